"""Prefill oracles against exhaustive search, Top-K and the token-by-token decoding oracle."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

import agents.prefill_oracle as prefill_oracle
from agents.prefill_oracle import (
    ExactPrefillOracle,
    FastPrefillOracle,
    PrefillOraclePolicy,
    PrefillTopKPolicy,
    exhaustive_prefill_search,
    token_by_token_decision,
)
from eval.prefill_gap import random_small_instance
from wide_env.channel import ChannelModel
from wide_env.config import MoEArchitecture, ScenarioConfig
from wide_env.prefill import WidePrefillEnv
from wide_env.prefill_cost import PrefillCostModel
from wide_env.profile import MoEProfile, build_gate_source, build_profile, softmax, synthetic_cost_tables


@lru_cache(maxsize=4)
def exhaustive_cases(seed: int, access: str, count: int):
    """Random instances with their exhaustive optimum, shared by the exact and the fast oracle's tests."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        cost_model, state = random_small_instance(rng, access)
        cases.append((cost_model, state, exhaustive_prefill_search(cost_model, state)))
    return cases


def scenario_states(count: int, seed: int, **overrides):
    """Prefill states of the scenario: channel and gates as the environment draws them."""
    scenario = ScenarioConfig(**{"gate_source": "synthetic", **overrides})
    profile = build_profile(scenario)
    cost_model = PrefillCostModel(scenario, profile)
    channel, gates = ChannelModel(scenario), build_gate_source(scenario)
    rng = np.random.default_rng(seed)
    states = []
    for _ in range(count):
        channel.reset(np.random.default_rng(rng.integers(2**62)))
        gates.reset(np.random.default_rng(rng.integers(2**62)))
        layer = int(rng.integers(profile.num_layers))
        logits = np.stack([gates.next_token()[layer] for _ in range(scenario.prompt_tokens)])
        states.append(cost_model.make_state(layer, softmax(logits), channel.true_gains))
    return cost_model, states


def assert_same_optimum(result, reference):
    assert result.status == reference.status
    assert result.excess == pytest.approx(reference.excess, abs=1e-7)
    assert result.energy_j == pytest.approx(reference.energy_j, rel=1e-7, abs=1e-15)


def assert_not_worse(result, other, cost_model, state):
    """``result`` is at most ``other`` in (total excess, energy) whenever ``other`` finishes in time."""
    cost = cost_model.evaluate(state, other)
    if not cost.latency_ok:
        return
    assert result.excess <= cost.excess + 1e-9
    if cost.excess == 0.0:
        assert result.energy_j <= cost.energy_j * (1 + 1e-9)


# -- exact oracle -------------------------------------------------------------------


def test_exact_matches_exhaustive_fdma():
    statuses = []
    for cost_model, state, reference in exhaustive_cases(2026, "fdma", 70):
        result = ExactPrefillOracle(cost_model).solve(state)
        assert_same_optimum(result, reference)
        statuses.append(result.status)
    # The instance mix must exercise both feasible and infeasible steps.
    assert set(statuses) == {"optimal", "infeasible"}


def test_exact_matches_exhaustive_tdma():
    for cost_model, state, reference in exhaustive_cases(7, "tdma", 40):
        assert_same_optimum(ExactPrefillOracle(cost_model).solve(state), reference)


def test_exact_matches_exhaustive_at_sixteen_bits():
    rng = np.random.default_rng(3)
    for num_tokens, num_experts in ((2, 8), (4, 4), (8, 2)):
        scenario = ScenarioConfig(num_nodes=2, prompt_tokens=num_tokens, prefill_latency_budget_s=1e-3 * num_tokens)
        architecture = MoEArchitecture("random", 1, 4096, 14336, num_experts, 2, True)
        skip, replace, clusters = synthetic_cost_tables(architecture, 2, rng)
        nodes = 1 + (np.arange(num_experts) * 2) // num_experts
        cost_model = PrefillCostModel(scenario, MoEProfile(architecture, nodes, skip, replace, clusters))
        state = cost_model.make_state(0, softmax(rng.normal(size=(num_tokens, num_experts))),
                                      10.0 ** (rng.uniform(-110.0, -95.0, size=2) / 10.0))
        assert_same_optimum(ExactPrefillOracle(cost_model).solve(state), exhaustive_prefill_search(cost_model, state))


def test_exact_equals_top_k_at_zero_budget():
    cost_model, states = scenario_states(3, seed=5, prompt_tokens=6, accuracy_budget=0.0, distance_max_m=80.0)
    for state in states:
        top_k = cost_model.evaluate(state, cost_model.top_k_mask(state))
        result = ExactPrefillOracle(cost_model).solve(state)

        assert top_k.latency_ok
        assert result.status == "optimal"
        assert result.energy_j == pytest.approx(top_k.energy_j, rel=1e-9)


def test_exact_reports_infeasible_best_effort():
    # Every node is out of reach, so every token must skip its experts.
    cost_model, states = scenario_states(1, seed=6, prompt_tokens=3, distance_min_m=500.0, distance_max_m=600.0)
    result = ExactPrefillOracle(cost_model).solve(states[0])

    assert result.status == "infeasible"
    assert not result.success
    assert not result.x.any()
    assert result.excess > 0
    assert "least total excess" in result.message


def test_exhaustive_rejects_large_instances():
    cost_model, states = scenario_states(1, seed=0, prompt_tokens=3)
    with pytest.raises(ValueError, match="S\\*E <= 16"):
        exhaustive_prefill_search(cost_model, states[0])


def test_exact_rejects_negative_budget():
    cost_model, _ = scenario_states(1, seed=0, prompt_tokens=2)
    with pytest.raises(ValueError, match="accuracy_budget"):
        ExactPrefillOracle(cost_model, accuracy_budget=-0.1)


# -- fast oracle ---------------------------------------------------------------------


@pytest.mark.parametrize("access, seed, count", [("fdma", 2026, 70), ("tdma", 7, 40)])
def test_fast_close_to_exhaustive(access, seed, count):
    gaps, worse_excess = [], 0
    for cost_model, state, reference in exhaustive_cases(seed, access, count):
        result = FastPrefillOracle(cost_model).solve(state)
        assert result.excess >= reference.excess - 1e-9
        if result.excess > reference.excess + 1e-7:
            worse_excess += 1
        elif reference.energy_j > 0:
            gaps.append(result.energy_j / reference.energy_j - 1.0)
    assert worse_excess <= 1
    assert np.mean(gaps) < 0.01


def test_fast_matches_exact_on_default_scenario():
    cost_model, states = scenario_states(4, seed=13, prompt_tokens=8, prefill_latency_budget_s=8e-3)
    for state in states:
        fast = FastPrefillOracle(cost_model).solve(state)
        exact = ExactPrefillOracle(cost_model).solve(state)
        assert fast.excess >= exact.excess - 1e-9
        assert fast.energy_j >= exact.energy_j * (1 - 1e-9) or fast.excess > exact.excess
        if exact.status == "optimal":
            assert fast.energy_j == pytest.approx(exact.energy_j, rel=0.01)


@pytest.mark.parametrize("access", ["fdma", "tdma"])
def test_fast_beats_top_k_and_token_by_token(access):
    cost_model, states = scenario_states(12, seed=14, access=access, prompt_tokens=16)
    for state in states:
        result = FastPrefillOracle(cost_model).solve(state)
        assert_not_worse(result, cost_model.top_k_mask(state), cost_model, state)
        assert_not_worse(result, token_by_token_decision(cost_model, state), cost_model, state)


def test_exact_beats_top_k_and_token_by_token():
    cost_model, states = scenario_states(3, seed=15, prompt_tokens=12)
    for state in states:
        result = ExactPrefillOracle(cost_model).solve(state)
        assert_not_worse(result, cost_model.top_k_mask(state), cost_model, state)
        assert_not_worse(result, token_by_token_decision(cost_model, state), cost_model, state)


def test_fast_meets_every_token_budget_when_exact_does():
    cost_model, states = scenario_states(6, seed=16, prompt_tokens=16, distance_max_m=100.0)
    statuses = []
    for state in states:
        result = FastPrefillOracle(cost_model).solve(state)
        assert result.status == ExactPrefillOracle(cost_model).solve(state).status
        assert cost_model.evaluate(state, result.x).latency_ok
        if result.status == "optimal":
            assert np.all(result.token_degradation <= cost_model.accuracy_budget + 1e-9)
        statuses.append(result.status)
    assert "optimal" in statuses


def test_fast_handles_large_candidate_sets(monkeypatch):
    # A small enumeration limit forces the candidate truncation path.
    monkeypatch.setattr(prefill_oracle, "ENUMERATION_LIMIT", 8)
    cost_model, states = scenario_states(2, seed=17, moe_preset="qwen1.5-moe-a2.7b", num_nodes=6, prompt_tokens=4)
    for state in states:
        result = FastPrefillOracle(cost_model).solve(state)
        assert_not_worse(result, cost_model.top_k_mask(state), cost_model, state)


def test_fast_without_token_by_token_start():
    cost_model, states = scenario_states(3, seed=18, prompt_tokens=8)
    oracle = FastPrefillOracle(cost_model, starts=("empty", "top_k"))
    for state in states:
        result = oracle.solve(state)
        assert set(result.extra["sweeps"]) <= {"empty", "top_k"}
        assert_not_worse(result, cost_model.top_k_mask(state), cost_model, state)


def test_fast_rejects_unknown_start():
    cost_model, _ = scenario_states(1, seed=0, prompt_tokens=2)
    with pytest.raises(ValueError, match="invalid starts"):
        FastPrefillOracle(cost_model, starts=("random",))


# -- policies -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "fast", "token-by-token"])
def test_oracle_policy_runs_an_episode(method):
    env = WidePrefillEnv(prompt_tokens=3, num_nodes=4, distance_max_m=100.0, gate_source="synthetic")
    policy = PrefillOraclePolicy(env, method=method)
    observation, info = env.reset(seed=18)
    energy = 0.0
    for _ in range(4):
        action = policy.decide(observation, info)
        assert action.shape == (24,)
        observation, _, _, _, info = env.step(action)
        energy += info["energy_j"]
        if method != "token-by-token":
            assert info["tokens_violating"] == 0
    assert energy > 0


def test_observed_csi_policy_reads_observed_state():
    env = WidePrefillEnv(prompt_tokens=2, csi_delay_steps=2)
    policy = PrefillOraclePolicy(env, method="fast", csi="observed")
    observation, info = env.reset(seed=19)

    policy.decide(observation, info)

    observed = info["privileged"]["observed_state"]
    expected = FastPrefillOracle(env.cost_model).solve(observed).x
    np.testing.assert_array_equal(policy.last_result.x, expected)
    assert policy.name == "prefill-fast-observed"


def test_top_k_policy_matches_cost_model():
    env = WidePrefillEnv(prompt_tokens=3)
    observation, info = env.reset(seed=20)

    action = PrefillTopKPolicy(env).decide(observation, info)

    expected = env.cost_model.top_k_mask(info["privileged"]["state"])
    np.testing.assert_array_equal(action.reshape(3, 8), expected)


def test_policy_rejects_decoding_env():
    from wide_env.env import WideDecodeEnv

    with pytest.raises(TypeError, match="WIDE-Prefill-v0"):
        PrefillTopKPolicy(WideDecodeEnv())


def test_policy_rejects_unknown_method():
    with pytest.raises(ValueError, match="invalid method"):
        PrefillOraclePolicy(WidePrefillEnv(prompt_tokens=2), method="greedy")
