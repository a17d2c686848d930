"""One decoding step as a mixed-integer linear program, solved by ``scipy.optimize.milp`` (HiGHS).

A second, independent route to the oracle's optimum, for checks and for the
benchmark. Under FDMA the energy of a decision is a sum over nodes of a table
entry at the node's count of computed experts, so it is linear in one-hot
count variables. The variables are:

- ``x[j]`` (binary): expert ``j`` is computed;
- ``z[n, c]`` (binary): node ``n`` computes exactly ``c`` experts, for the
  counts ``c`` that the node can finish in time;
- ``y[i, j]`` and ``y[i, skip]`` (continuous in [0, 1]): Top-K expert ``i``
  takes expert ``j`` as its replacement, or is skipped.

with ``sum_c z[n, c] = 1``, ``sum_c c z[n, c] = sum_{j on n} x[j]``,
``y[i, j] <= x[j]`` and ``sum_j y[i, j] + y[i, skip] = 1``. The degradation
``delta = sum_i w_i (sum_j min(r_ij, s_i) y[i, j] + s_i y[i, skip])`` (with
``r_ii = 0``) reaches its minimum over ``y`` at integer ``y`` for a fixed
``x``, so the program is exact. The energy objective is scaled by the
reference energy so that HiGHS's tolerances are relative to a typical step.
When no decision meets the budget, a first program minimises ``delta`` and a
second minimises energy at that ``delta``, the oracle's lexicographic order.

TDMA shares one band among all links, which makes the energy non-separable;
this formulation rejects it.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from agents.oracle import STATUS_INFEASIBLE, STATUS_OPTIMAL, OracleResult
from wide_env.cost import DEGRADATION_TOLERANCE, CostModel, StepState

# HiGHS stops when the relative gap between its bound and its best solution is below this.
MIP_RELATIVE_GAP = 1e-9
# Slack on delta in the second program of an infeasible step, over HiGHS's feasibility tolerance.
SECOND_STAGE_DELTA_SLACK = 1e-7


class _StepProgram:
    """The arrays of one step's program; ``solve`` runs HiGHS with an objective and a delta limit."""

    def __init__(self, cost_model: CostModel, state: StepState):
        cm = cost_model
        self.cost_model = cm
        num_experts, num_nodes = cm.num_experts, cm.num_nodes + 1
        top_k = state.top_k
        layer = state.layer
        skip = cm.profile.skip_cost[layer, top_k]
        cover = np.minimum(cm.profile.replace_cost[layer][top_k], skip[:, None])  # (K, E)
        cover[np.arange(top_k.size), top_k] = 0.0
        table = state.tables.energy_j

        # Variable layout: x (E), then z over the finite table entries, then y (K * (E + 1)).
        finite = np.isfinite(table)
        z_nodes, z_counts = np.nonzero(finite)
        self.num_x = num_experts
        self.num_z = z_nodes.size
        self.num_y = top_k.size * (num_experts + 1)
        size = self.num_x + self.num_z + self.num_y
        z_start, y_start = self.num_x, self.num_x + self.num_z

        self.energy = np.zeros(size)
        self.energy[z_start:y_start] = table[z_nodes, z_counts]
        y_cost = np.concatenate([cover, skip[:, None]], axis=1)  # (K, E + 1), last column = skip
        self.delta = np.zeros(size)
        self.delta[y_start:] = (state.weights[:, None] * y_cost).ravel()

        upper = np.ones(size)
        upper[:num_experts] = state.tables.reachable[cm.expert_nodes, 1]
        self.bounds = Bounds(np.zeros(size), upper)
        self.integrality = np.zeros(size)
        self.integrality[:y_start] = 1

        rows, cols, values, lower, upper_rows = [], [], [], [], []
        row = 0
        for node in range(num_nodes):
            entries = np.flatnonzero(z_nodes == node)
            # One count per node.
            rows += [row] * entries.size
            cols += (z_start + entries).tolist()
            values += [1.0] * entries.size
            lower.append(1.0)
            upper_rows.append(1.0)
            row += 1
            # The count equals the number of computed experts on the node.
            rows += [row] * entries.size
            cols += (z_start + entries).tolist()
            values += z_counts[entries].astype(float).tolist()
            hosted = np.flatnonzero(cm.expert_nodes == node)
            rows += [row] * hosted.size
            cols += hosted.tolist()
            values += [-1.0] * hosted.size
            lower.append(0.0)
            upper_rows.append(0.0)
            row += 1
        for expert_row in range(top_k.size):
            base = y_start + expert_row * (num_experts + 1)
            # Each Top-K expert takes exactly one option.
            rows += [row] * (num_experts + 1)
            cols += list(range(base, base + num_experts + 1))
            values += [1.0] * (num_experts + 1)
            lower.append(1.0)
            upper_rows.append(1.0)
            row += 1
            # A replacement must be computed: y[i, j] - x[j] <= 0.
            for expert in range(num_experts):
                rows += [row, row]
                cols += [base + expert, expert]
                values += [1.0, -1.0]
                lower.append(-np.inf)
                upper_rows.append(0.0)
                row += 1
        matrix = coo_array((values, (rows, cols)), shape=(row, size)).tocsr()
        self.structure = LinearConstraint(matrix, lower, upper_rows)

    def solve(self, objective: np.ndarray, delta_limit: float | None):
        constraints = [self.structure]
        if delta_limit is not None:
            constraints.append(LinearConstraint(self.delta[None, :], -np.inf, delta_limit))
        return milp(objective, integrality=self.integrality, bounds=self.bounds, constraints=constraints,
                    options={"mip_rel_gap": MIP_RELATIVE_GAP})

    def decision(self, solution: np.ndarray) -> np.ndarray:
        return solution[:self.num_x] > 0.5


def solve_step_milp(cost_model: CostModel, state: StepState, accuracy_budget: float | None = None,
                    degradation_price: float | None = None) -> OracleResult:
    """Solve one FDMA decoding step with ``scipy.optimize.milp``; the result has the oracle's fields.

    ``nodes_examined`` is HiGHS's branch-and-bound node count. The energy,
    degradation and status are those of the returned decision under the
    cost model, so they compare directly with the oracle's.
    """
    if cost_model.scenario.access != "fdma":
        raise ValueError("the MILP formulation needs access='fdma': under TDMA the energy is not a sum over nodes")
    budget = cost_model.accuracy_budget if accuracy_budget is None else float(accuracy_budget)
    start = time.perf_counter()
    program = _StepProgram(cost_model, state)
    reference = cost_model.reference_energy_j
    nodes = 0

    if degradation_price is not None:
        result = program.solve(program.energy / reference + degradation_price * program.delta, None)
        nodes += int(getattr(result, "mip_node_count", 0) or 0)
    else:
        result = program.solve(program.energy / reference, budget + DEGRADATION_TOLERANCE)
        nodes += int(getattr(result, "mip_node_count", 0) or 0)
        if result.x is None:
            # No decision meets the budget: find the least delta, then the least energy at it.
            least = program.solve(program.delta, None)
            nodes += int(getattr(least, "mip_node_count", 0) or 0)
            if least.x is None:
                raise RuntimeError(f"HiGHS found no decision for the step: {least.message}")
            limit = float(program.delta @ least.x) + SECOND_STAGE_DELTA_SLACK
            result = program.solve(program.energy / reference, limit)
            nodes += int(getattr(result, "mip_node_count", 0) or 0)
    if result.x is None:
        raise RuntimeError(f"HiGHS found no decision for the step: {result.message}")

    mask = program.decision(result.x)
    cost = cost_model.evaluate(state, mask)
    excess = max(cost.degradation - budget - DEGRADATION_TOLERANCE, 0.0)
    status = STATUS_INFEASIBLE if degradation_price is None and excess > 0 else STATUS_OPTIMAL
    objective = cost.energy_j if degradation_price is None else \
        cost.energy_j / reference + degradation_price * cost.degradation
    return OracleResult(x=mask, energy_j=cost.energy_j, degradation=cost.degradation, status=status,
                        success=status == STATUS_OPTIMAL, excess=excess, candidates=cost_model.num_experts,
                        nodes_examined=nodes, solve_time_s=time.perf_counter() - start,
                        message=f"scipy.optimize.milp (HiGHS): {result.message}", objective=objective,
                        extra={"latency_ok": cost.latency_ok, "mip_gap": getattr(result, "mip_gap", math.nan)})
