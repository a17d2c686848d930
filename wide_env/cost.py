"""Cost of an expert-selection decision: energy, latency feasibility and degradation.

This module is the single place that turns a step's state and a decision (the
set of computed experts) into energy in joules, constraint flags and the
degradation bound ``delta``. The environments, the oracle, the baselines and
the evaluation all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from wide_env import radio
from wide_env.config import ScenarioConfig
from wide_env.profile import MoEProfile, top_k_weights

# Slack on the accuracy constraint so that a decision exactly at the budget counts as feasible.
DEGRADATION_TOLERANCE = 1e-9
# Longest rows that sum_last_axis adds column by column.
SHORT_ROW_LIMIT = 32


def sum_last_axis(values: np.ndarray) -> np.ndarray:
    """``values.sum(axis=-1)`` to the last bit, faster for many short rows.

    numpy reduces a row with pairwise summation: fewer than 8 values from left
    to right, otherwise eight running sums over blocks of 8, combined as
    ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``, then the remainder
    from left to right. Doing the same additions on whole columns rounds the
    same way without numpy's per-row overhead. Rows longer than
    ``SHORT_ROW_LIMIT`` go to numpy, whose overhead they amortise.
    """
    # NOTE: this follows numpy's summation order, checked for numpy 2.4. The batched and single
    # costs agree to the last bit only while it holds, so tests/wide_env/test_vector.py compares them.
    width = values.shape[-1]
    if values.ndim == 1 or width > SHORT_ROW_LIMIT or width < 2:
        return values.sum(axis=-1)
    columns = [values[..., index] for index in range(width)]
    if width < 8:
        total = columns[0] + columns[1]
        for column in columns[2:]:
            total += column
        return total
    blocks = width - width % 8
    running = list(columns[:8])
    for start in range(8, blocks, 8):
        running = [running[lane] + columns[start + lane] for lane in range(8)]
    total = ((running[0] + running[1]) + (running[2] + running[3])) + \
        ((running[4] + running[5]) + (running[6] + running[7]))
    for column in columns[blocks:]:
        total = total + column
    return total


def _sum_one_row(values: np.ndarray) -> float:
    """``float(values.sum())`` for a 1-D array, faster for fewer than 8 values, which numpy adds in order."""
    if values.size >= 8 or values.size < 2:
        return float(values.sum())
    items = values.tolist()
    total = items[0]
    for item in items[1:]:
        total += item
    return total


def _fields_equal(first, second) -> bool:
    """Field-by-field equality that compares numpy arrays element-wise."""
    if type(first) is not type(second):
        return NotImplemented
    for name, spec in first.__dataclass_fields__.items():
        if not spec.compare:
            continue
        a, b = getattr(first, name), getattr(second, name)
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            if not np.array_equal(a, b):
                return False
        elif a != b:
            return False
    return True


@dataclass(eq=False)
class NodeTables:
    """Per-node costs as a function of how many experts the node computes.

    Arrays have shape ``(N + 1, C + 1)``: row 0 is the source (compute only),
    rows 1..N the edge nodes, column ``c`` the number of computed experts. Under
    FDMA the entries are exact; under TDMA they are the costs of the node as
    the only user of the band, a lower bound on its share. ``energy_j`` is
    ``inf`` where ``reachable`` is false.
    """

    energy_j: np.ndarray
    uplink_energy_j: np.ndarray
    downlink_energy_j: np.ndarray
    compute_energy_j: np.ndarray
    reachable: np.ndarray

    __eq__ = _fields_equal


@dataclass(eq=False)
class StepState:
    """One decoding step: one token at one MoE layer, with the channel it meets."""

    layer: int
    token: int
    gates: np.ndarray  # (E,) softmax router probabilities
    top_k: np.ndarray  # (K,) expert indices, largest gate first
    weights: np.ndarray  # (K,) Top-K weights used in delta
    gains: np.ndarray  # (N,) linear power gain of each edge link
    tables: NodeTables
    # The profile's skip costs (K,) and replacement-cost rows (K, E) of the Top-K experts at this
    # layer. They follow from the fields above, so equality ignores them; None means look them up.
    skip_costs: np.ndarray | None = field(default=None, compare=False)
    replace_costs: np.ndarray | None = field(default=None, compare=False)

    __eq__ = _fields_equal


@dataclass(eq=False)
class StepBatch:
    """Many decoding steps at once: the fields of ``StepState`` stacked along a leading axis of size ``B``.

    The node tables have shape ``(B, N + 1, C + 1)``. The steps may come from
    different episodes, layers and channels; they share one cost model.
    """

    layer: np.ndarray  # (B,) int64
    token: np.ndarray  # (B,) int64
    gates: np.ndarray  # (B, E)
    top_k: np.ndarray  # (B, K)
    weights: np.ndarray  # (B, K)
    gains: np.ndarray  # (B, N)
    tables: NodeTables
    skip_costs: np.ndarray | None = field(default=None, compare=False)  # (B, K)
    replace_costs: np.ndarray | None = field(default=None, compare=False)  # (B, K, E)

    __eq__ = _fields_equal

    def __len__(self) -> int:
        return int(self.layer.shape[0])

    def state(self, index: int) -> StepState:
        """Return step ``index`` as a ``StepState`` whose arrays are views into the batch."""
        tables = self.tables
        return StepState(
            layer=int(self.layer[index]), token=int(self.token[index]), gates=self.gates[index],
            top_k=self.top_k[index], weights=self.weights[index], gains=self.gains[index],
            tables=NodeTables(energy_j=tables.energy_j[index], uplink_energy_j=tables.uplink_energy_j[index],
                              downlink_energy_j=tables.downlink_energy_j[index],
                              compute_energy_j=tables.compute_energy_j[index], reachable=tables.reachable[index]),
            skip_costs=None if self.skip_costs is None else self.skip_costs[index],
            replace_costs=None if self.replace_costs is None else self.replace_costs[index],
        )

    @classmethod
    def stack(cls, states: Sequence[StepState]) -> "StepBatch":
        """Stack single steps into a batch; raises ``ValueError`` for an empty sequence."""
        if len(states) == 0:
            raise ValueError("cannot stack an empty sequence of steps into a StepBatch")
        tables = NodeTables(**{name: np.stack([getattr(s.tables, name) for s in states])
                               for name in NodeTables.__dataclass_fields__})
        return cls(
            layer=np.array([s.layer for s in states], dtype=np.int64),
            token=np.array([s.token for s in states], dtype=np.int64),
            gates=np.stack([s.gates for s in states]), top_k=np.stack([s.top_k for s in states]),
            weights=np.stack([s.weights for s in states]), gains=np.stack([s.gains for s in states]),
            tables=tables,
        )


@dataclass
class DecisionCost:
    """Energy in J, degradation and constraint flags of one decision in one step."""

    energy_j: float
    uplink_energy_j: float
    downlink_energy_j: float
    compute_energy_j: float
    failure_energy_j: float
    degradation: float
    accuracy_budget: float
    accuracy_ok: bool
    latency_ok: bool
    nodes_contacted: int
    experts_computed: int
    failed_nodes: tuple[int, ...] = ()
    computed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def as_info(self) -> dict:
        """Return the cost terms as plain floats, ints and bools for an ``info`` dict."""
        return {
            "energy_j": self.energy_j,
            "uplink_energy_j": self.uplink_energy_j,
            "downlink_energy_j": self.downlink_energy_j,
            "compute_energy_j": self.compute_energy_j,
            "failure_energy_j": self.failure_energy_j,
            "degradation": self.degradation,
            "accuracy_budget": self.accuracy_budget,
            "accuracy_violation": not self.accuracy_ok,
            "latency_violation": not self.latency_ok,
            "nodes_contacted": self.nodes_contacted,
            "experts_computed": self.experts_computed,
            "failed_nodes": self.failed_nodes,
        }


@dataclass
class DecisionCostBatch:
    """The terms of ``DecisionCost`` for many decisions, as arrays of one shape ``S``.

    ``S`` is ``(B,)`` for one decision per step or ``(B, M)`` for ``M`` decisions
    per step. ``failed`` has shape ``S + (N + 1,)`` and marks the nodes that
    could not finish in time; ``computed`` has shape ``S + (E,)`` and excludes
    the experts of those nodes.
    """

    energy_j: np.ndarray
    uplink_energy_j: np.ndarray
    downlink_energy_j: np.ndarray
    compute_energy_j: np.ndarray
    failure_energy_j: np.ndarray
    degradation: np.ndarray
    accuracy_budget: float
    accuracy_ok: np.ndarray
    latency_ok: np.ndarray
    nodes_contacted: np.ndarray
    experts_computed: np.ndarray
    failed: np.ndarray
    computed: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.energy_j.shape

    def item(self, index) -> DecisionCost:
        """Return one decision as a ``DecisionCost``; ``index`` is an int or a tuple into ``shape``."""
        return DecisionCost(
            energy_j=float(self.energy_j[index]), uplink_energy_j=float(self.uplink_energy_j[index]),
            downlink_energy_j=float(self.downlink_energy_j[index]),
            compute_energy_j=float(self.compute_energy_j[index]),
            failure_energy_j=float(self.failure_energy_j[index]), degradation=float(self.degradation[index]),
            accuracy_budget=self.accuracy_budget, accuracy_ok=bool(self.accuracy_ok[index]),
            latency_ok=bool(self.latency_ok[index]), nodes_contacted=int(self.nodes_contacted[index]),
            experts_computed=int(self.experts_computed[index]),
            failed_nodes=tuple(int(n) for n in np.flatnonzero(self.failed[index])),
            computed=self.computed[index],
        )

    def as_info(self) -> dict:
        """Return the cost terms as arrays, keyed like ``DecisionCost.as_info``, with ``failed_nodes`` as a mask."""
        return {
            "energy_j": self.energy_j,
            "uplink_energy_j": self.uplink_energy_j,
            "downlink_energy_j": self.downlink_energy_j,
            "compute_energy_j": self.compute_energy_j,
            "failure_energy_j": self.failure_energy_j,
            "degradation": self.degradation,
            "accuracy_budget": np.full(self.energy_j.shape, self.accuracy_budget),
            "accuracy_violation": ~self.accuracy_ok,
            "latency_violation": ~self.latency_ok,
            "nodes_contacted": self.nodes_contacted,
            "experts_computed": self.experts_computed,
            "failed_nodes": self.failed,
        }


class CostModel:
    """Energy, latency and degradation of decisions for one scenario and profile."""

    def __init__(self, scenario: ScenarioConfig, profile: MoEProfile):
        self.scenario = scenario
        self.profile = profile
        self.num_experts = profile.num_experts
        self.num_nodes = scenario.num_nodes
        self.expert_nodes = np.asarray(profile.expert_nodes, dtype=np.int64)
        self.experts_per_node = np.bincount(self.expert_nodes, minlength=self.num_nodes + 1)
        self.max_count = int(self.experts_per_node.max())
        # one-hot (E, N + 1) map from experts to nodes, to count computed experts per node
        self.node_onehot = np.zeros((self.num_experts, self.num_nodes + 1), dtype=np.int64)
        self.node_onehot[np.arange(self.num_experts), self.expert_nodes] = 1

        self.flops_per_expert = profile.architecture.flops_per_expert
        self.payload_bits = scenario.payload_bits
        self.bandwidth_hz = scenario.node_bandwidth_hz
        self.noise_psd_w_per_hz = scenario.noise_psd_w_per_hz
        self.source_power_w = scenario.source_tx_power_w
        self.node_power_w = scenario.node_tx_power_w
        self.latency_budget_s = scenario.latency_budget_s
        self.accuracy_budget = scenario.accuracy_budget
        self.failure_energy_per_node_j = self.source_power_w * self.latency_budget_s

        counts = np.arange(self.max_count + 1, dtype=np.float64)
        flops_per_s = np.full((self.num_nodes + 1, 1), scenario.node_flops_per_s)
        flops_per_s[0] = scenario.source_flops_per_s
        j_per_flop = np.full((self.num_nodes + 1, 1), scenario.node_energy_j_per_flop)
        j_per_flop[0] = scenario.source_energy_j_per_flop
        self._compute_time_s = radio.compute_time_s(counts[None, :], self.flops_per_expert, flops_per_s)
        self._compute_energy_j = radio.compute_energy_j(counts[None, :], self.flops_per_expert, j_per_flop)
        hosted = counts[None, :] <= self.experts_per_node[:, None]
        self._count_possible = hosted
        self._rows = np.arange(self.num_nodes + 1)
        self._row_offsets = self._rows * (self.max_count + 1)
        self._edge_rows = np.arange(self.num_nodes)
        # Time left for the two links of edge node n when it computes c experts, shape (N, C + 1).
        self._link_budget_s = self.latency_budget_s - self._compute_time_s[1:]
        self._source_in_time = self._compute_time_s[0] <= self.latency_budget_s
        self._node_onehot_f = self.node_onehot.astype(np.float64)
        # Constants of radio.tx_energy_j, computed as it computes them.
        self._noise_power_w = self.noise_psd_w_per_hz * self.bandwidth_hz
        self._payload_nats = np.asarray(self.payload_bits, dtype=np.float64) * radio.LN2
        self._uplink_slower = self.source_power_w <= self.node_power_w
        self._replace_columns: np.ndarray | None = None  # built on first use, see _replace_cost_columns
        self.reference_energy_j = self._reference_energy()

    # -- building states ------------------------------------------------------

    def make_state(self, layer: int, token: int, gates: np.ndarray, gains: np.ndarray) -> StepState:
        """State of one step from the gate probabilities and the edge-link gains."""
        top_k, weights = top_k_weights(gates, self.profile.top_k, self.profile.architecture.renormalize)
        return StepState(layer=layer, token=token, gates=gates, top_k=top_k, weights=weights,
                         gains=np.asarray(gains, dtype=np.float64), tables=self.node_tables(gains),
                         skip_costs=self.profile.skip_cost[layer, top_k],
                         replace_costs=self.profile.replace_cost[layer][top_k])

    def make_batch(self, layer: np.ndarray, token: np.ndarray, gates: np.ndarray, gains: np.ndarray,
                   tables: NodeTables | None = None) -> StepBatch:
        """Batch of steps from per-step layers ``(B,)``, tokens ``(B,)``, gates ``(B, E)`` and gains ``(B, N)``.

        ``tables`` may pass in ``node_tables(gains)`` when the caller has it already.
        """
        layer = np.asarray(layer, dtype=np.int64)
        gates = np.asarray(gates, dtype=np.float64)
        gains = np.asarray(gains, dtype=np.float64)
        top_k, weights = top_k_weights(gates, self.profile.top_k, self.profile.architecture.renormalize)
        return StepBatch(layer=layer, token=np.asarray(token, dtype=np.int64), gates=gates, top_k=top_k,
                         weights=weights, gains=gains, tables=self.node_tables(gains) if tables is None else tables,
                         skip_costs=self.profile.skip_cost[layer[:, None], top_k],
                         replace_costs=self.profile.replace_cost[layer[:, None], top_k])

    def node_tables(self, gains: np.ndarray) -> NodeTables:
        """Cost of each node for every count of computed experts, at the given gains.

        ``gains`` has shape ``(..., N)`` and every table ``(..., N + 1, C + 1)``.
        Each entry is computed element-wise, so a table is the same whether its
        gains come alone or inside a batch.
        """
        gains = np.asarray(gains, dtype=np.float64)
        shape = gains.shape[:-1] + self._compute_energy_j.shape
        link_gains = gains[..., :, None]
        up, down, reachable = self._link_energies(link_gains, self._link_budget_s,
                                                  self.min_link_times(link_gains))

        uplink = np.zeros(shape)
        downlink = np.zeros(shape)
        uplink[..., 1:, :] = np.where(reachable, up, np.inf)
        downlink[..., 1:, :] = np.where(reachable, down, np.inf)
        uplink[..., 0] = 0.0
        downlink[..., 0] = 0.0
        ok = np.ones(shape, dtype=bool)
        ok[..., 1:, :] = reachable
        ok[..., 0] = True
        ok[..., 0, :] = self._source_in_time
        ok &= self._count_possible

        compute_energy = self._compute_energy_j if not gains.shape[:-1] else np.broadcast_to(self._compute_energy_j,
                                                                                             shape)
        energy = np.where(ok, uplink + downlink + compute_energy, np.inf)
        return NodeTables(energy_j=energy, uplink_energy_j=uplink, downlink_energy_j=downlink,
                          compute_energy_j=compute_energy, reachable=ok)

    def _link_energies(self, gains, link_budget, min_link_times):
        """Energies of the uplink and downlink of each node within ``link_budget``, and whether they fit.

        The arithmetic of ``radio.split_round_trip`` and ``radio.tx_energy_j``,
        operation by operation, in fewer calls. Entries that do not fit are
        meaningless; callers replace them.
        """
        tau_min_up, tau_min_down = min_link_times
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            half = 0.5 * link_budget
            if self._uplink_slower:
                # The uplink's cap is the lower, so tau_min_up >= tau_min_down and the downlink cap can bind
                # only when the uplink's does: split_round_trip reduces to this maximum.
                tau_up = np.maximum(tau_min_up, half)
            else:
                tau_up = np.where(tau_min_up >= half, tau_min_up,
                                  np.where(tau_min_down >= half, link_budget - tau_min_down, half))
            tau_down = link_budget - tau_up
            reachable = (tau_min_up + tau_min_down <= link_budget) & (link_budget > 0)
            noise_over_gain = self._noise_power_w / gains
            up = tau_up * noise_over_gain * np.expm1(self._payload_nats / (self.bandwidth_hz * tau_up))
            down = tau_down * noise_over_gain * np.expm1(self._payload_nats / (self.bandwidth_hz * tau_down))
        return up, down, reachable

    def min_link_times(self, gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shortest uplink and downlink times in s of every edge link at full power, ``(..., N)`` each."""
        gains = np.asarray(gains, dtype=np.float64)
        tau_min_up = radio.min_tx_time_s(self.payload_bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                         self.source_power_w)
        tau_min_down = radio.min_tx_time_s(self.payload_bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                           self.node_power_w)
        return tau_min_up, tau_min_down

    def node_terms(self, gains: np.ndarray, counts: np.ndarray, min_link_times=None):
        """Entries of ``node_tables(gains)`` at the given counts only, without building the tables.

        ``gains`` has shape ``(..., N)`` and ``counts`` ``(..., N + 1)`` (the two
        broadcast). ``min_link_times`` may pass in ``min_link_times(gains)``.
        Returns ``(uplink_j, downlink_j, compute_j, in_time)``, each
        ``(..., N + 1)``, equal element by element to the table entries.
        """
        gains = np.asarray(gains, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.int64)
        flat = self._row_offsets + counts  # index of (n, counts[n]) in a flattened (N + 1, C + 1) table
        edge_counts = counts[..., 1:]
        link_budget = self._link_budget_s.take(flat[..., 1:] - (self.max_count + 1))
        up, down, reachable = self._link_energies(
            gains, link_budget, self.min_link_times(gains) if min_link_times is None else min_link_times)

        idle = edge_counts == 0
        shape = link_budget.shape[:-1] + (self.num_nodes + 1,)
        uplink = np.zeros(shape)
        downlink = np.zeros(shape)
        up[~reachable] = np.inf
        up[idle] = 0.0
        down[~reachable] = np.inf
        down[idle] = 0.0
        uplink[..., 1:] = up
        downlink[..., 1:] = down
        in_time = np.empty(shape, dtype=bool)
        in_time[..., 1:] = idle | reachable
        in_time[..., 0] = self._source_in_time[counts[..., 0]]
        in_time &= self._count_possible.take(flat)
        compute = self._compute_energy_j.take(flat)
        return uplink, downlink, compute, in_time

    # -- degradation ----------------------------------------------------------

    def degradation(self, state: StepState, computed: np.ndarray) -> np.ndarray:
        """Degradation bound ``delta`` of one or many decisions.

        ``computed`` is a boolean array ``(..., E)``. Each Top-K expert that is not
        computed costs its weight times the cheaper of skipping it and replacing
        it by the closest computed expert.
        """
        computed = np.asarray(computed, dtype=bool)
        skip = state.skip_costs
        if skip is None:
            skip = self.profile.skip_cost[state.layer, state.top_k]  # (K,)
        replace = state.replace_costs
        if replace is None:
            replace = self.profile.replace_cost[state.layer][state.top_k]  # (K, E)
        masked = np.where(computed[..., None, :], replace, np.inf)  # (..., K, E)
        per_expert = np.minimum(skip, masked.min(axis=-1))
        per_expert = np.where(computed[..., state.top_k], 0.0, per_expert)
        # A product and a sum over the last axis, not a dot product, so that the
        # batched form below rounds exactly the same way.
        return (per_expert * state.weights).sum(axis=-1)

    def degradation_batch(self, batch: StepBatch, computed: np.ndarray) -> np.ndarray:
        """Degradation bound of decisions ``(B, ..., E)`` for the ``B`` steps of ``batch``; shape ``(B, ...)``."""
        computed = np.asarray(computed, dtype=bool)
        if computed.ndim == 2:
            return self._degradation_one_each(batch, computed)
        middle = (1,) * (computed.ndim - 2)
        size = len(batch)
        layer = batch.layer[:, None]
        skip = batch.skip_costs if batch.skip_costs is not None else self.profile.skip_cost[layer, batch.top_k]
        skip = skip.reshape((size,) + middle + (-1,))  # (B, ..., K)
        replace = batch.replace_costs
        if replace is None:
            replace = self.profile.replace_cost[layer, batch.top_k]  # (B, K, E)
        replace = replace.reshape((size,) + middle + replace.shape[1:])  # (B, ..., K, E)
        top_k = np.broadcast_to(batch.top_k.reshape((size,) + middle + (-1,)),
                                computed.shape[:-1] + batch.top_k.shape[-1:])
        masked = np.where(computed[..., None, :], replace, np.inf)  # (B, ..., K, E)
        per_expert = np.minimum(skip, masked.min(axis=-1))
        per_expert = np.where(np.take_along_axis(computed, top_k, axis=-1), 0.0, per_expert)
        weights = batch.weights.reshape((size,) + middle + (-1,))
        return (per_expert * weights).sum(axis=-1)

    def _degradation_one_each(self, batch: StepBatch, computed: np.ndarray) -> np.ndarray:
        # degradation_batch for one decision (B, E) per step, with the same values in fewer, faster calls.
        # The replacement costs are laid out (E, B, K), experts first: numpy reduces a leading axis of a
        # C-ordered array with whole-array minimum operations, far faster than many short rows, and a
        # minimum is exact in any order. Adding 0 or inf masks the experts without changing any value.
        size, experts = computed.shape
        rows = batch.layer[:, None] * experts + batch.top_k  # (B, K) rows of the (L * E, E) tables
        replace = self._replace_cost_columns().take(rows, axis=1)  # (E, B, K)
        skip = self.profile.skip_cost.take(rows)  # (B, K)
        penalty = np.where(computed.T, 0.0, np.inf)  # (E, B)
        per_expert = np.minimum(skip, (replace + penalty[:, :, None]).min(axis=0))
        chosen = computed.take(np.arange(size)[:, None] * experts + batch.top_k)
        per_expert[chosen] = 0.0
        return sum_last_axis(per_expert * batch.weights)

    def _replace_cost_columns(self) -> np.ndarray:
        """``replace_cost`` as ``(E, L * E)``: entry ``[j, l * E + i]`` is ``replace_cost[l, i, j]``."""
        if self._replace_columns is None:
            table = self.profile.replace_cost
            self._replace_columns = np.ascontiguousarray(table.transpose(2, 0, 1)).reshape(table.shape[2], -1)
        return self._replace_columns

    # -- energy ---------------------------------------------------------------

    def node_counts(self, computed: np.ndarray) -> np.ndarray:
        """Number of computed experts on each node, shape ``(..., N + 1)``."""
        computed = np.asarray(computed)
        if computed.ndim == 1:
            return computed.astype(np.int64) @ self.node_onehot
        # Counts of 0/1 entries are exact in float64, and the float product uses BLAS.
        return (computed.astype(np.float64) @ self._node_onehot_f).astype(np.int64)

    def energy_of_counts(self, state_or_tables, counts: np.ndarray):
        """Energy terms of computing ``counts[n]`` experts on node ``n``.

        Returns ``(uplink_j, downlink_j, compute_j, failed_nodes)``. Under FDMA a
        node fails when it cannot finish in the budget with its count. Under TDMA
        nodes fail, those with the longest round trip at full power first,
        until the remaining links fit. The source (node 0) fails when its local
        experts cannot finish in the budget. Failed nodes contribute no energy here.
        """
        tables = state_or_tables.tables if isinstance(state_or_tables, StepState) else state_or_tables
        counts = np.asarray(counts, dtype=np.int64)
        rows = self._rows
        flat = self._row_offsets + counts  # index of (n, counts[n]) in the flattened tables
        ok = tables.reachable.take(flat)
        if ok.all():
            # Fast path of the general case below; np.where with an all-true mask changes nothing.
            compute = _sum_one_row(tables.compute_energy_j.take(flat))
            if self.scenario.access == "fdma":
                uplink = _sum_one_row(tables.uplink_energy_j.take(flat))
                downlink = _sum_one_row(tables.downlink_energy_j.take(flat))
                return uplink, downlink, compute, ()
            return self._tdma_energy(state_or_tables, counts, ok, compute, [])
        failed = [int(n) for n in np.flatnonzero(~ok) if counts[n] > 0]
        compute = float(np.where(ok, tables.compute_energy_j[rows, counts], 0.0).sum())
        if self.scenario.access == "fdma":
            uplink = float(np.where(ok, tables.uplink_energy_j[rows, counts], 0.0).sum())
            downlink = float(np.where(ok, tables.downlink_energy_j[rows, counts], 0.0).sum())
            return uplink, downlink, compute, tuple(failed)
        return self._tdma_energy(state_or_tables, counts, ok, compute, failed)

    def _tdma_energy(self, state_or_tables, counts, ok, compute, failed):
        if not isinstance(state_or_tables, StepState):
            raise TypeError("TDMA energy needs the StepState (its gains), not only the node tables")
        return self._tdma_energy_at_gains(state_or_tables.gains, counts, ok, failed)

    def _tdma_energy_at_gains(self, gains, counts, ok, failed):
        contacted = [n for n in range(1, self.num_nodes + 1) if counts[n] > 0 and ok[n]]
        failed = list(failed)
        while contacted:
            node_gains = gains[np.asarray(contacted) - 1]
            m_up = radio.min_tx_time_s(self.payload_bits, node_gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                       self.source_power_w)
            m_down = radio.min_tx_time_s(self.payload_bits, node_gains, self.bandwidth_hz,
                                         self.noise_psd_w_per_hz, self.node_power_w)
            busiest = max(self._compute_time_s[n, counts[n]] for n in contacted)
            budget = self.latency_budget_s - busiest
            tau_min = np.concatenate([m_up, m_down])
            link_gains = np.concatenate([node_gains, node_gains])
            bits = np.full(tau_min.shape, self.payload_bits)
            tau, _, feasible = radio.tdma_allocation(bits, link_gains, self.bandwidth_hz,
                                                     self.noise_psd_w_per_hz, tau_min, budget)
            if feasible:
                energy = radio.tx_energy_j(tau, bits, link_gains, self.bandwidth_hz, self.noise_psd_w_per_hz)
                half = len(contacted)
                compute_edge = sum(self._compute_energy_j[n, counts[n]] for n in contacted)
                local = self._compute_energy_j[0, counts[0]] if ok[0] else 0.0
                return float(energy[:half].sum()), float(energy[half:].sum()), float(compute_edge + local), \
                    tuple(sorted(failed))
            worst = int(np.argmax(m_up + m_down))
            failed.append(contacted.pop(worst))
        local = self._compute_energy_j[0, counts[0]] if ok[0] else 0.0
        return 0.0, 0.0, float(local), tuple(sorted(failed))

    # -- full evaluation ------------------------------------------------------

    def evaluate(self, state: StepState, computed: np.ndarray) -> DecisionCost:
        """Cost of computing the experts in the boolean mask ``computed`` (shape ``(E,)``).

        A contacted node that cannot finish in time is charged the source's
        uplink at full power for the whole budget, and its experts count as not
        computed in ``delta``. The source counts as such a node when its local
        experts cannot finish in time.
        """
        computed = np.asarray(computed, dtype=bool)
        counts = self.node_counts(computed)
        uplink, downlink, compute, failed = self.energy_of_counts(state, counts)
        effective = computed
        if failed:
            failed_node = np.zeros(self.num_nodes + 1, dtype=bool)
            failed_node[list(failed)] = True
            effective = computed & ~failed_node[self.expert_nodes]
        delta = float(self.degradation(state, effective))
        failure_energy = self.failure_energy_per_node_j * len(failed)
        return DecisionCost(
            energy_j=uplink + downlink + compute + failure_energy,
            uplink_energy_j=uplink,
            downlink_energy_j=downlink,
            compute_energy_j=compute,
            failure_energy_j=failure_energy,
            degradation=delta,
            accuracy_budget=self.accuracy_budget,
            accuracy_ok=delta <= self.accuracy_budget + DEGRADATION_TOLERANCE,
            latency_ok=not failed,
            nodes_contacted=int(np.count_nonzero(counts[1:])),
            experts_computed=int(effective.sum()) if failed else int(counts.sum()),
            failed_nodes=failed,
            computed=effective,
        )

    def evaluate_batch(self, batch: StepBatch, computed: np.ndarray) -> DecisionCostBatch:
        """Cost of many decisions for many steps in one call.

        ``computed`` is a boolean array ``(B, E)`` (one decision per step) or
        ``(B, M, E)`` (``M`` decisions per step). Every term equals, to the last
        bit under FDMA, what ``evaluate`` returns for the same step and decision.
        """
        computed = np.asarray(computed, dtype=bool)
        if computed.ndim not in (2, 3) or computed.shape[0] != len(batch) or computed.shape[-1] != self.num_experts:
            raise ValueError(f"invalid decisions: expected a boolean array of shape ({len(batch)}, {self.num_experts}) "
                             f"or ({len(batch)}, M, {self.num_experts}), got shape {computed.shape}")
        counts = self.node_counts(computed)  # (B, [M,] N + 1)
        uplink, downlink, compute, failed = self.energy_of_counts_batch(batch, counts)
        return self.decision_cost_batch(batch, computed, counts, uplink, downlink, compute, failed)

    def energy_of_counts_batch(self, batch: StepBatch, counts: np.ndarray):
        """``energy_of_counts`` for count vectors ``(B, [M,] N + 1)`` of the steps of ``batch``.

        Returns ``(uplink_j, downlink_j, compute_j, failed)``: three arrays of the
        counts' leading shape and the boolean mask ``failed`` of the counts' shape.
        """
        counts = np.asarray(counts, dtype=np.int64)
        steps = np.arange(counts.shape[0]).reshape((-1,) + (1,) * (counts.ndim - 1))
        # Index of (step, n, counts[n]) in the flattened (B, N + 1, C + 1) tables.
        flat = (steps * (self.num_nodes + 1) + self._rows) * (self.max_count + 1) + counts
        tables = batch.tables
        ok = tables.reachable.take(flat)
        failed = ~ok & (counts > 0)
        compute = sum_last_axis(np.where(ok, tables.compute_energy_j.take(flat), 0.0))
        if self.scenario.access == "fdma":
            uplink = sum_last_axis(np.where(ok, tables.uplink_energy_j.take(flat), 0.0))
            downlink = sum_last_axis(np.where(ok, tables.downlink_energy_j.take(flat), 0.0))
            return uplink, downlink, compute, failed
        return self._tdma_energy_batch(batch.gains, counts, ok, compute, failed)

    def energy_batch(self, batch: StepBatch, computed: np.ndarray) -> np.ndarray:
        """``evaluate_batch(batch, computed).energy_j`` without the degradation bound."""
        computed = np.asarray(computed, dtype=bool)
        uplink, downlink, compute, failed = self.energy_of_counts_batch(batch, self.node_counts(computed))
        return uplink + downlink + compute + self.failure_energy_per_node_j * np.count_nonzero(failed, axis=-1)

    def _tdma_energy_batch(self, gains, counts, ok, compute, failed):
        # NOTE: the time-sharing allocation is a bisection per step, so TDMA evaluates
        # one decision at a time here; FDMA above has no Python loop.
        uplink = np.zeros(counts.shape[:-1])
        downlink = np.zeros(counts.shape[:-1])
        compute = np.array(compute, dtype=np.float64)
        failed = np.array(failed)
        for index in np.ndindex(*counts.shape[:-1]):
            up, down, comp, failed_nodes = self._tdma_energy_at_gains(
                gains[index[0]], counts[index], ok[index], [int(n) for n in np.flatnonzero(failed[index])])
            uplink[index], downlink[index], compute[index] = up, down, comp
            failed[index] = False
            failed[index + (list(failed_nodes),)] = True
        return uplink, downlink, compute, failed

    def evaluate_at(self, steps: StepBatch, computed: np.ndarray, min_link_times=None) -> DecisionCostBatch:
        """``evaluate_batch`` for a batch whose ``tables`` may be ``None``.

        Only the node-table entries at the decisions' counts are computed
        (``node_terms``), which is much less work than whole tables when a
        node hosts many experts; the results equal ``evaluate_batch``'s.
        ``min_link_times`` may pass in ``min_link_times(steps.gains)``.
        """
        computed = np.asarray(computed, dtype=bool)
        counts = self.node_counts(computed)
        uplink, downlink, compute, failed = self.energy_at(steps.gains, counts, min_link_times)
        return self.decision_cost_batch(steps, computed, counts, uplink, downlink, compute, failed)

    def energy_at(self, gains: np.ndarray, counts: np.ndarray, min_link_times=None):
        """``energy_of_counts_batch`` from the gains ``(B, N)`` alone, without node tables.

        ``counts`` has shape ``(B, [M,] N + 1)``; ``min_link_times`` may pass in
        ``min_link_times(gains)``.
        """
        counts = np.asarray(counts, dtype=np.int64)
        gains = np.asarray(gains, dtype=np.float64)
        steps_gains = gains
        middle = (1,) * (counts.ndim - 2)
        gains = gains.reshape(gains.shape[:1] + middle + gains.shape[1:])
        if min_link_times is not None:
            min_link_times = tuple(t.reshape(t.shape[:1] + middle + t.shape[1:]) for t in min_link_times)
        uplink, downlink, compute, ok = self.node_terms(gains, counts, min_link_times)
        failed = ~ok & (counts > 0)
        compute = sum_last_axis(np.where(ok, compute, 0.0))
        if self.scenario.access == "fdma":
            uplink = sum_last_axis(np.where(ok, uplink, 0.0))
            downlink = sum_last_axis(np.where(ok, downlink, 0.0))
            return uplink, downlink, compute, failed
        return self._tdma_energy_batch(steps_gains, counts, ok, compute, failed)

    def decision_cost_batch(self, batch, computed, counts, uplink, downlink, compute, failed) -> DecisionCostBatch:
        """Assemble the costs of decisions ``computed`` from their energy terms.

        ``counts`` are the decisions' node counts and ``(uplink, downlink,
        compute, failed)`` what ``energy_at`` or ``energy_of_counts_batch``
        returned for them. This adds the degradation bound and the flags.
        """
        effective = computed & ~np.take(failed, self.expert_nodes, axis=-1)
        delta = self.degradation_batch(batch, effective)
        num_failed = np.count_nonzero(failed, axis=-1)
        # Same order of additions as evaluate(), so the two agree to the last bit.
        failure_energy = self.failure_energy_per_node_j * num_failed
        return DecisionCostBatch(
            energy_j=uplink + downlink + compute + failure_energy,
            uplink_energy_j=uplink,
            downlink_energy_j=downlink,
            compute_energy_j=compute,
            failure_energy_j=failure_energy,
            degradation=delta,
            accuracy_budget=self.accuracy_budget,
            accuracy_ok=delta <= self.accuracy_budget + DEGRADATION_TOLERANCE,
            latency_ok=num_failed == 0,
            nodes_contacted=np.count_nonzero(counts[..., 1:], axis=-1),
            experts_computed=np.count_nonzero(effective, axis=-1),
            failed=failed,
            computed=effective,
        )

    def top_k_mask(self, state: StepState) -> np.ndarray:
        mask = np.zeros(self.num_experts, dtype=bool)
        mask[state.top_k] = True
        return mask

    def _reference_energy(self) -> float:
        """Energy of Top-K at the mean channel: K experts spread round-robin over the edge nodes.

        Every edge node sits at the mean distance with unit fading power. Experts
        that do not fit on the edge nodes are counted at the source. This is the
        energy scale of the reward, so Top-K earns about -1 per step.
        """
        from wide_env.channel import ChannelModel

        gain = ChannelModel(self.scenario).mean_distance_gain()
        gains = np.full(self.num_nodes, gain)
        counts = np.zeros(self.num_nodes + 1, dtype=np.int64)
        placed = 0
        while placed < self.profile.top_k:
            free = [n for n in range(1, self.num_nodes + 1) if counts[n] < self.experts_per_node[n]]
            if not free:
                break
            for node in free[: self.profile.top_k - placed]:
                counts[node] += 1
                placed += 1
        counts[0] = min(self.profile.top_k - placed, self.experts_per_node[0])
        gates = np.full(self.num_experts, 1.0 / self.num_experts)
        state = self.make_state(0, 0, gates, gains)
        uplink, downlink, compute, failed = self.energy_of_counts(state, counts)
        energy = uplink + downlink + compute + self.failure_energy_per_node_j * len(failed)
        # A profile with nothing to compute anywhere would give 0 J; keep the scale positive.
        return max(energy, np.finfo(float).tiny)
