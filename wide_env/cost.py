"""Cost of an expert-selection decision: energy, latency feasibility and degradation.

This module is the single place that turns a step's state and a decision (the
set of computed experts) into energy in joules, constraint flags and the
degradation bound ``delta``. The environments, the oracle, the baselines and
the evaluation all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wide_env import radio
from wide_env.config import ScenarioConfig
from wide_env.profile import MoEProfile, top_k_weights

# Slack on the accuracy constraint so that a decision exactly at the budget counts as feasible.
DEGRADATION_TOLERANCE = 1e-9


def _fields_equal(first, second) -> bool:
    """Field-by-field equality that compares numpy arrays element-wise."""
    if type(first) is not type(second):
        return NotImplemented
    for name in first.__dataclass_fields__:
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

    __eq__ = _fields_equal


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
        """The cost terms as plain floats, ints and bools for an ``info`` dict."""
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
        self.reference_energy_j = self._reference_energy()

    # -- building states ------------------------------------------------------

    def make_state(self, layer: int, token: int, gates: np.ndarray, gains: np.ndarray) -> StepState:
        """State of one step from the gate probabilities and the edge-link gains."""
        top_k, weights = top_k_weights(gates, self.profile.top_k, self.profile.architecture.renormalize)
        return StepState(layer=layer, token=token, gates=gates, top_k=top_k, weights=weights,
                         gains=np.asarray(gains, dtype=np.float64), tables=self.node_tables(gains))

    def node_tables(self, gains: np.ndarray) -> NodeTables:
        """Cost of each node for every count of computed experts, at the given gains."""
        gains = np.asarray(gains, dtype=np.float64)
        compute_time = self._compute_time_s
        compute_energy = self._compute_energy_j

        tau_min_up = radio.min_tx_time_s(self.payload_bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                         self.source_power_w)[:, None]
        tau_min_down = radio.min_tx_time_s(self.payload_bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                           self.node_power_w)[:, None]
        link_budget = self.latency_budget_s - compute_time[1:]
        tau_up, tau_down, reachable = radio.split_round_trip(link_budget, tau_min_up, tau_min_down)
        up = radio.tx_energy_j(tau_up, self.payload_bits, gains[:, None], self.bandwidth_hz, self.noise_psd_w_per_hz)
        down = radio.tx_energy_j(tau_down, self.payload_bits, gains[:, None], self.bandwidth_hz,
                                 self.noise_psd_w_per_hz)

        uplink = np.zeros_like(compute_energy)
        downlink = np.zeros_like(compute_energy)
        uplink[1:] = np.where(reachable, up, np.inf)
        downlink[1:] = np.where(reachable, down, np.inf)
        uplink[:, 0] = 0.0
        downlink[:, 0] = 0.0
        ok = np.ones_like(compute_energy, dtype=bool)
        ok[1:] = reachable
        ok[:, 0] = True
        ok[0] = compute_time[0] <= self.latency_budget_s
        ok &= self._count_possible

        energy = np.where(ok, uplink + downlink + compute_energy, np.inf)
        return NodeTables(energy_j=energy, uplink_energy_j=uplink, downlink_energy_j=downlink,
                          compute_energy_j=compute_energy, reachable=ok)

    # -- degradation ----------------------------------------------------------

    def degradation(self, state: StepState, computed: np.ndarray) -> np.ndarray:
        """Degradation bound ``delta`` of one or many decisions.

        ``computed`` is a boolean array ``(..., E)``. Each Top-K expert that is not
        computed costs its weight times the cheaper of skipping it and replacing
        it by the closest computed expert.
        """
        computed = np.asarray(computed, dtype=bool)
        skip = self.profile.skip_cost[state.layer, state.top_k]  # (K,)
        replace = self.profile.replace_cost[state.layer][state.top_k]  # (K, E)
        masked = np.where(computed[..., None, :], replace, np.inf)  # (..., K, E)
        per_expert = np.minimum(skip, masked.min(axis=-1))
        per_expert = np.where(computed[..., state.top_k], 0.0, per_expert)
        return per_expert @ state.weights

    # -- energy ---------------------------------------------------------------

    def node_counts(self, computed: np.ndarray) -> np.ndarray:
        """Number of computed experts on each node, shape ``(..., N + 1)``."""
        return np.asarray(computed, dtype=np.int64) @ self.node_onehot

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
        rows = np.arange(self.num_nodes + 1)
        ok = tables.reachable[rows, counts]
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
        gains = state_or_tables.gains
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
            effective = computed & ~np.isin(self.expert_nodes, failed)
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
            experts_computed=int(effective.sum()),
            failed_nodes=failed,
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
