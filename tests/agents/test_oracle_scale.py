"""The oracle's searches at scale, its batched form and the MILP reference."""

import numpy as np
import pytest

import agents.oracle as oracle_module
from agents.exhaustive import exhaustive_search
from agents.milp import solve_step_milp
from agents.oracle import SiftMoEOracle
from wide_env.config import MOE_PRESETS, MoEArchitecture, ScenarioConfig
from wide_env.cost import CostModel, StepBatch
from wide_env.env import WideDecodeEnv
from wide_env.profile import MoEProfile, softmax, synthetic_cost_tables


def random_instance(rng: np.random.Generator, access: str = "fdma"):
    """A random cost model and four steps: E <= 14, K <= 6, local experts and slow nodes that fill up."""
    num_experts = int(rng.integers(2, 15))
    top_k = int(rng.integers(1, min(num_experts, 6) + 1))
    num_nodes = int(rng.integers(1, 6))
    epsilon = 0.0 if rng.random() < 0.15 else float(rng.uniform(0.0, 0.8))
    # 2e11 FLOP/s makes one mixtral-sized expert take 1.8 ms, so nodes run out of time after a few experts.
    scenario = ScenarioConfig(num_nodes=num_nodes, access=access, accuracy_budget=epsilon,
                              source_flops_per_s=float(rng.choice([5e12, 1e11])),
                              node_flops_per_s=float(rng.choice([20e12, 2e11])))
    architecture = MoEArchitecture("random", 2, 4096, int(rng.choice([1024, 14336])), num_experts, top_k,
                                   bool(rng.random() < 0.5))
    skip, replace, clusters = synthetic_cost_tables(architecture, int(rng.integers(1, 4)), rng)
    nodes = rng.integers(0 if rng.random() < 0.3 else 1, num_nodes + 1, size=num_experts)
    cost_model = CostModel(scenario, MoEProfile(architecture, nodes.astype(np.int64), skip, replace, clusters))
    states = []
    for _ in range(4):
        gains = 10.0 ** (rng.uniform(-128.0, -85.0, size=num_nodes) / 10.0)
        gates = softmax(rng.normal(0.0, 1.5, size=num_experts))
        states.append(cost_model.make_state(int(rng.integers(0, 2)), 0, gates, gains))
    return cost_model, states


def assert_same_optimum(result, reference, price=None, rel=1e-9):
    if price is not None:
        assert result.objective == pytest.approx(reference.objective, rel=rel, abs=1e-12)
        return
    assert result.status == reference.status
    assert result.excess == pytest.approx(reference.excess, abs=1e-9)
    assert result.energy_j == pytest.approx(reference.energy_j, rel=rel, abs=1e-15)


def check_against_exhaustive(seed: int, trials: int):
    rng = np.random.default_rng(seed)
    statuses = set()
    for _ in range(trials):
        access = "tdma" if rng.random() < 0.25 else "fdma"
        cost_model, states = random_instance(rng, access)
        price = None if rng.random() < 0.7 else float(rng.choice([0.0, 0.5, 2.0, 10.0]))
        oracle = SiftMoEOracle(cost_model, degradation_price=price)
        for state in states:
            result = oracle.solve(state)
            assert_same_optimum(result, exhaustive_search(cost_model, state, degradation_price=price), price)
            assert cost_model.evaluate(state, result.x).latency_ok
            statuses.add(result.status)
    assert statuses == {"optimal", "infeasible"}


# -- exactness of each search ------------------------------------------------------------


def test_enumeration_matches_exhaustive():
    check_against_exhaustive(seed=31, trials=60)


def test_top_k_subset_search_matches_exhaustive(monkeypatch):
    monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    check_against_exhaustive(seed=32, trials=100)


def test_candidate_search_matches_exhaustive(monkeypatch):
    # Also covers TDMA steps whose least-excess decision needs the exact excess comparison.
    monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    monkeypatch.setattr(oracle_module, "TOP_K_SUBSET_LIMIT", 0)
    check_against_exhaustive(seed=21, trials=60)


def test_top_k_subset_search_reports_work(monkeypatch):
    monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    env = WideDecodeEnv(moe_preset="olmoe-1b-7b", gate_source="synthetic")
    _, info = env.reset(seed=0)
    result = SiftMoEOracle(env.cost_model).solve(info["privileged"]["state"])

    assert result.nodes_examined >= 1
    assert 0 < result.candidates <= env.num_experts
    assert result.solve_time_s > 0


# -- batched form -------------------------------------------------------------------------


@pytest.mark.parametrize("price", [None, 2.0])
def test_batched_oracle_equals_single_oracle(price):
    env = WideDecodeEnv(tokens_per_episode=2)
    _, info = env.reset(seed=3)
    states = []
    for _ in range(64):
        states.append(info["privileged"]["state"])
        _, _, _, _, info = env.step(np.zeros(8, dtype=np.int8))
    oracle = SiftMoEOracle(env.cost_model, degradation_price=price)

    batched = oracle.solve_batch(StepBatch.stack(states))

    assert len(batched) == 64
    for index, state in enumerate(states):
        single = oracle.solve(state)
        np.testing.assert_array_equal(batched.x[index], single.x)
        assert batched.energy_j[index] == single.energy_j
        assert batched.degradation[index] == single.degradation
        assert batched.status[index] == single.status
        assert batched.result(index).objective == single.objective


def test_batched_oracle_in_small_chunks(monkeypatch):
    monkeypatch.setattr(oracle_module, "BATCH_CHUNK_VALUES", 1)
    rng = np.random.default_rng(8)
    cost_model, states = random_instance(rng)
    oracle = SiftMoEOracle(cost_model)

    batched = oracle.solve_batch(StepBatch.stack(states))

    for index, state in enumerate(states):
        assert batched.energy_j[index] == oracle.solve(state).energy_j


@pytest.mark.parametrize("access", ["tdma", "fdma"])
def test_batched_oracle_without_enumeration(monkeypatch, access):
    monkeypatch.setattr(oracle_module, "ENUMERATION_LIMIT", 0)
    env = WideDecodeEnv(access=access, gate_source="synthetic")
    _, info = env.reset(seed=5)
    states = []
    for _ in range(6):
        states.append(info["privileged"]["state"])
        _, _, _, _, info = env.step(np.zeros(8, dtype=np.int8))
    oracle = SiftMoEOracle(env.cost_model)

    batched = oracle.solve_batch(StepBatch.stack(states))

    for index, state in enumerate(states):
        assert_same_optimum(batched.result(index), oracle.solve(state))


# -- every preset, deepseek-v3 over 16 nodes, and the MILP ------------------------------


def preset_states(count: int, seed: int = 2, **overrides):
    env = WideDecodeEnv(gate_source="synthetic", **overrides)
    _, info = env.reset(seed=seed)
    states = []
    for _ in range(count):
        states.append(info["privileged"]["state"])
        _, _, _, _, info = env.step(np.zeros(env.num_experts, dtype=np.int8))
    return env.cost_model, states


@pytest.mark.parametrize("preset", list(MOE_PRESETS))
def test_every_preset_matches_milp(preset):
    cost_model, states = preset_states(2, moe_preset=preset)
    oracle = SiftMoEOracle(cost_model)
    for state in states:
        assert_same_optimum(oracle.solve(state), solve_step_milp(cost_model, state), rel=1e-6)


def test_deepseek_v3_sixteen_nodes_matches_milp():
    # With 20 MHz per node and nodes within 100 m, most steps are feasible and the search has work to do.
    cost_model, states = preset_states(4, moe_preset="deepseek-v3", num_nodes=16, bandwidth_total_hz=320e6,
                                       distance_max_m=100.0)
    oracle = SiftMoEOracle(cost_model)
    statuses = set()
    for state in states:
        result = oracle.solve(state)
        assert_same_optimum(result, solve_step_milp(cost_model, state), rel=1e-6)
        assert result.candidates > cost_model.profile.top_k
        statuses.add(result.status)
    assert "optimal" in statuses


def test_least_excess_tie_keeps_least_energy():
    # An infeasible deepseek-v3 step whose node capacities bind: every decision with the least excess
    # reaches one delta exactly, and the bound must not prune the cheapest of them for rounding.
    cost_model, states = preset_states(26, seed=0, moe_preset="deepseek-v3")
    state = states[25]
    result = SiftMoEOracle(cost_model).solve(state)

    assert result.status == "infeasible"
    assert_same_optimum(result, solve_step_milp(cost_model, state), rel=1e-9)


def test_deepseek_v3_sixteen_nodes_unreachable():
    # 114,688-bit payloads over 5 MHz per node need more than the 2 ms budget at any distance.
    cost_model, states = preset_states(3, moe_preset="deepseek-v3", num_nodes=16)
    oracle = SiftMoEOracle(cost_model)
    for state in states:
        result = oracle.solve(state)
        assert not result.x.any()
        assert result.status == "infeasible"
        assert_same_optimum(result, solve_step_milp(cost_model, state), rel=1e-6)


def test_milp_matches_oracle_on_small_instances():
    rng = np.random.default_rng(5)
    statuses = set()
    for _ in range(25):
        cost_model, states = random_instance(rng)
        price = None if rng.random() < 0.8 else 2.0
        oracle = SiftMoEOracle(cost_model, degradation_price=price)
        for state in states[:2]:
            result = solve_step_milp(cost_model, state, degradation_price=price)
            assert_same_optimum(result, oracle.solve(state), price, rel=1e-6)
            statuses.add(result.status)
    assert statuses == {"optimal", "infeasible"}


def test_milp_rejects_tdma():
    cost_model, states = preset_states(1, access="tdma")
    with pytest.raises(ValueError, match="access='fdma'"):
        solve_step_milp(cost_model, states[0])
