"""Gap of the fast prefill oracle to the exact one over random prefill steps.

Each instance is one WIDE-Prefill-v0 step drawn as the environment draws it:
node distances, shadowing and fading from a fresh channel, the prompt's gates
from the gate source at a random MoE layer. For each prompt length and
prefill-budget scale the command solves every instance with the exact MILP
and the fast best-response oracle. It prints the mean and max relative energy
gap over the instances where every token's budget can be met, how often the
fast one leaves more excess on the others, and the solve times.

With ``--exhaustive-check N`` it first checks the exact oracle against
exhaustive search over all ``2^(S*E)`` decisions on ``N`` random small
instances (``S*E <= 16``) per access scheme. Example::

    python -m eval.prefill_gap --instances 50 --tokens 4 8 16 --exhaustive-check 300
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agents.prefill_oracle import ExactPrefillOracle, FastPrefillOracle, exhaustive_prefill_search
from wide_env.channel import ChannelModel
from wide_env.config import MoEArchitecture, ScenarioConfig, resolve_scenario
from wide_env.prefill_cost import PrefillCostModel, PrefillState
from wide_env.profile import MoEProfile, build_gate_source, build_profile, softmax, synthetic_cost_tables

logger = logging.getLogger(__name__)


@dataclass
class GapRow:
    """Fast-versus-exact comparison over the instances of one prompt length and budget."""

    prompt_tokens: int
    prefill_budget_s: float
    access: str
    instances: int
    feasible_instances: int
    mean_gap_percent: float
    max_gap_percent: float
    zero_gap_share: float
    worse_excess_instances: int
    exact_time_s: float
    fast_time_s: float


def random_small_instance(rng: np.random.Generator, access: str = "fdma") -> tuple[PrefillCostModel, PrefillState]:
    """A random prefill cost model and state with ``S*E <= 16``, small enough for exhaustive search.

    The instance draws S, E, K, the number of nodes, a placement (sometimes with
    local experts), synthetic cost tables, the accuracy budget (zero one time
    in five), a prefill budget from 0.5 to 4 ms per token, gains from -125 to
    -85 dB and gates.
    """
    num_tokens = int(rng.integers(1, 5))
    num_experts = int(rng.integers(2, min(16 // num_tokens, 8) + 1))
    top_k = int(rng.integers(1, min(num_experts, 3) + 1))
    num_nodes = int(rng.integers(1, min(num_experts, 4) + 1))
    epsilon = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.0, 0.8))
    budget = float(rng.uniform(0.5e-3, 4e-3)) * num_tokens
    scenario = ScenarioConfig(num_nodes=num_nodes, access=access, accuracy_budget=epsilon, prompt_tokens=num_tokens,
                              prefill_latency_budget_s=budget, gate_source="synthetic")
    architecture = MoEArchitecture("random", 2, 4096, int(rng.choice([1024, 14336])), num_experts, top_k,
                                   bool(rng.random() < 0.5))
    skip, replace, clusters = synthetic_cost_tables(architecture, int(rng.integers(1, 4)), rng)
    nodes = rng.integers(0 if rng.random() < 0.3 else 1, num_nodes + 1, size=num_experts)
    profile = MoEProfile(architecture, nodes.astype(np.int64), skip, replace, clusters)
    cost_model = PrefillCostModel(scenario, profile)
    gains = 10.0 ** (rng.uniform(-125.0, -85.0, size=num_nodes) / 10.0)
    gates = softmax(rng.normal(0.0, 1.5, size=(num_tokens, num_experts)))
    return cost_model, cost_model.make_state(int(rng.integers(0, 2)), gates, gains)


def check_exact_against_exhaustive(instances: int, access: str, seed: int) -> dict[str, int]:
    """Count the random small instances where the exact oracle matches exhaustive search.

    A match has the same status, the same total excess (within 1e-7) and the
    same energy (within a relative 1e-7).
    """
    rng = np.random.default_rng(seed)
    counts = {"instances": 0, "agree": 0, "optimal": 0, "infeasible": 0}
    for _ in range(instances):
        cost_model, state = random_small_instance(rng, access)
        exact = ExactPrefillOracle(cost_model).solve(state)
        reference = exhaustive_prefill_search(cost_model, state)
        counts["instances"] += 1
        counts[reference.status] += 1
        same = (exact.status == reference.status and abs(exact.excess - reference.excess) <= 1e-7
                and abs(exact.energy_j - reference.energy_j) <= 1e-7 * abs(reference.energy_j) + 1e-15)
        counts["agree"] += int(same)
    return counts


def draw_states(scenario: ScenarioConfig, count: int, seed: int) -> tuple[PrefillCostModel, list[PrefillState]]:
    """``count`` prefill states of the scenario, each from a fresh channel and prompt."""
    profile = build_profile(scenario)
    cost_model = PrefillCostModel(scenario, profile)
    channel, gates = ChannelModel(scenario), build_gate_source(scenario)
    rng = np.random.default_rng(seed)
    states = []
    for _ in range(count):
        channel.reset(np.random.default_rng(rng.integers(2**62)))
        gates.reset(np.random.default_rng(rng.integers(2**62)))
        layer = int(rng.integers(profile.num_layers))
        logits = np.stack([gates.next_token()[layer] for _ in range(scenario.prompt_tokens)])
        states.append(cost_model.make_state(layer, softmax(logits), channel.true_gains))
    return cost_model, states


def measure_gap(scenario: ScenarioConfig, instances: int, seed: int) -> GapRow:
    """Solve ``instances`` random states of ``scenario`` with both oracles and compare them."""
    cost_model, states = draw_states(scenario, instances, seed)
    exact_oracle, fast_oracle = ExactPrefillOracle(cost_model), FastPrefillOracle(cost_model)
    gaps, worse_excess = [], 0
    exact_time = fast_time = 0.0
    for state in states:
        start = time.perf_counter()
        exact = exact_oracle.solve(state)
        exact_time += time.perf_counter() - start
        start = time.perf_counter()
        fast = fast_oracle.solve(state)
        fast_time += time.perf_counter() - start
        if fast.excess > exact.excess + 1e-7:
            worse_excess += 1
        elif exact.status == "optimal" and exact.energy_j > 0:
            gaps.append(100.0 * (fast.energy_j / exact.energy_j - 1.0))
    gaps_array = np.array(gaps) if gaps else np.array([np.nan])
    return GapRow(
        prompt_tokens=scenario.prompt_tokens, prefill_budget_s=scenario.prefill_budget_s, access=scenario.access,
        instances=instances, feasible_instances=len(gaps), mean_gap_percent=float(np.mean(gaps_array)),
        max_gap_percent=float(np.max(gaps_array)), zero_gap_share=float(np.mean(gaps_array < 1e-7)),
        worse_excess_instances=worse_excess, exact_time_s=exact_time / instances, fast_time_s=fast_time / instances,
    )


def format_table(rows: Sequence[GapRow]) -> str:
    header = (f"{'S':>4} {'T_p (ms)':>8} {'access':>6} {'inst.':>5} {'feas.':>5} {'mean gap %':>10} "
              f"{'max gap %':>9} {'gap = 0':>7} {'more excess':>11} {'exact s':>8} {'fast s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.prompt_tokens:4d} {1e3 * r.prefill_budget_s:8.2f} {r.access:>6} {r.instances:5d} "
                     f"{r.feasible_instances:5d} {r.mean_gap_percent:10.4f} {r.max_gap_percent:9.4f} "
                     f"{r.zero_gap_share:7.0%} {r.worse_excess_instances:11d} {r.exact_time_s:8.3f} "
                     f"{r.fast_time_s:7.3f}")
    lines.append("gap = fast energy over exact energy - 1, on instances where every token's budget can be met; "
                 "'more excess' counts the others where the fast oracle leaves more total excess")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.prefill_gap",
        description="Measure the fast prefill oracle's energy gap to the exact MILP oracle on random prefill steps.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 8, 16], metavar="S",
                        help="prompt lengths (default 4 8 16)")
    parser.add_argument("--budget-scales", type=float, nargs="+", default=[1.0, 0.5], metavar="SCALE",
                        help="prefill budget as a multiple of prompt_tokens * latency_budget_s (default 1 0.5; "
                             "0.5 makes nodes run out of time and couples the tokens more)")
    parser.add_argument("--instances", type=int, default=50, help="random steps per setting (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instance generator (default 0)")
    parser.add_argument("--scenario", metavar="YAML", help="scenario YAML file (default: the built-in scenario)")
    parser.add_argument("--scenario-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one scenario field, e.g. access=tdma; repeatable")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV file")
    parser.add_argument("--exhaustive-check", type=int, default=0, metavar="N",
                        help="first compare the exact oracle with exhaustive search on N random instances with "
                             "S*E <= 16, for FDMA and for TDMA (default 0: skip)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from eval.average_budget_study import parse_assignments

        if args.instances < 1:
            raise ValueError(f"invalid --instances: expected a positive integer, got {args.instances}")
        base = resolve_scenario(args.scenario, **parse_assignments(args.scenario_set))
        for access in ("fdma", "tdma") if args.exhaustive_check > 0 else ():
            counts = check_exact_against_exhaustive(args.exhaustive_check, access, args.seed)
            print(f"exact = exhaustive ({access}): {counts['agree']}/{counts['instances']} instances "
                  f"({counts['optimal']} feasible, {counts['infeasible']} infeasible)", flush=True)
        rows = []
        for tokens in args.tokens:
            for scale in args.budget_scales:
                scenario = base.replace(prompt_tokens=tokens,
                                        prefill_latency_budget_s=scale * tokens * base.latency_budget_s)
                rows.append(measure_gap(scenario, args.instances, args.seed))
                logger.info("S=%d, budget scale %g: mean gap %.4f %%", tokens, scale, rows[-1].mean_gap_percent)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    all_gaps = [r.mean_gap_percent * r.feasible_instances for r in rows if r.feasible_instances]
    feasible = sum(r.feasible_instances for r in rows)
    if feasible:
        print(f"overall: mean gap {sum(all_gaps) / feasible:.4f} % over {feasible} feasible instances, "
              f"max {max(r.max_gap_percent for r in rows if r.feasible_instances):.4f} %")
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
