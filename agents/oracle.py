"""The SiftMoE oracle: the exact energy-optimal expert selection of one decoding step.

It solves

    minimise E(A)  subject to  delta(A) <= eps  and every contacted node reachable

over all subsets ``A`` of experts, with full knowledge of the gates, the gains
and the profile. When no subset meets the accuracy budget it returns the
decision that first minimises ``max(delta - eps, 0)`` and then energy, with
status ``"infeasible"``. With ``degradation_price = mu`` it instead minimises
the Lagrangian ``E(A) / E_ref + mu * delta(A)`` with no accuracy constraint.

Exactness rests on four facts:

1. ``E`` only grows when an expert is added (more compute, and less link
   time for the node or the shared band), and ``delta`` never grows.
2. An expert outside Top-K is only worth computing as a replacement that
   beats some Top-K expert's skip cost, so only those are candidates.
3. Among candidates on the same node, one whose replacement costs are all at
   least those of another is never needed, because both cost the same energy.
4. An optimal set has at most K experts, since each computed expert either is
   a computed Top-K expert or is the closest replacement of a dropped one.

The search enumerates all candidate subsets of size at most K when there are
few candidates (vectorised), and otherwise runs a depth-first branch and
bound whose bounds are the energy of the current set (fact 1) and the
degradation reached if every remaining candidate were added.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from agents.base import Policy
from agents.baselines import privileged_state
from wide_env.cost import DEGRADATION_TOLERANCE, CostModel, StepState

# Candidate counts up to this size are solved by vectorised enumeration.
ENUMERATION_LIMIT = 14
STATUS_OPTIMAL = "optimal"
STATUS_INFEASIBLE = "infeasible"


@dataclass
class OracleResult:
    """Solution of one step, in the spirit of ``scipy.optimize.OptimizeResult``.

    ``x`` is the boolean mask of computed experts. ``status`` is ``"optimal"``
    or ``"infeasible"``; ``success`` is true for ``"optimal"``. For an
    infeasible step ``x`` is the best effort: least excess of ``delta`` over
    the budget, then least energy.
    """

    x: np.ndarray
    energy_j: float
    degradation: float
    status: str
    success: bool
    excess: float
    candidates: int
    nodes_examined: int
    solve_time_s: float
    message: str = ""
    objective: float = math.nan
    extra: dict = field(default_factory=dict)


@lru_cache(maxsize=64)
def _subsets_up_to(size: int, max_members: int) -> np.ndarray:
    """All subsets of ``range(size)`` with at most ``max_members`` members as a boolean matrix."""
    rows = []
    for members in range(min(size, max_members) + 1):
        for combo in itertools.combinations(range(size), members):
            row = np.zeros(size, dtype=bool)
            row[list(combo)] = True
            rows.append(row)
    matrix = np.array(rows, dtype=bool).reshape(len(rows), size)
    matrix.setflags(write=False)
    return matrix


class SiftMoEOracle:
    """Exact per-step solver bound to one cost model."""

    def __init__(self, cost_model: CostModel, accuracy_budget: float | None = None,
                 degradation_price: float | None = None):
        if degradation_price is not None and (not math.isfinite(degradation_price) or degradation_price < 0):
            raise ValueError(f"invalid degradation_price: expected a finite value >= 0, got {degradation_price!r}")
        self.cost_model = cost_model
        self.accuracy_budget = cost_model.accuracy_budget if accuracy_budget is None else float(accuracy_budget)
        if not math.isfinite(self.accuracy_budget) or self.accuracy_budget < 0:
            raise ValueError(f"invalid accuracy_budget: expected a finite value >= 0, got {accuracy_budget!r}")
        self.degradation_price = degradation_price
        self.tdma = cost_model.scenario.access == "tdma"

    # -- public API -----------------------------------------------------------

    def solve(self, state: StepState) -> OracleResult:
        start = time.perf_counter()
        candidates = self._candidates(state)
        if len(candidates) <= ENUMERATION_LIMIT:
            mask, examined = self._enumerate(state, candidates)
        else:
            mask, examined = self._branch_and_bound(state, candidates)
        return self._result(state, mask, len(candidates), examined, time.perf_counter() - start)

    # -- candidates -----------------------------------------------------------

    def _candidates(self, state: StepState) -> np.ndarray:
        """Experts that can be part of an optimal decision (facts 2 and 3), Top-K first."""
        cm = self.cost_model
        nodes = cm.expert_nodes
        reachable = state.tables.reachable[nodes, 1]
        skip = cm.profile.skip_cost[state.layer, state.top_k]
        replace = cm.profile.replace_cost[state.layer][state.top_k]  # (K, E)

        in_top_k = np.zeros(cm.num_experts, dtype=bool)
        in_top_k[state.top_k] = True
        useful = reachable & (in_top_k | np.any(replace < skip[:, None], axis=0))

        others = [int(e) for e in np.flatnonzero(useful & ~in_top_k)]
        kept: list[int] = []
        for expert in others:
            dominated = False
            for other in others:
                if other == expert or nodes[other] != nodes[expert]:
                    continue
                better_or_equal = np.all(replace[:, other] <= replace[:, expert])
                strictly = np.any(replace[:, other] < replace[:, expert])
                if better_or_equal and (strictly or other < expert):
                    dominated = True
                    break
            if not dominated:
                kept.append(expert)
        top = [int(e) for e in state.top_k if useful[e]]
        return np.asarray(top + kept, dtype=np.int64)

    # -- objective ------------------------------------------------------------

    def _excess(self, delta):
        return np.maximum(delta - self.accuracy_budget - DEGRADATION_TOLERANCE, 0.0)

    def _table_energy(self, state: StepState, counts: np.ndarray) -> np.ndarray:
        """Sum of per-node table energies: exact under FDMA, a lower bound under TDMA."""
        rows = np.arange(counts.shape[-1])
        return state.tables.energy_j[rows, counts].sum(axis=-1)

    def _true_energy(self, state: StepState, counts: np.ndarray) -> float:
        """Exact energy of a count vector, ``inf`` when a contacted node cannot finish in time."""
        if not self.tdma:
            return float(self._table_energy(state, counts))
        uplink, downlink, compute, failed = self.cost_model.energy_of_counts(state, counts)
        return math.inf if failed else uplink + downlink + compute

    def _score(self, energy: float, delta: float) -> tuple[float, float]:
        """Lexicographic objective: (excess of delta, energy), or (0, Lagrangian) with a price."""
        if self.degradation_price is None:
            return float(self._excess(delta)), energy
        return 0.0, energy / self.cost_model.reference_energy_j + self.degradation_price * delta

    # -- vectorised enumeration -------------------------------------------------

    def _enumerate(self, state: StepState, candidates: np.ndarray) -> tuple[np.ndarray, int]:
        cm = self.cost_model
        subsets = _subsets_up_to(len(candidates), cm.profile.top_k)
        masks = np.zeros((subsets.shape[0], cm.num_experts), dtype=bool)
        masks[:, candidates] = subsets
        counts = cm.node_counts(masks)
        energy_bound = self._table_energy(state, counts)
        delta = cm.degradation(state, masks)
        finite = np.isfinite(energy_bound)

        if self.degradation_price is None:
            primary = self._excess(delta)
            secondary = energy_bound
        else:
            primary = np.zeros_like(delta)
            secondary = energy_bound / cm.reference_energy_j + self.degradation_price * delta
        primary = np.where(finite, primary, np.inf)

        if not self.tdma:
            order = np.lexsort((secondary, primary))
            return masks[order[0]], len(masks)

        # TDMA: visit subsets by their lower bound and stop once it cannot beat the best exact value.
        order = np.lexsort((secondary, primary))
        best_index, best_score, examined = order[0], (math.inf, math.inf), 0
        for index in order:
            if not finite[index]:
                break
            bound = (float(primary[index]), float(secondary[index]))
            if bound[0] > best_score[0] or (bound[0] == best_score[0] and bound[1] >= best_score[1]):
                break
            examined += 1
            energy = self._true_energy(state, counts[index])
            if not math.isfinite(energy):
                continue
            score = self._score(energy, float(delta[index]))
            if score < best_score:
                best_index, best_score = index, score
        return masks[best_index], examined

    # -- branch and bound -----------------------------------------------------

    def _branch_and_bound(self, state: StepState, candidates: np.ndarray) -> tuple[np.ndarray, int]:
        cm = self.cost_model
        top_k = state.top_k
        weights = [float(w) for w in state.weights]
        skip = cm.profile.skip_cost[state.layer, top_k]
        replace = cm.profile.replace_cost[state.layer][top_k][:, candidates]  # (K, M)
        num_k, num_candidates = replace.shape
        # coverage[k] with candidate m computed: 0 for expert k itself, else its replacement cost
        cover = np.minimum(replace, skip[:, None])
        for position, expert in enumerate(candidates):
            cover[top_k == expert, position] = 0.0
        # best coverage reachable from position p onward, for the degradation bound
        suffix = np.full((num_candidates + 1, num_k), np.inf)
        for position in range(num_candidates - 1, -1, -1):
            suffix[position] = np.minimum(suffix[position + 1], cover[:, position])
        cover_lists = cover.T.tolist()
        suffix_lists = suffix.tolist()
        skip_list = skip.tolist()
        nodes = cm.expert_nodes[candidates].tolist()
        table = state.tables.energy_j.tolist()
        max_members = cm.profile.top_k
        price = self.degradation_price
        reference = cm.reference_energy_j
        budget = self.accuracy_budget + DEGRADATION_TOLERANCE

        counts = [0] * (cm.num_nodes + 1)
        chosen: list[int] = []
        best = {"score": (math.inf, math.inf), "set": []}
        examined = 0

        def delta_of(coverage):
            return sum(w * c for w, c in zip(weights, coverage))

        def visit(position: int, coverage: list[float], energy: float) -> None:
            nonlocal examined
            examined += 1
            delta = delta_of(coverage)
            if price is None:
                score = (max(delta - budget, 0.0), energy)
            else:
                score = (0.0, energy / reference + price * delta)
            if score < best["score"]:
                exact = energy if not self.tdma else self._true_energy(state, np.asarray(counts))
                if math.isfinite(exact):
                    exact_score = score if not self.tdma else self._score(exact, delta)
                    if exact_score < best["score"]:
                        best["score"], best["set"] = exact_score, list(chosen)
            if price is None and delta <= budget:
                return  # adding experts only costs energy
            if position >= num_candidates or len(chosen) >= max_members:
                return
            floor = [min(c, s) for c, s in zip(coverage, suffix_lists[position])]
            delta_floor = delta_of(floor)
            if price is None:
                bound = (max(delta_floor - budget, 0.0), energy)
            else:
                bound = (0.0, energy / reference + price * delta_floor)
            if bound >= best["score"]:
                return
            for index in range(position, num_candidates):
                node = nodes[index]
                added = table[node][counts[node] + 1] - table[node][counts[node]] \
                    if counts[node] + 1 < len(table[node]) else math.inf
                if not math.isfinite(added):
                    continue
                new_coverage = [min(c, v) for c, v in zip(coverage, cover_lists[index])]
                counts[node] += 1
                chosen.append(index)
                visit(index + 1, new_coverage, energy + added)
                chosen.pop()
                counts[node] -= 1

        visit(0, list(skip_list), float(table[0][0] * 0.0))
        mask = np.zeros(cm.num_experts, dtype=bool)
        mask[candidates[best["set"]]] = True
        return mask, examined

    # -- result ---------------------------------------------------------------

    def _result(self, state: StepState, mask: np.ndarray, num_candidates: int, examined: int,
                elapsed: float) -> OracleResult:
        cm = self.cost_model
        counts = cm.node_counts(mask)
        energy = self._true_energy(state, counts)
        delta = float(cm.degradation(state, mask))
        excess = float(self._excess(delta))
        if self.degradation_price is not None:
            status, message = STATUS_OPTIMAL, "minimised energy / reference + price * delta"
        elif excess > 0:
            status = STATUS_INFEASIBLE
            message = (f"no decision meets the accuracy budget {self.accuracy_budget:g}; "
                       f"returned the least excess {excess:.4g}, then least energy")
        else:
            status, message = STATUS_OPTIMAL, "minimum energy within the accuracy budget"
        objective = energy if self.degradation_price is None else \
            energy / cm.reference_energy_j + self.degradation_price * delta
        return OracleResult(x=mask, energy_j=energy, degradation=delta, status=status,
                            success=status == STATUS_OPTIMAL, excess=excess, candidates=num_candidates,
                            nodes_examined=examined, solve_time_s=elapsed, message=message, objective=objective)


class SiftMoEPolicy(Policy):
    """The oracle as a policy, on the true CSI (genie bound) or on the observed CSI (fair baseline)."""

    uses_privileged = True

    def __init__(self, env, csi: str = "true", accuracy_budget: float | None = None,
                 degradation_price: float | None = None):
        super().__init__(env)
        if csi not in ("true", "observed"):
            raise ValueError(f"invalid csi: expected 'true' or 'observed', got {csi!r}")
        self.csi = csi
        self.name = "oracle" if csi == "true" else "oracle-observed"
        self.oracle = SiftMoEOracle(self.cost_model, accuracy_budget, degradation_price)
        self.last_result: OracleResult | None = None

    def decide(self, observation: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        state = privileged_state(info, self.csi)
        self.last_result = self.oracle.solve(state)
        return self._mask_to_action(self.last_result.x)


def solve_step(cost_model: CostModel, state: StepState, accuracy_budget: float | None = None,
               degradation_price: float | None = None) -> OracleResult:
    """Solve one step exactly; see :class:`SiftMoEOracle`."""
    return SiftMoEOracle(cost_model, accuracy_budget, degradation_price).solve(state)
