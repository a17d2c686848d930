"""MoE profile: expert placement, skip and replacement costs, and gate sources.

The cost tables are per MoE layer and dimensionless, in units of the typical
Top-K layer output:

- ``skip_cost[l, i]`` bounds the size of expert ``i``'s output,
- ``replace_cost[l, i, j]`` bounds the distance between the outputs of ``i`` and ``j``
  (zero diagonal, symmetric, at most ``skip_cost[l, i] + skip_cost[l, j]``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from wide_env.config import MoEArchitecture, ScenarioConfig

# Uniform ranges of the synthetic cost tables.
WITHIN_CLUSTER_REPLACE_COST = (0.2, 0.5)
ACROSS_CLUSTER_REPLACE_COST = (0.9, 1.4)
SKIP_COST = (0.8, 1.2)


@dataclass(frozen=True)
class MoEProfile:
    """Everything about the MoE model that the cost of a decision needs."""

    architecture: MoEArchitecture
    expert_nodes: np.ndarray  # (E,) node of each expert, 0 = source
    skip_cost: np.ndarray  # (L, E)
    replace_cost: np.ndarray  # (L, E, E)
    cluster_of_expert: np.ndarray | None = None  # (L, E) for synthetic profiles

    @property
    def num_experts(self) -> int:
        return self.architecture.num_experts

    @property
    def top_k(self) -> int:
        return self.architecture.top_k

    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers

    def gate_weights(self, gates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K indices (largest gate first) and their weights, renormalised if the model does."""
        return top_k_weights(gates, self.top_k, self.architecture.renormalize)


def top_k_weights(gates: np.ndarray, top_k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-K indices along the last axis, largest gate first, and their weights."""
    order = np.argsort(-gates, axis=-1, kind="stable")[..., :top_k]
    weights = np.take_along_axis(gates, order, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return order, weights


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def synthetic_cost_tables(architecture: MoEArchitecture, cluster_size: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw clustered skip and replacement costs for every layer.

    Each layer groups its experts at random into clusters of ``cluster_size``.
    Replacement costs are ``U[0.2, 0.5]`` inside a cluster and ``U[0.9, 1.4]``
    across clusters, skip costs ``U[0.8, 1.2]``; the tables are then made
    symmetric and capped at ``s_i + s_j``. Returns ``(skip, replace, cluster)``.
    """
    num_layers, num_experts = architecture.num_layers, architecture.num_experts
    skip = rng.uniform(*SKIP_COST, size=(num_layers, num_experts))
    replace = np.empty((num_layers, num_experts, num_experts))
    clusters = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        cluster = np.empty(num_experts, dtype=np.int64)
        cluster[rng.permutation(num_experts)] = np.arange(num_experts) // cluster_size
        same = cluster[:, None] == cluster[None, :]
        within = rng.uniform(*WITHIN_CLUSTER_REPLACE_COST, size=(num_experts, num_experts))
        across = rng.uniform(*ACROSS_CLUSTER_REPLACE_COST, size=(num_experts, num_experts))
        table = np.triu(np.where(same, within, across), k=1)
        table = table + table.T
        table = np.minimum(table, skip[layer][:, None] + skip[layer][None, :])
        np.fill_diagonal(table, 0.0)
        replace[layer] = table
        clusters[layer] = cluster
    return skip, replace, clusters


def build_profile(scenario: ScenarioConfig) -> MoEProfile:
    """Build the scenario's profile.

    With ``gate_source="trace"`` the cost tables are the ones measured from
    the trace's model (see ``wide_env.trace``); otherwise the synthetic tables
    are drawn from ``profile_seed``.
    """
    if scenario.gate_source == "trace":
        from wide_env.trace import scenario_trace, trace_profile

        trace, _ = scenario_trace(scenario)
        return trace_profile(scenario, trace)
    rng = np.random.default_rng([scenario.profile_seed, 0x5EED])
    skip, replace, clusters = synthetic_cost_tables(scenario.architecture, scenario.expert_cluster_size, rng)
    return MoEProfile(
        architecture=scenario.architecture,
        expert_nodes=np.asarray(scenario.expert_nodes(), dtype=np.int64),
        skip_cost=skip,
        replace_cost=replace,
        cluster_of_expert=clusters,
    )


class GateSource(abc.ABC):
    """Source of router logits, one ``(L, E)`` block per generated token.

    ``reset`` starts an episode with the given generator; ``next_token`` returns
    the logits of every MoE layer for the next token. Implementations draw
    random numbers only from the generator passed to ``reset``.
    """

    num_layers: int
    num_experts: int

    @abc.abstractmethod
    def reset(self, rng: np.random.Generator) -> None:
        """Start a new episode."""

    @abc.abstractmethod
    def next_token(self) -> np.ndarray:
        """Router logits of the next token, shape ``(L, E)``."""


class SyntheticGateSource(GateSource):
    """Router logits with per-layer expert popularity and correlation across tokens.

    ``logits[t, l] = popularity[l] + logit_std * z[t, l]`` where ``z`` is an AR(1)
    process over tokens, ``z[t] = c z[t-1] + sqrt(1 - c^2) n[t]`` with unit-variance
    Gaussian ``n``. The popularity is a fixed property of the model, drawn once
    from the profile seed. With ``logit_std = 1`` the mixtral-8x7b preset's
    renormalised Top-1 weight averages about 0.6.
    """

    def __init__(self, architecture: MoEArchitecture, logit_std: float, popularity_std: float,
                 token_correlation: float, profile_seed: int):
        self.num_layers = architecture.num_layers
        self.num_experts = architecture.num_experts
        self.logit_std = logit_std
        self.token_correlation = token_correlation
        popularity_rng = np.random.default_rng([profile_seed, 0x6A7E])
        self.popularity = popularity_std * popularity_rng.standard_normal((self.num_layers, self.num_experts))
        self._state = np.zeros((self.num_layers, self.num_experts))
        self._rng: np.random.Generator | None = None
        self._fresh = True

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._fresh = True

    def next_token(self) -> np.ndarray:
        if self._rng is None:
            raise RuntimeError("SyntheticGateSource.next_token() called before reset()")
        noise = self._rng.standard_normal((self.num_layers, self.num_experts))
        if self._fresh:
            self._state = noise
            self._fresh = False
        else:
            c = self.token_correlation
            self._state = c * self._state + np.sqrt(1.0 - c * c) * noise
        return self.popularity + self.logit_std * self._state


def build_gate_source(scenario: ScenarioConfig) -> GateSource:
    if scenario.gate_source == "synthetic":
        return SyntheticGateSource(scenario.architecture, scenario.gate_logit_std, scenario.gate_popularity_std,
                                   scenario.gate_token_correlation, scenario.profile_seed)
    if scenario.gate_source == "trace":
        from wide_env.trace import TraceGateSource, scenario_trace

        trace, _ = scenario_trace(scenario)
        return TraceGateSource(trace, scenario.architecture.num_layers, scenario.tokens_per_episode)
    raise ValueError(f"invalid gate_source: expected 'synthetic' or 'trace', got {scenario.gate_source!r}")
