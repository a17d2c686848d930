"""Decoding environment WIDE-Decode-v0: API checks, seeding, episode shape, reward and actions."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import wide_env  # noqa: F401  (registers WIDE-Decode-v0)
from wide_env.env import WideDecodeEnv

SCENARIO_VARIANTS = [
    {},
    {"access": "tdma"},
    {"fading_mode": "slow"},
    {"moe_preset": "olmoe-1b-7b"},
    {"accuracy_budget_mode": "average"},
    {"csi_delay_steps": 3},
]
ENERGY_KEYS = ("energy_j", "uplink_energy_j", "downlink_energy_j", "compute_energy_j", "failure_energy_j",
               "topk_energy_j")


def run_episode(env, seed, action_seed=0):
    """Play one episode with random actions drawn from ``action_seed``.

    Returns the observations, rewards, infos and ``(terminated, truncated)`` flags of every step.
    """
    rng = np.random.default_rng(action_seed)
    observation, _ = env.reset(seed=seed)
    observations, rewards, infos, flags = [observation], [], [], []
    while True:
        action = (rng.random(env.num_experts) < 0.5).astype(np.int8)
        observation, reward, terminated, truncated, info = env.step(action)
        observations.append(observation)
        rewards.append(reward)
        infos.append(info)
        flags.append((terminated, truncated))
        if terminated or truncated:
            return observations, rewards, infos, flags


# -- API checkers -------------------------------------------------------------


@pytest.mark.parametrize("overrides", SCENARIO_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_gymnasium_env_checker(overrides):
    env = gym.make("WIDE-Decode-v0", render_mode="ansi", **overrides)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gymnasium_check_env(env.unwrapped)

    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


@pytest.mark.parametrize("overrides", SCENARIO_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_sb3_env_checker(overrides):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(WideDecodeEnv(**overrides), warn=True)

    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


# -- seeding ------------------------------------------------------------------


def test_same_seed_same_episode():
    first = run_episode(WideDecodeEnv(), seed=11)
    second = run_episode(WideDecodeEnv(), seed=11)

    for a, b in zip(first[0], second[0]):
        np.testing.assert_array_equal(a, b)
    assert first[1] == second[1]
    for info_a, info_b in zip(first[2], second[2]):
        for key in ENERGY_KEYS:
            assert info_a[key] == info_b[key]


def test_reset_with_same_seed_repeats_episode():
    env = WideDecodeEnv(access="tdma", csi_delay_steps=2, tokens_per_episode=2)

    first = run_episode(env, seed=12)
    second = run_episode(env, seed=12)

    np.testing.assert_array_equal(np.array(first[0]), np.array(second[0]))
    assert first[1] == second[1]


def test_different_seeds_differ():
    env = WideDecodeEnv()

    first = run_episode(env, seed=1)[:3]
    second = run_episode(env, seed=2)[:3]

    assert not np.array_equal(first[0][0], second[0][0])
    assert first[1] != second[1]
    assert [i["energy_j"] for i in first[2]] != [i["energy_j"] for i in second[2]]


def test_unseeded_reset_continues_generator():
    env = WideDecodeEnv()
    seeded, _ = env.reset(seed=3)

    unseeded, _ = env.reset()

    assert not np.array_equal(seeded, unseeded)


# -- episode shape ------------------------------------------------------------


@pytest.mark.parametrize("overrides, steps", [({}, 16 * 32), ({"moe_preset": "olmoe-1b-7b", "tokens_per_episode": 5}, 5 * 16)])
def test_episode_length_and_truncation(overrides, steps):
    env = WideDecodeEnv(**overrides)

    _, _, infos, flags = run_episode(env, seed=0)

    assert len(flags) == steps
    assert env.max_steps == steps
    assert all(not terminated for terminated, _ in flags)
    assert [truncated for _, truncated in flags] == [False] * (steps - 1) + [True]
    assert infos[-1]["step"] == steps


def test_step_positions_walk_layers_then_tokens():
    env = WideDecodeEnv(moe_preset="olmoe-1b-7b", tokens_per_episode=3)
    observation, info = env.reset(seed=0)
    experts, nodes = env.num_experts, env.num_nodes

    for index in range(env.max_steps):
        state = info["privileged"]["state"]
        token, layer = divmod(index, 16)
        assert (state.token, state.layer) == (token, layer)
        assert observation[experts + nodes] == pytest.approx(layer / 16)
        assert observation[experts + nodes + 1] == pytest.approx(token / 3)
        observation, _, _, _, info = env.step(env.cost_model.top_k_mask(env.state))


def test_gates_drawn_once_per_token():
    env = WideDecodeEnv(fading_mode="slow")
    draw_next_token = env.gate_source.next_token
    draws = []

    def counting_next_token():
        draws.append(draw_next_token())
        return draws[-1]

    env.gate_source.next_token = counting_next_token
    env.reset(seed=0)
    gates_by_step = []
    for index in range(3 * 32):
        assert len(draws) == 1 + index // 32
        gates_by_step.append(env.state.gates)
        env.step(np.zeros(8, dtype=np.int8))

    assert len(draws) == 4
    for layer in range(32):
        assert not np.array_equal(gates_by_step[layer], gates_by_step[32 + layer])


@pytest.mark.parametrize("overrides", SCENARIO_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_observations_in_space(overrides):
    env = WideDecodeEnv(tokens_per_episode=4, **overrides)
    expected_size = env.num_experts + env.num_nodes + 2 + int(overrides.get("accuracy_budget_mode") == "average")

    observations, _, _, _ = run_episode(env, seed=4)

    assert env.observation_space.shape == (expected_size,)
    for observation in observations:
        assert observation.dtype == np.float32
        assert observation.shape == (expected_size,)
        assert env.observation_space.contains(observation)


def test_observation_matches_state():
    env = WideDecodeEnv(csi_delay_steps=3)
    env.reset(seed=5)
    for _ in range(10):
        observation, _, _, _, info = env.step(np.ones(8, dtype=np.int8))
    observed = info["privileged"]["observed_state"]
    true = info["privileged"]["state"]

    np.testing.assert_allclose(observation[:8], true.gates, rtol=1e-6)
    expected_channel = np.clip(env.channel.standardise_db(observed.gains), -10, 10)
    np.testing.assert_allclose(observation[8:12], expected_channel, rtol=1e-5, atol=1e-6)
    # With delayed CSI the agent observes old gains, while energy is charged on the true ones.
    assert np.all(observed.gains != true.gains)


# -- reward -------------------------------------------------------------------


def test_reward_is_energy_ratio_minus_penalties():
    env = WideDecodeEnv(accuracy_violation_penalty=3.0, latency_violation_penalty=0.5)

    _, rewards, infos, _ = run_episode(env, seed=6)

    assert env.reference_energy_j > 0.0
    for reward, info in zip(rewards, infos):
        terms = info["reward_terms"]
        assert reward == pytest.approx(sum(terms.values()), rel=1e-12)
        assert terms["energy"] == pytest.approx(-info["energy_j"] / env.reference_energy_j, rel=1e-12)
        assert terms["accuracy_penalty"] == (-3.0 if info["accuracy_violation"] else 0.0)
        assert terms["latency_penalty"] == (-0.5 if info["latency_violation"] else 0.0)
    assert any(info["accuracy_violation"] for info in infos)
    assert any(info["latency_violation"] for info in infos)
    assert not all(info["accuracy_violation"] for info in infos)


def test_info_energy_terms_add_up():
    _, _, infos, _ = run_episode(WideDecodeEnv(access="tdma", tokens_per_episode=4), seed=7)

    for info in infos:
        parts = (info["uplink_energy_j"] + info["downlink_energy_j"] + info["compute_energy_j"]
                 + info["failure_energy_j"])
        assert info["energy_j"] == pytest.approx(parts, rel=1e-12)
        assert info["accuracy_budget"] == 0.15


def test_top_k_action_energy_is_topk():
    env = WideDecodeEnv()
    _, info = env.reset(seed=8)

    for _ in range(40):
        state = info["privileged"]["state"]
        expected = env.cost_model.evaluate(state, env.cost_model.top_k_mask(state))
        _, reward, _, _, info = env.step(env.cost_model.top_k_mask(env.state))
        assert info["topk_energy_j"] == info["energy_j"]
        assert info["energy_j"] == expected.energy_j
        penalties = 0.0
        if info["accuracy_violation"]:
            penalties += env.scenario.accuracy_violation_penalty
        if info["latency_violation"]:
            penalties += env.scenario.latency_violation_penalty
        assert reward == pytest.approx(-info["energy_j"] / env.reference_energy_j - penalties)
        # Top-K loses accuracy only when one of its nodes cannot finish in time.
        if not info["latency_violation"]:
            assert info["degradation"] == 0.0


def test_average_budget_penalty_at_end():
    env = WideDecodeEnv(accuracy_budget_mode="average", moe_preset="olmoe-1b-7b", tokens_per_episode=2)
    observation, _ = env.reset(seed=9)
    degradation_sum = 0.0
    total_budget = 0.15 * env.max_steps

    assert observation[-1] == 1.0
    for index in range(env.max_steps):
        observation, _, _, truncated, info = env.step(np.zeros(64, dtype=np.int8))
        degradation_sum += info["degradation"]
        assert info["episode_mean_degradation"] == pytest.approx(degradation_sum / (index + 1))
        assert observation[-1] == pytest.approx(np.clip(1.0 - degradation_sum / total_budget, -1, 1), abs=1e-6)
        if not truncated:
            assert info["reward_terms"]["accuracy_penalty"] == 0.0
            assert not info["accuracy_violation"]

    excess = degradation_sum - total_budget
    assert excess > 0
    assert info["accuracy_violation"]
    assert info["reward_terms"]["accuracy_penalty"] == pytest.approx(-env.scenario.accuracy_violation_penalty * excess / 0.15)


def test_average_budget_met_gives_no_penalty():
    env = WideDecodeEnv(accuracy_budget_mode="average", moe_preset="olmoe-1b-7b", tokens_per_episode=2,
                        gate_source="synthetic")
    env.reset(seed=10)

    for _ in range(env.max_steps):
        _, _, _, _, info = env.step(np.ones(64, dtype=np.int8))

    assert info["reward_terms"]["accuracy_penalty"] == 0.0
    assert not info["accuracy_violation"]


# -- actions ------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, error, pattern",
    [
        (np.array(["1"] * 8), TypeError, r"invalid action: expected a numeric or boolean array .*MultiBinary\(8\).*dtype <U1"),
        (np.ones(7, dtype=np.int8), ValueError, r"invalid action: expected shape \(8,\) .*got shape \(7,\)"),
        (np.ones((1, 8), dtype=np.int8), ValueError, r"invalid action: expected shape \(8,\) .*got shape \(1, 8\)"),
        (3, ValueError, r"invalid action: expected shape \(8,\) .*got shape \(\)"),
        (np.array([0, 1, 2, 0, 0, 0, 0, 0]), ValueError, r"invalid action: expected shape \(8,\) of 0/1 values \(MultiBinary\(8\)\), got entries \[2\]"),
        (np.array([0.5] + [0.0] * 7), ValueError, r"invalid action: expected shape \(8,\) of 0/1 values \(MultiBinary\(8\)\), got entries \[0\.5\]"),
        (np.array([np.nan] + [0.0] * 7), ValueError, r"invalid action: expected shape \(8,\) of 0/1 values \(MultiBinary\(8\)\), got entries \[nan\]"),
        (np.array([None] * 8), TypeError, r"invalid action: .*got dtype object"),
    ],
)
def test_invalid_action_rejected(action, error, pattern):
    env = WideDecodeEnv()
    env.reset(seed=0)

    with pytest.raises(error, match=pattern):
        env.step(action)


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.float32, np.float64, bool])
def test_valid_action_dtypes_accepted(dtype):
    env = WideDecodeEnv()
    env.reset(seed=0)
    action = np.array([1, 0, 0, 1, 0, 0, 0, 0], dtype=dtype)

    _, _, _, _, info = env.step(action)

    assert info["nodes_contacted"] == 2


def test_action_as_list_accepted():
    env = WideDecodeEnv()
    env.reset(seed=0)

    _, _, _, _, info = env.step([1, 1, 0, 0, 0, 0, 0, 0])

    assert info["nodes_contacted"] == 1


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match=r"step\(\) called before reset\(\)"):
        WideDecodeEnv().step(np.zeros(8, dtype=np.int8))


def test_action_masks_shape_and_content():
    env = WideDecodeEnv()
    env.reset(seed=0)

    masks = env.action_masks()

    assert masks.shape == (16,)
    assert masks.dtype == bool
    assert np.all(masks[0::2])
    np.testing.assert_array_equal(masks[1::2], env.reachable_experts())


def test_action_masks_block_unreachable_nodes():
    env = WideDecodeEnv(distance_min_m=400.0, distance_max_m=500.0)
    env.reset(seed=0)

    masks = env.action_masks()

    assert np.all(masks[0::2])
    assert not np.any(masks[1::2])


def test_action_masks_allow_local_experts():
    env = WideDecodeEnv(distance_min_m=400.0, distance_max_m=500.0, local_experts=(2, 5))
    env.reset(seed=0)

    masks = env.action_masks()

    assert np.flatnonzero(masks[1::2]).tolist() == [2, 5]


# -- rendering and registration -----------------------------------------------


def test_render_ansi_returns_text():
    env = WideDecodeEnv(render_mode="ansi")
    env.reset(seed=0)

    before = env.render()
    env.step(env.cost_model.top_k_mask(env.state))
    after = env.render()

    assert isinstance(before, str)
    assert before.startswith("WIDE-Decode")
    assert "(* = Top-K)" in before
    assert isinstance(after, str)
    assert "last   computed" in after


def test_render_without_mode_returns_none():
    env = WideDecodeEnv()
    env.reset(seed=0)

    assert env.render() is None


def test_invalid_render_mode():
    with pytest.raises(ValueError, match=r"invalid render_mode: expected None or one of \['ansi'\], got 'human'"):
        WideDecodeEnv(render_mode="human")


def test_make_applies_override():
    env = gym.make("WIDE-Decode-v0", access="tdma", tokens_per_episode=2)

    assert env.unwrapped.scenario.access == "tdma"
    assert env.unwrapped.scenario.node_bandwidth_hz == 80e6
    assert env.unwrapped.max_steps == 64


def test_make_loads_yaml_scenario(tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text("num_nodes: 2\nfading_mode: slow\n", encoding="utf-8")

    env = gym.make("WIDE-Decode-v0", scenario=str(path), access="tdma")

    assert env.unwrapped.scenario.num_nodes == 2
    assert env.unwrapped.scenario.fading_mode == "slow"
    assert env.unwrapped.scenario.access == "tdma"
    assert env.observation_space.shape == (8 + 2 + 2,)


def test_make_rejects_unknown_kwarg():
    with pytest.raises(ValueError, match=r"unknown scenario key\(s\) 'bandwidth'; valid keys are: .*bandwidth_total_hz"):
        gym.make("WIDE-Decode-v0", bandwidth=20e6)


def test_state_before_reset_raises():
    with pytest.raises(RuntimeError, match=r"no state before reset\(\)"):
        WideDecodeEnv().state
