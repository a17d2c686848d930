"""The batched env, its SB3 adapter, the batched channel and the batched decision cost."""

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import wide_env  # noqa: F401  (registers WIDE-Decode-v0)
from wide_env.channel import ChannelBatch, ChannelModel, NormalStreams, complex_normal, gauss_markov_step
from wide_env.config import ScenarioConfig
from wide_env.cost import CostModel, StepBatch
from wide_env.env import WideDecodeEnv
from wide_env.profile import build_profile, softmax
from wide_env.vector import WideDecodeVectorEnv, make_sb3_vec_env
from wide_env.wrappers import TopKSubsetAction

COST_FIELDS = ("energy_j", "uplink_energy_j", "downlink_energy_j", "compute_energy_j", "failure_energy_j",
               "degradation", "accuracy_ok", "latency_ok", "nodes_contacted", "experts_computed", "failed_nodes")

INFO_FIELDS = ("energy_j", "uplink_energy_j", "downlink_energy_j", "compute_energy_j", "failure_energy_j",
               "degradation", "accuracy_violation", "latency_violation", "nodes_contacted", "experts_computed")

SCENARIOS = [
    {"tokens_per_episode": 2},
    {"tokens_per_episode": 2, "gate_source": "synthetic"},
    {"tokens_per_episode": 2, "gate_source": "synthetic", "csi_delay_steps": 2, "csi_error_std": 0.1},
    {"tokens_per_episode": 2, "accuracy_budget_mode": "average", "accuracy_budget": 0.05},
    {"tokens_per_episode": 2, "gate_source": "synthetic", "fading_mode": "slow", "shadowing_std_db": 4.0,
     "local_experts": (1,), "source_flops_per_s": 1e11},
    {"tokens_per_episode": 1, "moe_preset": "qwen1.5-moe-a2.7b", "gate_source": "synthetic", "num_nodes": 6},
    {"tokens_per_episode": 1, "access": "tdma"},
]


def scenario_id(overrides):
    return ",".join(f"{key}={value}" for key, value in overrides.items())


def make_vector(num_envs, **kwargs):
    return gym.make_vec("WIDE-Decode-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)


def random_actions(rng, num_envs, num_experts):
    return (rng.random((num_envs, num_experts)) < 0.4).astype(np.int8)


# -- registration and spaces ----------------------------------------------------


def test_make_vec_returns_native_env():
    envs = make_vector(3)

    assert isinstance(envs.unwrapped, WideDecodeVectorEnv)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert envs.num_envs == 3
    single = WideDecodeEnv()
    assert envs.single_observation_space == single.observation_space
    assert envs.single_action_space == single.action_space
    assert envs.observation_space.shape == (3,) + single.observation_space.shape


def test_make_vec_passes_scenario_overrides():
    envs = make_vector(2, num_nodes=2, autoreset_mode="NextStep")

    assert envs.unwrapped.scenario.num_nodes == 2
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="invalid num_envs"):
        WideDecodeVectorEnv(0)
    with pytest.raises(ValueError, match="invalid autoreset_mode"):
        WideDecodeVectorEnv(2, autoreset_mode="sometimes")


# -- same transitions as single envs --------------------------------------------


@pytest.mark.parametrize("overrides", SCENARIOS, ids=scenario_id)
def test_vector_env_matches_single_envs(overrides):
    num_envs = 3
    envs = make_vector(num_envs, **overrides)
    singles = [WideDecodeEnv(**overrides) for _ in range(num_envs)]
    observations, _ = envs.reset(seed=11)
    for index, env in enumerate(singles):
        observation, _ = env.reset(seed=11 + index)
        np.testing.assert_array_equal(observations[index], observation)

    rng = np.random.default_rng(0)
    steps = singles[0].max_steps + 5  # crosses an episode end and its autoreset
    finished = 0
    for _ in range(steps):
        actions = random_actions(rng, num_envs, singles[0].num_experts)
        observations, rewards, terminated, truncated, infos = envs.step(actions)
        for index, env in enumerate(singles):
            observation, reward, single_terminated, single_truncated, info = env.step(actions[index])
            assert rewards[index] == reward
            assert terminated[index] == single_terminated
            assert truncated[index] == single_truncated
            assert infos["topk_energy_j"][index] == info["topk_energy_j"]
            for name in INFO_FIELDS:
                assert infos[name][index] == info[name], name
            assert tuple(np.flatnonzero(infos["failed_nodes"][index])) == info["failed_nodes"]
            if single_truncated:
                finished += 1
                np.testing.assert_array_equal(infos["final_obs"][index], observation)
                observation, info = env.reset()
            np.testing.assert_array_equal(observations[index], observation)
            np.testing.assert_array_equal(infos["privileged"]["true_gains"][index], env.state.gains)
            np.testing.assert_array_equal(infos["privileged"]["gates"][index], env.state.gates)
    assert finished == num_envs


def test_next_step_autoreset_matches_single_envs():
    num_envs = 2
    envs = make_vector(num_envs, tokens_per_episode=1, autoreset_mode=AutoresetMode.NEXT_STEP)
    singles = [WideDecodeEnv(tokens_per_episode=1) for _ in range(num_envs)]
    envs.reset(seed=3)
    for index, env in enumerate(singles):
        env.reset(seed=3 + index)

    rng = np.random.default_rng(1)
    pending = [False] * num_envs
    for _ in range(singles[0].max_steps + 3):
        actions = random_actions(rng, num_envs, 8)
        observations, rewards, terminated, truncated, infos = envs.step(actions)
        for index, env in enumerate(singles):
            if pending[index]:
                observation, _ = env.reset()
                pending[index] = False
                assert rewards[index] == 0.0
                assert not truncated[index]
                assert not infos["_energy_j"][index]
            else:
                observation, reward, _, single_truncated, _ = env.step(actions[index])
                assert rewards[index] == reward
                assert infos["_energy_j"][index]
                pending[index] = single_truncated
            np.testing.assert_array_equal(observations[index], observation)


def test_disabled_autoreset_needs_reset_mask():
    envs = WideDecodeVectorEnv(2, tokens_per_episode=1, autoreset_mode=AutoresetMode.DISABLED)
    single = WideDecodeEnv(tokens_per_episode=1)
    envs.reset(seed=5)
    single.reset(seed=6)
    actions = np.zeros((2, 8), dtype=np.int8)
    for _ in range(envs.max_steps):
        _, _, _, truncated, _ = envs.step(actions)
    assert truncated.all()
    with pytest.raises(RuntimeError, match="reset_mask"):
        envs.step(actions)

    observations, infos = envs.reset(options={"reset_mask": np.array([False, True])})
    observation, _ = single.reset()

    np.testing.assert_array_equal(observations[1], observation)
    assert infos["_step"].tolist() == [False, True]
    with pytest.raises(RuntimeError, match=r"copies \[0\] finished"):
        envs.step(actions)


def test_partial_reset_with_seed_matches_single_env():
    envs = WideDecodeVectorEnv(3, tokens_per_episode=1)
    envs.reset(seed=0)
    for _ in range(5):
        envs.step(np.ones((3, 8), dtype=np.int8))

    observations, _ = envs.reset(seed=[None, 42, None], options={"reset_mask": np.array([False, True, False])})
    single = WideDecodeEnv(tokens_per_episode=1)
    observation, _ = single.reset(seed=42)

    np.testing.assert_array_equal(observations[1], observation)
    # The copies now sit at different steps; one more step must still match the single env.
    actions = np.ones((3, 8), dtype=np.int8)
    observations, rewards, _, _, _ = envs.step(actions)
    observation, reward, _, _, _ = single.step(actions[1])
    np.testing.assert_array_equal(observations[1], observation)
    assert rewards[1] == reward


def test_reset_seed_list_equals_integer_seed():
    first, _ = WideDecodeVectorEnv(3).reset(seed=7)
    second, _ = WideDecodeVectorEnv(3).reset(seed=[7, 8, 9])

    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "options, message",
    [({"reset_mask": np.array([1, 0])}, "boolean numpy array"), ({"reset_mask": np.zeros(2, dtype=bool)},
                                                                  "selects no copy")],
)
def test_invalid_reset_mask(options, message):
    envs = WideDecodeVectorEnv(2)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        envs.reset(options=options)


def test_first_reset_must_reset_every_copy():
    with pytest.raises(RuntimeError, match="first reset"):
        WideDecodeVectorEnv(2).reset(options={"reset_mask": np.array([True, False])})


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError, match=r"before reset\(\)"):
        WideDecodeVectorEnv(2).step(np.zeros((2, 8), dtype=np.int8))


@pytest.mark.parametrize(
    "actions, error, message",
    [(np.zeros((2, 7), dtype=np.int8), ValueError, r"expected shape \(2, 8\)"),
     (np.full((2, 8), 2, dtype=np.int8), ValueError, "0/1 values"),
     (np.full((2, 8), 0.5), ValueError, "0/1 values"),
     (np.array([["a"] * 8] * 2), TypeError, "numeric or boolean")],
)
def test_invalid_actions(actions, error, message):
    envs = WideDecodeVectorEnv(2)
    envs.reset(seed=0)
    with pytest.raises(error, match=message):
        envs.step(actions)


# -- discrete subsets, masks and privileged state ------------------------------------


def test_discrete_subsets_match_wrapper():
    envs = WideDecodeVectorEnv(2, tokens_per_episode=1, discrete_subsets=True)
    singles = [TopKSubsetAction(WideDecodeEnv(tokens_per_episode=1)) for _ in range(2)]
    envs.reset(seed=4)
    for index, env in enumerate(singles):
        env.reset(seed=4 + index)
    assert envs.single_action_space == singles[0].action_space

    rng = np.random.default_rng(2)
    for _ in range(10):
        np.testing.assert_array_equal(envs.action_masks(), np.stack([env.action_masks() for env in singles]))
        actions = rng.integers(0, 4, size=2)
        observations, rewards, _, _, _ = envs.step(actions)
        for index, env in enumerate(singles):
            observation, reward, _, _, _ = env.step(actions[index])
            np.testing.assert_array_equal(observations[index], observation)
            assert rewards[index] == reward

    with pytest.raises(ValueError, match=r"integers in \[0, 3\]"):
        envs.step(np.array([0, 4]))


def test_action_masks_match_single_envs():
    overrides = {"csi_delay_steps": 1, "distance_min_m": 100.0, "distance_max_m": 200.0}
    envs = WideDecodeVectorEnv(3, **overrides)
    singles = [WideDecodeEnv(**overrides) for _ in range(3)]
    envs.reset(seed=9)
    for index, env in enumerate(singles):
        env.reset(seed=9 + index)
    blocked = 0
    for _ in range(20):
        masks = envs.action_masks()
        for index, env in enumerate(singles):
            np.testing.assert_array_equal(masks[index], env.action_masks())
            env.step(np.ones(8, dtype=np.int8))
        blocked += int((~masks).sum())
        envs.step(np.ones((3, 8), dtype=np.int8))
    # Far nodes must be out of reach sometimes, or the masks were not tested.
    assert blocked > 0


@pytest.mark.parametrize("csi", ["true", "observed"])
def test_step_batch_equals_single_states(csi):
    envs = WideDecodeVectorEnv(2, csi_delay_steps=2)
    singles = [WideDecodeEnv(csi_delay_steps=2) for _ in range(2)]
    envs.reset(seed=1)
    for index, env in enumerate(singles):
        env.reset(seed=1 + index)
    for _ in range(5):
        envs.step(np.ones((2, 8), dtype=np.int8))
        for env in singles:
            env.step(np.ones(8, dtype=np.int8))

    batch = envs.step_batch(csi)
    key = "state" if csi == "true" else "observed_state"
    for index, env in enumerate(singles):
        assert batch.state(index) == env._info(None, {})["privileged"][key]

    with pytest.raises(ValueError, match="invalid csi"):
        envs.step_batch("perfect")


def test_infos_have_gymnasium_masks():
    envs = WideDecodeVectorEnv(2, tokens_per_episode=1)
    envs.reset(seed=0)
    _, _, _, _, infos = envs.step(np.ones((2, 8), dtype=np.int8))

    for key, value in infos.items():
        if not key.startswith("_"):
            assert f"_{key}" in infos, key
    assert set(infos["reward_terms"]) >= {"energy", "accuracy_penalty", "latency_penalty", "_energy"}
    assert "final_obs" not in infos


# -- Stable-Baselines3 ----------------------------------------------------------------


def test_sb3_vec_env_matches_dummy_vec_env():
    from stable_baselines3.common.env_util import make_vec_env

    native = make_sb3_vec_env(2, seed=21, tokens_per_episode=1)
    reference = make_vec_env(lambda: gym.make("WIDE-Decode-v0", tokens_per_episode=1), n_envs=2, seed=21)
    np.testing.assert_array_equal(native.reset(), reference.reset())

    rng = np.random.default_rng(0)
    for step in range(34):
        actions = random_actions(rng, 2, 8)
        observations, rewards, dones, infos = native.step(actions)
        expected_observations, expected_rewards, expected_dones, expected_infos = reference.step(actions)
        np.testing.assert_array_equal(observations, expected_observations)
        np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-6)
        np.testing.assert_array_equal(dones, expected_dones)
        for info, expected in zip(infos, expected_infos):
            if "terminal_observation" in expected:
                np.testing.assert_array_equal(info["terminal_observation"], expected["terminal_observation"])
                assert info["TimeLimit.truncated"] == expected["TimeLimit.truncated"]
                assert info["episode"]["l"] == expected["episode"]["l"]
                assert info["episode"]["r"] == pytest.approx(expected["episode"]["r"], rel=1e-5)
    assert dones.sum() == 0
    assert step == 33


def test_sb3_vec_env_supports_masks_and_attributes():
    envs = make_sb3_vec_env(3, seed=0)
    envs.reset()

    masks = envs.env_method("action_masks")
    assert len(masks) == 3
    assert masks[0].shape == (16,)
    assert envs.has_attr("action_masks")
    assert envs.get_attr("render_mode") == [None, None, None]
    assert envs.env_is_wrapped(gym.Wrapper) == [False, False, False]
    with pytest.raises(AttributeError, match="set it on vector_env"):
        envs.set_attr("render_mode", "ansi")


def test_sb3_adapter_rejects_other_autoreset_modes():
    from wide_env.vector import WideDecodeSB3VecEnv

    with pytest.raises(ValueError, match="SAME_STEP"):
        WideDecodeSB3VecEnv(WideDecodeVectorEnv(2, autoreset_mode=AutoresetMode.NEXT_STEP))


def test_ppo_trains_on_sb3_vec_env():
    from stable_baselines3 import PPO

    envs = make_sb3_vec_env(4, seed=0, tokens_per_episode=1)
    model = PPO("MlpPolicy", envs, n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=64)

    assert model.num_timesteps == 64


# -- batched channel ------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [1, 3, 8, 40])
def test_normal_streams_follow_generator_order(block_rows):
    streams = NormalStreams(2, (3,), block_rows)
    streams.reset(np.arange(2), [np.random.default_rng(5), np.random.default_rng(6)])
    blocks = [streams.take(np.arange(2), rows).copy() for rows in (1, 4, 2, 7)]

    for copy, seed in enumerate((5, 6)):
        expected = np.random.default_rng(seed).standard_normal((14, 3))
        np.testing.assert_array_equal(np.concatenate([block[copy] for block in blocks]), expected)


def test_normal_streams_copies_at_different_positions():
    streams = NormalStreams(2, (2,), 4)
    streams.reset(np.arange(2), [np.random.default_rng(1), np.random.default_rng(2)])
    first = streams.take(np.array([0]), 3).copy()
    both = streams.take(np.arange(2), 2).copy()

    expected_first = np.random.default_rng(1).standard_normal((5, 2))
    np.testing.assert_array_equal(np.concatenate([first[0], both[0]]), expected_first)
    np.testing.assert_array_equal(both[1], np.random.default_rng(2).standard_normal((2, 2)))


def test_channel_model_follows_step_by_step_recursion():
    scenario = ScenarioConfig(csi_error_std=0.2)
    channel = ChannelModel(scenario, block_steps=5)
    channel.reset(np.random.default_rng(3))

    # The step-by-step model: initial draws, then per step a Gauss-Markov step and an estimation error.
    rng = np.random.default_rng(3)
    nodes = scenario.num_nodes
    distances = rng.uniform(scenario.distance_min_m, scenario.distance_max_m, nodes)
    phase = np.exp(1j * rng.uniform(0.0, 2.0 * math.pi, nodes))
    scatter = complex_normal(rng, (nodes,))
    error = complex_normal(rng, (nodes,))
    np.testing.assert_array_equal(channel.distances_m, distances)
    for _ in range(12):
        fading = channel.los_amplitude * phase + channel.scatter_amplitude * scatter
        np.testing.assert_array_equal(channel.true_gains, channel.large_scale_gain * np.abs(fading) ** 2)
        observed = channel.large_scale_gain * np.abs(fading + 0.2 * error) ** 2
        np.testing.assert_array_equal(channel.observed_gains, observed)
        channel.advance()
        scatter = gauss_markov_step(scatter, channel.rho, rng)
        error = complex_normal(rng, (nodes,))


def test_channel_batch_blocks_do_not_change_gains():
    scenario = ScenarioConfig(csi_delay_steps=2, csi_error_std=0.1)
    whole = ChannelBatch(scenario, 2, block_steps=64)
    pieces = ChannelBatch(scenario, 2, block_steps=3)
    for channel in (whole, pieces):
        channel.reset(np.arange(2), [np.random.default_rng(8), np.random.default_rng(9)])
    true, observed = whole.emit(np.arange(2), 20)
    parts = [pieces.emit(np.arange(2), rows) for rows in (7, 1, 12)]

    np.testing.assert_array_equal(np.concatenate([part[0] for part in parts], axis=1), true)
    np.testing.assert_array_equal(np.concatenate([part[1] for part in parts], axis=1), observed)


def test_channel_batch_rejects_mixed_fresh_copies():
    channel = ChannelBatch(ScenarioConfig(), 2)
    channel.reset(np.arange(2), [np.random.default_rng(0), np.random.default_rng(1)])
    channel.emit(np.array([0]), 2)
    with pytest.raises(ValueError, match="cannot mix"):
        channel.emit(np.arange(2), 2)


# -- batched decision cost ------------------------------------------------------------


def make_cost_model(**overrides):
    scenario = ScenarioConfig(gate_source="synthetic", **overrides)
    return CostModel(scenario, build_profile(scenario))


def random_batch(cost_model, rng, size):
    gains = 10.0 ** (rng.uniform(-125.0, -85.0, (size, cost_model.num_nodes)) / 10.0)
    gates = softmax(rng.normal(size=(size, cost_model.num_experts)))
    layer = rng.integers(0, cost_model.profile.num_layers, size)
    batch = cost_model.make_batch(layer, np.zeros(size, dtype=np.int64), gates, gains)
    states = [cost_model.make_state(int(layer[i]), 0, gates[i], gains[i]) for i in range(size)]
    return batch, states


@pytest.mark.parametrize(
    "overrides",
    [{}, {"access": "tdma"}, {"moe_preset": "olmoe-1b-7b"}, {"local_experts": (0, 3), "source_flops_per_s": 1e11}],
    ids=scenario_id,
)
def test_batched_cost_equals_loop_of_single_costs(overrides):
    cost_model = make_cost_model(**overrides)
    rng = np.random.default_rng(4)
    batch, states = random_batch(cost_model, rng, 12)
    decisions = rng.random((12, 5, cost_model.num_experts)) < 0.3

    many = cost_model.evaluate_batch(batch, decisions)
    one_each = cost_model.evaluate_batch(batch, decisions[:, 0])
    without_tables = cost_model.evaluate_at(dataclasses.replace(batch, tables=None), decisions)

    for index, state in enumerate(states):
        for decision in range(5):
            single = cost_model.evaluate(state, decisions[index, decision])
            batched = many.item((index, decision))
            for name in COST_FIELDS:
                assert getattr(batched, name) == getattr(single, name), name
            np.testing.assert_array_equal(batched.computed, single.computed)
    for name in ("energy_j", "degradation", "failed", "computed"):
        np.testing.assert_array_equal(getattr(one_each, name), getattr(many, name)[:, 0])
        np.testing.assert_array_equal(getattr(without_tables, name), getattr(many, name))
    np.testing.assert_array_equal(cost_model.energy_batch(batch, decisions), many.energy_j)


def test_node_terms_equal_table_entries():
    cost_model = make_cost_model(moe_preset="qwen1.5-moe-a2.7b", num_nodes=6)
    rng = np.random.default_rng(5)
    gains = 10.0 ** (rng.uniform(-125.0, -85.0, (30, 6)) / 10.0)
    counts = rng.integers(0, cost_model.max_count + 1, size=(30, 7))
    tables = cost_model.node_tables(gains)

    uplink, downlink, compute, in_time = cost_model.node_terms(gains, counts)
    entries = np.arange(30)[:, None], np.arange(7), counts
    np.testing.assert_array_equal(uplink, tables.uplink_energy_j[entries])
    np.testing.assert_array_equal(downlink, tables.downlink_energy_j[entries])
    np.testing.assert_array_equal(compute, tables.compute_energy_j[entries])
    np.testing.assert_array_equal(in_time, tables.reachable[entries])


def test_step_batch_stack_and_state_round_trip():
    cost_model = make_cost_model()
    batch, states = random_batch(cost_model, np.random.default_rng(6), 4)

    assert StepBatch.stack(states) == batch
    assert len(batch) == 4
    assert batch.state(2) == states[2]
    with pytest.raises(ValueError, match="empty sequence"):
        StepBatch.stack([])


def test_evaluate_batch_rejects_bad_shape():
    cost_model = make_cost_model()
    batch, _ = random_batch(cost_model, np.random.default_rng(7), 3)
    with pytest.raises(ValueError, match=r"shape \(3, 8\) or \(3, M, 8\)"):
        cost_model.evaluate_batch(batch, np.zeros((2, 8), dtype=bool))
