"""Prefill oracles: an exact mixed-integer program and a fast best-response method.

Both solve, for one prefill step with full knowledge of the gates and gains,

    minimise E(A_1..A_S)  subject to  delta_s(A_s) <= eps for every token s
                          and every contacted node finishing within the budget

where the energy of node ``n`` is a function of the tokens it serves and the
pairs it computes (see :mod:`wide_env.prefill_cost`). When no decision meets
every token's budget, both return the decision that first minimises the total
excess ``sum_s max(delta_s - eps, 0)`` and then energy, with status
``"infeasible"``.

Per token, the decoding oracle's pruning still applies. Only reachable Top-K
experts and replacements cheaper than a skip are candidates. A candidate whose
replacement costs are all at least those of another on the same node is never
needed, because swapping it for that one keeps the node's counts. A token
computes at most K experts. Node energy grows with both counts, which the
exact program relies on to set ``u_n`` to the number of tokens that use node ``n``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from agents.base import Policy
from agents.oracle import STATUS_INFEASIBLE, STATUS_OPTIMAL, SiftMoEOracle, subset_count, subsets_up_to
from wide_env import radio
from wide_env.cost import DEGRADATION_TOLERANCE
from wide_env.prefill_cost import PrefillCostModel, PrefillState

# 2^16 decisions is the largest search the exhaustive reference accepts.
MAX_EXHAUSTIVE_BITS = 16
# Status when the solver stops at its time limit or the TDMA cut loop at its iteration limit.
STATUS_LIMIT = "limit"
# Relative optimality gap asked of HiGHS; the objective is in units of the reference energy.
MIP_RELATIVE_GAP = 1e-9
# Margin subtracted from the accuracy budget when a MILP solution overshoots it by the solver's tolerance.
BUDGET_MARGIN = 1e-6
# Slack on the least total excess when it becomes the cap of the energy minimisation.
EXCESS_SLACK = 1e-7
# The fast oracle enumerates at most this many candidate subsets per token; beyond it, it drops the
# weakest replacement candidates (see _truncate_candidates).
ENUMERATION_LIMIT = 4096


@dataclass
class PrefillOracleResult:
    """Solution of one prefill step, in the spirit of ``scipy.optimize.OptimizeResult``.

    ``x`` is the ``(S, E)`` boolean mask of computed experts. ``status`` is
    ``"optimal"``, ``"infeasible"`` or ``"limit"``. An infeasible result is the
    best effort: least total excess, then least energy. With ``"limit"`` a
    solver limit stopped the search and ``x`` is the best decision found. ``energy_j`` and the degradations are those the cost
    model charges for ``x``.
    """

    x: np.ndarray
    energy_j: float
    degradation: float
    token_degradation: np.ndarray
    excess: float
    status: str
    success: bool
    solve_time_s: float
    method: str
    message: str = ""
    extra: dict = field(default_factory=dict)


def _result(cm: PrefillCostModel, state: PrefillState, mask: np.ndarray, budget: float, method: str,
            start: float, status: str | None = None, message: str = "", **extra: Any) -> PrefillOracleResult:
    mask = np.asarray(mask, dtype=bool)
    energy = cm.decision_energy(state, mask)
    token_delta = cm.token_degradation(state, mask)
    excess = float(cm.excess(token_delta, budget))
    if status is None:
        status = STATUS_INFEASIBLE if excess > 0 else STATUS_OPTIMAL
    if not message:
        message = ("minimum energy within every token's accuracy budget" if status == STATUS_OPTIMAL else
                   f"no decision meets every token's accuracy budget {budget:g}; returned the least total "
                   f"excess {excess:.4g}, then least energy" if status == STATUS_INFEASIBLE else status)
    return PrefillOracleResult(x=mask, energy_j=energy, degradation=float(token_delta.mean()),
                               token_degradation=token_delta, excess=excess, status=status,
                               success=status == STATUS_OPTIMAL, solve_time_s=time.perf_counter() - start,
                               method=method, message=message, extra=dict(extra))


def _check_budget(cm: PrefillCostModel, accuracy_budget: float | None) -> float:
    budget = cm.accuracy_budget if accuracy_budget is None else float(accuracy_budget)
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"invalid accuracy_budget: expected a finite value >= 0, got {accuracy_budget!r}")
    return budget


# -- candidates -----------------------------------------------------------------


def token_candidates(cm: PrefillCostModel, state: PrefillState) -> list[np.ndarray]:
    """Candidate experts of every token, Top-K first (see the module docstring)."""
    nodes = cm.expert_nodes
    reachable = cm.single_token_reachable(state.gains)[nodes]
    candidates = []
    for token in range(state.num_tokens):
        top_k = state.top_k[token]
        skip = cm.profile.skip_cost[state.layer, top_k]
        replace = cm.profile.replace_cost[state.layer][top_k]  # (K, E)
        in_top_k = np.zeros(cm.num_experts, dtype=bool)
        in_top_k[top_k] = True
        useful = reachable & (in_top_k | np.any(replace < skip[:, None], axis=0))

        others = [int(e) for e in np.flatnonzero(useful & ~in_top_k)]
        undominated = []
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
                undominated.append(expert)
        candidates.append(np.asarray([int(e) for e in top_k if useful[e]] + undominated, dtype=np.int64))
    return candidates


# -- exhaustive reference -----------------------------------------------------------


def exhaustive_prefill_search(cm: PrefillCostModel, state: PrefillState,
                              accuracy_budget: float | None = None) -> PrefillOracleResult:
    """Evaluate all ``2^(S*E)`` decisions; the reference for small instances (``S*E <= 16``).

    A decision is admissible when every node it contacts finishes in time. The
    best admissible one has the least total excess, then the least energy.
    Ties keep the smaller binary index, where bit ``s*E + e`` is token ``s``,
    expert ``e``.
    """
    budget = _check_budget(cm, accuracy_budget)
    num_tokens, num_experts = state.num_tokens, cm.num_experts
    bits = num_tokens * num_experts
    if bits > MAX_EXHAUSTIVE_BITS:
        raise ValueError(f"exhaustive prefill search supports S*E <= {MAX_EXHAUSTIVE_BITS}, got "
                         f"{num_tokens}*{num_experts} = {bits}")
    start = time.perf_counter()
    indices = np.arange(2**bits)
    masks = ((indices[:, None] >> np.arange(bits)[None, :]) & 1).astype(bool).reshape(-1, num_tokens, num_experts)
    token_delta = cm.token_degradation(state, masks)
    excess = cm.excess(token_delta, budget)
    tokens, pairs = cm.loads(masks)

    loads = np.concatenate([tokens, pairs], axis=1)
    unique_loads, inverse = np.unique(loads, axis=0, return_inverse=True)
    unique_energy = np.empty(len(unique_loads))
    width = cm.num_nodes + 1
    for row, load in enumerate(unique_loads):
        uplink, downlink, compute, failed = cm.energy_of_loads(state, load[:width], load[width:])
        unique_energy[row] = math.inf if failed else uplink + downlink + compute
    energy = unique_energy[inverse.reshape(-1)]
    primary = np.where(np.isfinite(energy), excess, np.inf)
    best = int(np.lexsort((indices, energy, primary))[0])
    return _result(cm, state, masks[best], budget, "exhaustive", start, decisions=len(masks))


# -- exact mixed-integer program ----------------------------------------------------


class _ProgramBuilder:
    """Sparse rows of a linear program, added one constraint at a time."""

    def __init__(self):
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.values: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, coefficients: dict[int, float], lower: float, upper: float) -> None:
        row = len(self.lower)
        for col, value in coefficients.items():
            self.rows.append(row)
            self.cols.append(col)
            self.values.append(value)
        self.lower.append(lower)
        self.upper.append(upper)

    def constraint(self, num_variables: int) -> LinearConstraint:
        matrix = sparse.csr_array((self.values, (self.rows, self.cols)), shape=(len(self.lower), num_variables))
        return LinearConstraint(matrix, np.asarray(self.lower), np.asarray(self.upper))


class ExactPrefillOracle:
    """Exact prefill solver: a mixed-integer program solved by HiGHS (``scipy.optimize.milp``).

    Variables:

    - binary ``x[s, e]``: token ``s`` computes candidate ``e``,
    - binary ``y[s, n]``: token ``s`` is sent to edge node ``n``,
    - binary ``z[n, u, c]``, one per reachable load ``(u, c)`` of node ``n``, with
      ``sum_{u,c} z[n, u, c] <= 1`` (all zero for an idle node),
    - continuous ``a[s, k, j]``: token ``s``'s Top-K expert ``k`` is replaced by
      ``j``, or kept when ``j = k``.

    Each node's energy is the table entry of its chosen ``(u, c)``, so the
    program represents it exactly. The rows ``sum z*u = sum_s y[s, n]`` and
    ``sum z*c = sum x`` tie ``u`` and ``c`` to the decisions.

    Under TDMA the link energy is not a sum over nodes. The program then
    minimises compute energy plus a variable ``t`` bounded below by the node
    tables (each node alone in the band) and by Lagrangian dual cuts, and a
    row makes the full-power link times fit in ``T - max compute``, which is
    exactly the TDMA feasibility test. Each round evaluates the true TDMA
    energy of the solution's loads, adds the dual cut at that schedule's
    multiplier and a cut that excludes that load vector, and solves again. It
    stops when the program's bound reaches the best true (excess, energy) or
    after ``max_cut_rounds`` rounds, with status ``"limit"``.
    """

    def __init__(self, cost_model: PrefillCostModel, accuracy_budget: float | None = None,
                 time_limit_s: float = 60.0, max_cut_rounds: int = 200):
        self.cost_model = cost_model
        self.accuracy_budget = _check_budget(cost_model, accuracy_budget)
        if not time_limit_s > 0:
            raise ValueError(f"invalid time_limit_s: expected a positive number of seconds, got {time_limit_s!r}")
        self.time_limit_s = float(time_limit_s)
        self.max_cut_rounds = int(max_cut_rounds)
        self.tdma = cost_model.scenario.access == "tdma"

    def solve(self, state: PrefillState) -> PrefillOracleResult:
        start = time.perf_counter()
        program = self._build(state)
        if program["num_variables"] == 0:
            # No token has a reachable candidate: computing nothing is the only decision.
            empty = np.zeros((state.num_tokens, self.cost_model.num_experts), dtype=bool)
            return _result(self.cost_model, state, empty, self.accuracy_budget, "milp", start)
        solution = self._solve_with_excess(program, state)
        if solution is None:
            return _result(self.cost_model, state, np.zeros((state.num_tokens, self.cost_model.num_experts), bool),
                           self.accuracy_budget, "milp", start, status=STATUS_LIMIT,
                           message="HiGHS found no solution within the time limit")
        mask, status, extra = solution
        return _result(self.cost_model, state, mask, self.accuracy_budget, "milp", start, status=status, **extra)

    # -- program ------------------------------------------------------------

    def _build(self, state: PrefillState) -> dict[str, Any]:
        cm = self.cost_model
        tables = cm.node_tables(state)
        reference = cm.reference_energy_j
        candidates = token_candidates(cm, state)
        nodes = cm.expert_nodes

        x_index: dict[tuple[int, int], int] = {}
        for token, experts in enumerate(candidates):
            for expert in experts:
                x_index[(token, int(expert))] = len(x_index)
        count = len(x_index)
        y_index: dict[tuple[int, int], int] = {}
        for token, experts in enumerate(candidates):
            for node in sorted({int(nodes[e]) for e in experts if nodes[e] > 0}):
                y_index[(token, node)] = count
                count += 1

        # Reachable loads of each edge node, bounded by what its candidates allow.
        z_index: dict[int, list[tuple[int, int, int]]] = {}
        for node in range(1, cm.num_nodes + 1):
            max_tokens = sum(1 for (token, n) in y_index if n == node)
            max_pairs = sum(1 for (token, e) in x_index if nodes[e] == node)
            loads = []
            for u in range(1, max_tokens + 1):
                for c in range(u, min(max_pairs, u * int(cm.experts_per_node[node])) + 1):
                    if tables.reachable[node, u, c]:
                        loads.append((u, c, count))
                        count += 1
            z_index[node] = loads

        a_index: dict[tuple[int, int, int], tuple[int, float]] = {}
        for token, experts in enumerate(candidates):
            top_k = state.top_k[token]
            skip = cm.profile.skip_cost[state.layer, top_k]
            replace = cm.profile.replace_cost[state.layer][top_k]
            for k, expert_k in enumerate(top_k):
                for expert in experts:
                    cover = 0.0 if expert == expert_k else min(float(replace[k, expert]), float(skip[k]))
                    saving = float(state.weights[token, k]) * (float(skip[k]) - cover)
                    if saving > 0:
                        a_index[(token, k, int(expert))] = (count, saving)
                        count += 1
        # Under TDMA, t is the link energy over the reference and m the busiest node's compute time over T.
        link_column = max_compute_column = None
        if self.tdma:
            link_column, max_compute_column = count, count + 1
            count += 2
        num_variables = count

        cost = np.zeros(num_variables)
        for node, loads in z_index.items():
            for u, c, column in loads:
                node_energy = tables.compute_energy_j[node, u, c] if self.tdma else tables.energy_j[node, u, c]
                cost[column] = node_energy / reference
        local_energy = cm.flops_per_expert * cm.energy_j_per_flop[0] / reference
        for (token, expert), column in x_index.items():
            if nodes[expert] == 0:
                cost[column] = local_energy

        integrality = np.zeros(num_variables)
        integrality[: len(x_index) + len(y_index)] = 1
        for loads in z_index.values():
            for _, _, column in loads:
                integrality[column] = 1

        builder = _ProgramBuilder()
        for (token, expert), column in x_index.items():
            node = int(nodes[expert])
            if node > 0:
                builder.add({column: 1.0, y_index[(token, node)]: -1.0}, -np.inf, 0.0)
        for (token, node), column in y_index.items():
            row = {column: 1.0}
            for expert in candidates[token]:
                if nodes[expert] == node:
                    row[x_index[(token, int(expert))]] = -1.0
            builder.add(row, -np.inf, 0.0)
        for node, loads in z_index.items():
            tokens_row = {column: float(u) for u, _, column in loads}
            pairs_row = {column: float(c) for _, c, column in loads}
            for (token, n), column in y_index.items():
                if n == node:
                    tokens_row[column] = -1.0
            for (token, expert), column in x_index.items():
                if nodes[expert] == node:
                    pairs_row[column] = -1.0
            if not loads:
                continue
            builder.add(tokens_row, 0.0, 0.0)
            builder.add(pairs_row, 0.0, 0.0)
            builder.add({column: 1.0 for _, _, column in loads}, -np.inf, 1.0)
        local = [column for (token, expert), column in x_index.items() if nodes[expert] == 0]
        if local:
            max_local = math.floor(cm.latency_budget_s * cm.flops_per_s[0] / cm.flops_per_expert + 1e-9)
            builder.add({column: 1.0 for column in local}, -np.inf, float(max_local))
        for token in range(state.num_tokens):
            row = {x_index[(token, int(e))]: 1.0 for e in candidates[token]}
            if row:
                builder.add(row, -np.inf, float(cm.top_k))
        by_top_k: dict[tuple[int, int], dict[int, float]] = {}
        for (token, k, expert), (column, _) in a_index.items():
            builder.add({column: 1.0, x_index[(token, expert)]: -1.0}, -np.inf, 0.0)
            by_top_k.setdefault((token, k), {})[column] = 1.0
        for row in by_top_k.values():
            builder.add(row, -np.inf, 1.0)

        # delta_s = sum_k w_k skip_k - sum of savings, so delta_s <= eps reads savings >= sum_k w_k skip_k - eps.
        full_skip = [float((cm.profile.skip_cost[state.layer, state.top_k[s]] * state.weights[s]).sum())
                     for s in range(state.num_tokens)]
        savings: list[dict[int, float]] = [{} for _ in range(state.num_tokens)]
        for (token, k, expert), (column, saving) in a_index.items():
            savings[token][column] = saving

        bounds_low = np.zeros(num_variables)
        bounds_high = np.ones(num_variables)
        if self.tdma:
            cost[link_column] = 1.0
            bounds_high[link_column] = np.inf
            # The solo tables bound each node's links from below, and the links at full
            # power must fit in the band time T - max compute (exactly the TDMA feasibility test).
            solo = {link_column: 1.0}
            band_time = {max_compute_column: 1.0}
            for node, loads in z_index.items():
                compute_row = {max_compute_column: 1.0}
                for u, c, column in loads:
                    link = tables.uplink_energy_j[node, u, c] + tables.downlink_energy_j[node, u, c]
                    solo[column] = -link / reference
                    compute_row[column] = -c * cm.flops_per_expert / cm.flops_per_s[node] / cm.latency_budget_s
                    band_time[column] = cm.min_round_trip_s(state.gains, node, u) / cm.latency_budget_s
                builder.add(compute_row, 0.0, np.inf)
            builder.add(solo, 0.0, np.inf)
            builder.add(band_time, -np.inf, 1.0)
        return {"cost": cost, "integrality": integrality, "builder": builder, "num_variables": num_variables,
                "bounds": (bounds_low, bounds_high), "x_index": x_index, "z_index": z_index,
                "savings": savings, "full_skip": full_skip, "cuts": [], "link_column": link_column,
                "max_compute_column": max_compute_column}

    def _dual_cut(self, program: dict[str, Any], state: PrefillState, multiplier: float):
        """TDMA cut ``t >= (sum_n h_n(u_n; lam) - lam * (T - max compute)) / E_ref`` (weak duality)."""
        cm = self.cost_model
        scale = multiplier * cm.latency_budget_s / cm.reference_energy_j
        row = {program["link_column"]: 1.0, program["max_compute_column"]: -scale}
        for node, loads in program["z_index"].items():
            if not loads:
                continue
            tokens = np.array([u for u, _, _ in loads], dtype=np.float64)
            link = cm.tdma_dual_link_energy(state.gains[node - 1], tokens, multiplier)
            for (_, _, column), energy in zip(loads, link):
                row[column] = -float(energy) / cm.reference_energy_j
        return row, -scale, np.inf

    def _solve_program(self, program: dict[str, Any], budget: float, excess_cap: float | None,
                       minimise_excess: bool):
        """Solve with per-token accuracy rows; with excess variables when ``excess_cap`` or ``minimise_excess``."""
        num_tokens = len(program["full_skip"])
        base = program["num_variables"]
        with_excess = minimise_excess or excess_cap is not None
        num_variables = base + (num_tokens if with_excess else 0)
        cost = np.zeros(num_variables)
        if minimise_excess:
            cost[base:] = 1.0
        else:
            cost[:base] = program["cost"]
        integrality = np.concatenate([program["integrality"], np.zeros(num_variables - base)])
        low = np.concatenate([program["bounds"][0], np.zeros(num_variables - base)])
        high = np.concatenate([program["bounds"][1], np.full(num_variables - base, np.inf)])

        builder: _ProgramBuilder = program["builder"]
        extra = _ProgramBuilder()
        for token in range(num_tokens):
            row = dict(program["savings"][token])
            if with_excess:
                row[base + token] = 1.0
            extra.add(row, program["full_skip"][token] - budget - DEGRADATION_TOLERANCE, np.inf)
        if excess_cap is not None:
            extra.add({base + token: 1.0 for token in range(num_tokens)}, -np.inf, excess_cap)
        for cut in program["cuts"]:
            extra.add(*cut)
        constraints = [builder.constraint(num_variables)] if builder.lower else []
        if extra.lower:
            constraints.append(extra.constraint(num_variables))
        return milp(cost, integrality=integrality, bounds=Bounds(low, high), constraints=constraints,
                    options={"time_limit": self.time_limit_s, "mip_rel_gap": MIP_RELATIVE_GAP})

    def _mask(self, program: dict[str, Any], solution: np.ndarray, num_tokens: int) -> np.ndarray:
        mask = np.zeros((num_tokens, self.cost_model.num_experts), dtype=bool)
        for (token, expert), column in program["x_index"].items():
            mask[token, expert] = solution[column] > 0.5
        return mask

    def _solve_at_excess(self, program: dict[str, Any], budget: float, least_excess: float):
        """Minimise energy among decisions whose total excess is at most ``least_excess`` plus a slack.

        HiGHS can report such a program infeasible when the cap sits within its
        tolerances of the least excess, so three tries use ``EXCESS_SLACK``
        times 1, 10 and 100 (relative to the excess when it exceeds 1). Returns
        the last result and its cap, with the cap ``None`` when every try was
        infeasible.
        """
        result = None
        for slack in (EXCESS_SLACK, 10 * EXCESS_SLACK, 100 * EXCESS_SLACK):
            cap = least_excess + slack * max(1.0, least_excess)
            result = self._solve_program(program, budget, cap, minimise_excess=False)
            if result.status != 2:
                return result, cap
        return result, None

    def _solve_with_excess(self, program: dict[str, Any], state: PrefillState):
        """Solve with zero excess if possible, else minimise the total excess first and then energy."""
        if self.tdma:
            return self._solve_tdma(program, state)
        budget = self.accuracy_budget
        excess_cap = None
        for _ in range(3):
            result = self._solve_program(program, budget, excess_cap, minimise_excess=False)
            if result.status == 2 and excess_cap is None:
                # No decision meets every token's budget: find the least total excess first.
                phase_one = self._solve_program(program, budget, None, minimise_excess=True)
                if phase_one.x is None:
                    return None
                result, excess_cap = self._solve_at_excess(program, budget, float(phase_one.fun))
                if excess_cap is None:
                    # The least-excess solution is still valid; only its energy is not minimised.
                    mask = self._mask(program, phase_one.x, state.num_tokens)
                    return mask, STATUS_LIMIT, {"milp_status": 2, "message": "energy not minimised: HiGHS "
                                                "rejected every excess cap near the least excess"}
            if result.x is None:
                return None
            mask = self._mask(program, result.x, state.num_tokens)
            token_delta = self.cost_model.token_degradation(state, mask)
            overshoot = excess_cap is None and np.any(token_delta > self.accuracy_budget + DEGRADATION_TOLERANCE)
            if not overshoot:
                break
            # HiGHS met a row only within its feasibility tolerance; tighten the budget and solve again.
            budget -= BUDGET_MARGIN
        status = None if result.status == 0 else STATUS_LIMIT
        return mask, status, {"milp_status": int(result.status), "milp_objective": float(result.fun)}

    def _solve_tdma(self, program: dict[str, Any], state: PrefillState):
        """Close the gap between the per-node lower bounds and the true shared-band energy by cuts.

        Each round solves the program at the current excess level, evaluates the
        true TDMA energy of the solution's loads and excludes that load vector.
        When a level has no load vector left, the least excess among the rest
        becomes the next level. The search stops when the program's bound cannot
        beat the best true (excess, energy) found, or after ``max_cut_rounds``
        rounds with status ``"limit"``.
        """
        cm = self.cost_model
        budget = self.accuracy_budget
        excess_cap = None
        best_mask, best_excess, best_energy = None, math.inf, math.inf
        status, rounds = None, 0
        for start in (cm.top_k_mask(state), token_by_token_decision(cm, state)):
            multiplier = cm.tdma_multiplier(state, *cm.loads(start))
            if multiplier is not None:
                program["cuts"].append(self._dual_cut(program, state, multiplier))
        while True:
            if rounds >= self.max_cut_rounds:
                status = STATUS_LIMIT
                break
            result = self._solve_program(program, budget, excess_cap, minimise_excess=False)
            energy_bound_known = True
            if result.status == 2:
                phase_one = self._solve_program(program, budget, None, minimise_excess=True)
                if phase_one.x is None or float(phase_one.fun) > best_excess + EXCESS_SLACK:
                    break  # every remaining load vector has more excess than the best decision
                result, cap = self._solve_at_excess(program, budget, float(phase_one.fun))
                if cap is None:
                    # Take the least-excess solution itself and cut it, so that the loop progresses.
                    result, energy_bound_known = phase_one, False
                else:
                    excess_cap = cap
            if result.x is None:
                status = STATUS_LIMIT
                break
            level = 0.0 if excess_cap is None else excess_cap
            if energy_bound_known:
                bound = float(result.fun) * cm.reference_energy_j
                if best_excess <= level + EXCESS_SLACK and best_energy <= bound * (1.0 + 1e-9) + 1e-15:
                    break
            candidate = self._mask(program, result.x, state.num_tokens)
            energy = cm.decision_energy(state, candidate)
            excess = float(cm.excess(cm.token_degradation(state, candidate), self.accuracy_budget))
            if math.isfinite(energy) and (excess < best_excess - 1e-12 or
                                          (excess <= best_excess + 1e-12 and energy < best_energy)):
                best_mask, best_excess, best_energy = candidate, excess, energy
            program["cuts"].append(self._exclude_loads(program, result.x))
            multiplier = cm.tdma_multiplier(state, *cm.loads(candidate))
            if multiplier is not None:
                program["cuts"].append(self._dual_cut(program, state, multiplier))
            rounds += 1
        if best_mask is None:
            return None
        return best_mask, status, {"cut_rounds": rounds}

    @staticmethod
    def _exclude_loads(program, solution):
        """Build a cut that removes exactly the load vector of ``solution``.

        With ``P`` the chosen ``z`` of the contacted nodes and ``Q`` every ``z`` of
        the idle nodes, ``sum_P z - sum_Q z <= |P| - 1`` is violated by that load
        vector alone: any other one drops a member of ``P`` or adds one of ``Q``.
        """
        row: dict[int, float] = {}
        chosen = 0
        for loads in program["z_index"].values():
            columns = [column for _, _, column in loads]
            used = [column for column in columns if solution[column] > 0.5]
            if used:
                row[used[0]] = 1.0
                chosen += 1
            else:
                row.update({column: -1.0 for column in columns})
        return row, -np.inf, chosen - 1.0


# -- fast best-response method ----------------------------------------------------------


def _truncate_candidates(cm: PrefillCostModel, state: PrefillState, token: int,
                         candidates: np.ndarray) -> np.ndarray:
    """Drop the weakest replacement candidates until at most ``ENUMERATION_LIMIT`` subsets remain.

    Top-K candidates are always kept; replacements are ranked by their weighted
    saving over skipping, summed over the token's Top-K experts.
    """
    if subset_count(len(candidates), cm.top_k) <= ENUMERATION_LIMIT:
        return candidates
    top_k = state.top_k[token]
    in_top_k = np.isin(candidates, top_k)
    skip = cm.profile.skip_cost[state.layer, top_k]
    replace = cm.profile.replace_cost[state.layer][top_k][:, candidates]  # (K, M)
    saving = (state.weights[token][:, None] * np.maximum(skip[:, None] - replace, 0.0)).sum(axis=0)
    keep = int(in_top_k.sum())
    while subset_count(keep + 1, cm.top_k) <= ENUMERATION_LIMIT:
        keep += 1
    others = np.flatnonzero(~in_top_k)
    others = others[np.argsort(-saving[others], kind="stable")][: max(keep - int(in_top_k.sum()), 0)]
    return np.concatenate([candidates[in_top_k], candidates[np.sort(others)]])


class _TokenOptions:
    """Candidate decisions of one token, with their per-node counts and degradation."""

    def __init__(self, cm: PrefillCostModel, state: PrefillState, token: int, candidates: np.ndarray,
                 budget: float):
        candidates = _truncate_candidates(cm, state, token, candidates)
        subsets = subsets_up_to(len(candidates), cm.top_k)
        self.masks = np.zeros((len(subsets), cm.num_experts), dtype=bool)
        self.masks[:, candidates] = subsets
        self.counts = self.masks.astype(np.int64) @ cm.node_onehot  # (P, N + 1)
        self.served = (self.counts > 0).astype(np.int64)
        computed = np.zeros((len(subsets), state.num_tokens, cm.num_experts), dtype=bool)
        computed[:, token] = self.masks
        self.degradation = cm.token_degradation(state, computed)[:, token]
        self.excess = np.maximum(self.degradation - budget - DEGRADATION_TOLERANCE, 0.0)


class _FdmaObjective:
    """Total energy of load vectors under FDMA: the sum of the nodes' exact energies ``E_n(u_n, c_n)``."""

    def __init__(self, cm: PrefillCostModel, state: PrefillState):
        self.cm, self.state = cm, state
        self.rows = np.arange(cm.num_nodes + 1)
        try:
            self.table = cm.node_tables(state).energy_j
        except ValueError:
            self.table = None  # too large to tabulate: evaluate the counts on demand

    def __call__(self, tokens: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        if self.table is not None:
            energy = self.table[self.rows, tokens, pairs]
        else:
            uplink, downlink, compute, ok = self.cm.node_energy(self.state.gains, tokens, pairs)
            energy = np.where(ok, uplink + downlink + compute, np.inf)
        return energy.sum(axis=-1)

    def update(self, tokens: np.ndarray, pairs: np.ndarray) -> bool:
        """Return False: FDMA energies do not depend on a schedule, so there is nothing to update."""
        return False


class _TdmaObjective:
    """Lagrangian estimate of the TDMA energy of load vectors, exact at the loads it was updated with.

    For a multiplier ``lam`` of the shared band time, the link energy of a load
    is estimated by ``sum_n h_n(u_n; lam) - lam * (T - max compute)`` (see
    :meth:`PrefillCostModel.tdma_dual_link_energy`), which equals the optimal
    schedule's energy when ``lam`` is that schedule's multiplier and bounds it
    from below otherwise. Loads whose links cannot fit at full power in the
    band time are infinite, exactly as in the cost model.
    """

    def __init__(self, cm: PrefillCostModel, state: PrefillState, initial_loads):
        self.cm, self.state = cm, state
        width = cm.num_nodes + 1
        self.rows = np.arange(cm.num_nodes)
        counts = np.arange(state.num_tokens + 1)
        self.round_trip = np.array([[cm.min_round_trip_s(state.gains, node, u) for u in counts]
                                    for node in range(1, width)])  # (N, S + 1)
        self.compute_time = cm.flops_per_expert / cm.flops_per_s  # per pair, (N + 1,)
        self.compute_energy = cm.flops_per_expert * cm.energy_j_per_flop
        self.hosted = cm.experts_per_node
        self.multiplier = None
        self.link = None
        for tokens, pairs in initial_loads:
            if self.update(tokens, pairs):
                break
        if self.multiplier is None:
            # No start has a feasible schedule: price the band time as if one token used the whole band.
            single = radio.tx_energy_derivative(cm.latency_budget_s / 2, cm.payload_bits, state.gains.max(),
                                                cm.bandwidth_hz, cm.noise_psd_w_per_hz)
            self._set_multiplier(float(-single))

    def _set_multiplier(self, multiplier: float) -> None:
        counts = np.arange(self.state.num_tokens + 1, dtype=np.float64)
        self.multiplier = multiplier
        self.link = self.cm.tdma_dual_link_energy(self.state.gains[:, None], counts[None, :], multiplier)

    def update(self, tokens: np.ndarray, pairs: np.ndarray) -> bool:
        """Take the multiplier of the optimal schedule of these loads; return whether the estimate changed."""
        multiplier = self.cm.tdma_multiplier(self.state, tokens, pairs)
        if multiplier is None or not multiplier > 0:
            return False
        if self.multiplier is not None and abs(multiplier - self.multiplier) <= 1e-9 * self.multiplier:
            return False
        self._set_multiplier(multiplier)
        return True

    def __call__(self, tokens: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        edge_tokens, edge_pairs = tokens[..., 1:], pairs[..., 1:]
        compute = (pairs * self.compute_energy).sum(axis=-1)
        busiest = (edge_pairs * self.compute_time[1:]).max(axis=-1)
        band_time = self.cm.latency_budget_s - busiest
        needed = self.round_trip[self.rows, edge_tokens].sum(axis=-1)
        link = self.link[self.rows, edge_tokens].sum(axis=-1)
        contacted = (edge_pairs > 0).any(axis=-1)
        estimate = compute + np.where(contacted, link - self.multiplier * band_time, 0.0)
        possible = np.all((pairs >= tokens) & (pairs <= tokens * self.hosted), axis=-1)
        source_ok = pairs[..., 0] * self.compute_time[0] <= self.cm.latency_budget_s
        ok = possible & source_ok & (needed <= band_time)
        return np.where(ok, estimate, np.inf)


class FastPrefillOracle:
    """Best-response (coordinate descent) on marginal node costs, for prompts too long for the MILP.

    Starting from a decision, each token in turn takes its best decision given
    the loads of all other tokens. Every subset of at most K of its candidates
    is scored by its total excess and the total energy of the resulting loads,
    and the best replaces the current one. Sweeps repeat until no token
    changes. When single moves are stuck while a token exceeds its budget,
    joint moves of that token with each other token are tried.

    The method runs from three starts: no expert computed, Top-K, and the
    decoding oracle's decision for each token alone with the decoding budget.
    It returns the best decision by the true cost with the starts themselves
    among the candidates. So with the default starts it never costs more than
    Top-K or the token-by-token decoding oracle when those finish in time and
    meet every token's budget. ``starts`` selects a subset of the three. The
    token-by-token start runs the decoding oracle once per token, which
    dominates the time for presets with many experts and a large K.

    Under FDMA the sweeps use the exact node energies. Under TDMA they use a
    Lagrangian estimate of the shared-band energy whose multiplier is updated
    from the current loads after every sweep, and the final choice uses the
    true TDMA energy.
    """

    STARTS = ("empty", "top_k", "token_by_token")

    def __init__(self, cost_model: PrefillCostModel, accuracy_budget: float | None = None,
                 max_sweeps: int = 30, starts: tuple[str, ...] = STARTS):
        self.cost_model = cost_model
        self.accuracy_budget = _check_budget(cost_model, accuracy_budget)
        if max_sweeps < 1:
            raise ValueError(f"invalid max_sweeps: expected a positive integer, got {max_sweeps!r}")
        unknown = [name for name in starts if name not in self.STARTS]
        if unknown or not starts:
            raise ValueError(f"invalid starts: expected a non-empty subset of {', '.join(self.STARTS)}, "
                             f"got {starts!r}")
        self.max_sweeps = int(max_sweeps)
        self.starts = tuple(starts)
        self.tdma = cost_model.scenario.access == "tdma"
        self._decode_oracle = SiftMoEOracle(cost_model.decode, self.accuracy_budget)

    def solve(self, state: PrefillState) -> PrefillOracleResult:
        cm = self.cost_model
        start = time.perf_counter()
        candidates = token_candidates(cm, state)
        options = [_TokenOptions(cm, state, token, candidates[token], self.accuracy_budget)
                   for token in range(state.num_tokens)]
        top_k = cm.top_k_mask(state)
        starts = {"empty": lambda: np.zeros((state.num_tokens, cm.num_experts), dtype=bool),
                  "top_k": lambda: top_k,
                  "token_by_token": lambda: token_by_token_decision(cm, state, self._decode_oracle)}

        best = None
        sweeps_done = {}
        for name in self.starts:
            initial = starts[name]()
            runs = [initial]
            objective = self._objective(state, [cm.loads(initial), cm.loads(top_k)])
            if np.isfinite(objective(*cm.loads(initial))):
                search = _LocalSearch(cm, options, initial, objective)
                sweeps_done[name] = search.run(self.max_sweeps)
                runs.extend(search.visited)
            for mask in runs:
                score = self._score(state, mask)
                if best is None or score < best[0]:
                    best = (score, mask, name)
        return _result(cm, state, best[1], self.accuracy_budget, "best-response", start, start_point=best[2],
                       sweeps=sweeps_done)

    def _objective(self, state: PrefillState, initial_loads):
        if self.tdma:
            return _TdmaObjective(self.cost_model, state, initial_loads)
        return _FdmaObjective(self.cost_model, state)

    def _score(self, state: PrefillState, mask: np.ndarray) -> tuple[float, float]:
        energy = self.cost_model.decision_energy(state, mask)
        if not math.isfinite(energy):
            return math.inf, math.inf
        excess = float(self.cost_model.excess(self.cost_model.token_degradation(state, mask), self.accuracy_budget))
        return excess, energy


class _LocalSearch:
    """Loads and choices of the best-response descent.

    ``choice[s]`` indexes token ``s``'s options, or is -1 while the token keeps a
    start decision that is not among them. Moves are accepted only when they
    strictly lower the lexicographic objective (total excess, energy).
    ``visited`` keeps the decision after every round of sweeps, because under
    TDMA the estimate that the sweeps minimise changes between rounds.
    """

    def __init__(self, cm: PrefillCostModel, options: list[_TokenOptions], initial: np.ndarray, objective):
        self.options = options
        self.objective = objective
        self.initial = initial
        self.choice = []
        for token, option in enumerate(options):
            matches = np.flatnonzero(np.all(option.masks == initial[token], axis=1))
            self.choice.append(int(matches[0]) if matches.size else -1)
        self.per_token = initial.astype(np.int64) @ cm.node_onehot  # (S, N + 1)
        self.tokens = (self.per_token > 0).sum(axis=0)
        self.pairs = self.per_token.sum(axis=0)
        self.visited: list[np.ndarray] = []

    def run(self, max_sweeps: int) -> int:
        """Alternate sweeps, pair moves and objective updates until nothing changes; returns the sweeps run."""
        sweeps = 0
        while sweeps < max_sweeps:
            sweeps += self.sweep(max_sweeps - sweeps)
            # Single moves are stuck; a pair move can free capacity that a violating token needs.
            moved = self.pair_moves()
            self.visited.append(self.mask())
            repriced = self.objective.update(self.tokens, self.pairs)
            if not moved and not repriced:
                break
        return sweeps

    def _move(self, token: int, index: int) -> None:
        option = self.options[token]
        self.tokens = self.tokens - (self.per_token[token] > 0) + option.served[index]
        self.pairs = self.pairs - self.per_token[token] + option.counts[index]
        self.per_token[token] = option.counts[index]
        self.choice[token] = index

    @staticmethod
    def _improves(primary, energy, current_primary, current_energy) -> bool:
        if primary != current_primary:
            return primary < current_primary
        return energy < current_energy - 1e-12 * abs(current_energy)

    def sweep(self, max_sweeps: int) -> int:
        """Best responses of every token in turn until none changes; returns the sweeps run."""
        sweeps = 0
        for sweeps in range(1, max_sweeps + 1):
            changed = False
            for token, option in enumerate(self.options):
                others_tokens = self.tokens - (self.per_token[token] > 0)
                others_pairs = self.pairs - self.per_token[token]
                energy = self.objective(others_tokens[None, :] + option.served, others_pairs[None, :] + option.counts)
                primary = np.where(np.isfinite(energy), option.excess, np.inf)
                best = int(np.lexsort((energy, primary))[0])
                current = self.choice[token]
                if current >= 0 and not self._improves(primary[best], energy[best], primary[current],
                                                       energy[current]):
                    continue
                if not np.isfinite(primary[best]):
                    continue
                self._move(token, best)
                changed = True
            if not changed:
                break
        return sweeps

    def pair_moves(self) -> bool:
        """Try joint moves of each violating token with each other token; returns whether one was made.

        Only tokens whose excess is above the least excess among their options
        are tried, because no load change can do better than that.
        """
        moved = False
        for first, option in enumerate(self.options):
            current_first = self.choice[first]
            if current_first < 0 or option.excess[current_first] <= option.excess.min():
                continue
            for second in range(len(self.options)):
                if second == first or self.choice[second] < 0:
                    continue
                if self._pair_move(first, second):
                    moved = True
                    break
        return moved

    def _pair_move(self, first: int, second: int) -> bool:
        a, b = self.options[first], self.options[second]
        rest_tokens = self.tokens - (self.per_token[first] > 0) - (self.per_token[second] > 0)
        rest_pairs = self.pairs - self.per_token[first] - self.per_token[second]
        counts = a.counts[:, None, :] + b.counts[None, :, :]  # (Pa, Pb, N + 1)
        served = a.served[:, None, :] + b.served[None, :, :]
        energy = self.objective(rest_tokens + served, rest_pairs + counts)
        primary = np.where(np.isfinite(energy), a.excess[:, None] + b.excess[None, :], np.inf)
        flat = int(np.lexsort((energy.ravel(), primary.ravel()))[0])
        i, j = np.unravel_index(flat, primary.shape)
        ci, cj = self.choice[first], self.choice[second]
        if not self._improves(primary[i, j], energy[i, j], primary[ci, cj], energy[ci, cj]):
            return False
        self._move(first, int(i))
        self._move(second, int(j))
        return True

    def mask(self) -> np.ndarray:
        result = np.zeros_like(self.initial, dtype=bool)
        for token, option in enumerate(self.options):
            result[token] = option.masks[self.choice[token]] if self.choice[token] >= 0 else self.initial[token]
        return result


def token_by_token_decision(cm: PrefillCostModel, state: PrefillState,
                            decode_oracle: SiftMoEOracle | None = None) -> np.ndarray:
    """Solve each token alone with the decoding oracle and its latency budget; return the ``(S, E)`` mask."""
    oracle = decode_oracle if decode_oracle is not None else SiftMoEOracle(cm.decode)
    mask = np.zeros((state.num_tokens, cm.num_experts), dtype=bool)
    for token in range(state.num_tokens):
        step = cm.decode.make_state(state.layer, token, state.gates[token], state.gains)
        mask[token] = oracle.solve(step).x
    return mask


# -- policies ---------------------------------------------------------------------------


class PrefillPolicy(Policy):
    """A decision rule for ``WIDE-Prefill-v0``: ``decide`` returns a MultiBinary action of shape ``(S*E,)``."""

    def __init__(self, env):
        from wide_env.prefill import WidePrefillEnv

        base = getattr(env, "unwrapped", env)
        if not isinstance(base, WidePrefillEnv):
            raise TypeError(f"{type(self).__name__} needs a WIDE-Prefill-v0 env, got {type(base).__name__}")
        self.env = base
        self.cost_model = base.cost_model
        self.num_experts = base.num_experts
        self.num_tokens = base.num_tokens

    @staticmethod
    def _state(info: dict[str, Any], csi: str) -> PrefillState:
        try:
            privileged = info["privileged"]
        except (KeyError, TypeError):
            raise ValueError("this policy needs info['privileged'] from WIDE-Prefill-v0's reset() or step()") from None
        return privileged["state" if csi == "true" else "observed_state"]

    def _mask_to_action(self, mask: np.ndarray) -> np.ndarray:
        return np.asarray(mask, dtype=np.int8).reshape(-1)


class PrefillTopKPolicy(PrefillPolicy):
    """Conventional Top-K routing for every prompt token, blind to the channel."""

    name = "topk"

    def decide(self, observation, info):
        gates = np.asarray(observation[: self.num_tokens * self.num_experts]).reshape(self.num_tokens,
                                                                                       self.num_experts)
        top_k = np.argsort(-gates, axis=1, kind="stable")[:, : self.cost_model.top_k]
        mask = np.zeros(gates.shape, dtype=bool)
        np.put_along_axis(mask, top_k, True, axis=1)
        return self._mask_to_action(mask)


class PrefillOraclePolicy(PrefillPolicy):
    """A prefill oracle as a policy, on the true CSI (genie bound) or on the observed CSI.

    ``method`` is ``"exact"`` (the MILP), ``"fast"`` (best response) or
    ``"token-by-token"`` (the decoding oracle for each token alone).
    """

    uses_privileged = True
    METHODS = ("exact", "fast", "token-by-token")

    def __init__(self, env, method: str = "fast", csi: str = "true", accuracy_budget: float | None = None,
                 **solver_options: Any):
        super().__init__(env)
        if method not in self.METHODS:
            raise ValueError(f"invalid method: expected one of {', '.join(self.METHODS)}, got {method!r}")
        if csi not in ("true", "observed"):
            raise ValueError(f"invalid csi: expected 'true' or 'observed', got {csi!r}")
        self.method, self.csi = method, csi
        self.name = f"prefill-{method}" + ("" if csi == "true" else "-observed")
        if method == "exact":
            self.oracle = ExactPrefillOracle(self.cost_model, accuracy_budget, **solver_options)
        elif method == "fast":
            self.oracle = FastPrefillOracle(self.cost_model, accuracy_budget, **solver_options)
        else:
            self.oracle = SiftMoEOracle(self.cost_model.decode, accuracy_budget)
        self.last_result: PrefillOracleResult | None = None

    def decide(self, observation, info):
        state = self._state(info, self.csi)
        if self.method == "token-by-token":
            return self._mask_to_action(token_by_token_decision(self.cost_model, state, self.oracle))
        self.last_result = self.oracle.solve(state)
        return self._mask_to_action(self.last_result.x)
