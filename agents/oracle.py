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
   beats some Top-K expert's current option, so only those are candidates.
3. Among candidates on the same node, one whose replacement costs are all at
   least those of another is never needed, because both cost the same energy.
4. An optimal set has at most K experts, since each computed expert either is
   a computed Top-K expert or is the closest replacement of a dropped one.

Three searches use them:

- Enumeration (small models such as mixtral-8x7b): every subset of at most K
  experts is one row of a precomputed matrix, so one step, or a whole batch
  of steps, is solved by array arithmetic.
- Top-K subsets (K <= ``TOP_K_SUBSET_LIMIT``): the ``2^K`` choices of which
  Top-K experts to compute are scored at once and visited best bound first;
  for each, a depth-first branch and bound adds replacement experts. Its
  bounds are the energy so far (fact 1), the degradation reached if every
  remaining candidate were added, and a fractional knapsack over the
  candidates' degradation gains and marginal energies. A greedy decision
  gives the first incumbent. When no decision can meet the budget, every
  Top-K expert must reach its lowest coverage, which usually fixes the
  decision without a search.
- Candidate subsets (larger K): a depth-first branch and bound over the
  candidates of facts 2 and 3.

``OracleResult.nodes_examined`` counts the decisions or search nodes scored.
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
from wide_env.cost import DEGRADATION_TOLERANCE, CostModel, StepBatch, StepState

# Subsets of at most K experts up to this count are solved by vectorised enumeration.
ENUMERATION_LIMIT = 4096
# Top-K sizes up to this are searched through the 2^K subsets of computed Top-K experts.
TOP_K_SUBSET_LIMIT = 12
# float64 values of the largest intermediate array of one chunk of a batched enumeration.
BATCH_CHUNK_VALUES = 4_000_000
# (layer, Top-K) entries of the enumeration's degradation cache before it is cleared.
FACTOR_CACHE_ENTRIES = 65_536
# Amount by which the knapsack bound undercuts the exact degradation reduction, far above rounding errors.
KNAPSACK_SLACK = 1e-12
STATUS_OPTIMAL = "optimal"
STATUS_INFEASIBLE = "infeasible"


@dataclass
class OracleResult:
    """Solution of one step, in the spirit of ``scipy.optimize.OptimizeResult``.

    ``x`` is the boolean mask of computed experts. ``status`` is ``"optimal"``
    or ``"infeasible"``; ``success`` is true for ``"optimal"``. For an
    infeasible step ``x`` is the best effort: least excess of ``delta`` over
    the budget, then least energy. ``candidates`` is the number of experts the
    search could choose from and ``nodes_examined`` the number of decisions or
    search nodes it scored.
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


@dataclass
class OracleBatchResult:
    """Solutions of ``B`` steps as arrays: the fields of ``OracleResult`` with a leading axis.

    ``solve_time_s`` is the time of the whole batch.
    """

    x: np.ndarray  # (B, E) bool
    energy_j: np.ndarray
    degradation: np.ndarray
    status: np.ndarray  # (B,) str
    success: np.ndarray
    excess: np.ndarray
    candidates: np.ndarray
    nodes_examined: np.ndarray
    objective: np.ndarray
    solve_time_s: float

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def result(self, index: int) -> OracleResult:
        """Return step ``index`` as an ``OracleResult`` (its ``solve_time_s`` is the batch's mean)."""
        return OracleResult(x=self.x[index], energy_j=float(self.energy_j[index]),
                            degradation=float(self.degradation[index]), status=str(self.status[index]),
                            success=bool(self.success[index]), excess=float(self.excess[index]),
                            candidates=int(self.candidates[index]), nodes_examined=int(self.nodes_examined[index]),
                            solve_time_s=self.solve_time_s / max(len(self), 1), objective=float(self.objective[index]))


@lru_cache(maxsize=64)
def subsets_up_to(size: int, max_members: int) -> np.ndarray:
    """Return all subsets of ``range(size)`` with at most ``max_members`` members as a boolean matrix."""
    rows = []
    for members in range(min(size, max_members) + 1):
        for combo in itertools.combinations(range(size), members):
            row = np.zeros(size, dtype=bool)
            row[list(combo)] = True
            rows.append(row)
    matrix = np.array(rows, dtype=bool).reshape(len(rows), size)
    matrix.setflags(write=False)
    return matrix


def subset_count(size: int, max_members: int) -> int:
    """Return the number of subsets of ``size`` items with at most ``max_members`` members."""
    return sum(math.comb(size, members) for members in range(min(size, max_members) + 1))


@dataclass(frozen=True)
class _Enumeration:
    """Every decision of at most K experts of one cost model, as arrays."""

    masks: np.ndarray  # (S, E) bool; row 0 is the empty decision
    members: np.ndarray  # (K, S) expert indices of each decision, padded by repeating its first member
    flat_counts: np.ndarray  # (S, N + 1) index of (n, count) in a flattened (N + 1, C + 1) node table

    @classmethod
    def build(cls, cost_model: CostModel) -> "_Enumeration":
        masks = subsets_up_to(cost_model.num_experts, cost_model.profile.top_k)
        members = np.zeros((cost_model.profile.top_k, masks.shape[0]), dtype=np.int64)
        for row, mask in enumerate(masks):
            chosen = np.flatnonzero(mask)
            if chosen.size:
                # A repeated member leaves the minimum over members unchanged.
                members[:, row] = chosen[0]
                members[:chosen.size, row] = chosen
        counts = cost_model.node_counts(masks)
        flat = np.arange(cost_model.num_nodes + 1) * (cost_model.max_count + 1) + counts
        return cls(masks=masks, members=members, flat_counts=flat)


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
        self._enumeration_data: _Enumeration | None = None
        # Degradation factor of every enumerated decision per Top-K expert, (S, K), by (layer, Top-K
        # experts in order): it does not depend on the gate values, which only weight it.
        self._factor_cache: dict[tuple[int, bytes], np.ndarray] = {}

    # -- public API -----------------------------------------------------------

    def solve(self, state: StepState) -> OracleResult:
        """Solve one step exactly."""
        start = time.perf_counter()
        enumeration = self._enumeration()
        if enumeration is not None and not self.tdma:
            return self._enumerated_result(enumeration, self._enumerate_one(enumeration, state), start)
        if enumeration is not None:
            mask, examined = self._enumerate_tdma(enumeration, state)
            candidates = self.cost_model.num_experts
        elif state.top_k.size <= TOP_K_SUBSET_LIMIT:
            search = _TopKSubsetSearch(self, state)
            mask, examined, candidates = search.run()
        else:
            mask, examined, candidates = _candidate_branch_and_bound(self, state)
        return self._result(state, mask, candidates, examined, time.perf_counter() - start)

    def solve_batch(self, batch: StepBatch) -> OracleBatchResult:
        """Solve every step of ``batch`` exactly; the same decisions as ``solve`` step by step.

        Under FDMA with the enumeration search all steps are solved together,
        in chunks that bound the memory; otherwise the steps are solved one by one.
        """
        start = time.perf_counter()
        enumeration = self._enumeration()
        if enumeration is None or self.tdma:
            results = [self.solve(batch.state(index)) for index in range(len(batch))]
            return _stack_results(results, time.perf_counter() - start, self.cost_model.num_experts)
        top_k = batch.top_k
        skip, replace = self._cost_rows(batch.layer, top_k, batch.skip_costs, batch.replace_costs)
        energy_flat = batch.tables.energy_j.reshape(len(batch), -1)
        per_step = enumeration.masks.shape[0] * top_k.shape[1] * 4
        chunk = max(1, BATCH_CHUNK_VALUES // per_step)
        parts = [self._enumerate_fdma(enumeration, energy_flat[i:i + chunk], skip[i:i + chunk],
                                      replace[i:i + chunk], top_k[i:i + chunk], batch.weights[i:i + chunk])
                 for i in range(0, len(batch), chunk)]
        merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        return self._batch_result(enumeration, merged, time.perf_counter() - start)

    # -- objective ------------------------------------------------------------

    def _excess(self, delta):
        if isinstance(delta, float):
            # The same arithmetic as below without numpy's per-call cost, for the searches' scalars.
            excess = delta - self.accuracy_budget - DEGRADATION_TOLERANCE
            return excess if excess > 0.0 else 0.0
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

    def _enumeration(self) -> _Enumeration | None:
        cm = self.cost_model
        if subset_count(cm.num_experts, cm.profile.top_k) > ENUMERATION_LIMIT:
            return None
        if self._enumeration_data is None:
            self._enumeration_data = _Enumeration.build(cm)
        return self._enumeration_data

    def _cost_rows(self, layer, top_k, skip, replace):
        """Skip costs ``(B, K)`` and replacement rows ``(B, K, E)`` of the Top-K experts, looked up if missing."""
        profile = self.cost_model.profile
        layer = np.asarray(layer).reshape(-1, 1)
        if skip is None:
            skip = profile.skip_cost[layer, top_k]
        if replace is None:
            replace = profile.replace_cost[layer, top_k]
        return skip, replace

    def _step_arrays(self, state: StepState):
        """Return the enumeration inputs of one step as a batch of one."""
        skip, replace = self._cost_rows(state.layer, state.top_k[None], None if state.skip_costs is None else
                                        state.skip_costs[None], None if state.replace_costs is None else
                                        state.replace_costs[None])
        return (state.tables.energy_j.reshape(1, -1), skip, replace, state.top_k[None], state.weights[None])

    def _enumerate_fdma(self, enumeration: _Enumeration, energy_flat, skip, replace, top_k, weights) -> dict:
        """Score every decision of at most K experts for ``B`` steps and pick each step's best.

        The degradation uses the cost model's arithmetic, so each decision's
        ``delta`` equals ``CostModel.degradation`` to the last bit.
        """
        cm = self.cost_model
        size = energy_flat.shape[0]
        energy = energy_flat[:, enumeration.flat_counts].sum(axis=-1)  # (B, S)

        members = enumeration.members
        replaced = replace[:, :, members[0]]  # (B, K, S): best replacement among each decision's experts
        for column in members[1:]:
            np.minimum(replaced, replace[:, :, column], out=replaced)
        replaced[:, :, 0] = np.inf  # the empty decision replaces nothing
        per_expert = np.ascontiguousarray(np.minimum(skip[:, :, None], replaced).transpose(0, 2, 1))  # (B, S, K)
        per_expert[enumeration.masks[:, top_k].transpose(1, 0, 2)] = 0.0
        delta = (per_expert * weights[:, None, :]).sum(axis=-1)  # (B, S)

        rows = np.arange(size)
        if self.degradation_price is None:
            # Inadmissible decisions have infinite energy, so they never win on energy.
            excess = self._excess(delta)
            within = np.where(excess == 0.0, energy, np.inf)
            best = within.argmin(axis=1)
            infeasible = np.isinf(within[rows, best])
            if infeasible.any():
                primary = np.where(np.isfinite(energy[infeasible]), excess[infeasible], np.inf)
                least = primary.min(axis=1, keepdims=True)
                best[infeasible] = np.where(primary == least, energy[infeasible], np.inf).argmin(axis=1)
        else:
            objective = energy / cm.reference_energy_j + self.degradation_price * delta
            best = np.where(np.isfinite(energy), objective, np.inf).argmin(axis=1)
        return {"index": best, "energy": energy[rows, best], "delta": delta[rows, best],
                "examined": np.full(size, enumeration.masks.shape[0])}

    def _enumerate_one(self, enumeration: _Enumeration, state: StepState) -> dict:
        """``_enumerate_fdma`` for one step, with its degradation factors cached by layer and Top-K experts."""
        key = (state.layer, state.top_k.tobytes())
        factors = self._factor_cache.get(key)
        if factors is None:
            energy_flat, skip, replace, top_k, _ = self._step_arrays(state)
            replaced = replace[:, :, enumeration.members[0]]
            for column in enumeration.members[1:]:
                np.minimum(replaced, replace[:, :, column], out=replaced)
            replaced[:, :, 0] = np.inf
            factors = np.ascontiguousarray(np.minimum(skip[:, :, None], replaced)[0].T)  # (S, K)
            factors[enumeration.masks[:, state.top_k]] = 0.0
            if len(self._factor_cache) >= FACTOR_CACHE_ENTRIES:
                self._factor_cache.clear()
            self._factor_cache[key] = factors
        energy = state.tables.energy_j.take(enumeration.flat_counts).sum(axis=-1)  # (S,)
        delta = (factors * state.weights).sum(axis=-1)  # the cost model's arithmetic, row by row
        if self.degradation_price is None:
            excess = self._excess(delta)
            within = np.where(excess == 0.0, energy, np.inf)
            best = int(within.argmin())
            if np.isinf(within[best]):
                primary = np.where(np.isfinite(energy), excess, np.inf)
                best = int(np.where(primary == primary.min(), energy, np.inf).argmin())
        else:
            objective = energy / self.cost_model.reference_energy_j + self.degradation_price * delta
            best = int(np.where(np.isfinite(energy), objective, np.inf).argmin())
        return {"index": np.array([best]), "energy": energy[best:best + 1], "delta": delta[best:best + 1],
                "examined": np.array([enumeration.masks.shape[0]])}

    def _enumerated_result(self, enumeration: _Enumeration, chosen: dict, start: float) -> OracleResult:
        """``OracleResult`` of the one step that ``_enumerate_fdma`` solved."""
        energy, delta = float(chosen["energy"][0]), float(chosen["delta"][0])
        excess = float(self._excess(delta))
        if self.degradation_price is not None:
            status, message = STATUS_OPTIMAL, "minimised energy / reference + price * delta"
            objective = energy / self.cost_model.reference_energy_j + self.degradation_price * delta
        elif excess > 0:
            status, objective = STATUS_INFEASIBLE, energy
            message = (f"no decision meets the accuracy budget {self.accuracy_budget:g}; "
                       f"returned the least excess {excess:.4g}, then least energy")
        else:
            status, message, objective = STATUS_OPTIMAL, "minimum energy within the accuracy budget", energy
        return OracleResult(x=enumeration.masks[chosen["index"][0]].copy(), energy_j=energy, degradation=delta,
                            status=status, success=status == STATUS_OPTIMAL, excess=excess,
                            candidates=self.cost_model.num_experts, nodes_examined=int(chosen["examined"][0]),
                            solve_time_s=time.perf_counter() - start, message=message, objective=objective)

    def _batch_result(self, enumeration: _Enumeration, chosen: dict, elapsed: float) -> OracleBatchResult:
        cm = self.cost_model
        energy, delta = chosen["energy"], chosen["delta"]
        excess = self._excess(delta)
        if self.degradation_price is None:
            success = excess <= 0
            objective = energy
        else:
            success = np.ones(energy.shape, dtype=bool)
            objective = energy / cm.reference_energy_j + self.degradation_price * delta
        return OracleBatchResult(
            x=enumeration.masks[chosen["index"]], energy_j=energy, degradation=delta,
            status=np.where(success, STATUS_OPTIMAL, STATUS_INFEASIBLE), success=success, excess=excess,
            candidates=np.full(energy.shape, cm.num_experts), nodes_examined=chosen["examined"],
            objective=objective, solve_time_s=elapsed)

    def _enumerate_tdma(self, enumeration: _Enumeration, state: StepState) -> tuple[np.ndarray, int]:
        """Visit decisions by their FDMA-table lower bound; stop once it cannot beat the best exact value."""
        cm = self.cost_model
        masks = enumeration.masks
        counts = cm.node_counts(masks)
        energy_bound = self._table_energy(state, counts)
        delta = cm.degradation(state, masks)
        finite = np.isfinite(energy_bound)
        if self.degradation_price is None:
            primary, secondary = self._excess(delta), energy_bound
        else:
            primary = np.zeros_like(delta)
            secondary = energy_bound / cm.reference_energy_j + self.degradation_price * delta
        primary = np.where(finite, primary, np.inf)
        order = np.lexsort((secondary, primary))
        best_index, best_score, examined = order[0], (math.inf, math.inf), 0
        for index in order:
            if not finite[index]:
                break
            bound = (float(primary[index]), float(secondary[index]))
            if bound >= best_score:
                break
            examined += 1
            energy = self._true_energy(state, counts[index])
            if not math.isfinite(energy):
                continue
            score = self._score(energy, float(delta[index]))
            if score < best_score:
                best_index, best_score = index, score
        return masks[best_index], examined

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


def _stack_results(results: list[OracleResult], elapsed: float, num_experts: int) -> OracleBatchResult:
    def column(name, dtype=None):
        return np.array([getattr(r, name) for r in results], dtype=dtype)

    x = np.stack([r.x for r in results]) if results else np.zeros((0, num_experts), dtype=bool)
    return OracleBatchResult(x=x, energy_j=column("energy_j", float), degradation=column("degradation", float),
                             status=column("status", str), success=column("success", bool),
                             excess=column("excess", float), candidates=column("candidates", np.int64),
                             nodes_examined=column("nodes_examined", np.int64),
                             objective=column("objective", float), solve_time_s=elapsed)


# -- search over subsets of the Top-K experts ------------------------------------


class _TopKSubsetSearch:
    """Exact search: which Top-K experts to compute, then which other experts to add as replacements.

    Every decision splits into its computed Top-K experts ``S`` and its other
    experts, the extras. Each ``S`` fixes part of the energy and each Top-K
    expert's best option among ``S`` and skipping. An extra can then only
    help by beating that option (fact 2), and at most one extra per remaining
    Top-K expert is useful (fact 4). Coverage vectors hold, per Top-K expert,
    the degradation weight factor of its best option: 0 when computed, else the
    least of its skip cost and its replacement costs by computed experts.
    """

    def __init__(self, oracle: SiftMoEOracle, state: StepState):
        cm = oracle.cost_model
        self.oracle = oracle
        self.cost_model = cm
        self.state = state
        self.price = oracle.degradation_price
        self.reference = cm.reference_energy_j
        self.budget = oracle.accuracy_budget
        self.nodes = cm.expert_nodes

        tables = state.tables.energy_j
        self.tables = tables
        with np.errstate(invalid="ignore"):
            steps = tables[:, 1:] - tables[:, :-1]
        self.increments = np.full(tables.shape, np.inf)  # [n, c]: energy of node n going from c to c + 1 experts
        self.increments[:, :-1] = np.where(np.isfinite(steps), steps, np.inf)

        top_k = state.top_k
        skip = state.skip_costs if state.skip_costs is not None else cm.profile.skip_cost[state.layer, top_k]
        replace = state.replace_costs if state.replace_costs is not None else \
            cm.profile.replace_cost[state.layer][top_k]
        self.skip = skip
        self.cover = np.minimum(replace, skip[:, None])  # (K, E): option of Top-K expert k if expert e is computed
        self.cover[np.arange(top_k.size), top_k] = 0.0
        self.weights = state.weights
        self.reachable = state.tables.reachable[self.nodes, 1]
        is_top = np.zeros(cm.num_experts, dtype=bool)
        is_top[top_k] = True
        self.extras = np.flatnonzero(self.reachable & ~is_top)

        self.best_score = (math.inf, math.inf)
        self.best_mask: np.ndarray | None = None
        self.examined = 0

    # -- objective --------------------------------------------------------------

    def delta(self, coverage: np.ndarray):
        return (coverage * self.weights).sum(axis=-1)

    def score(self, delta: float, energy: float) -> tuple[float, float]:
        if self.price is None:
            return float(self.oracle._excess(delta)), energy
        return 0.0, energy / self.reference + self.price * delta

    def offer(self, mask_of, delta: float, table_energy: float, counts: np.ndarray) -> None:
        """Keep the decision if it beats the incumbent; ``mask_of`` builds its mask only when needed."""
        if not math.isfinite(table_energy) or not self.score(delta, table_energy) < self.best_score:
            return
        energy = table_energy
        if self.oracle.tdma:
            energy = self.oracle._true_energy(self.state, counts)
            if not math.isfinite(energy):
                return
        score = self.score(delta, energy)
        if score < self.best_score:
            self.best_score, self.best_mask = score, mask_of()

    def _mask(self, experts) -> np.ndarray:
        mask = np.zeros(self.cost_model.num_experts, dtype=bool)
        mask[np.asarray(experts, dtype=np.int64)] = True
        return mask

    def _energy(self, counts: np.ndarray) -> float:
        return float(self.tables[self.cost_model._rows, counts].sum())

    # -- search -------------------------------------------------------------------

    def run(self) -> tuple[np.ndarray, int, int]:
        cm = self.cost_model
        top_k = self.state.top_k
        rows = np.flatnonzero(self.reachable[top_k])
        candidates = int(rows.size + self.extras.size)

        chosen_rows = ((np.arange(2**rows.size)[:, None] >> np.arange(rows.size)) & 1).astype(bool)
        in_s = np.zeros((chosen_rows.shape[0], top_k.size), dtype=bool)
        in_s[:, rows] = chosen_rows
        top_nodes = np.zeros((top_k.size, cm.num_nodes + 1), dtype=np.int64)
        top_nodes[np.arange(top_k.size), self.nodes[top_k]] = 1
        counts = in_s.astype(np.int64) @ top_nodes
        capacity = self.tables.shape[1] - 1
        energy = np.where((counts <= capacity).all(axis=1),
                          self.tables[cm._rows, np.minimum(counts, capacity)].sum(axis=1), np.inf)
        possible = np.isfinite(energy)
        by_top = np.where(in_s[:, None, :], self.cover[:, top_k][None], np.inf).min(axis=-1)  # (2^R, K)
        base = np.where(in_s, 0.0, np.minimum(self.skip, by_top))
        lowest_extra = self.cover[:, self.extras].min(axis=1) if self.extras.size else self.skip
        delta_floor = self.delta(np.minimum(base, lowest_extra))

        if self.price is None:
            primary, secondary = self.oracle._excess(delta_floor), energy
            if (primary[possible] > 0).all() and self._least_excess_shortcut():
                return self.best_mask, self.examined, candidates
            # Where the Top-K experts alone cannot reach the floor's excess, a decision needs an extra,
            # which costs at least the cheapest next increment of a node that hosts one.
            hosts = np.zeros(cm.num_nodes + 1, dtype=bool)
            hosts[self.nodes[self.extras]] = True
            if hosts.any():
                next_increment = self.increments[cm._rows[hosts], counts[:, hosts]].min(axis=1)
                needs_extra = self.oracle._excess(self.delta(base)) > primary
                secondary = np.where(needs_extra, energy + next_increment, energy)
        else:
            primary = np.zeros_like(delta_floor)
            secondary = energy / self.reference + self.price * delta_floor
        primary = np.where(possible, primary, np.inf)
        self._greedy()

        delta_base = self.delta(base)
        for index in np.lexsort((secondary, primary)).tolist():
            if (float(primary[index]), float(secondary[index])) >= self.best_score:
                break
            self.examined += 1
            experts = top_k[in_s[index]]
            self.offer(lambda: self._mask(experts), float(delta_base[index]), float(energy[index]), counts[index])
            self._add_extras(experts, base[index], counts[index], float(energy[index]))
        if self.best_mask is None:
            self.best_mask = np.zeros(cm.num_experts, dtype=bool)
        return self.best_mask, self.examined, candidates

    def _least_excess_shortcut(self) -> bool:
        """Solve a step where no decision meets the budget, if its least-excess decision is forced.

        Every decision with the least excess gives each Top-K expert of
        positive weight its lowest reachable coverage. When each such expert
        has one expert that achieves it, the decision is their union. Ties, or
        a node over capacity, leave the work to the full search.
        """
        cm = self.cost_model
        reachable = np.flatnonzero(self.reachable)
        cover = self.cover[:, reachable]
        lowest = cover.min(axis=1) if reachable.size else self.skip.copy()
        needed = (self.weights > 0) & (lowest < self.skip)
        chosen = []
        for row in np.flatnonzero(needed).tolist():
            providers = reachable[cover[row] == lowest[row]]
            if providers.size != 1:
                return False
            chosen.append(int(providers[0]))
        mask = self._mask(chosen)
        counts = cm.node_counts(mask)
        if (counts >= self.tables.shape[1]).any():
            return False
        energy = self._energy(counts)
        if not math.isfinite(energy):
            return False
        if self.oracle.tdma and not math.isfinite(self.oracle._true_energy(self.state, counts)):
            return False
        self.examined += 1
        self.offer(lambda: mask, float(self.delta(np.minimum(self.skip, lowest))), energy, counts)
        return self.best_mask is not None

    def _greedy(self) -> None:
        """Offer a first incumbent: add the expert with the best gain per joule, then drop the unneeded ones."""
        cm = self.cost_model
        candidates = np.flatnonzero(self.reachable)
        if candidates.size == 0:
            self.offer(lambda: self._mask([]), float(self.delta(self.skip)), 0.0, np.zeros(cm.num_nodes + 1, int))
            return
        cover = self.cover[:, candidates]
        nodes = self.nodes[candidates]
        coverage = self.skip.copy()
        counts = np.zeros(cm.num_nodes + 1, dtype=np.int64)
        chosen: list[int] = []
        while True:
            delta = float(self.delta(coverage))
            if self.price is None and self.oracle._excess(delta) <= 0:
                break
            gains = (np.maximum(coverage[:, None] - cover, 0.0) * self.weights[:, None]).sum(axis=0)
            marginal = self.increments[nodes, counts[nodes]]
            usable = (gains > 0) & np.isfinite(marginal)
            if not usable.any():
                break
            if self.price is None:
                value = np.where(usable, gains / np.maximum(marginal, 1e-300), -np.inf)
            else:
                value = np.where(usable, self.price * gains - marginal / self.reference, -np.inf)
                if value.max() <= 0:
                    break
            pick = int(value.argmax())
            chosen.append(pick)
            counts[nodes[pick]] += 1
            coverage = np.minimum(coverage, cover[:, pick])
        if self.price is None:
            self._drop_unneeded(chosen, cover, nodes, counts)
        coverage = np.minimum.reduce([self.skip] + [cover[:, pick] for pick in chosen])
        experts = candidates[chosen]
        self.offer(lambda: self._mask(experts), float(self.delta(coverage)), self._energy(counts), counts)

    def _drop_unneeded(self, chosen: list[int], cover: np.ndarray, nodes: np.ndarray, counts: np.ndarray) -> None:
        while chosen:
            best = None
            for position, pick in enumerate(chosen):
                rest = chosen[:position] + chosen[position + 1:]
                coverage = np.minimum.reduce([self.skip] + [cover[:, other] for other in rest])
                if self.oracle._excess(float(self.delta(coverage))) > 0:
                    continue
                saving = self.increments[nodes[pick], counts[nodes[pick]] - 1]
                if best is None or saving > best[0]:
                    best = (saving, position)
            if best is None:
                return
            pick = chosen.pop(best[1])
            counts[nodes[pick]] -= 1

    # -- extras of one Top-K subset -------------------------------------------

    def _add_extras(self, top_experts: np.ndarray, coverage: np.ndarray, counts: np.ndarray, energy: float) -> None:
        """Branch and bound over the extras that can follow the computed Top-K experts ``top_experts``."""
        open_rows = np.flatnonzero((coverage > 0) & (self.weights > 0))
        if open_rows.size == 0 or self.extras.size == 0:
            return
        if self.price is None and self.oracle._excess(float(self.delta(coverage))) <= 0:
            return  # the budget holds: extras only add energy
        capped = np.minimum(self.cover[open_rows][:, self.extras], coverage[open_rows, None])  # (d, M)
        useful = (capped < coverage[open_rows, None]).any(axis=0)
        extras, capped = self.extras[useful], capped[:, useful]
        if extras.size == 0:
            return
        extras, capped = _drop_dominated(extras, capped, self.nodes[extras])
        nodes = self.nodes[extras]
        gains = (self.weights[open_rows, None] * (coverage[open_rows, None] - capped)).sum(axis=0)
        marginal = self.increments[nodes, counts[nodes]]
        order = np.argsort(marginal / np.maximum(gains, 1e-300), kind="stable")
        extras, nodes = extras[order], nodes[order]
        _ExtrasBranchAndBound(self, top_experts, extras, nodes, open_rows).run(coverage, counts.copy(), energy)


def _drop_dominated(extras: np.ndarray, capped: np.ndarray, nodes: np.ndarray):
    """Keep the extras that no other extra on the same node matches or beats on every open row (fact 3).

    ``capped`` is ``(d, M)``, one column per extra. The extras are compared
    within their nodes only, in blocks padded with infinite costs, which never
    dominate anything.
    """
    if extras.size < 2:
        return extras, capped
    order = np.argsort(nodes, kind="stable")
    sorted_nodes = nodes[order]
    first = np.searchsorted(sorted_nodes, sorted_nodes, side="left")
    rank = np.arange(extras.size) - first  # position within the node's block
    block_of = np.unique(sorted_nodes, return_inverse=True)[1]
    blocks = np.full((block_of.max() + 1, rank.max() + 1, capped.shape[0]), np.inf)
    blocks[block_of, rank] = capped[:, order].T
    at_most = (blocks[:, :, None, :] <= blocks[:, None, :, :]).all(axis=-1)  # [g, a, b]: a is at most b everywhere
    below = (blocks[:, :, None, :] < blocks[:, None, :, :]).any(axis=-1)
    earlier = np.arange(blocks.shape[1])[:, None] < np.arange(blocks.shape[1])[None, :]
    dominates = at_most & (below | earlier)
    dominates[:, np.arange(blocks.shape[1]), np.arange(blocks.shape[1])] = False
    dominated = dominates.any(axis=1)[block_of, rank]  # per extra in sorted order
    keep = np.zeros(extras.size, dtype=bool)
    keep[order] = ~dominated
    return extras[keep], capped[:, keep]


class _ExtrasBranchAndBound:
    """Depth-first branch and bound over extras in a fixed order, for one set of computed Top-K experts."""

    def __init__(self, search: _TopKSubsetSearch, top_experts: np.ndarray, extras: np.ndarray, nodes: np.ndarray,
                 open_rows: np.ndarray):
        self.search = search
        self.top_experts = top_experts
        self.extras = extras
        self.nodes = nodes
        self.node_list = nodes.tolist()
        self.cover = np.ascontiguousarray(search.cover[:, extras].T)  # (M, K)
        # Best coverage reachable from position p onward, for the degradation floor.
        self.suffix = np.minimum.accumulate(self.cover[::-1], axis=0)[::-1]
        self.max_extras = int(open_rows.size)
        self.increments = search.increments
        self.increment_list = search.increments.tolist()
        first = search.increments[:, 0]
        second = search.increments[:, 1] if search.increments.shape[1] > 1 else np.full(first.shape, np.inf)
        self.first_increment = first
        self.second_increment = np.where(np.isfinite(second), second, 0.0)
        self.chosen: list[int] = []

    def run(self, coverage: np.ndarray, counts: np.ndarray, energy: float) -> None:
        self.counts = counts
        self._visit(0, coverage, energy)

    def _visit(self, position: int, coverage: np.ndarray, energy: float) -> None:
        search = self.search
        search.examined += 1
        delta = float(search.delta(coverage))
        if self.chosen:
            experts = np.concatenate([self.top_experts, self.extras[self.chosen]])
            search.offer(lambda: search._mask(experts), delta, energy, self.counts)
        constrained = search.price is None
        if constrained and search.oracle._excess(delta) <= 0:
            return  # adding experts only costs energy
        if position >= self.extras.size or len(self.chosen) >= self.max_extras:
            return
        if self._bound(position, coverage, delta, energy) >= search.best_score:
            return
        for index in range(position, self.extras.size):
            node = self.node_list[index]
            added = self.increment_list[node][self.counts[node]]
            if not math.isfinite(added):
                continue
            best_excess, best_energy = search.best_score
            if constrained and best_excess == 0.0 and energy + added >= best_energy:
                continue
            self.counts[node] += 1
            self.chosen.append(index)
            self._visit(index + 1, np.minimum(coverage, self.cover[index]), energy + added)
            self.chosen.pop()
            self.counts[node] -= 1

    def _bound(self, position: int, coverage: np.ndarray, delta: float, energy: float) -> tuple[float, float]:
        """Lower bound on the score of every decision below this search node."""
        search = self.search
        nodes = self.nodes[position:]
        # NOTE: the floor only drops nodes that are full already, and lets the others take every
        # remaining candidate. So steps where node capacity binds and no decision meets the budget
        # can take thousands of search nodes (see docs/benchmarks.md).
        addable = np.isfinite(self.increments[nodes, self.counts[nodes]])  # nodes with room for one more
        if addable.all():
            floor = np.minimum(coverage, self.suffix[position])
        elif addable.any():
            floor = np.minimum(coverage, self.cover[position:][addable].min(axis=0))
        else:
            floor = coverage
        delta_floor = float(search.delta(floor))
        if search.price is None:
            excess_floor = float(search.oracle._excess(delta_floor))
            best_excess = search.best_score[0]
            if excess_floor > best_excess or not math.isfinite(best_excess):
                return excess_floor, energy
            # To match the incumbent's excess, delta must fall by about this much. The slack covers the
            # rounding of the sums: without it a completion that reaches the incumbent's delta exactly
            # could look one rounding error short and be pruned.
            needed = delta - (search.budget + DEGRADATION_TOLERANCE + best_excess) - KNAPSACK_SLACK
            if needed <= 0:
                return excess_floor, energy
            return excess_floor, energy + self._knapsack(position, coverage, needed)
        floor = energy / search.reference + search.price * delta_floor
        return 0.0, max(floor, energy / search.reference + search.price * delta - self._lagrangian_gain(
            position, coverage))

    def _items(self, position: int, coverage: np.ndarray):
        """Per remaining extra: its degradation gain per Top-K expert ``(m, K)`` and a lower bound on its energy."""
        search = self.search
        gains = np.maximum(coverage - self.cover[position:], 0.0) * search.weights  # (m, K)
        nodes = self.nodes[position:]
        counts = self.counts[nodes]
        cost = self.increments[nodes, counts]
        slots = self.max_extras - len(self.chosen)
        if slots > 1:
            # Extras that share a node not yet contacted share its first increment: k of them cost at
            # least min(first, (first + (slots - 1) * second) / slots) each, for any k <= slots.
            shared = (self.first_increment[nodes] + (slots - 1) * self.second_increment[nodes]) / slots
            cost = np.where(counts == 0, np.minimum(cost, shared), cost)
        return gains, cost

    def _knapsack(self, position: int, coverage: np.ndarray, needed: float) -> float:
        """Return a lower bound on the energy that lowers delta by ``needed``: the larger of two fractional knapsacks.

        Both split a completion's energy over degradation gains at the best
        energy-per-gain ratio: one per extra, one per Top-K expert, whose gain
        cannot exceed its largest single gain however many extras cover it.
        """
        gains, cost = self._items(position, coverage)
        total = gains.sum(axis=1)
        usable = (total > 0) & np.isfinite(cost)
        if not usable.any():
            return math.inf
        ratio = np.where(usable, cost / np.where(usable, total, 1.0), np.inf)
        by_extra = _fractional_cost(total[usable], ratio[usable], needed)
        row_ratio = np.where((gains > 0) & usable[:, None], ratio[:, None], np.inf).min(axis=0)
        row_gain = np.where(np.isfinite(row_ratio), gains.max(axis=0), 0.0)
        by_row = _fractional_cost(row_gain, row_ratio, needed)
        return max(by_extra, by_row)

    def _lagrangian_gain(self, position: int, coverage: np.ndarray) -> float:
        """Upper bound on what added extras can lower ``energy / E_ref + price * delta`` by."""
        search = self.search
        gains, cost = self._items(position, coverage)
        total = gains.sum(axis=1)
        usable = (total > 0) & np.isfinite(cost)
        if not usable.any():
            return 0.0
        scaled_cost = cost / search.reference
        by_extra = float(np.maximum(search.price * total - scaled_cost, 0.0)[usable].sum())
        ratio = np.where(usable, scaled_cost / np.where(usable, total, 1.0), np.inf)
        row_ratio = np.where((gains > 0) & usable[:, None], ratio[:, None], np.inf).min(axis=0)
        by_row = float((gains.max(axis=0) * np.maximum(search.price - row_ratio, 0.0)).sum())
        return min(by_extra, by_row)


def _fractional_cost(gains: np.ndarray, ratios: np.ndarray, needed: float) -> float:
    """Return the minimum cost of item fractions that gain ``needed``, given each item's gain and cost per gain."""
    order = np.argsort(ratios, kind="stable")
    gains, ratios = gains[order], ratios[order]
    reached = np.cumsum(gains)
    last = int(np.searchsorted(reached, needed))
    if last >= gains.size or not math.isfinite(ratios[last]):
        return math.inf
    before = float(reached[last - 1]) if last else 0.0
    return float((gains[:last] * ratios[:last]).sum()) + (needed - before) * float(ratios[last])


# -- candidate branch and bound (large K) ------------------------------------------


def _candidates(oracle: SiftMoEOracle, state: StepState) -> np.ndarray:
    """Experts that can be part of an optimal decision (facts 2 and 3), Top-K first."""
    cm = oracle.cost_model
    nodes = cm.expert_nodes
    reachable = state.tables.reachable[nodes, 1]
    skip = cm.profile.skip_cost[state.layer, state.top_k]
    replace = cm.profile.replace_cost[state.layer][state.top_k]  # (K, E)

    in_top_k = np.zeros(cm.num_experts, dtype=bool)
    in_top_k[state.top_k] = True
    useful = reachable & (in_top_k | np.any(replace < skip[:, None], axis=0))
    others = np.flatnonzero(useful & ~in_top_k)
    others, _ = _drop_dominated(others, np.minimum(replace[:, others], skip[:, None]), nodes[others])
    top = [int(e) for e in state.top_k if useful[e]]
    return np.asarray(top + sorted(others.tolist()), dtype=np.int64)


def _candidate_branch_and_bound(oracle: SiftMoEOracle, state: StepState) -> tuple[np.ndarray, int, int]:
    """Depth-first branch and bound over the candidates; the bounds are energy so far and the degradation floor."""
    cm = oracle.cost_model
    candidates = _candidates(oracle, state)
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
    price = oracle.degradation_price
    reference = cm.reference_energy_j
    budget = oracle.accuracy_budget + DEGRADATION_TOLERANCE

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
            # The oracle's own excess expression, so that scores compare exactly with exact_score below.
            score = (float(oracle._excess(delta)), energy)
        else:
            score = (0.0, energy / reference + price * delta)
        if score < best["score"]:
            exact = energy if not oracle.tdma else oracle._true_energy(state, np.asarray(counts))
            if math.isfinite(exact):
                exact_score = score if not oracle.tdma else oracle._score(exact, delta)
                if exact_score < best["score"]:
                    best["score"], best["set"] = exact_score, list(chosen)
        if price is None and delta <= budget:
            return  # adding experts only costs energy
        if position >= num_candidates or len(chosen) >= max_members:
            return
        floor = [min(c, s) for c, s in zip(coverage, suffix_lists[position])]
        delta_floor = delta_of(floor)
        if price is None:
            bound = (float(oracle._excess(delta_floor)), energy)
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

    visit(0, list(skip_list), 0.0)
    mask = np.zeros(cm.num_experts, dtype=bool)
    mask[candidates[best["set"]]] = True
    return mask, examined, int(candidates.size)


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
