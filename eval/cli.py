"""``wide-eval``: compare policies on the same WIDE-Decode-v0 episodes, print a table, save CSV, JSON and plots.

Example::

    wide-eval --policies oracle topk greedy random runs/ppo-0/model.zip --episodes 20 --out results/
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from agents import POLICY_NAMES
from eval.attainability import AttainabilityHook
from eval.metrics import PolicySummary
from eval.runner import (
    EvaluationResult,
    SweepResult,
    build_policies,
    check_policy_specs,
    evaluate_built_policies,
    prepare_scenario,
    run_sweep,
)

logger = logging.getLogger("eval")

DEFAULT_POLICIES = ("oracle", "topk", "greedy", "random")
DEFAULT_SWEEP_POLICIES = ("oracle", "topk", "greedy")
# Budgets swept by default, in the scenario's SI units (latency_budget_s in seconds).
DEFAULT_SWEEP_POINTS = {
    "accuracy_budget": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3],
    "latency_budget_s": [1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3],
}


# -- argument parsing ---------------------------------------------------------


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML, reading number strings such as ``2e-3`` as floats.

    YAML 1.1 (PyYAML) reads ``2e-3`` as a string because it has no decimal
    point, so such strings are converted here.
    """
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"invalid {option} {text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def parse_overrides(assignments: Iterable[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into scenario overrides."""
    return {key: parse_value(value)
            for key, value in (parse_assignment(text, "--scenario-set") for text in assignments)}


def parse_sweep_points(assignments: Iterable[str]) -> dict[str, list[Any]]:
    """Turn ``KEY=V1,V2,...`` strings into the values to sweep for each scenario field."""
    points: dict[str, list[Any]] = {}
    for text in assignments:
        key, values = parse_assignment(text, "--sweep-points")
        parsed = [parse_value(item) for item in values.split(",") if item.strip()]
        if not parsed:
            raise ValueError(f"invalid --sweep-points {text!r}: expected KEY=V1,V2,... with at least one value")
        points[key] = parsed
    return points


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def _format_sweep_points(points: dict[str, list[Any]]) -> str:
    return " ".join(f"{key}={','.join(f'{value:g}' for value in values)}" for key, values in points.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wide-eval",
        description="Evaluate expert-selection policies on the same WIDE-Decode-v0 episodes (common random "
                    "numbers): episode i of every policy starts from reset(seed=SEED+i). Prints a summary "
                    "table and writes summary.csv, episodes.csv, summary.json and PNG plots to --out.",
    )

    runs = parser.add_argument_group("policies and episodes")
    runs.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), metavar="POLICY",
                      help=f"policies to evaluate: {', '.join(POLICY_NAMES)}, or a saved SB3 model "
                           "(.zip, optionally prefixed with the algorithm, e.g. ppo:runs/ppo-0/model.zip) "
                           f"(default: {' '.join(DEFAULT_POLICIES)})")
    runs.add_argument("--episodes", type=_positive_int, default=20, help="episodes per policy (default: 20)")
    runs.add_argument("--seed", type=int, default=0,
                      help="seed of the first episode, so episode i uses SEED+i (default: 0)")

    scenario = parser.add_argument_group("scenario")
    scenario.add_argument("--scenario", metavar="YAML",
                          help="scenario YAML file. Keys it omits take the default scenario's values")
    scenario.add_argument("--scenario-set", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                          help="override scenario fields in SI units, e.g. accuracy_budget=0.1 access=tdma")
    scenario.add_argument("--tokens", type=_positive_int,
                          help="tokens per episode, overriding the scenario's tokens_per_episode to shorten runs")

    accuracy = parser.add_argument_group("measured accuracy (decisions applied inside the shipped small MoE model)")
    accuracy.add_argument("--measure-accuracy", action="store_true",
                          help="also run each policy's decisions inside the small MoE model that produced the "
                               "scenario's trace and report the perplexity increase over Top-K")
    accuracy.add_argument("--accuracy-tokens", type=_positive_int, default=1024,
                          help="held-out tokens for --measure-accuracy (default: 1024)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    output.add_argument("--no-plots", action="store_true", help="write no PNG plots and skip the budget sweeps")
    output.add_argument("--quiet", action="store_true", help="log no progress to stderr")

    sweeps = parser.add_argument_group("budget sweeps (plots of energy against a scenario field)")
    sweeps.add_argument("--no-sweep", action="store_true",
                        help="skip the budget sweeps but still plot the evaluated policies")
    sweeps.add_argument("--sweep-points", nargs="+", default=[], metavar="KEY=V1,V2,...", action="extend",
                        help="scenario fields to sweep and their values in SI units, replacing the default "
                             f"sweeps {_format_sweep_points(DEFAULT_SWEEP_POINTS)}")
    sweeps.add_argument("--sweep-policies", nargs="+", default=list(DEFAULT_SWEEP_POLICIES), metavar="POLICY",
                        help=f"policies in the sweeps (default: {' '.join(DEFAULT_SWEEP_POLICIES)})")
    sweeps.add_argument("--sweep-episodes", type=_positive_int, default=2,
                        help="episodes per sweep point (default: 2)")
    sweeps.add_argument("--sweep-tokens", type=_positive_int, default=4,
                        help="tokens per episode in the sweeps (default: 4)")
    return parser


# -- output -------------------------------------------------------------------


def _format_optional(value: float | None, template: str) -> str:
    return "-" if value is None or math.isnan(value) else template.format(value)


def _format_percent(interval) -> str:
    return "-" if interval is None or math.isnan(interval.mean) else f"{100 * interval.mean:.2f} %"


def format_summary_table(summaries: Sequence[PolicySummary],
                         perplexity_increase_pct: Mapping[str, float] | None = None) -> str:
    """Render the summaries as an aligned text table, one row per policy.

    ``perplexity_increase_pct`` maps policy names to their measured perplexity
    increase over Top-K in %; when given, it becomes the last column.
    """
    headers = ["policy", "energy/token (mJ)", "saving vs Top-K", "gap to oracle", "acc. viol.",
               "avoidable acc. viol.", "lat. viol.", "mean δ", "experts/step", "nodes/step", "decide (µs)"]
    if perplexity_increase_pct is not None:
        headers.append("ppl increase")
    rows = []
    for s in summaries:
        energy = s.energy_per_token_mj
        rows.append([
            s.policy,
            f"{energy.mean:.3f} ± {_format_optional(energy.half_width, '{:.3f}')}",
            f"{s.saving_vs_topk_pct:+.1f} %",
            _format_optional(s.gap_to_oracle_pct, "{:+.1f} %"),
            f"{100 * s.accuracy_violation_rate:.2f} %",
            _format_percent(s.extra.get("avoidable_accuracy_violation_rate")),
            f"{100 * s.latency_violation_rate:.2f} %",
            f"{s.mean_degradation:.4f}",
            f"{s.experts_per_step:.2f}",
            f"{s.nodes_per_step:.2f}",
            f"{s.decide_time_us:.1f}",
        ])
        if perplexity_increase_pct is not None:
            rows[-1].append(_format_optional(perplexity_increase_pct.get(s.policy), "{:+.2f} %"))
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    lines = [render(headers), "  ".join("-" * width for width in widths)]
    lines.extend(render(row) for row in rows)
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or infinity, so they become null. Numpy scalars become Python numbers.
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write records as CSV with the union of their keys as columns. Missing values, None and NaN are empty."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if _json_safe(value) is None else value for key, value in row.items()})
    return path


def write_results(result: EvaluationResult, sweeps: Sequence[SweepResult], out: Path,
                  command: Sequence[str]) -> list[Path]:
    """Write summary.csv, episodes.csv, summary.json and, with sweeps, sweep.csv into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_csv([s.as_row() for s in result.summaries], out / "summary.csv"),
        write_csv(result.episode_rows(), out / "episodes.csv"),
    ]
    document = {"command": list(command), **result.to_dict(),
                "sweeps": {sweep.parameter: sweep.rows() for sweep in sweeps}}
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(_json_safe(document), indent=2) + "\n", encoding="utf-8")
    written.append(json_path)
    if sweeps:
        written.append(write_csv([row for sweep in sweeps for row in sweep.rows()], out / "sweep.csv"))
    return written


# -- main ---------------------------------------------------------------------


def _resolve_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Validate the scenario, the sweep points and every policy spec, and report problems as usage errors."""
    try:
        overrides = parse_overrides(args.scenario_set)
        scenario = prepare_scenario(args.scenario, overrides, args.tokens)
    except FileNotFoundError as error:
        parser.error(str(error))
    except (ValueError, TypeError) as error:
        parser.error(f"invalid scenario: {error}")

    sweep_points: dict[str, list[Any]] = {}
    if not (args.no_plots or args.no_sweep):
        try:
            sweep_points = parse_sweep_points(args.sweep_points) or dict(DEFAULT_SWEEP_POINTS)
            for key, values in sweep_points.items():
                for value in values:
                    prepare_scenario(scenario, {key: value}, args.sweep_tokens)
            check_policy_specs(args.sweep_policies)
        except FileNotFoundError as error:
            parser.error(f"--sweep-policies: {error}")
        except (ValueError, TypeError) as error:
            parser.error(f"invalid sweep: {error}")

    try:
        built = build_policies(args.policies, scenario, args.seed)
    except FileNotFoundError as error:
        parser.error(str(error))
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    return scenario, sweep_points, built


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)

    scenario, sweep_points, built = _resolve_inputs(parser, args)
    started = time.perf_counter()
    logger.info("evaluating %s on %d episodes of %d steps (seed %d)", " ".join(args.policies), args.episodes,
                scenario.steps_per_episode, args.seed)
    result = evaluate_built_policies(built, scenario, args.episodes, args.seed, hooks=[AttainabilityHook()])
    accuracy_report = None
    perplexity = None
    if args.measure_accuracy:
        from eval.accuracy import measure_policy_accuracy

        logger.info("measuring accuracy inside the small MoE model on %d held-out tokens", args.accuracy_tokens)
        accuracy_report = measure_policy_accuracy(args.policies, scenario, tokens=args.accuracy_tokens,
                                                  seed=args.seed)
        perplexity = {name: item.perplexity_increase_percent for name, item in accuracy_report.by_policy().items()}
    print(format_summary_table(result.summaries, perplexity), flush=True)
    if accuracy_report is not None:
        print("\n" + accuracy_report.format_table(), flush=True)

    sweeps = []
    for parameter, values in sweep_points.items():
        sweep_scenario = scenario.replace(tokens_per_episode=args.sweep_tokens)
        sweeps.append(run_sweep(args.sweep_policies, sweep_scenario, parameter, values,
                                args.sweep_episodes, args.seed))

    written = write_results(result, sweeps, args.out,
                            [parser.prog, *(sys.argv[1:] if argv is None else argv)])
    if accuracy_report is not None:
        written.append(write_csv(accuracy_report.rows(), args.out / "accuracy.csv"))
    if not args.no_plots:
        from eval.plots import plot_energy_per_episode, plot_sweep

        written.append(plot_energy_per_episode(result, args.out / "energy_per_episode.png"))
        for sweep in sweeps:
            written.append(plot_sweep(sweep, args.out / f"sweep_{sweep.parameter}.png"))
    logger.info("wrote %s in %.1f s", ", ".join(str(path) for path in written), time.perf_counter() - started)
    return 0


__all__ = ["build_parser", "format_summary_table", "main", "parse_overrides", "parse_sweep_points",
           "parse_value", "write_csv", "write_results"]
