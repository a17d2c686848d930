"""Accuracy violations that some decision could have avoided.

In the default scenario an expert's node is often out of reach, and then no
decision may meet the per-step accuracy budget: the oracle itself reports
``infeasible`` on such steps. The raw violation rate of every policy includes
those steps. This hook solves each state once with the exact oracle and
counts a policy's violation as avoidable only when a decision within the
budget existed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from agents.oracle import STATUS_OPTIMAL, SiftMoEOracle
from eval.runner import MetricHook
from wide_env.cost import StepState
from wide_env.env import WideDecodeEnv


class AttainabilityHook(MetricHook):
    """Adds ``attainable_rate`` and ``avoidable_accuracy_violation_rate`` per episode.

    Results are cached by (episode, token, layer): under common random numbers
    every policy meets the same states, so each state is solved once. Episodes
    with an average accuracy budget get no metrics, because their violation is
    an episode-level event.
    """

    def __init__(self) -> None:
        self._attainable: dict[tuple[int, int, int], bool] = {}
        self._oracle: SiftMoEOracle | None = None
        self._episode = 0
        self._skip = False
        self._steps = 0
        self._attainable_steps = 0
        self._avoidable = 0

    def start_episode(self, policy: str, episode: int, env: WideDecodeEnv) -> None:
        self._skip = env.average_budget
        if self._oracle is None or self._oracle.cost_model.scenario != env.scenario:
            self._oracle = SiftMoEOracle(env.cost_model)
            self._attainable.clear()
        self._episode = episode
        self._steps = self._attainable_steps = self._avoidable = 0

    def after_step(self, policy: str, state: StepState, action: np.ndarray, info: Mapping[str, Any]) -> None:
        if self._skip:
            return
        key = (self._episode, state.token, state.layer)
        attainable = self._attainable.get(key)
        if attainable is None:
            attainable = self._oracle.solve(state).status == STATUS_OPTIMAL
            self._attainable[key] = attainable
        self._steps += 1
        self._attainable_steps += int(attainable)
        self._avoidable += int(attainable and bool(info["accuracy_violation"]))

    def end_episode(self, policy: str, episode: int) -> Mapping[str, float]:
        if self._skip or self._steps == 0:
            return {}
        return {"attainable_rate": self._attainable_steps / self._steps,
                "avoidable_accuracy_violation_rate": self._avoidable / self._steps}
