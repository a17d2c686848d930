"""Cost of a prefill decision: one MoE layer over the ``S`` tokens of a prompt.

Each token ``s`` has its own gates, Top-K set and decision ``A_s``. Edge node
``n`` receives every token that computes at least one expert on it, so with
``u_n`` tokens served and ``c_n`` (token, expert) pairs computed on it:

- uplink and downlink each carry ``u_n * d * b`` bits,
- compute takes ``c_n * F / phi_n`` seconds and ``c_n * F * kappa_n`` joules,
- uplink, compute and downlink must fit in the prefill budget ``T_p``.

Under FDMA the energy of node ``n`` depends only on ``(u_n, c_n)``; it is the
decoding model's round trip with the payload scaled by ``u_n``. Under TDMA all
links share one band in time, as in decoding. The degradation bound applies
per token: ``delta_s`` is the decoding ``delta`` of ``A_s`` against token
``s``'s Top-K set. This module is the one place that turns a prefill state and a
decision into energy, constraint flags and degradation. The prefill
environment and every prefill policy call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import lambertw

from wide_env import radio
from wide_env.config import ScenarioConfig
from wide_env.cost import DEGRADATION_TOLERANCE, CostModel, DecisionCost
from wide_env.profile import MoEProfile, top_k_weights

# Largest (tokens + 1) * (pairs + 1) grid per node that node_tables() builds.
MAX_TABLE_CELLS = 1_000_000


@dataclass(eq=False)
class PrefillNodeTables:
    """Per-node costs as a function of tokens served ``u`` and pairs computed ``c``.

    Arrays have shape ``(N + 1, S + 1, C + 1)`` indexed ``[node, u, c]``. Row 0
    is the source, which only computes, so its entries depend on ``c`` alone.
    An edge node entry is possible only for ``u <= c <= u * hosted`` (each
    served token computes between one and all of the node's experts) or
    ``u = c = 0``. ``energy_j`` is ``inf`` where ``reachable`` is false. Under
    TDMA the entries treat the node as the only user of the band, a lower
    bound on its share.
    """

    energy_j: np.ndarray
    uplink_energy_j: np.ndarray
    downlink_energy_j: np.ndarray
    compute_energy_j: np.ndarray
    reachable: np.ndarray


@dataclass(eq=False)
class PrefillState:
    """One prefill step: the ``S`` prompt tokens at one MoE layer, with the channel they meet."""

    layer: int
    gates: np.ndarray  # (S, E) softmax router probabilities
    top_k: np.ndarray  # (S, K) expert indices, largest gate first
    weights: np.ndarray  # (S, K) Top-K weights used in delta
    gains: np.ndarray  # (N,) linear power gain of each edge link
    _tables: PrefillNodeTables | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.gates.shape[0])

    def __eq__(self, other) -> bool:
        # Field-by-field, element-wise for arrays; the cached tables follow from the fields.
        if not isinstance(other, PrefillState):
            return NotImplemented
        return self.layer == other.layer and all(
            np.array_equal(getattr(self, name), getattr(other, name))
            for name in ("gates", "top_k", "weights", "gains"))

    __hash__ = None


@dataclass
class PrefillDecisionCost(DecisionCost):
    """Cost of one prefill decision.

    ``degradation`` is the mean of the per-token bounds ``token_degradation``;
    ``accuracy_ok`` holds when every token meets the budget. ``experts_computed``
    counts (token, expert) pairs and ``tokens_sent`` the uplink payloads.
    """

    token_degradation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens_violating: int = 0
    tokens_sent: int = 0
    excess: float = 0.0

    def as_info(self) -> dict:
        info = super().as_info()
        info.update({
            "max_degradation": float(self.token_degradation.max()) if self.token_degradation.size else 0.0,
            "tokens_violating": self.tokens_violating,
            "tokens_sent": self.tokens_sent,
            "token_degradation": self.token_degradation.copy(),
        })
        return info


class PrefillCostModel:
    """Energy, latency and degradation of prefill decisions for one scenario and profile.

    The decoding :class:`CostModel` of the same scenario supplies the expert
    placement, the radio constants and the degradation tables. The latency
    budget is the scenario's ``prefill_budget_s``, and the prompt has
    ``prompt_tokens`` tokens.
    """

    def __init__(self, scenario: ScenarioConfig, profile: MoEProfile, decode_cost_model: CostModel | None = None):
        self.scenario = scenario
        self.profile = profile
        self.decode = decode_cost_model if decode_cost_model is not None else CostModel(scenario, profile)
        self.num_tokens = scenario.prompt_tokens
        self.num_experts = self.decode.num_experts
        self.num_nodes = self.decode.num_nodes
        self.top_k = profile.top_k
        self.expert_nodes = self.decode.expert_nodes
        self.node_onehot = self.decode.node_onehot
        self.experts_per_node = self.decode.experts_per_node

        self.flops_per_expert = self.decode.flops_per_expert
        self.payload_bits = self.decode.payload_bits
        self.bandwidth_hz = self.decode.bandwidth_hz
        self.noise_psd_w_per_hz = self.decode.noise_psd_w_per_hz
        self.source_power_w = self.decode.source_power_w
        self.node_power_w = self.decode.node_power_w
        self.latency_budget_s = scenario.prefill_budget_s
        self.accuracy_budget = scenario.accuracy_budget
        self.failure_energy_per_node_j = self.source_power_w * self.latency_budget_s

        self.flops_per_s = np.full(self.num_nodes + 1, scenario.node_flops_per_s)
        self.flops_per_s[0] = scenario.source_flops_per_s
        self.energy_j_per_flop = np.full(self.num_nodes + 1, scenario.node_energy_j_per_flop)
        self.energy_j_per_flop[0] = scenario.source_energy_j_per_flop
        self.reference_energy_j = self._reference_energy()

    # -- states ---------------------------------------------------------------

    def make_state(self, layer: int, gates: np.ndarray, gains: np.ndarray) -> PrefillState:
        """State of one prefill step from the ``(S, E)`` gate probabilities and the edge-link gains."""
        gates = np.asarray(gates, dtype=np.float64)
        if gates.ndim != 2 or gates.shape[1] != self.num_experts:
            raise ValueError(f"invalid gates: expected shape (tokens, {self.num_experts}), got {gates.shape}")
        top_k, weights = top_k_weights(gates, self.top_k, self.profile.architecture.renormalize)
        return PrefillState(layer=int(layer), gates=gates, top_k=top_k, weights=weights,
                            gains=np.asarray(gains, dtype=np.float64))

    # -- node energy ------------------------------------------------------------

    def node_energy(self, gains: np.ndarray, tokens: np.ndarray, pairs: np.ndarray):
        """Energy terms of every node serving ``tokens[..., n]`` tokens and ``pairs[..., n]`` pairs.

        ``tokens`` and ``pairs`` have shape ``(..., N + 1)``; column 0 is the
        source, for which only ``pairs`` matters. Returns ``(uplink_j,
        downlink_j, compute_j, reachable)`` of that shape. An impossible count
        (``pairs`` outside ``[tokens, tokens * hosted]``) or a node that cannot
        finish within the prefill budget is not reachable, with infinite link
        energy. Under TDMA the node is costed as the only user of the band.
        """
        tokens = np.asarray(tokens, dtype=np.float64)
        pairs = np.asarray(pairs, dtype=np.float64)
        gains = np.asarray(gains, dtype=np.float64)
        hosted = self.experts_per_node.astype(np.float64)

        compute_time = pairs * self.flops_per_expert / self.flops_per_s
        compute = pairs * self.flops_per_expert * self.energy_j_per_flop

        # A served token computes between one and all of the node's experts.
        idle = (tokens == 0) & (pairs == 0)
        possible = idle | ((tokens > 0) & (pairs >= tokens) & (pairs <= tokens * hosted))

        edge_tokens = tokens[..., 1:]
        bits = edge_tokens * self.payload_bits
        tau_min_up = radio.min_tx_time_s(bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                         self.source_power_w)
        tau_min_down = radio.min_tx_time_s(bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                           self.node_power_w)
        link_budget = self.latency_budget_s - compute_time[..., 1:]
        tau_up, tau_down, reachable = radio.split_round_trip(link_budget, tau_min_up, tau_min_down)
        up = radio.tx_energy_j(tau_up, bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz)
        down = radio.tx_energy_j(tau_down, bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz)

        edge_idle = idle[..., 1:]
        edge_ok = edge_idle | (possible[..., 1:] & reachable)
        uplink = np.where(edge_idle, 0.0, np.where(edge_ok, up, np.inf))
        downlink = np.where(edge_idle, 0.0, np.where(edge_ok, down, np.inf))

        source_ok = possible[..., :1] & (compute_time[..., :1] <= self.latency_budget_s)
        zeros = np.zeros(source_ok.shape)
        uplink = np.concatenate([zeros, uplink], axis=-1)
        downlink = np.concatenate([zeros, downlink], axis=-1)
        ok = np.concatenate([source_ok, edge_ok], axis=-1)
        return uplink, downlink, compute, ok

    def node_tables(self, state: PrefillState) -> PrefillNodeTables:
        """Cost of each node for every ``(u, c)`` at the state's gains, cached on the state."""
        if state._tables is not None:
            return state._tables
        num_tokens = state.num_tokens
        max_pairs = num_tokens * int(self.experts_per_node.max())
        if (num_tokens + 1) * (max_pairs + 1) > MAX_TABLE_CELLS:
            raise ValueError(f"node tables for {num_tokens} tokens and up to {max_pairs} pairs per node exceed "
                             f"{MAX_TABLE_CELLS} cells; use node_energy() on the counts you need")
        u = np.arange(num_tokens + 1, dtype=np.float64)[:, None, None]
        c = np.arange(max_pairs + 1, dtype=np.float64)[None, :, None]
        shape = (num_tokens + 1, max_pairs + 1, self.num_nodes + 1)
        uplink, downlink, compute, ok = self.node_energy(state.gains, np.broadcast_to(u, shape),
                                                         np.broadcast_to(c, shape))
        energy = np.where(ok, uplink + downlink + compute, np.inf)
        order = (2, 0, 1)
        state._tables = PrefillNodeTables(
            energy_j=energy.transpose(order).copy(),
            uplink_energy_j=uplink.transpose(order).copy(),
            downlink_energy_j=downlink.transpose(order).copy(),
            compute_energy_j=np.broadcast_to(compute, shape).transpose(order).copy(),
            reachable=ok.transpose(order).copy(),
        )
        return state._tables

    def single_token_reachable(self, gains: np.ndarray) -> np.ndarray:
        """Return whether each node (0..N) can serve one token with one expert within the prefill budget."""
        ones = np.ones(self.num_nodes + 1)
        return self.node_energy(gains, ones, ones)[3]

    # -- loads and degradation --------------------------------------------------

    def loads(self, computed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens served and pairs computed per node, each of shape ``(..., N + 1)``.

        ``computed`` is a boolean array ``(..., S, E)``. Column 0 of the tokens
        counts the tokens with a local expert.
        """
        per_token = np.asarray(computed, dtype=np.int64) @ self.node_onehot  # (..., S, N + 1)
        return (per_token > 0).sum(axis=-2), per_token.sum(axis=-2)

    def token_degradation(self, state: PrefillState, computed: np.ndarray) -> np.ndarray:
        """Degradation bound ``delta_s`` of every token, shape ``(..., S)`` for ``computed`` ``(..., S, E)``."""
        computed = np.asarray(computed, dtype=bool)
        skip = self.profile.skip_cost[state.layer][state.top_k]  # (S, K)
        replace = self.profile.replace_cost[state.layer][state.top_k]  # (S, K, E)
        masked = np.where(computed[..., None, :], replace, np.inf)  # (..., S, K, E)
        per_expert = np.minimum(skip, masked.min(axis=-1))
        in_top_k = np.take_along_axis(computed, np.broadcast_to(state.top_k, computed.shape[:-1] + (self.top_k,)),
                                      axis=-1)
        per_expert = np.where(in_top_k, 0.0, per_expert)
        return (per_expert * state.weights).sum(axis=-1)

    def excess(self, token_degradation: np.ndarray, accuracy_budget: float | None = None) -> np.ndarray:
        """Total excess of the per-token bounds over the budget, ``sum_s max(delta_s - eps, 0)``."""
        budget = self.accuracy_budget if accuracy_budget is None else accuracy_budget
        return np.maximum(np.asarray(token_degradation) - budget - DEGRADATION_TOLERANCE, 0.0).sum(axis=-1)

    # -- energy ---------------------------------------------------------------

    def energy_of_loads(self, state: PrefillState, tokens: np.ndarray, pairs: np.ndarray):
        """Energy terms of one load vector: ``(uplink_j, downlink_j, compute_j, failed_nodes)``.

        Under FDMA a node fails when it cannot finish within the budget with its
        load. Under TDMA nodes fail, those with the longest round trip at full
        power first, until the remaining links fit in the shared band. Failed
        nodes contribute no energy here.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        pairs = np.asarray(pairs, dtype=np.int64)
        uplink, downlink, compute, ok = self.node_energy(state.gains, tokens, pairs)
        # Node 0 fails only when the local experts overrun the budget, and evaluate() charges it no link.
        failed = [int(n) for n in np.flatnonzero((pairs > 0) & ~ok)]
        compute_j = float(np.where(ok, compute, 0.0).sum())
        if self.scenario.access == "fdma":
            return (float(np.where(ok, uplink, 0.0).sum()), float(np.where(ok, downlink, 0.0).sum()), compute_j,
                    tuple(failed))
        return self._tdma_energy(state, tokens, pairs, ok, failed)

    def _tdma_energy(self, state, tokens, pairs, ok, failed):
        contacted = [n for n in range(1, self.num_nodes + 1) if pairs[n] > 0 and ok[n]]
        failed = list(failed)
        compute_all = pairs * self.flops_per_expert * self.energy_j_per_flop
        local = float(compute_all[0]) if ok[0] else 0.0
        while contacted:
            index = np.asarray(contacted)
            node_gains = state.gains[index - 1]
            bits = tokens[index] * self.payload_bits
            m_up = radio.min_tx_time_s(bits, node_gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                       self.source_power_w)
            m_down = radio.min_tx_time_s(bits, node_gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                         self.node_power_w)
            busiest = float((pairs[index] * self.flops_per_expert / self.flops_per_s[index]).max())
            link_bits = np.concatenate([bits, bits]).astype(np.float64)
            link_gains = np.concatenate([node_gains, node_gains])
            tau, _, feasible = radio.tdma_allocation(link_bits, link_gains, self.bandwidth_hz,
                                                     self.noise_psd_w_per_hz, np.concatenate([m_up, m_down]),
                                                     self.latency_budget_s - busiest)
            if feasible:
                energy = radio.tx_energy_j(tau, link_bits, link_gains, self.bandwidth_hz, self.noise_psd_w_per_hz)
                half = len(contacted)
                return (float(energy[:half].sum()), float(energy[half:].sum()),
                        float(compute_all[index].sum()) + local, tuple(sorted(failed)))
            worst = int(np.argmax(m_up + m_down))
            failed.append(contacted.pop(worst))
        return 0.0, 0.0, local, tuple(sorted(failed))

    def min_round_trip_s(self, gains: np.ndarray, node: int, tokens: int) -> float:
        """Uplink plus downlink time in s of ``tokens`` payloads to edge node ``node`` at the power caps."""
        bits = tokens * self.payload_bits
        gain = gains[node - 1]
        return float(radio.min_tx_time_s(bits, gain, self.bandwidth_hz, self.noise_psd_w_per_hz, self.source_power_w)
                     + radio.min_tx_time_s(bits, gain, self.bandwidth_hz, self.noise_psd_w_per_hz, self.node_power_w))

    def tdma_multiplier(self, state: PrefillState, tokens: np.ndarray, pairs: np.ndarray) -> float | None:
        """Multiplier ``lam`` (J/s) of the shared-band time budget at the optimal TDMA schedule of a load.

        Returns ``None`` when the contacted nodes cannot share the band within
        the budget or no edge node is contacted.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        pairs = np.asarray(pairs, dtype=np.int64)
        contacted = np.flatnonzero(pairs[1:] > 0) + 1
        if contacted.size == 0:
            return None
        node_gains = state.gains[contacted - 1]
        bits = tokens[contacted] * self.payload_bits
        m_up = radio.min_tx_time_s(bits, node_gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                   self.source_power_w)
        m_down = radio.min_tx_time_s(bits, node_gains, self.bandwidth_hz, self.noise_psd_w_per_hz,
                                     self.node_power_w)
        busiest = float((pairs[contacted] * self.flops_per_expert / self.flops_per_s[contacted]).max())
        _, multiplier, feasible = radio.tdma_allocation(
            np.concatenate([bits, bits]).astype(np.float64), np.concatenate([node_gains, node_gains]),
            self.bandwidth_hz, self.noise_psd_w_per_hz, np.concatenate([m_up, m_down]),
            self.latency_budget_s - busiest)
        return float(multiplier) if feasible else None

    def tdma_dual_link_energy(self, gains: np.ndarray, tokens: np.ndarray, multiplier: float) -> np.ndarray:
        """``min over tau >= tau_min of E_tx(tau) + lam * tau``, summed over each edge node's two links.

        ``tokens`` has shape ``(..., N)``. For any ``lam > 0`` the sum of these
        terms over the contacted nodes, minus ``lam`` times the band time
        ``T - max compute``, is a lower bound on the TDMA link energy (weak
        duality), and it is tight at the optimal schedule's multiplier.
        """
        if not multiplier > 0:
            raise ValueError(f"invalid multiplier: expected a positive value in J/s, got {multiplier!r}")
        gains = np.asarray(gains, dtype=np.float64)
        bits = np.asarray(tokens, dtype=np.float64) * self.payload_bits
        noise_over_gain = self.noise_psd_w_per_hz * self.bandwidth_hz / gains
        # dE_tx/dtau = -lam at u = D ln2 / (B tau) = 1 + W0((lam / a - 1) / e), a = N0 B / G.
        exponent = 1.0 + np.real(lambertw((multiplier / noise_over_gain - 1.0) / math.e, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            tau_free = bits * radio.LN2 / (self.bandwidth_hz * exponent)
        total = np.zeros(np.broadcast_shapes(bits.shape, gains.shape))
        for power in (self.source_power_w, self.node_power_w):
            tau_min = radio.min_tx_time_s(bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz, power)
            tau = np.maximum(tau_free, tau_min)
            energy = radio.tx_energy_j(tau, bits, gains, self.bandwidth_hz, self.noise_psd_w_per_hz)
            total = total + np.where(bits > 0, energy + multiplier * tau, 0.0)
        return total

    def decision_energy(self, state: PrefillState, computed: np.ndarray) -> float:
        """Energy in J of a decision whose contacted nodes all finish in time, else ``inf``."""
        tokens, pairs = self.loads(computed)
        uplink, downlink, compute, failed = self.energy_of_loads(state, tokens, pairs)
        return math.inf if failed else uplink + downlink + compute

    # -- full evaluation --------------------------------------------------------

    def evaluate(self, state: PrefillState, computed: np.ndarray) -> PrefillDecisionCost:
        """Cost of computing the ``(S, E)`` boolean mask ``computed``.

        A contacted node that cannot finish in time is charged the source's
        uplink at full power for the whole prefill budget, and its experts
        count as not computed for every token.
        """
        computed = np.asarray(computed, dtype=bool)
        expected = (state.num_tokens, self.num_experts)
        if computed.shape != expected:
            raise ValueError(f"invalid decision: expected a boolean mask of shape {expected}, got {computed.shape}")
        tokens, pairs = self.loads(computed)
        uplink, downlink, compute, failed = self.energy_of_loads(state, tokens, pairs)
        effective = computed
        if failed:
            effective = computed & ~np.isin(self.expert_nodes, failed)[None, :]
        token_delta = self.token_degradation(state, effective)
        violating = int(np.count_nonzero(token_delta > self.accuracy_budget + DEGRADATION_TOLERANCE))
        failure_energy = self.failure_energy_per_node_j * sum(1 for n in failed if n > 0)
        return PrefillDecisionCost(
            energy_j=uplink + downlink + compute + failure_energy,
            uplink_energy_j=uplink,
            downlink_energy_j=downlink,
            compute_energy_j=compute,
            failure_energy_j=failure_energy,
            degradation=float(token_delta.mean()),
            accuracy_budget=self.accuracy_budget,
            accuracy_ok=violating == 0,
            latency_ok=not failed,
            nodes_contacted=int(np.count_nonzero(pairs[1:])),
            experts_computed=int(effective.sum()),
            failed_nodes=failed,
            computed=effective,
            token_degradation=token_delta,
            tokens_violating=violating,
            tokens_sent=int(tokens[1:].sum()),
            excess=float(self.excess(token_delta)),
        )

    def top_k_mask(self, state: PrefillState) -> np.ndarray:
        """Conventional Top-K routing for every token, shape ``(S, E)``."""
        mask = np.zeros((state.num_tokens, self.num_experts), dtype=bool)
        np.put_along_axis(mask, state.top_k, True, axis=-1)
        return mask

    def _reference_energy(self) -> float:
        """Energy of Top-K over the prompt at the mean channel with balanced node loads.

        Every edge node sits at the mean distance with unit fading power. Token
        ``s`` places its K experts round-robin over the edge nodes, starting at
        node ``s * K mod N``, so all nodes carry about the same load. Experts
        that do not fit on the edge nodes are counted at the source. This is the
        energy scale of the prefill reward, so Top-K earns about -1 per step.
        """
        from wide_env.channel import ChannelModel

        gain = ChannelModel(self.scenario).mean_distance_gain()
        gains = np.full(self.num_nodes, gain)
        per_token = np.zeros((self.num_tokens, self.num_nodes + 1), dtype=np.int64)
        for token in range(self.num_tokens):
            placed, node = 0, (token * self.top_k) % max(self.num_nodes, 1)
            for _ in range(self.top_k * self.num_nodes):
                if placed == self.top_k:
                    break
                if per_token[token, node + 1] < self.experts_per_node[node + 1]:
                    per_token[token, node + 1] += 1
                    placed += 1
                node = (node + 1) % self.num_nodes
            per_token[token, 0] = min(self.top_k - placed, self.experts_per_node[0])
        tokens = (per_token > 0).sum(axis=0)
        pairs = per_token.sum(axis=0)
        state = self.make_state(0, np.full((self.num_tokens, self.num_experts), 1.0 / self.num_experts), gains)
        uplink, downlink, compute, failed = self.energy_of_loads(state, tokens, pairs)
        energy = uplink + downlink + compute + self.failure_energy_per_node_j * sum(1 for n in failed if n > 0)
        # A profile with nothing to compute anywhere would give 0 J; keep the scale positive.
        return max(energy, np.finfo(float).tiny)
