"""Metrics of an evaluation: per-episode totals, confidence intervals and summaries.

Energy is reported per token in mJ: the sum of ``energy_j`` over the ``L``
steps (MoE layers) of one token. Every other per-step quantity is a mean over
all steps of all episodes. Confidence intervals are over episodes, with the
Student t distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class ConfidenceInterval:
    """Sample mean with the half-width of its two-sided t confidence interval.

    ``half_width`` is NaN when there is a single sample, because the spread
    cannot be estimated from one value.
    """

    mean: float
    half_width: float
    confidence: float
    samples: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_confidence_interval(values: Sequence[float] | np.ndarray,
                             confidence: float = DEFAULT_CONFIDENCE) -> ConfidenceInterval:
    """Compute the mean of ``values`` and the t-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)``."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("cannot compute a confidence interval of an empty sample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"invalid confidence: expected a value in (0, 1), got {confidence!r}")
    mean = float(array.mean())
    if array.size == 1:
        return ConfidenceInterval(mean, math.nan, confidence, 1)
    standard_error = float(array.std(ddof=1)) / math.sqrt(array.size)
    quantile = float(stats.t.ppf(0.5 + confidence / 2.0, df=array.size - 1))
    return ConfidenceInterval(mean, quantile * standard_error, confidence, int(array.size))


def saving_percent(energy: float, reference: float) -> float:
    """Return the energy saved relative to ``reference``, in % of ``reference`` (negative when worse)."""
    if reference <= 0.0:
        raise ValueError(f"invalid reference energy: expected a positive value, got {reference!r}")
    return 100.0 * (reference - energy) / reference


def gap_percent(energy: float, optimum: float) -> float:
    """Return how much more energy than ``optimum`` a policy uses, in % of ``optimum``."""
    if optimum <= 0.0:
        raise ValueError(f"invalid optimal energy: expected a positive value, got {optimum!r}")
    return 100.0 * (energy - optimum) / optimum


def token_energies_j(step_energies_j: Sequence[float] | np.ndarray, layers_per_token: int) -> np.ndarray:
    """Sum step energies over the ``layers_per_token`` consecutive steps of each token."""
    array = np.asarray(step_energies_j, dtype=np.float64)
    if layers_per_token < 1:
        raise ValueError(f"invalid layers_per_token: expected a positive integer, got {layers_per_token!r}")
    if array.size % layers_per_token != 0:
        raise ValueError(
            f"{array.size} steps do not split into whole tokens of {layers_per_token} layers; "
            "an episode must end on a token boundary"
        )
    return array.reshape(-1, layers_per_token).sum(axis=1)


# -- per-episode records ------------------------------------------------------


@dataclass
class EpisodeStats:
    """Totals of one policy over one episode, with energies in J and times in s."""

    episode: int
    seed: int
    steps: int
    tokens: int
    energy_j: float
    topk_energy_j: float
    uplink_energy_j: float
    downlink_energy_j: float
    compute_energy_j: float
    failure_energy_j: float
    degradation_sum: float
    accuracy_violations: int
    latency_violations: int
    nodes_contacted_sum: int
    experts_computed_sum: int
    decide_time_s: float
    token_energies_j: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def energy_per_token_mj(self) -> float:
        return 1e3 * self.energy_j / self.tokens

    @property
    def topk_energy_per_token_mj(self) -> float:
        return 1e3 * self.topk_energy_j / self.tokens

    def as_row(self) -> dict[str, Any]:
        """Return a flat record for CSV and JSON output, without the per-token energies."""
        row = {
            "episode": self.episode,
            "seed": self.seed,
            "steps": self.steps,
            "tokens": self.tokens,
            "energy_per_token_mj": self.energy_per_token_mj,
            "topk_energy_per_token_mj": self.topk_energy_per_token_mj,
            "uplink_energy_j": self.uplink_energy_j,
            "downlink_energy_j": self.downlink_energy_j,
            "compute_energy_j": self.compute_energy_j,
            "failure_energy_j": self.failure_energy_j,
            "mean_degradation": self.degradation_sum / self.steps,
            "accuracy_violation_rate": self.accuracy_violations / self.steps,
            "latency_violation_rate": self.latency_violations / self.steps,
            "experts_per_step": self.experts_computed_sum / self.steps,
            "nodes_per_step": self.nodes_contacted_sum / self.steps,
            "decide_time_us": 1e6 * self.decide_time_s / self.steps,
        }
        row.update(self.extra)
        return row


class EpisodeAccumulator:
    """Collects the ``info`` of every step of one episode into an ``EpisodeStats``."""

    def __init__(self, episode: int, seed: int, layers_per_token: int):
        self.episode = episode
        self.seed = seed
        self.layers_per_token = layers_per_token
        self._energies: list[float] = []
        self._topk_energies: list[float] = []
        self._uplink = 0.0
        self._downlink = 0.0
        self._compute = 0.0
        self._failure = 0.0
        self._degradation = 0.0
        self._accuracy_violations = 0
        self._latency_violations = 0
        self._nodes = 0
        self._experts = 0
        self._decide_time_s = 0.0

    def add_step(self, info: Mapping[str, Any], decide_time_s: float) -> None:
        """Add one step's ``info`` from ``env.step`` and the time the policy took to decide it."""
        self._energies.append(float(info["energy_j"]))
        self._topk_energies.append(float(info["topk_energy_j"]))
        self._uplink += float(info["uplink_energy_j"])
        self._downlink += float(info["downlink_energy_j"])
        self._compute += float(info["compute_energy_j"])
        self._failure += float(info["failure_energy_j"])
        self._degradation += float(info["degradation"])
        # NOTE: with an average accuracy budget the env flags a violation only at the
        # last step of the episode, so this per-step rate is then (violating episodes) / steps.
        self._accuracy_violations += int(bool(info["accuracy_violation"]))
        self._latency_violations += int(bool(info["latency_violation"]))
        self._nodes += int(info["nodes_contacted"])
        self._experts += int(info["experts_computed"])
        self._decide_time_s += float(decide_time_s)

    def finish(self, extra: Mapping[str, float] | None = None) -> EpisodeStats:
        """Close the episode and attach ``extra``, a mapping of additional per-episode metrics by name."""
        if not self._energies:
            raise ValueError(f"episode {self.episode} has no steps")
        per_token = token_energies_j(self._energies, self.layers_per_token)
        return EpisodeStats(
            episode=self.episode,
            seed=self.seed,
            steps=len(self._energies),
            tokens=int(per_token.size),
            # fsum rounds exactly, so a policy that repeats Top-K's decisions gets exactly Top-K's total.
            energy_j=math.fsum(self._energies),
            topk_energy_j=math.fsum(self._topk_energies),
            uplink_energy_j=self._uplink,
            downlink_energy_j=self._downlink,
            compute_energy_j=self._compute,
            failure_energy_j=self._failure,
            degradation_sum=self._degradation,
            accuracy_violations=self._accuracy_violations,
            latency_violations=self._latency_violations,
            nodes_contacted_sum=self._nodes,
            experts_computed_sum=self._experts,
            decide_time_s=self._decide_time_s,
            token_energies_j=per_token,
            extra={name: float(value) for name, value in (extra or {}).items()},
        )


# -- per-policy summaries -----------------------------------------------------


@dataclass
class PolicySummary:
    """Metrics of one policy over all evaluated episodes.

    ``saving_vs_topk_pct`` compares with the Top-K energy of the same steps,
    which the environment reports in every ``info``, so it needs no Top-K run.
    ``gap_to_oracle_pct`` is ``None`` unless the oracle ran on the same episodes.
    """

    policy: str
    episodes: int
    steps: int
    energy_per_token_mj: ConfidenceInterval
    topk_energy_per_token_mj: float
    saving_vs_topk_pct: float
    gap_to_oracle_pct: float | None
    accuracy_violation_rate: float
    latency_violation_rate: float
    mean_degradation: float
    experts_per_step: float
    nodes_per_step: float
    decide_time_us: float
    extra: dict[str, ConfidenceInterval] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        """Return a flat record for CSV and JSON output.

        Each extra metric gets a ``_mean`` column and a ``_ci`` column with the CI half-width.
        """
        row = {
            "policy": self.policy,
            "episodes": self.episodes,
            "steps": self.steps,
            "energy_per_token_mj": self.energy_per_token_mj.mean,
            "energy_per_token_mj_ci": self.energy_per_token_mj.half_width,
            "topk_energy_per_token_mj": self.topk_energy_per_token_mj,
            "saving_vs_topk_pct": self.saving_vs_topk_pct,
            "gap_to_oracle_pct": self.gap_to_oracle_pct,
            "accuracy_violation_rate": self.accuracy_violation_rate,
            "latency_violation_rate": self.latency_violation_rate,
            "mean_degradation": self.mean_degradation,
            "experts_per_step": self.experts_per_step,
            "nodes_per_step": self.nodes_per_step,
            "decide_time_us": self.decide_time_us,
        }
        for name, interval in self.extra.items():
            row[f"{name}_mean"] = interval.mean
            row[f"{name}_ci"] = interval.half_width
        return row


def summarize_policy(policy: str, episodes: Sequence[EpisodeStats],
                     confidence: float = DEFAULT_CONFIDENCE) -> PolicySummary:
    """Aggregate one policy's episodes. ``add_oracle_gaps`` fills in the gap to the oracle later."""
    if not episodes:
        raise ValueError(f"policy {policy!r} has no episodes to summarize")
    steps = sum(e.steps for e in episodes)
    energy = mean_confidence_interval([e.energy_per_token_mj for e in episodes], confidence)
    topk_energy = float(np.mean([e.topk_energy_per_token_mj for e in episodes]))

    extra_names = sorted({name for e in episodes for name in e.extra})
    extra = {}
    for name in extra_names:
        values = [e.extra[name] for e in episodes if name in e.extra]
        extra[name] = mean_confidence_interval(values, confidence)

    return PolicySummary(
        policy=policy,
        episodes=len(episodes),
        steps=steps,
        energy_per_token_mj=energy,
        topk_energy_per_token_mj=topk_energy,
        saving_vs_topk_pct=saving_percent(energy.mean, topk_energy),
        gap_to_oracle_pct=None,
        accuracy_violation_rate=sum(e.accuracy_violations for e in episodes) / steps,
        latency_violation_rate=sum(e.latency_violations for e in episodes) / steps,
        mean_degradation=sum(e.degradation_sum for e in episodes) / steps,
        experts_per_step=sum(e.experts_computed_sum for e in episodes) / steps,
        nodes_per_step=sum(e.nodes_contacted_sum for e in episodes) / steps,
        decide_time_us=1e6 * sum(e.decide_time_s for e in episodes) / steps,
        extra=extra,
    )


def add_oracle_gaps(summaries: Sequence[PolicySummary], oracle: str = "oracle") -> None:
    """Set ``gap_to_oracle_pct`` of every summary when ``oracle`` is among them, else leave ``None``."""
    reference = next((s for s in summaries if s.policy == oracle), None)
    if reference is None:
        return
    for summary in summaries:
        summary.gap_to_oracle_pct = gap_percent(summary.energy_per_token_mj.mean,
                                                reference.energy_per_token_mj.mean)


def find_mismatched_episodes(results: Mapping[str, Sequence[EpisodeStats]], rtol: float = 1e-9) -> list[int]:
    """Return the episode indices whose Top-K energy differs between policies.

    Every policy replays the same channels and gates under common random
    numbers, so the Top-K energy of an episode must agree across policies.
    """
    by_episode: dict[int, list[float]] = {}
    for episodes in results.values():
        for record in episodes:
            by_episode.setdefault(record.episode, []).append(record.topk_energy_j)
    return sorted(index for index, values in by_episode.items()
                  if not np.allclose(values, values[0], rtol=rtol, atol=0.0))


__all__ = [
    "DEFAULT_CONFIDENCE",
    "ConfidenceInterval",
    "EpisodeAccumulator",
    "EpisodeStats",
    "PolicySummary",
    "add_oracle_gaps",
    "find_mismatched_episodes",
    "gap_percent",
    "mean_confidence_interval",
    "saving_percent",
    "summarize_policy",
    "token_energies_j",
]
