"""Cost of imperfect CSI: the genie oracle against the oracle on delayed, noisy CSI.

For every pair of a Doppler frequency and a CSI delay, the study runs episodes
in which the oracle decides on the observed CSI (``csi="observed"``) while the
environment charges energy on the true channel. At every step it also solves
the same step with the true CSI (the genie bound) and charges that decision
on the same true state, so both see identical channels and gates. The
environment schedules the links of a decision on the true channel, so the
CSI error acts through the choice of experts and nodes. A node that looked
reachable may fail, which is charged ``P_max,source * T`` and loses its
experts, or it may cost more than expected.

Two gaps are reported. The cost gap compares the environment's per-step cost,
``E / E_ref`` plus the accuracy and latency penalties (the negative reward),
and is the one that grows with the delay and the Doppler frequency. The energy
gap compares joules alone, which can be negative because a failed node is
charged less than a completed round trip would cost. The study writes a CSV
and a PNG plot. Example::

    python -m eval.csi_study --out results/csi
    python -m eval.csi_study --env prefill --dopplers 10 50 --delays 0 1 4 --out results/csi-prefill
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from wide_env.channel import doppler_correlation
from wide_env.config import ScenarioConfig, resolve_scenario

logger = logging.getLogger(__name__)

DEFAULT_DOPPLERS_HZ = (10.0, 25.0, 50.0, 100.0)
DEFAULT_DELAYS = (0, 1, 2, 4, 8)


@dataclass
class CsiPoint:
    """Results of one (Doppler, delay) point, energies in mJ per prompt or generated token."""

    env: str
    doppler_hz: float
    csi_delay_steps: int
    csi_error_std: float
    csi_correlation: float
    episodes: int
    steps: int
    genie_cost_per_step: float
    observed_cost_per_step: float
    cost_gap_percent: float
    genie_energy_mj_per_token: float
    observed_energy_mj_per_token: float
    energy_gap_percent: float
    observed_latency_violation_rate: float
    observed_accuracy_violation_rate: float
    genie_accuracy_violation_rate: float
    topk_energy_mj_per_token: float


def _solver(env_name: str, env):
    """Return the oracle's ``solve`` for the env: the exact decoding oracle or the fast prefill oracle."""
    if env_name == "decode":
        from agents.oracle import SiftMoEOracle

        oracle = SiftMoEOracle(env.cost_model)
        return oracle.solve
    from agents.prefill_oracle import FastPrefillOracle

    return FastPrefillOracle(env.cost_model).solve


def _make_env(env_name: str, scenario: ScenarioConfig):
    if env_name == "decode":
        from wide_env.env import WideDecodeEnv

        return WideDecodeEnv(scenario)
    from wide_env.prefill import WidePrefillEnv

    return WidePrefillEnv(scenario)


def step_cost(env, cost) -> float:
    """Return the environment's per-step cost of a decision, ``E / E_ref`` plus its per-step penalties."""
    scenario = env.scenario
    value = cost.energy_j / env.reference_energy_j
    if not cost.latency_ok:
        value += scenario.latency_violation_penalty
    violating = getattr(cost, "tokens_violating", None)
    if violating is not None:  # prefill: the penalty scales with the share of tokens over budget
        value += scenario.accuracy_violation_penalty * violating / env.num_tokens
    elif not cost.accuracy_ok:
        value += scenario.accuracy_violation_penalty
    return value


def run_point(scenario: ScenarioConfig, env_name: str, episodes: int, seed: int) -> CsiPoint:
    """Run ``episodes`` episodes of the observed-CSI oracle and evaluate the genie on the same states."""
    env = _make_env(env_name, scenario)
    solve = _solver(env_name, env)
    tokens_per_episode = scenario.tokens_per_episode if env_name == "decode" else scenario.prompt_tokens
    genie_energy = observed_energy = topk_energy = genie_cost = observed_cost = 0.0
    latency_violations = accuracy_violations = genie_violations = steps = 0
    for episode in range(episodes):
        _, info = env.reset(seed=seed + episode)
        truncated = False
        while not truncated:
            true_state = info["privileged"]["state"]
            observed_state = info["privileged"]["observed_state"]
            genie = env.cost_model.evaluate(true_state, solve(true_state).x)
            decision = solve(observed_state).x
            _, reward, _, truncated, info = env.step(np.asarray(decision, dtype=np.int8).reshape(-1))

            genie_cost += step_cost(env, genie)
            observed_cost -= reward
            genie_energy += genie.energy_j
            observed_energy += info["energy_j"]
            topk_energy += info["topk_energy_j"]
            latency_violations += int(info["latency_violation"])
            accuracy_violations += int(info["accuracy_violation"])
            genie_violations += int(not genie.accuracy_ok)
            steps += 1

    tokens = episodes * tokens_per_episode
    energy_gap = 100.0 * (observed_energy - genie_energy) / genie_energy if genie_energy > 0 else math.nan
    cost_gap = 100.0 * (observed_cost - genie_cost) / genie_cost if genie_cost > 0 else math.nan
    step_s = scenario.fading_step_s if env_name == "decode" or scenario.step_duration_s is not None \
        else min(scenario.prefill_budget_s, 10.0)
    rho = doppler_correlation(scenario.doppler_hz, step_s)
    return CsiPoint(
        env=env_name, doppler_hz=scenario.doppler_hz, csi_delay_steps=scenario.csi_delay_steps,
        csi_error_std=scenario.csi_error_std, csi_correlation=rho**scenario.csi_delay_steps,
        episodes=episodes, steps=steps,
        genie_cost_per_step=genie_cost / steps, observed_cost_per_step=observed_cost / steps,
        cost_gap_percent=cost_gap,
        genie_energy_mj_per_token=1e3 * genie_energy / tokens,
        observed_energy_mj_per_token=1e3 * observed_energy / tokens, energy_gap_percent=energy_gap,
        observed_latency_violation_rate=latency_violations / steps,
        observed_accuracy_violation_rate=accuracy_violations / steps,
        genie_accuracy_violation_rate=genie_violations / steps,
        topk_energy_mj_per_token=1e3 * topk_energy / tokens,
    )


def run_csi_study(base: ScenarioConfig, dopplers_hz: Sequence[float] = DEFAULT_DOPPLERS_HZ,
                  delays: Sequence[int] = DEFAULT_DELAYS, env_name: str = "decode", episodes: int = 3,
                  seed: int = 0) -> list[CsiPoint]:
    """Run every (Doppler, delay) point on the same episode seeds; returns one row per point."""
    if env_name not in ("decode", "prefill"):
        raise ValueError(f"invalid env: expected 'decode' or 'prefill', got {env_name!r}")
    if episodes < 1:
        raise ValueError(f"invalid episodes: expected a positive integer, got {episodes!r}")
    if base.accuracy_budget_mode != "per_step":
        raise ValueError("the CSI study compares per-step oracles; set accuracy_budget_mode='per_step'")
    rows = []
    for doppler in dopplers_hz:
        for delay in delays:
            scenario = base.replace(doppler_hz=float(doppler), csi_delay_steps=int(delay))
            point = run_point(scenario, env_name, episodes, seed)
            logger.info("f_D %6.1f Hz, delay %2d: cost gap %+.2f %%, energy gap %+.2f %%, latency violations "
                        "%.1f %%", doppler, delay, point.cost_gap_percent, point.energy_gap_percent,
                        100 * point.observed_latency_violation_rate)
            rows.append(point)
    return rows


def write_csv(rows: Sequence[CsiPoint], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return path


def plot_csi_study(rows: Sequence[CsiPoint], path: Path) -> Path:
    """Plot the cost gap, the energy gap and the latency violation rate against the CSI delay, one line per Doppler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cost_axis, energy_axis, violation_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    for doppler in sorted({row.doppler_hz for row in rows}):
        points = sorted((row for row in rows if row.doppler_hz == doppler), key=lambda row: row.csi_delay_steps)
        delays = [row.csi_delay_steps for row in points]
        label = f"$f_D$ = {doppler:g} Hz"
        cost_axis.plot(delays, [row.cost_gap_percent for row in points], marker="o", label=label)
        energy_axis.plot(delays, [row.energy_gap_percent for row in points], marker="o", label=label)
        violation_axis.plot(delays, [100 * row.observed_latency_violation_rate for row in points], marker="o",
                            label=label)
    env_name = rows[0].env
    cost_axis.set_ylabel("cost (E/E_ref + penalties) over genie (%)")
    cost_axis.set_title(f"{env_name}: oracle on delayed CSI vs genie")
    energy_axis.set_ylabel("energy over genie (%)")
    energy_axis.set_title("energy alone (failed nodes charged P_max T)")
    violation_axis.set_ylabel("steps with a node out of time (%)")
    violation_axis.set_title("latency violations on delayed CSI")
    for axis in (cost_axis, energy_axis, violation_axis):
        axis.set_xlabel("CSI delay (steps)")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def format_table(rows: Sequence[CsiPoint]) -> str:
    header = (f"{'f_D (Hz)':>8} {'delay':>5} {'corr':>6} {'genie cost':>10} {'observed':>9} {'cost gap %':>10} "
              f"{'genie mJ/tok':>12} {'observed':>9} {'energy gap %':>12} {'lat. viol.':>10} {'acc. viol.':>10} "
              f"{'genie acc.':>10}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.doppler_hz:8g} {row.csi_delay_steps:5d} {row.csi_correlation:6.3f} "
                     f"{row.genie_cost_per_step:10.4f} {row.observed_cost_per_step:9.4f} {row.cost_gap_percent:10.2f} "
                     f"{row.genie_energy_mj_per_token:12.4f} {row.observed_energy_mj_per_token:9.4f} "
                     f"{row.energy_gap_percent:12.2f} {row.observed_latency_violation_rate:10.2%} "
                     f"{row.observed_accuracy_violation_rate:10.2%} {row.genie_accuracy_violation_rate:10.2%}")
    lines.append("cost = E/E_ref + accuracy and latency penalties per step (the negative reward); corr = rho^delay")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.csi_study",
        description="Energy gap between the genie oracle (true CSI) and the oracle on delayed CSI, over a grid "
                    "of Doppler frequencies and CSI delays. Writes csi_study.csv and csi_study.png.")
    parser.add_argument("--env", choices=("decode", "prefill"), default="decode",
                        help="WIDE-Decode-v0 with the exact oracle, or WIDE-Prefill-v0 with the fast prefill "
                             "oracle (default decode)")
    parser.add_argument("--dopplers", type=float, nargs="+", default=list(DEFAULT_DOPPLERS_HZ), metavar="HZ",
                        help="Doppler frequencies in Hz (default 10 25 50 100)")
    parser.add_argument("--delays", type=int, nargs="+", default=list(DEFAULT_DELAYS), metavar="STEPS",
                        help="CSI delays in decision steps (default 0 1 2 4 8)")
    parser.add_argument("--episodes", type=int, default=3, help="episodes per point (default 3)")
    parser.add_argument("--tokens", type=int, default=4,
                        help="decode: tokens_per_episode; prefill: prompt_tokens (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode at every point (default 0)")
    parser.add_argument("--scenario", metavar="YAML", help="scenario YAML file (default: the built-in scenario)")
    parser.add_argument("--scenario-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one scenario field, e.g. csi_error_std=0.1; repeatable")
    parser.add_argument("--out", type=Path, default=Path("results/csi"),
                        help="output directory (default results/csi)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from eval.average_budget_study import parse_assignments

        overrides = parse_assignments(args.scenario_set)
        overrides["tokens_per_episode" if args.env == "decode" else "prompt_tokens"] = args.tokens
        scenario = resolve_scenario(args.scenario, **overrides)
        rows = run_csi_study(scenario, args.dopplers, args.delays, args.env, args.episodes, args.seed)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, args.out / "csi_study.csv")
    png_path = plot_csi_study(rows, args.out / "csi_study.png")
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
