"""Baseline policies: conventional Top-K, random Top-K subsets and a channel-aware greedy rule."""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Policy
from wide_env.cost import DEGRADATION_TOLERANCE, StepState


def privileged_state(info: dict[str, Any], csi: str = "true") -> StepState:
    """Return the StepState in ``info["privileged"]`` for the true or the observed channel."""
    try:
        privileged = info["privileged"]
    except (KeyError, TypeError):
        raise ValueError("this policy needs info['privileged'] from WIDE-Decode-v0's reset() or step()") from None
    key = "state" if csi == "true" else "observed_state"
    return privileged[key]


class TopKPolicy(Policy):
    """Conventional Top-K routing: compute exactly the router's Top-K experts, blind to the channel."""

    name = "topk"
    uses_privileged = False

    def decide(self, observation, info):
        gates = np.asarray(observation[: self.num_experts])
        top_k = np.argsort(-gates, kind="stable")[: self.cost_model.profile.top_k]
        action = np.zeros(self.num_experts, dtype=np.int8)
        action[top_k] = 1
        return action


class RandomSubsetPolicy(Policy):
    """Compute a uniformly random subset of the Top-K experts; a floor for learned agents."""

    name = "random"
    uses_privileged = False

    def __init__(self, env, seed: int | None = None):
        super().__init__(env)
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self._rng = np.random.default_rng([seed] if self._seed is None else [self._seed, seed])

    def decide(self, observation, info):
        gates = np.asarray(observation[: self.num_experts])
        top_k = np.argsort(-gates, kind="stable")[: self.cost_model.profile.top_k]
        action = np.zeros(self.num_experts, dtype=np.int8)
        action[top_k] = self._rng.integers(0, 2, size=top_k.size)
        return action


class GreedyChannelPolicy(Policy):
    """Channel-aware greedy rule on the observed CSI.

    Start from the reachable Top-K experts. If dropping the unreachable ones
    broke the accuracy budget, add the reachable replacement that lowers
    ``delta`` most per joule until the budget is met or no replacement helps. Then repeatedly
    drop the computed expert whose removal saves the most energy while
    ``delta`` stays within the budget.
    """

    name = "greedy"
    uses_privileged = True

    def decide(self, observation, info):
        state = privileged_state(info, "observed")
        return self._mask_to_action(self.select(state))

    def select(self, state: StepState) -> np.ndarray:
        cm = self.cost_model
        budget = cm.accuracy_budget + DEGRADATION_TOLERANCE
        reachable = state.tables.reachable[cm.expert_nodes, 1]
        computed = np.zeros(self.num_experts, dtype=bool)
        computed[state.top_k] = reachable[state.top_k]
        delta = float(cm.degradation(state, computed))
        energy = cm.evaluate(state, computed).energy_j

        while delta > budget:
            best = None
            for expert in np.flatnonzero(reachable & ~computed):
                trial = computed.copy()
                trial[expert] = True
                cost = cm.evaluate(state, trial)
                if cost.failed_nodes or cost.degradation >= delta:
                    continue
                gain = (delta - cost.degradation) / max(cost.energy_j - energy, 1e-15)
                if best is None or gain > best[0]:
                    best = (gain, trial, cost)
            if best is None:
                break
            computed, delta, energy = best[1], best[2].degradation, best[2].energy_j

        while True:
            best = None
            for expert in np.flatnonzero(computed):
                trial = computed.copy()
                trial[expert] = False
                cost = cm.evaluate(state, trial)
                if cost.degradation > budget or cost.failed_nodes:
                    continue
                if best is None or cost.energy_j < best[1].energy_j:
                    best = (trial, cost)
            if best is None or best[1].energy_j >= energy:
                break
            computed, energy = best[0], best[1].energy_j
        return computed
