"""Lagrangian SiftMoE baseline: exact per-step Lagrangian decisions and price tuning by bisection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agents.exhaustive import exhaustive_search
from agents.lagrangian import LagrangianPolicy, record_states, step_price, tune_price
from agents.oracle import SiftMoEOracle
from wide_env.config import ScenarioConfig
from wide_env.env import WideDecodeEnv

# Short episodes (2 tokens x 32 layers) keep the tuning fast.
SHORT = dict(accuracy_budget_mode="average", tokens_per_episode=2, distance_max_m=100.0, gate_source="synthetic")


def run_policy(env, policy, seeds):
    """Per-episode mean delta and total energy of ``policy`` on ``env.reset(seed)`` for each seed."""
    degradations, energies = [], []
    for seed in seeds:
        policy.reset(seed)
        observation, info = env.reset(seed=seed)
        truncated = False
        delta = energy = 0.0
        steps = 0
        while not truncated:
            observation, _, _, truncated, info = env.step(policy.decide(observation, info))
            delta += info["degradation"]
            energy += info["energy_j"]
            steps += 1
        degradations.append(delta / steps)
        energies.append(energy)
    return np.array(degradations), np.array(energies)


@pytest.fixture(scope="module")
def tuned():
    scenario = ScenarioConfig(**SHORT)
    return scenario, tune_price(scenario, episodes=3, seed=0)


def test_policy_decisions_are_exact_lagrangian_minimisers():
    env = WideDecodeEnv(ScenarioConfig(**SHORT))
    policy = LagrangianPolicy(env, price=1.5)
    observation, info = env.reset(seed=5)
    for _ in range(40):
        state = info["privileged"]["state"]
        action = policy.decide(observation, info)
        reference = exhaustive_search(env.cost_model, state, degradation_price=1.5)

        cm = env.cost_model
        cost = cm.evaluate(state, action.astype(bool))
        objective = cost.energy_j / cm.reference_energy_j + 1.5 * cost.degradation
        assert objective == pytest.approx(reference.objective, rel=1e-9, abs=1e-12)
        observation, _, _, _, info = env.step(action)


def test_tuned_price_meets_budget_on_training_episodes(tuned):
    scenario, tuning = tuned

    assert tuning.feasible
    assert tuning.mean_degradation <= scenario.accuracy_budget + 1e-12
    assert tuning.steps == 3 * 64
    # Bisection stops within its tolerance of the price where the budget starts to hold.
    lower = [price for price, delta, _ in tuning.history if delta > scenario.accuracy_budget]
    assert max(lower) < tuning.price <= max(lower) * (1 + 2e-3) + 1e-12


def test_mean_degradation_falls_as_price_rises(tuned):
    _, tuning = tuned
    by_price = sorted(tuning.history)
    deltas = [delta for _, delta, _ in by_price]
    energies = [energy for _, _, energy in by_price]

    assert all(later <= earlier + 1e-12 for earlier, later in zip(deltas, deltas[1:]))
    assert all(later >= earlier - 1e-15 for earlier, later in zip(energies, energies[1:]))


def test_tuned_policy_replays_the_tuning(tuned):
    scenario, tuning = tuned
    env = WideDecodeEnv(scenario)

    degradations, energies = run_policy(env, LagrangianPolicy(env, tuning.price), seeds=range(3))

    assert degradations.mean() == pytest.approx(tuning.mean_degradation, rel=1e-9)
    assert energies.sum() / tuning.steps == pytest.approx(tuning.mean_energy_j, rel=1e-9)


def test_lagrangian_saves_energy_over_per_step_oracle(tuned):
    # The per-step oracle meets delta <= eps at every step, so it meets the average budget too,
    # but it cannot move accuracy from good steps to bad ones.
    scenario, tuning = tuned
    env = WideDecodeEnv(scenario)
    oracle = SiftMoEOracle(env.cost_model)
    per_step_delta = per_step_energy = 0.0
    for steps in record_states(env, 3, 0):
        for state, _ in steps:
            result = oracle.solve(state)
            per_step_delta += result.degradation
            per_step_energy += result.energy_j

    assert per_step_delta / tuning.steps <= scenario.accuracy_budget
    assert tuning.mean_energy_j < per_step_energy / tuning.steps


def test_unreachable_budget_reports_infeasible():
    scenario = ScenarioConfig(**SHORT).replace(accuracy_budget=0.001, distance_min_m=120.0, distance_max_m=160.0)

    tuning = tune_price(scenario, episodes=1, seed=0)

    assert not tuning.feasible
    assert tuning.floor_degradation > 0.001
    assert tuning.mean_degradation == pytest.approx(tuning.floor_degradation, rel=2e-3)


def test_generous_budget_gives_zero_price():
    tuning = tune_price(ScenarioConfig(**SHORT).replace(accuracy_budget=5.0), episodes=1, seed=0)

    assert tuning.price == 0.0
    assert tuning.feasible


def test_adaptive_price_tracks_episode_budget():
    scenario = ScenarioConfig(**SHORT)
    env = WideDecodeEnv(scenario)
    fixed = tune_price(scenario, episodes=3, seed=0)
    adaptive = tune_price(scenario, episodes=3, seed=0, feedback=20.0, margin=0.1)
    test_seeds = range(100, 106)

    fixed_delta, _ = run_policy(env, LagrangianPolicy(env, fixed.price), test_seeds)
    adaptive_delta, _ = run_policy(env, LagrangianPolicy(env, adaptive.price, feedback=20.0, margin=0.1),
                                   test_seeds)

    # The controller keeps each episode close to its aim, so the spread across episodes shrinks.
    # Episodes of 64 steps leave it little room: one late step can still move the mean by 0.01.
    assert adaptive_delta.std() < fixed_delta.std()
    assert adaptive_delta.max() < fixed_delta.max()
    assert np.all(adaptive_delta <= scenario.accuracy_budget * 1.1)


def test_step_price_follows_overspending():
    assert step_price(2.0, 0.0, 10.0, 5, 0.1, 100) == 2.0
    assert step_price(2.0, 10.0, 0.5, 5, 0.1, 100) == pytest.approx(2.0)
    # Spending 0.5 more than 0.1 * 5 multiplies the price by e when feedback * 0.5 / (0.1 * 100) = 1.
    assert step_price(2.0, 20.0, 1.0, 5, 0.1, 100) == pytest.approx(2.0 * math.e)
    assert step_price(2.0, 20.0, 0.0, 5, 0.1, 100) == pytest.approx(2.0 / math.e)
    assert step_price(2.0, 1e6, 50.0, 5, 0.1, 100) == 1e6


def test_policy_counts_degradation_from_info():
    env = WideDecodeEnv(ScenarioConfig(**SHORT))
    policy = LagrangianPolicy(env, price=2.0, feedback=20.0)
    observation, info = env.reset(seed=1)
    spent = 0.0
    for _ in range(10):
        observation, _, _, _, info = env.step(policy.decide(observation, info))
        spent += info["degradation"]
    policy.current_price(info)

    assert policy._spent == pytest.approx(spent)
    _, info = env.reset(seed=2)
    assert policy.current_price(info) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(price=-1.0), "invalid price"),
    (dict(price=float("nan")), "invalid price"),
    (dict(price=1.0, csi="delayed"), "invalid csi"),
    (dict(price=1.0, feedback=-2.0), "invalid feedback"),
    (dict(price=1.0, margin=1.0), "invalid margin"),
])
def test_policy_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LagrangianPolicy(WideDecodeEnv(), **kwargs)


def test_tune_price_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="invalid episodes"):
        tune_price(ScenarioConfig(**SHORT), episodes=0)
    with pytest.raises(ValueError, match="invalid budget"):
        tune_price(ScenarioConfig(**SHORT), budget=-0.1)
