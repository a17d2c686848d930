"""Average accuracy budget: learned agents against the per-step oracle and the Lagrangian baseline.

With ``accuracy_budget_mode="average"`` the budget is ``(1/T) sum_t delta_t <=
eps_avg`` over an episode. The study runs, on the same test episodes:

- ``oracle``: the per-step SiftMoE oracle with ``delta_t <= eps_avg`` at every step
  (feasible for the average budget, but it cannot move accuracy between steps),
- ``lagrangian``: per-step ``min E/E_ref + mu * delta`` with ``mu`` tuned by
  bisection on separate training episodes (:func:`agents.lagrangian.tune_price`),
- ``lagrangian-adaptive``: the same with the price following the episode's
  spending (``--feedback``), aiming at ``(1 - margin) * eps_avg`` (``--margin``),
- ``topk``: conventional Top-K routing,
- every saved agent given with ``--model``,

and reports energy per token, the episode mean ``delta`` against ``eps_avg``,
the share of episodes that meet the budget, and the episode return. Example::

    python -m train --algo ppo --scenario-set accuracy_budget_mode=average --out runs/ppo-average
    python -m eval.average_budget_study --model runs/ppo-average/model.zip --out results/average-budget
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from agents import make_policy
from agents.base import Policy
from agents.lagrangian import LagrangianPolicy, PriceTuning, tune_price
from agents.oracle import SiftMoEPolicy
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.env import WideDecodeEnv

logger = logging.getLogger(__name__)

# Slack on the episode budget when counting compliant episodes, as in the cost model's accuracy check.
BUDGET_SLACK = 1e-9


@dataclass
class EpisodeResult:
    """Totals of one policy over one episode."""

    policy: str
    episode: int
    seed: int
    energy_per_token_mj: float
    mean_degradation: float
    meets_budget: bool
    episode_return: float
    latency_violation_rate: float


@dataclass
class PolicySummary:
    """Means over the test episodes, with the half-width of the 95 % t interval of the energy."""

    policy: str
    episodes: int
    energy_per_token_mj: float
    energy_half_width_mj: float
    mean_degradation: float
    max_episode_degradation: float
    budget_compliance: float
    episode_return: float
    latency_violation_rate: float


def run_episode(env: WideDecodeEnv, policy: Policy, seed: int, episode: int) -> EpisodeResult:
    """Run one episode of ``policy`` from ``env.reset(seed=seed)`` and total it."""
    policy.reset(seed)
    observation, info = env.reset(seed=seed)
    energy = total_return = degradation = 0.0
    steps = latency_violations = 0
    truncated = False
    while not truncated:
        observation, reward, _, truncated, info = env.step(policy.decide(observation, info))
        energy += info["energy_j"]
        degradation += info["degradation"]
        latency_violations += int(info["latency_violation"])
        total_return += reward
        steps += 1
    mean_degradation = degradation / steps
    return EpisodeResult(
        policy=policy.name, episode=episode, seed=seed,
        energy_per_token_mj=1e3 * energy / env.scenario.tokens_per_episode,
        mean_degradation=mean_degradation,
        meets_budget=mean_degradation <= env.scenario.accuracy_budget + BUDGET_SLACK,
        episode_return=total_return,
        latency_violation_rate=latency_violations / steps,
    )


def summarise(policy: str, results: Sequence[EpisodeResult]) -> PolicySummary:
    energy = np.array([r.energy_per_token_mj for r in results])
    half_width = math.nan
    if len(energy) > 1:
        half_width = float(stats.t.ppf(0.975, len(energy) - 1) * energy.std(ddof=1) / math.sqrt(len(energy)))
    return PolicySummary(
        policy=policy, episodes=len(results), energy_per_token_mj=float(energy.mean()),
        energy_half_width_mj=half_width,
        mean_degradation=float(np.mean([r.mean_degradation for r in results])),
        max_episode_degradation=float(np.max([r.mean_degradation for r in results])),
        budget_compliance=float(np.mean([r.meets_budget for r in results])),
        episode_return=float(np.mean([r.episode_return for r in results])),
        latency_violation_rate=float(np.mean([r.latency_violation_rate for r in results])),
    )


def build_policies(env: WideDecodeEnv, fixed: PriceTuning, adaptive: PriceTuning, feedback: float, margin: float,
                   models: Sequence[str], csi: str) -> list[Policy]:
    per_step = SiftMoEPolicy(env, csi=csi)
    per_step.name = "oracle" if csi == "true" else "oracle-observed"
    policies: list[Policy] = [per_step, LagrangianPolicy(env, fixed.price, csi=csi),
                              LagrangianPolicy(env, adaptive.price, csi=csi, feedback=feedback, margin=margin),
                              make_policy("topk", env)]
    for spec in models:
        policy = make_policy(spec, env)
        policy.name = spec
        policies.append(policy)
    return policies


def run_study(scenario: ScenarioConfig, models: Sequence[str] = (), episodes: int = 10, seed: int = 1000,
              train_episodes: int = 4, train_seed: int = 0, csi: str = "true", feedback: float = 20.0,
              margin: float = 0.1):
    """Tune the Lagrangian prices, then run every policy on the same test episodes.

    Returns ``(tunings, summaries, episode_results)`` with the fixed-price and
    the adaptive tuning under ``"lagrangian"`` and ``"lagrangian-adaptive"``. The training seeds
    ``train_seed .. train_seed + train_episodes - 1`` must not overlap the test
    seeds ``seed .. seed + episodes - 1``.
    """
    if scenario.accuracy_budget_mode != "average":
        scenario = scenario.replace(accuracy_budget_mode="average")
    train_seeds = set(range(train_seed, train_seed + train_episodes))
    if train_seeds & set(range(seed, seed + episodes)):
        raise ValueError(f"training seeds {train_seed}..{train_seed + train_episodes - 1} overlap the test seeds "
                         f"{seed}..{seed + episodes - 1}; choose disjoint ranges")
    tunings = {
        "lagrangian": tune_price(scenario, episodes=train_episodes, seed=train_seed, csi=csi),
        "lagrangian-adaptive": tune_price(scenario, episodes=train_episodes, seed=train_seed, csi=csi,
                                          feedback=feedback, margin=margin),
    }
    for name, tuning in tunings.items():
        logger.info("%s: tuned price mu=%.4g, mean delta %.4f on %d training steps (budget %.4f, feasible=%s)",
                    name, tuning.price, tuning.mean_degradation, tuning.steps, tuning.budget, tuning.feasible)

    env = WideDecodeEnv(scenario)
    results: list[EpisodeResult] = []
    summaries: list[PolicySummary] = []
    policies = build_policies(env, tunings["lagrangian"], tunings["lagrangian-adaptive"], feedback, margin, models,
                              csi)
    for policy in policies:
        runs = [run_episode(env, policy, seed + i, i) for i in range(episodes)]
        results.extend(runs)
        summaries.append(summarise(policy.name, runs))
        logger.info("%s: %.4f mJ/token, mean delta %.4f", policy.name, summaries[-1].energy_per_token_mj,
                    summaries[-1].mean_degradation)
    return tunings, summaries, results


def format_table(summaries: Sequence[PolicySummary], budget: float) -> str:
    header = (f"{'policy':<40} {'mJ/token':>16} {'mean delta':>11} {'max ep. delta':>13} "
              f"{'meets eps_avg':>13} {'return':>10} {'latency viol.':>13}")
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(f"{s.policy[-40:]:<40} {s.energy_per_token_mj:9.4f} ± {s.energy_half_width_mj:<5.3f} "
                     f"{s.mean_degradation:11.4f} {s.max_episode_degradation:13.4f} {s.budget_compliance:13.0%} "
                     f"{s.episode_return:10.1f} {s.latency_violation_rate:13.2%}")
    lines.append(f"eps_avg = {budget:g}; ± is the half-width of the 95 % t interval over episodes")
    return "\n".join(lines)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs with YAML-typed values (numbers, booleans, lists)."""
    import yaml

    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid assignment {item!r}: expected KEY=VALUE, e.g. distance_max_m=100")
        values[key] = yaml.safe_load(text)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.average_budget_study",
        description="Compare saved agents with the per-step oracle and the Lagrangian baseline "
                    "under an average accuracy budget on WIDE-Decode-v0.")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="saved SB3 model (.zip or run directory), optionally 'algo:PATH'; repeatable")
    parser.add_argument("--scenario", metavar="YAML", help="scenario YAML file (default: the built-in scenario)")
    parser.add_argument("--scenario-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one scenario field; accuracy_budget_mode is always 'average'")
    parser.add_argument("--episodes", type=int, default=10, help="test episodes per policy (default 10)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first test episode (default 1000)")
    parser.add_argument("--train-episodes", type=int, default=4,
                        help="episodes the Lagrangian price is tuned on (default 4)")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="seed of the first training episode (default 0)")
    parser.add_argument("--csi", choices=("true", "observed"), default="true",
                        help="CSI the oracle and the Lagrangian baseline decide on (default true)")
    parser.add_argument("--feedback", type=float, default=20.0,
                        help="price feedback of the adaptive Lagrangian baseline: overspending 1/FEEDBACK of the "
                             "episode budget multiplies the price by e (default 20)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="fraction of eps_avg the adaptive Lagrangian baseline keeps in reserve (default 0.1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for summary.json and episodes.csv (default: print only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_assignments(args.scenario_set)
        overrides["accuracy_budget_mode"] = "average"
        scenario = resolve_scenario(args.scenario, **overrides)
        tunings, summaries, results = run_study(scenario, args.model, args.episodes, args.seed,
                                                args.train_episodes, args.train_seed, args.csi, args.feedback,
                                                args.margin)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    for name, tuning in tunings.items():
        print(f"{name}: price mu = {tuning.price:.4g} (mean delta {tuning.mean_degradation:.4f} on "
              f"{tuning.steps} training steps; least reachable {tuning.floor_degradation:.4f})")
    print(format_table(summaries, scenario.accuracy_budget))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {"scenario": scenario.to_dict(),
                   "tuning": {name: asdict(tuning) for name, tuning in tunings.items()},
                   "policies": [asdict(s) for s in summaries]}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        with (args.out / "episodes.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in results)
        print(f"wrote {args.out / 'summary.json'} and {args.out / 'episodes.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
