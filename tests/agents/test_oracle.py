"""The SiftMoE oracle against exhaustive search, Top-K and its own contract."""

from __future__ import annotations

import numpy as np
import pytest

import agents.oracle as oracle_module
from agents.exhaustive import exhaustive_search
from agents.oracle import SiftMoEOracle, solve_step
from wide_env.config import MoEArchitecture, ScenarioConfig
from wide_env.cost import CostModel
from wide_env.profile import MoEProfile, softmax, synthetic_cost_tables


def random_instance(rng: np.random.Generator, access: str = "fdma", epsilon: float | None = None):
    """A random cost model and step: random E <= 12, K, placement, tables, gains and budget."""
    num_experts = int(rng.integers(2, 13))
    top_k = int(rng.integers(1, min(num_experts, 4) + 1))
    num_nodes = int(rng.integers(1, 5))
    if epsilon is None:
        epsilon = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.0, 0.8))
    scenario = ScenarioConfig(num_nodes=num_nodes, access=access, accuracy_budget=epsilon)
    architecture = MoEArchitecture("random", 2, 4096, int(rng.choice([1024, 14336])), num_experts, top_k,
                                   bool(rng.random() < 0.5))
    skip, replace, clusters = synthetic_cost_tables(architecture, int(rng.integers(1, 4)), rng)
    nodes = rng.integers(0 if rng.random() < 0.3 else 1, num_nodes + 1, size=num_experts)
    profile = MoEProfile(architecture, nodes.astype(np.int64), skip, replace, clusters)
    cost_model = CostModel(scenario, profile)
    gains_db = rng.uniform(-128.0, -85.0, size=num_nodes)
    gates = softmax(rng.normal(0.0, 1.5, size=num_experts))
    state = cost_model.make_state(int(rng.integers(0, 2)), 0, gates, 10.0 ** (gains_db / 10.0))
    return cost_model, state


def assert_same_optimum(result, reference):
    assert result.status == reference.status
    assert result.excess == pytest.approx(reference.excess, abs=1e-9)
    assert result.energy_j == pytest.approx(reference.energy_j, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("path", ["enumeration", "branch_and_bound"])
def test_oracle_matches_exhaustive_fdma(path, monkeypatch):
    if path == "branch_and_bound":
        monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    rng = np.random.default_rng(2026)
    statuses = set()
    for _ in range(500):
        cost_model, state = random_instance(rng)
        result = solve_step(cost_model, state)
        reference = exhaustive_search(cost_model, state)
        assert_same_optimum(result, reference)
        statuses.add(result.status)
    # The instance mix must exercise both feasible and infeasible steps.
    assert statuses == {"optimal", "infeasible"}


def test_oracle_matches_exhaustive_tdma():
    rng = np.random.default_rng(7)
    for _ in range(150):
        cost_model, state = random_instance(rng, access="tdma")
        assert_same_optimum(solve_step(cost_model, state), exhaustive_search(cost_model, state))


def test_oracle_matches_exhaustive_tdma_branch_and_bound(monkeypatch):
    monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    rng = np.random.default_rng(8)
    for _ in range(100):
        cost_model, state = random_instance(rng, access="tdma")
        assert_same_optimum(solve_step(cost_model, state), exhaustive_search(cost_model, state))


@pytest.mark.parametrize("path", ["enumeration", "branch_and_bound"])
def test_lagrangian_matches_exhaustive(path, monkeypatch):
    if path == "branch_and_bound":
        monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    rng = np.random.default_rng(11)
    for _ in range(200):
        cost_model, state = random_instance(rng)
        price = float(rng.choice([0.0, 0.5, 2.0, 10.0, 100.0]))
        result = solve_step(cost_model, state, degradation_price=price)
        reference = exhaustive_search(cost_model, state, degradation_price=price)
        assert result.objective == pytest.approx(reference.objective, rel=1e-9, abs=1e-12)


def test_oracle_equals_topk_at_zero_budget():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(300):
        cost_model, state = random_instance(rng, epsilon=0.0)
        topk = cost_model.evaluate(state, cost_model.top_k_mask(state))
        if not topk.latency_ok:
            continue
        result = solve_step(cost_model, state)
        assert result.status == "optimal"
        assert np.array_equal(result.x, cost_model.top_k_mask(state))
        assert result.energy_j == pytest.approx(topk.energy_j, rel=1e-12)
        checked += 1
    assert checked > 100


def test_oracle_never_costs_more_than_feasible_topk():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(500):
        cost_model, state = random_instance(rng)
        topk = cost_model.evaluate(state, cost_model.top_k_mask(state))
        if not topk.latency_ok:
            continue
        result = solve_step(cost_model, state)
        assert result.status == "optimal"
        assert result.energy_j <= topk.energy_j * (1 + 1e-12)
        checked += 1
    assert checked > 100


def test_oracle_decision_is_feasible_under_cost_model():
    rng = np.random.default_rng(9)
    for _ in range(200):
        cost_model, state = random_instance(rng)
        result = solve_step(cost_model, state)
        cost = cost_model.evaluate(state, result.x)
        assert cost.latency_ok
        assert cost.energy_j == pytest.approx(result.energy_j, rel=1e-12, abs=1e-18)
        assert cost.degradation == pytest.approx(result.degradation, abs=1e-12)
        if result.status == "optimal":
            assert cost.accuracy_ok


def test_oracle_on_default_env_matches_exhaustive():
    import gymnasium as gym

    import wide_env  # noqa: F401  (registers the env)

    env = gym.make("WIDE-Decode-v0").unwrapped
    _, info = env.reset(seed=0)
    oracle = SiftMoEOracle(env.cost_model)
    for _ in range(100):
        state = info["privileged"]["state"]
        result = oracle.solve(state)
        assert_same_optimum(result, exhaustive_search(env.cost_model, state))
        _, _, _, _, info = env.step(result.x.astype(np.int8))


def test_oracle_rejects_negative_price():
    rng = np.random.default_rng(0)
    cost_model, _ = random_instance(rng)
    with pytest.raises(ValueError, match="degradation_price"):
        SiftMoEOracle(cost_model, degradation_price=-1.0)


def test_exhaustive_rejects_large_expert_count():
    import gymnasium as gym

    import wide_env  # noqa: F401

    env = gym.make("WIDE-Decode-v0", moe_preset="olmoe-1b-7b").unwrapped
    _, info = env.reset(seed=0)
    with pytest.raises(ValueError, match="at most 16 experts"):
        exhaustive_search(env.cost_model, info["privileged"]["state"])
