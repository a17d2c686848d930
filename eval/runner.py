"""Run policies on the same episodes and collect their metrics.

Common random numbers: episode ``i`` of every policy starts from
``env.reset(seed=seed + i)`` on its own environment. The channels and gates of
``WIDE-Decode-v0`` do not depend on the actions, so every policy meets the
same states step by step and the differences between policies are not noise
between episodes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from agents import POLICY_NAMES, make_policy
from agents.base import Policy
from eval.metrics import (
    DEFAULT_CONFIDENCE,
    EpisodeAccumulator,
    EpisodeStats,
    PolicySummary,
    add_oracle_gaps,
    find_mismatched_episodes,
    summarize_policy,
)
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.cost import StepState
from wide_env.env import WideDecodeEnv

logger = logging.getLogger(__name__)

ORACLE_POLICY = "oracle"

# Signature of ``agents.make_policy``: (spec, env, seed) -> Policy.
PolicyFactory = Callable[[str, WideDecodeEnv, int], Policy]


class MetricHook:
    """Extension point for extra per-episode metrics of each policy.

    The runner calls ``start_episode`` after each reset, ``after_step`` after
    each step with the state that the action was applied to, and
    ``end_episode`` at the end of each episode. The mapping that
    ``end_episode`` returns becomes extra metrics of that episode, summarised
    over episodes as a mean with a confidence interval and written as extra
    CSV and JSON columns. A measured-accuracy mode that replays each decision
    inside a real MoE language model fits here. The base class records nothing.
    """

    def start_episode(self, policy: str, episode: int, env: WideDecodeEnv) -> None:
        """Prepare for a new episode of ``policy``."""

    def after_step(self, policy: str, state: StepState, action: np.ndarray, info: Mapping[str, Any]) -> None:
        """Observe one step: the state the action applied to, the action and the ``info`` of ``env.step``."""

    def end_episode(self, policy: str, episode: int) -> Mapping[str, float]:
        """Return the extra metrics of the episode that just ended, by name."""
        return {}


@dataclass
class PolicyResult:
    """Every episode of one policy and their summary."""

    policy: str
    episodes: list[EpisodeStats]
    summary: PolicySummary


@dataclass
class EvaluationResult:
    """Results of several policies on the same episodes of one scenario."""

    scenario: ScenarioConfig
    seed: int
    episodes: int
    policies: dict[str, PolicyResult] = field(default_factory=dict)

    @property
    def summaries(self) -> list[PolicySummary]:
        return [result.summary for result in self.policies.values()]

    def episode_rows(self) -> list[dict[str, Any]]:
        """Return one flat record per (policy, episode), for CSV output."""
        rows = []
        for result in self.policies.values():
            for episode in result.episodes:
                rows.append({"policy": result.policy, **episode.as_row()})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain structure for JSON output: the scenario, the settings and every summary and episode."""
        return {
            "scenario": self.scenario.to_dict(),
            "seed": self.seed,
            "episodes": self.episodes,
            "policies": {
                name: {"summary": result.summary.as_row(),
                       "episodes": [episode.as_row() for episode in result.episodes]}
                for name, result in self.policies.items()
            },
        }


# -- scenario and policy specs ------------------------------------------------


def prepare_scenario(scenario: ScenarioConfig | Mapping[str, Any] | str | Path | None = None,
                     overrides: Mapping[str, Any] | None = None,
                     tokens: int | None = None) -> ScenarioConfig:
    """Resolve a scenario and apply field overrides, then ``tokens`` as ``tokens_per_episode``.

    Raises ``FileNotFoundError`` for a missing YAML file and ``ValueError`` or
    ``TypeError`` for an unknown key or an invalid value.
    """
    resolved = resolve_scenario(scenario, **dict(overrides or {}))
    if tokens is not None:
        resolved = resolved.replace(tokens_per_episode=tokens)
    return resolved


def _model_path(spec: str) -> str:
    # Same parsing as agents.make_policy: an optional "algo:" prefix before a model path.
    if ":" in spec and not Path(spec).exists():
        return spec.rpartition(":")[2]
    return spec


def check_policy_specs(specs: Sequence[str], check_names: bool = True) -> list[str]:
    """Validate policy specs before any episode runs and return them as a list.

    A spec is a name in ``agents.POLICY_NAMES`` or a path to a saved SB3 model
    (``.zip`` file or model folder), optionally prefixed with the algorithm.
    Raises ``ValueError`` for an empty list, a repeated spec or an unknown
    name, and ``FileNotFoundError`` for a model path that does not exist.
    With ``check_names=False`` only the list itself is checked, for factories
    that accept other names.
    """
    specs = list(specs)
    if not specs:
        raise ValueError("no policies given: name at least one of " + ", ".join(POLICY_NAMES)
                         + " or a saved SB3 model path")
    repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
    if repeated:
        raise ValueError(f"policy listed more than once: {', '.join(repeated)}. List each policy once")
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"policy spec must be a string, got {type(spec).__name__}")
        if not check_names or spec in POLICY_NAMES:
            continue
        path = Path(_model_path(spec))
        if path.suffix == ".zip" and not path.exists():
            raise FileNotFoundError(f"model file not found: {path} (policy {spec!r})")
        if path.suffix != ".zip" and not path.is_dir():
            raise ValueError(
                f"unknown policy {spec!r}: expected one of {', '.join(POLICY_NAMES)} "
                "or a path to a saved SB3 model (.zip), optionally prefixed with the algorithm, "
                "e.g. 'ppo:runs/model.zip'"
            )
    return specs


def build_policies(specs: Sequence[str], scenario: ScenarioConfig, seed: int = 0,
                   policy_factory: PolicyFactory | None = None) -> list[tuple[str, WideDecodeEnv, Policy]]:
    """Create one environment and one policy per spec, so that a bad spec fails before any episode runs.

    Specs are checked against ``agents.POLICY_NAMES`` only when ``policy_factory`` is the default.
    """
    factory = make_policy if policy_factory is None else policy_factory
    built = []
    for spec in check_policy_specs(specs, check_names=policy_factory is None):
        env = WideDecodeEnv(scenario)
        built.append((spec, env, factory(spec, env, seed)))
    return built


# -- running episodes ---------------------------------------------------------


def run_episode(env: WideDecodeEnv, policy: Policy, label: str, episode: int, seed: int,
                hooks: Sequence[MetricHook] = ()) -> EpisodeStats:
    """Run one full episode of ``policy`` from ``env.reset(seed=seed)`` and return its totals.

    Only the call to ``policy.decide`` is timed.
    """
    observation, info = env.reset(seed=seed)
    policy.reset(seed=seed)
    for hook in hooks:
        hook.start_episode(label, episode, env)

    accumulator = EpisodeAccumulator(episode, seed, env.num_layers)
    truncated = terminated = False
    while not (truncated or terminated):
        state = info["privileged"]["state"]
        started = time.perf_counter()
        action = policy.decide(observation, info)
        decide_time_s = time.perf_counter() - started

        observation, _, terminated, truncated, info = env.step(action)
        accumulator.add_step(info, decide_time_s)
        for hook in hooks:
            hook.after_step(label, state, action, info)

    extra: dict[str, float] = {}
    for hook in hooks:
        extra.update(hook.end_episode(label, episode))
    return accumulator.finish(extra)


def evaluate_policies(policy_specs: Sequence[str],
                      scenario: ScenarioConfig | Mapping[str, Any] | str | Path | None = None,
                      episodes: int = 10, seed: int = 0, *, tokens: int | None = None,
                      hooks: Iterable[MetricHook] = (), policy_factory: PolicyFactory | None = None,
                      confidence: float = DEFAULT_CONFIDENCE) -> EvaluationResult:
    """Run every policy on episodes ``seed .. seed + episodes - 1`` and summarise them.

    ``scenario`` is anything ``resolve_scenario`` accepts. ``tokens``
    overrides ``tokens_per_episode``. ``hooks`` add extra per-episode metrics
    (see ``MetricHook``). ``policy_factory`` replaces ``agents.make_policy``.
    The gap to the oracle is filled in when ``"oracle"`` is among the specs.
    Every policy is built before the first episode runs, so a bad spec fails fast.
    """
    resolved = prepare_scenario(scenario, tokens=tokens)
    built = build_policies(policy_specs, resolved, seed, policy_factory)
    return evaluate_built_policies(built, resolved, episodes, seed, hooks=hooks, confidence=confidence)


def evaluate_built_policies(built: Sequence[tuple[str, WideDecodeEnv, Policy]], scenario: ScenarioConfig,
                            episodes: int, seed: int, *, hooks: Iterable[MetricHook] = (),
                            confidence: float = DEFAULT_CONFIDENCE) -> EvaluationResult:
    """Run policies from ``build_policies`` on the same episodes and summarise them, closing their envs."""
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"invalid episodes: expected a positive integer, got {episodes!r}")
    hooks = list(hooks)

    result = EvaluationResult(scenario=scenario, seed=seed, episodes=episodes)
    for label, env, policy in built:
        started = time.perf_counter()
        records = [run_episode(env, policy, label, index, seed + index, hooks) for index in range(episodes)]
        env.close()
        summary = summarize_policy(label, records, confidence)
        result.policies[label] = PolicyResult(label, records, summary)
        logger.info("%s: %d episodes of %d steps in %.1f s, %.3f mJ/token", label, episodes,
                    records[0].steps, time.perf_counter() - started, summary.energy_per_token_mj.mean)

    add_oracle_gaps(result.summaries, ORACLE_POLICY)
    mismatched = find_mismatched_episodes({name: r.episodes for name, r in result.policies.items()})
    if mismatched:
        logger.warning("policies met different states in episodes %s although they share seeds; "
                       "savings and gaps compare different channels", mismatched)
    return result


# -- budget sweeps ------------------------------------------------------------


@dataclass
class SweepResult:
    """Summaries of several policies at each value of one scenario field."""

    parameter: str
    values: list[Any]
    points: list[EvaluationResult]

    def rows(self) -> list[dict[str, Any]]:
        """Return one flat record per (value, policy), for CSV and JSON output."""
        rows = []
        for value, point in zip(self.values, self.points):
            for summary in point.summaries:
                rows.append({"parameter": self.parameter, "value": value, **summary.as_row()})
        return rows


def run_sweep(policy_specs: Sequence[str], scenario: ScenarioConfig, parameter: str, values: Sequence[Any],
              episodes: int = 2, seed: int = 0, *, tokens: int | None = None,
              policy_factory: PolicyFactory | None = None) -> SweepResult:
    """Evaluate the policies with the scenario field ``parameter`` set to each of ``values``.

    Each point rebuilds the environments from the changed scenario and reuses
    the same seeds, so the points share their gates (and their channels, unless
    the field changes the channel model, as ``latency_budget_s`` does through
    the fading step).
    """
    if parameter not in ScenarioConfig.field_names():
        raise ValueError(f"unknown scenario key {parameter!r}; valid keys are: "
                         + ", ".join(ScenarioConfig.field_names()))
    values = list(values)
    if not values:
        raise ValueError(f"no values given for the sweep over {parameter}")
    points = []
    for value in values:
        point_scenario = prepare_scenario(scenario, {parameter: value}, tokens)
        logger.info("sweep %s = %s", parameter, value)
        points.append(evaluate_policies(policy_specs, point_scenario, episodes, seed,
                                        policy_factory=policy_factory))
    return SweepResult(parameter, values, points)


__all__ = [
    "MetricHook",
    "PolicyFactory",
    "PolicyResult",
    "EvaluationResult",
    "SweepResult",
    "build_policies",
    "check_policy_specs",
    "evaluate_built_policies",
    "evaluate_policies",
    "prepare_scenario",
    "run_episode",
    "run_sweep",
]
