"""PNG plots of an evaluation, drawn with matplotlib's Agg canvas (no display needed).

The figures are built with ``matplotlib.figure.Figure`` and rendered by
``FigureCanvasAgg`` directly, so importing this module never changes the
pyplot backend of the caller.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from eval.runner import EvaluationResult, SweepResult

# Axis label and factor from the field's SI value to the plotted unit, for the fields usually swept.
SWEEP_AXES = {
    "accuracy_budget": ("accuracy budget ε (degradation bound)", 1.0),
    "latency_budget_s": ("layer latency budget T (ms)", 1e3),
}


def _error_bar(half_width: float) -> float:
    # A single episode has no confidence interval, so it gets no error bar rather than a NaN one.
    return 0.0 if math.isnan(half_width) else half_width


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)
    return path


def plot_energy_per_episode(result: EvaluationResult, path: str | Path) -> Path:
    """Draw each policy's mean energy per token with its CI (left) and its energy per token in each episode (right)."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    bars, lines = figure.subplots(1, 2)
    names = list(result.policies)
    summaries = result.summaries

    means = [s.energy_per_token_mj.mean for s in summaries]
    errors = [_error_bar(s.energy_per_token_mj.half_width) for s in summaries]
    positions = np.arange(len(names))
    bars.bar(positions, means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
    bars.set_xticks(positions, names, rotation=20, ha="right")
    bars.set_ylabel("energy per token (mJ)")
    confidence = summaries[0].energy_per_token_mj.confidence if summaries else 0.95
    bars.set_title(f"mean over {_count(result.episodes, 'episode')}, {confidence:.0%} CI")

    for index, (name, policy_result) in enumerate(result.policies.items()):
        episodes = [e.episode for e in policy_result.episodes]
        energies = [e.energy_per_token_mj for e in policy_result.episodes]
        lines.plot(episodes, energies, marker="o", markersize=3, color=f"C{index}", label=name)
    lines.xaxis.set_major_locator(MaxNLocator(integer=True))
    lines.set_xlabel(f"episode (seed {result.seed} + index)")
    lines.set_ylabel("energy per token (mJ)")
    lines.set_title("per episode, same channels and gates for every policy")
    lines.legend(fontsize="small")
    return _save(figure, Path(path))


def plot_sweep(sweep: SweepResult, path: str | Path) -> Path:
    """Draw energy per token (left) and violation rates (right) against the swept scenario field.

    Energy alone misleads where a policy saves energy by failing its
    constraints, as Top-K does when deep fades make its nodes unreachable, so the
    right panel shows the accuracy-violation rate (solid) and the
    latency-violation rate (dashed). Sweeps use few episodes, so the energy
    has no error bars. The CI half-widths are in sweep.csv.
    """
    label, scale = SWEEP_AXES.get(sweep.parameter, (sweep.parameter, 1.0))
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    energy_axes, violation_axes = figure.subplots(1, 2)

    try:
        x_values = np.asarray(sweep.values, dtype=np.float64) * scale
    except (TypeError, ValueError):
        # Non-numeric values such as access=fdma,tdma become evenly spaced categories.
        x_values = np.arange(len(sweep.values), dtype=np.float64)
        for axes in (energy_axes, violation_axes):
            axes.set_xticks(x_values, [str(value) for value in sweep.values])
    policies = list(sweep.points[0].policies) if sweep.points else []
    for index, name in enumerate(policies):
        summaries = [point.policies[name].summary for point in sweep.points]
        color = f"C{index}"
        energy_axes.plot(x_values, [s.energy_per_token_mj.mean for s in summaries], marker="o", color=color,
                         label=name)
        violation_axes.plot(x_values, [100 * s.accuracy_violation_rate for s in summaries], marker="o",
                            color=color, label=f"{name}, accuracy")
        violation_axes.plot(x_values, [100 * s.latency_violation_rate for s in summaries], marker="s",
                            linestyle="--", color=color, label=f"{name}, latency")

    episodes = sweep.points[0].episodes if sweep.points else 0
    tokens = sweep.points[0].scenario.tokens_per_episode if sweep.points else 0
    energy_axes.set_xlabel(label)
    energy_axes.set_ylabel("energy per token (mJ)")
    energy_axes.set_title(f"mean of the same {_count(episodes, 'episode')} of {_count(tokens, 'token')} "
                          "at each point")
    energy_axes.legend(fontsize="small")
    violation_axes.set_xlabel(label)
    violation_axes.set_ylabel("steps violating the constraint (%)")
    violation_axes.set_title("constraint violations")
    violation_axes.legend(fontsize="x-small", ncol=2)
    return _save(figure, Path(path))


__all__ = ["SWEEP_AXES", "plot_energy_per_episode", "plot_sweep"]
