"""WIDE-Prefill-v0 and its cost model: aggregation per node, per-token budgets, CSI and fading."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from scipy.special import j0
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import wide_env  # noqa: F401  (registers the environments)
from wide_env import radio
from wide_env.channel import ChannelModel
from wide_env.config import ScenarioConfig
from wide_env.cost import CostModel
from wide_env.env import WideDecodeEnv
from wide_env.prefill import WidePrefillEnv
from wide_env.prefill_cost import PrefillCostModel
from wide_env.profile import build_profile, softmax


def small_env(**overrides) -> WidePrefillEnv:
    return WidePrefillEnv(prompt_tokens=overrides.pop("prompt_tokens", 4), **overrides)


def run_episode(env, policy, seed):
    observation, info = env.reset(seed=seed)
    infos = []
    truncated = False
    while not truncated:
        observation, _, terminated, truncated, info = env.step(policy(observation, info))
        assert not terminated
        infos.append(info)
    return infos


def top_k_action(env):
    def policy(observation, info):
        state = info["privileged"]["state"]
        return env.cost_model.top_k_mask(state).astype(np.int8).reshape(-1)
    return policy


# -- Gymnasium contract ------------------------------------------------------------


def test_gymnasium_env_checker_passes():
    gymnasium_check_env(gym.make("WIDE-Prefill-v0").unwrapped)


def test_sb3_env_checker_passes():
    sb3_check_env(gym.make("WIDE-Prefill-v0").unwrapped)


def test_env_checkers_pass_average_budget():
    env = gym.make("WIDE-Prefill-v0", prompt_tokens=3, accuracy_budget_mode="average", csi_delay_steps=2)
    gymnasium_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def test_spaces_match_prompt_and_profile():
    env = small_env(prompt_tokens=5)

    assert env.action_space == gym.spaces.MultiBinary(5 * 8)
    assert env.observation_space.shape == (5 * 8 + 4 + 1,)
    assert small_env(accuracy_budget_mode="average").observation_space.shape == (4 * 8 + 4 + 2,)


def test_episode_has_one_step_per_layer():
    env = small_env()
    infos = run_episode(env, lambda o, i: env.action_space.sample(), seed=0)

    assert len(infos) == env.profile.num_layers == 32
    assert [info["step"] for info in infos] == list(range(1, 33))


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match="before reset"):
        small_env().step(np.zeros(32, dtype=np.int8))


@pytest.mark.parametrize("action, error, message", [
    (np.zeros(31, dtype=np.int8), ValueError, "shape"),
    (np.full(32, 2, dtype=np.int8), ValueError, "entries"),
    (np.array(["a"] * 32), TypeError, "dtype"),
])
def test_invalid_action_rejected(action, error, message):
    env = small_env()
    env.reset(seed=0)

    with pytest.raises(error, match=message):
        env.step(action)


def test_reset_with_seed_is_reproducible():
    first, second = small_env(), small_env()
    obs_a, _ = first.reset(seed=7)
    obs_b, _ = second.reset(seed=7)

    np.testing.assert_array_equal(obs_a, obs_b)
    action = first.action_space.sample()
    assert first.step(action)[1] == second.step(action)[1]


# -- observation ----------------------------------------------------------------


def test_observation_layout():
    env = small_env(prompt_tokens=3)
    observation, info = env.reset(seed=1)
    state = info["privileged"]["state"]
    gate_size = 3 * 8

    np.testing.assert_allclose(observation[:gate_size], state.gates.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(observation[gate_size:gate_size + 4],
                               np.clip(env.channel.standardise_db(state.gains), -10, 10), rtol=1e-5)
    assert observation[gate_size + 4] == 0.0
    observation, *_ = env.step(np.zeros(gate_size, dtype=np.int8))
    assert observation[gate_size + 4] == pytest.approx(1 / 32)


def test_tokens_have_their_own_gates_and_top_k():
    env = small_env(prompt_tokens=6)
    _, info = env.reset(seed=2)
    state = info["privileged"]["state"]

    assert state.gates.shape == (6, 8)
    np.testing.assert_allclose(state.gates.sum(axis=1), 1.0)
    assert len({tuple(row) for row in state.top_k}) > 1


def test_remaining_budget_observation():
    env = small_env(accuracy_budget_mode="average", accuracy_budget=0.2)
    observation, _ = env.reset(seed=3)
    assert observation[-1] == 1.0

    observation, _, _, _, info = env.step(np.zeros(32, dtype=np.int8))

    expected = 1.0 - info["degradation"] / (0.2 * 32)
    assert observation[-1] == pytest.approx(expected, rel=1e-6)


# -- cost aggregation ----------------------------------------------------------------


def test_single_token_prefill_matches_decoding_cost():
    scenario = ScenarioConfig(prompt_tokens=1)  # prefill budget = decoding budget
    profile = build_profile(scenario)
    prefill, decode = PrefillCostModel(scenario, profile), CostModel(scenario, profile)
    rng = np.random.default_rng(4)
    for _ in range(40):
        gains = 10.0 ** (rng.uniform(-115.0, -85.0, size=4) / 10.0)
        gates = softmax(rng.normal(size=8))
        mask = rng.random(8) < 0.4
        expected = decode.evaluate(decode.make_state(3, 0, gates, gains), mask)

        cost = prefill.evaluate(prefill.make_state(3, gates[None, :], gains), mask[None, :])

        assert cost.energy_j == pytest.approx(expected.energy_j, rel=1e-12)
        assert cost.degradation == pytest.approx(expected.degradation, rel=1e-12)
        assert cost.failed_nodes == expected.failed_nodes


def test_node_payload_scales_with_tokens_served():
    scenario = ScenarioConfig(prompt_tokens=8)
    cost_model = PrefillCostModel(scenario, build_profile(scenario))
    gains = np.full(4, 10.0 ** -10.0)
    tokens = np.array([0, 3, 0, 0, 0])
    pairs = np.array([0, 5, 0, 0, 0])

    uplink, downlink, compute, ok = cost_model.node_energy(gains, tokens, pairs)

    bits = 3 * scenario.payload_bits
    budget = scenario.prefill_budget_s - 5 * cost_model.flops_per_expert / scenario.node_flops_per_s
    bandwidth, noise = scenario.node_bandwidth_hz, scenario.noise_psd_w_per_hz
    tau_up, tau_down, _ = radio.split_round_trip(
        budget, radio.min_tx_time_s(bits, 1e-10, bandwidth, noise, scenario.source_tx_power_w),
        radio.min_tx_time_s(bits, 1e-10, bandwidth, noise, scenario.node_tx_power_w))
    assert ok.all()
    assert uplink[1] == pytest.approx(float(radio.tx_energy_j(tau_up, bits, 1e-10, bandwidth, noise)))
    assert downlink[1] == pytest.approx(float(radio.tx_energy_j(tau_down, bits, 1e-10, bandwidth, noise)))
    assert compute[1] == pytest.approx(5 * cost_model.flops_per_expert * scenario.node_energy_j_per_flop)
    assert uplink[2] == downlink[2] == compute[2] == 0.0


def test_loads_count_tokens_and_pairs_per_node():
    scenario = ScenarioConfig(prompt_tokens=3)
    cost_model = PrefillCostModel(scenario, build_profile(scenario))
    computed = np.zeros((3, 8), dtype=bool)
    computed[0, [0, 1]] = True  # node 1, two experts
    computed[1, [1, 6]] = True  # nodes 1 and 4
    computed[2, 7] = True  # node 4

    tokens, pairs = cost_model.loads(computed)

    np.testing.assert_array_equal(tokens, [0, 2, 0, 0, 2])
    np.testing.assert_array_equal(pairs, [0, 3, 0, 0, 2])


def test_impossible_counts_are_unreachable():
    scenario = ScenarioConfig(prompt_tokens=4)
    cost_model = PrefillCostModel(scenario, build_profile(scenario))
    gains = np.full(4, 1e-9)

    *_, ok = cost_model.node_energy(gains, np.array([0, 2, 2, 0, 1]), np.array([0, 1, 5, 1, 2]))

    # 2 tokens need 2 to 4 pairs on a node with two experts; pairs without tokens are impossible.
    np.testing.assert_array_equal(ok, [True, False, False, False, True])


def test_node_energy_grows_with_tokens_and_pairs():
    scenario = ScenarioConfig(prompt_tokens=8)
    cost_model = PrefillCostModel(scenario, build_profile(scenario))
    state = cost_model.make_state(0, softmax(np.zeros((8, 8))), np.full(4, 10.0 ** -9.5))
    energy = cost_model.node_tables(state).energy_j[1]

    for u in range(1, 8):
        for c in range(u, 2 * u + 1):
            if np.isfinite(energy[u + 1, c + 1]):
                assert energy[u + 1, c + 1] > energy[u, c]
            if c + 1 <= 2 * u and np.isfinite(energy[u, c + 1]):
                assert energy[u, c + 1] > energy[u, c]


def test_tdma_energy_shares_one_band():
    scenario = ScenarioConfig(prompt_tokens=4, access="tdma")
    cost_model = PrefillCostModel(scenario, build_profile(scenario))
    state = cost_model.make_state(0, softmax(np.zeros((4, 8))), np.full(4, 10.0 ** -9.5))
    tokens, pairs = np.array([0, 2, 2, 0, 0]), np.array([0, 2, 3, 0, 0])

    uplink, downlink, _, failed = cost_model.energy_of_loads(state, tokens, pairs)
    alone = cost_model.node_energy(state.gains, tokens, pairs)

    assert failed == ()
    # Sharing the band costs more than each node having it alone.
    assert uplink + downlink > alone[0].sum() + alone[1].sum()


# -- accuracy and reward ----------------------------------------------------------------


def test_accuracy_budget_holds_per_token():
    env = small_env(prompt_tokens=4, accuracy_budget=0.15)
    _, info = env.reset(seed=5)
    state = info["privileged"]["state"]
    action = env.cost_model.top_k_mask(state)
    action[1] = False  # token 1 computes nothing

    *_, info = env.step(action.astype(np.int8).reshape(-1))

    assert info["token_degradation"][1] > 0.15
    assert info["tokens_violating"] >= 1
    assert info["accuracy_violation"]
    assert info["reward_terms"]["accuracy_penalty"] == pytest.approx(-env.scenario.accuracy_violation_penalty * info["tokens_violating"] / 4)
    assert info["degradation"] == pytest.approx(np.mean(info["token_degradation"]))
    assert info["max_degradation"] == pytest.approx(np.max(info["token_degradation"]))


def test_energy_charged_on_true_channel_with_delayed_csi():
    env = small_env(csi_delay_steps=3, csi_error_std=0.2)
    _, info = env.reset(seed=6)
    for _ in range(5):
        true_state = info["privileged"]["state"]
        observed_state = info["privileged"]["observed_state"]
        action = env.action_space.sample()
        expected = env.cost_model.evaluate(true_state, action.reshape(4, 8).astype(bool))

        *_, info = env.step(action)

        assert info["energy_j"] == pytest.approx(expected.energy_j)
    assert not np.allclose(true_state.gains, observed_state.gains, rtol=1e-3, atol=0.0)


def test_info_carries_decoding_terms():
    decode_env = WideDecodeEnv()
    decode_env.reset(seed=0)
    *_, decode_info = decode_env.step(np.zeros(8, dtype=np.int8))
    env = small_env()
    env.reset(seed=0)

    *_, info = env.step(np.zeros(32, dtype=np.int8))

    missing = set(decode_info) - set(info) - {"episode_mean_degradation"}
    assert not missing
    for key in ("max_degradation", "tokens_violating", "tokens_sent", "token_degradation"):
        assert key in info


def test_top_k_reward_near_minus_one():
    env = WidePrefillEnv(distance_max_m=100.0)
    infos = run_episode(env, top_k_action(env), seed=8)
    energy_terms = [info["reward_terms"]["energy"] for info in infos]

    assert -2.0 < np.mean(energy_terms) < -0.5
    assert all(info["topk_energy_j"] == pytest.approx(info["energy_j"]) for info in infos)


def test_average_budget_penalty_only_at_last_step():
    env = small_env(accuracy_budget_mode="average", accuracy_budget=0.1)
    infos = run_episode(env, lambda o, i: np.zeros(32, dtype=np.int8), seed=9)
    penalties = [info["reward_terms"]["accuracy_penalty"] for info in infos]
    total_delta = sum(info["degradation"] for info in infos)

    assert all(p == 0.0 for p in penalties[:-1])
    assert penalties[-1] == pytest.approx(-env.scenario.accuracy_violation_penalty * (total_delta - 0.1 * 32) / 0.1)
    assert infos[-1]["episode_mean_degradation"] == pytest.approx(total_delta / 32)


def test_far_node_fails_and_is_charged():
    env = small_env(distance_min_m=400.0, distance_max_m=500.0)
    infos = run_episode(env, top_k_action(env), seed=10)

    assert all(info["latency_violation"] for info in infos)
    failure = env.scenario.source_tx_power_w * env.scenario.prefill_budget_s
    assert infos[0]["failure_energy_j"] == pytest.approx(failure * len(infos[0]["failed_nodes"]))
    assert infos[0]["experts_computed"] == 0


def test_action_masks_follow_single_token_reach():
    env = small_env(distance_min_m=20.0, distance_max_m=500.0)
    env.reset(seed=11)
    masks = env.action_masks().reshape(4, 8, 2)

    assert masks[:, :, 0].all()
    np.testing.assert_array_equal(masks[:, :, 1], np.broadcast_to(env.reachable_experts(), (4, 8)))


def test_render_ansi_lists_tokens():
    env = small_env(render_mode="ansi")
    env.reset(seed=0)
    env.step(env.action_space.sample())

    text = env.render()

    assert "WIDE-Prefill" in text
    assert text.count("token ") == 4
    assert "energy" in text


def test_prompt_tokens_validated():
    with pytest.raises(ValueError, match="prompt_tokens"):
        ScenarioConfig(prompt_tokens=0)
    with pytest.raises(ValueError, match="prefill_latency_budget_s"):
        ScenarioConfig(prefill_latency_budget_s=-1.0)


def test_prefill_budget_defaults_to_prompt_times_decoding_budget():
    assert ScenarioConfig(prompt_tokens=8).prefill_budget_s == pytest.approx(8 * 2e-3)
    assert ScenarioConfig(prefill_latency_budget_s=5e-3).prefill_budget_s == 5e-3


# -- fading regimes ------------------------------------------------------------------


@pytest.mark.parametrize("env_class", [WideDecodeEnv, WidePrefillEnv])
def test_slow_fading_constant_within_episode(env_class):
    env = env_class(fading_mode="slow", prompt_tokens=2)
    _, info = env.reset(seed=12)
    first = info["privileged"]["state"].gains.copy()

    for _ in range(20):
        *_, info = env.step(np.zeros(env.action_space.n, dtype=np.int8))
        np.testing.assert_array_equal(info["privileged"]["state"].gains, first)


@pytest.mark.parametrize("env_class", [WideDecodeEnv, WidePrefillEnv])
def test_fast_fading_changes_every_step(env_class):
    env = env_class(prompt_tokens=2)
    _, info = env.reset(seed=13)
    previous = info["privileged"]["state"].gains.copy()

    for _ in range(10):
        *_, info = env.step(np.zeros(env.action_space.n, dtype=np.int8))
        gains = info["privileged"]["state"].gains
        assert np.all(gains != previous)
        previous = gains.copy()


@pytest.mark.parametrize("doppler_hz, step_s", [(10.0, 2e-3), (50.0, 2e-3), (20.0, 8e-3), (5.0, 30e-3)])
def test_decode_env_correlation_is_bessel_j0(doppler_hz, step_s):
    env = WideDecodeEnv(doppler_hz=doppler_hz, step_duration_s=step_s)

    assert env.channel.rho == pytest.approx(float(j0(2 * math.pi * doppler_hz * step_s)))


def test_prefill_step_duration_defaults_to_prefill_budget():
    env = WidePrefillEnv(prompt_tokens=4, doppler_hz=20.0)  # a step lasts 4 * 2 ms
    explicit = WidePrefillEnv(prompt_tokens=4, doppler_hz=20.0, step_duration_s=1e-3)

    assert env.channel.rho == pytest.approx(float(j0(2 * math.pi * 20.0 * 8e-3)))
    assert explicit.channel.rho == pytest.approx(float(j0(2 * math.pi * 20.0 * 1e-3)))


@pytest.mark.parametrize("doppler_hz, step_s", [(20.0, 8e-3), (60.0, 2e-3), (10.0, 2e-3)])
def test_simulated_fading_autocorrelation_matches_j0(doppler_hz, step_s):
    # The fading is a Gauss-Markov process with rho = J0(2 pi f_D dt), so the complex
    # autocorrelation at lag k is rho^k, J0 itself at lag 1. For CN(0, 1) fading the
    # power |h|^2 has autocorrelation |rho|^(2k).
    scenario = ScenarioConfig(moe_preset="deepseek-v3", num_nodes=256, doppler_hz=doppler_hz,
                              step_duration_s=step_s)
    channel = ChannelModel(scenario)
    channel.reset(np.random.default_rng(14))
    samples = []
    for _ in range(600):
        samples.append(channel.true_gains / channel.large_scale_gain)
        channel.advance()
    power = np.array(samples)
    rho = float(j0(2 * math.pi * doppler_hz * step_s))

    lag1 = np.corrcoef(power[1:].ravel(), power[:-1].ravel())[0, 1]
    lag3 = np.corrcoef(power[3:].ravel(), power[:-3].ravel())[0, 1]

    assert lag1 == pytest.approx(rho**2, abs=0.02)
    assert lag3 == pytest.approx(rho**6, abs=0.02)


def test_trace_prompt_is_consecutive_trace_tokens():
    env = small_env(prompt_tokens=6, gate_source="trace")
    _, info = env.reset(seed=15)
    source = env.gate_source
    first = source.position - 5
    state = info["privileged"]["state"]

    assert source.tokens_per_episode == 6
    assert first >= 0
    for token in range(6):
        logits = source.trace.router_logits[first + token][source.layer_map][0]
        np.testing.assert_allclose(state.gates[token], softmax(logits.astype(np.float64)), rtol=1e-6)
