"""Exhaustive search over all 2^E decisions: the reference the oracle is tested against."""

from __future__ import annotations

import math
import time

import numpy as np

from agents.base import Policy
from agents.baselines import privileged_state
from agents.oracle import STATUS_INFEASIBLE, STATUS_OPTIMAL, OracleResult
from wide_env.cost import DEGRADATION_TOLERANCE, CostModel, StepState

# 2^16 decisions of 16 experts is the largest search this reference accepts.
MAX_EXHAUSTIVE_EXPERTS = 16


def exhaustive_search(cost_model: CostModel, state: StepState, accuracy_budget: float | None = None,
                      degradation_price: float | None = None) -> OracleResult:
    """Evaluate every subset of experts and return the best by the oracle's objective.

    A subset is admissible when every node it contacts can finish in time. Among
    admissible subsets the best has the least excess of ``delta`` over the budget,
    then the least energy; with ``degradation_price`` it has the least
    ``energy / reference + price * delta``. Ties keep the subset with the smaller
    binary index.
    """
    num_experts = cost_model.num_experts
    if num_experts > MAX_EXHAUSTIVE_EXPERTS:
        raise ValueError(f"exhaustive search supports at most {MAX_EXHAUSTIVE_EXPERTS} experts, got {num_experts}")
    budget = cost_model.accuracy_budget if accuracy_budget is None else float(accuracy_budget)
    start = time.perf_counter()

    indices = np.arange(2**num_experts)
    masks = ((indices[:, None] >> np.arange(num_experts)[None, :]) & 1).astype(bool)
    delta = cost_model.degradation(state, masks)
    counts = cost_model.node_counts(masks)

    unique_counts, inverse = np.unique(counts, axis=0, return_inverse=True)
    unique_energy = np.empty(len(unique_counts))
    for row, count in enumerate(unique_counts):
        uplink, downlink, compute, failed = cost_model.energy_of_counts(state, count)
        unique_energy[row] = math.inf if failed else uplink + downlink + compute
    energy = unique_energy[inverse.reshape(-1)]
    admissible = np.isfinite(energy)

    if degradation_price is None:
        primary = np.maximum(delta - budget - DEGRADATION_TOLERANCE, 0.0)
        secondary = energy
    else:
        primary = np.zeros_like(delta)
        secondary = energy / cost_model.reference_energy_j + degradation_price * delta
    primary = np.where(admissible, primary, np.inf)
    best = int(np.lexsort((indices, secondary, primary))[0])

    excess = float(max(delta[best] - budget - DEGRADATION_TOLERANCE, 0.0))
    status = STATUS_INFEASIBLE if degradation_price is None and excess > 0 else STATUS_OPTIMAL
    objective = float(energy[best]) if degradation_price is None else float(secondary[best])
    return OracleResult(x=masks[best], energy_j=float(energy[best]), degradation=float(delta[best]),
                        status=status, success=status == STATUS_OPTIMAL, excess=excess,
                        candidates=num_experts, nodes_examined=len(masks),
                        solve_time_s=time.perf_counter() - start, message="exhaustive search",
                        objective=objective)


class ExhaustivePolicy(Policy):
    """Exhaustive search as a policy, for small expert counts only."""

    name = "exhaustive"
    uses_privileged = True

    def __init__(self, env):
        super().__init__(env)
        if self.num_experts > MAX_EXHAUSTIVE_EXPERTS:
            raise ValueError(f"exhaustive policy supports at most {MAX_EXHAUSTIVE_EXPERTS} experts, "
                             f"the scenario has {self.num_experts}")

    def decide(self, observation, info):
        return self._mask_to_action(exhaustive_search(self.cost_model, privileged_state(info)).x)
