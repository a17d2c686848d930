"""Prefill energy against the prompt length S, for the prefill oracles and Top-K.

For every prompt length the command runs WIDE-Prefill-v0 episodes with the
fast prefill oracle, the exact one (up to ``--exact-max-tokens``), the
decoding oracle applied token by token, and Top-K, all on the same episode
seeds. It reports energy per prompt token, the share of tokens over their
accuracy budget and the share of steps with a node out of time, then writes a
CSV and a PNG plot. Example::

    python -m eval.prefill_sweep --tokens 1 2 4 8 16 32 --out results/prefill-sweep
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from agents.prefill_oracle import PrefillOraclePolicy, PrefillTopKPolicy
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.prefill import WidePrefillEnv

logger = logging.getLogger(__name__)


@dataclass
class SweepPoint:
    """One policy at one prompt length, totalled over the episodes."""

    policy: str
    prompt_tokens: int
    prefill_budget_s: float
    episodes: int
    energy_mj_per_token: float
    tokens_violating_rate: float
    latency_violation_rate: float


def run_policy(env: WidePrefillEnv, policy, episodes: int, seed: int) -> SweepPoint:
    energy = 0.0
    violating = latency = steps = 0
    for episode in range(episodes):
        observation, info = env.reset(seed=seed + episode)
        truncated = False
        while not truncated:
            observation, _, _, truncated, info = env.step(policy.decide(observation, info))
            energy += info["energy_j"]
            violating += info["tokens_violating"]
            latency += int(info["latency_violation"])
            steps += 1
    tokens = episodes * env.num_tokens
    return SweepPoint(policy=policy.name, prompt_tokens=env.num_tokens,
                      prefill_budget_s=env.scenario.prefill_budget_s, episodes=episodes,
                      energy_mj_per_token=1e3 * energy / tokens,
                      tokens_violating_rate=violating / (steps * env.num_tokens),
                      latency_violation_rate=latency / steps)


def run_sweep(base: ScenarioConfig, prompt_lengths: Sequence[int], episodes: int = 2, seed: int = 0,
              exact_max_tokens: int = 8) -> list[SweepPoint]:
    """Run every policy at every prompt length; the exact oracle only up to ``exact_max_tokens`` tokens."""
    if episodes < 1:
        raise ValueError(f"invalid episodes: expected a positive integer, got {episodes!r}")
    rows = []
    for tokens in prompt_lengths:
        env = WidePrefillEnv(base.replace(prompt_tokens=int(tokens)))
        policies = [PrefillOraclePolicy(env, "fast"), PrefillOraclePolicy(env, "token-by-token"),
                    PrefillTopKPolicy(env)]
        if tokens <= exact_max_tokens:
            policies.insert(0, PrefillOraclePolicy(env, "exact"))
        for policy in policies:
            rows.append(run_policy(env, policy, episodes, seed))
            logger.info("S=%d %s: %.4f mJ/token", tokens, policy.name, rows[-1].energy_mj_per_token)
    return rows


def plot_sweep(rows: Sequence[SweepPoint], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (energy_axis, violation_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(row.policy for row in rows):
        points = sorted((row for row in rows if row.policy == policy), key=lambda row: row.prompt_tokens)
        lengths = [row.prompt_tokens for row in points]
        energy_axis.plot(lengths, [row.energy_mj_per_token for row in points], marker="o", label=policy)
        violation_axis.plot(lengths, [100 * row.tokens_violating_rate for row in points], marker="o", label=policy)
    for axis in (energy_axis, violation_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens S")
        axis.grid(True, alpha=0.3)
        axis.legend()
    energy_axis.set_ylabel("energy per prompt token (mJ, all layers)")
    energy_axis.set_title("prefill energy against prompt length")
    violation_axis.set_ylabel("tokens over their accuracy budget (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.prefill_sweep",
        description="Prefill energy per prompt token against the prompt length for the prefill oracles and Top-K. "
                    "Writes prefill_sweep.csv and prefill_sweep.png.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], metavar="S",
                        help="prompt lengths (default 1 2 4 8 16 32)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes (prompts) per length (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default 0)")
    parser.add_argument("--exact-max-tokens", type=int, default=8,
                        help="run the exact MILP oracle up to this prompt length (default 8)")
    parser.add_argument("--scenario", metavar="YAML", help="scenario YAML file (default: the built-in scenario)")
    parser.add_argument("--scenario-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one scenario field, e.g. prefill_latency_budget_s=0.01; repeatable")
    parser.add_argument("--out", type=Path, default=Path("results/prefill-sweep"),
                        help="output directory (default results/prefill-sweep)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from eval.average_budget_study import parse_assignments

        base = resolve_scenario(args.scenario, **parse_assignments(args.scenario_set))
        rows = run_sweep(base, args.tokens, args.episodes, args.seed, args.exact_max_tokens)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    header = f"{'S':>4} {'policy':<24} {'mJ/token':>9} {'tokens over eps':>15} {'latency viol.':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.prompt_tokens:4d} {row.policy:<24} {row.energy_mj_per_token:9.4f} "
              f"{row.tokens_violating_rate:15.2%} {row.latency_violation_rate:13.2%}")
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "prefill_sweep.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    plot_path = plot_sweep(rows, args.out / "prefill_sweep.png")
    print(f"wrote {args.out / 'prefill_sweep.csv'} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
