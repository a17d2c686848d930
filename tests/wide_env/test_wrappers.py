"""TopKSubsetAction: Discrete(2^K) actions over subsets of the current Top-K set."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from wide_env.env import WideDecodeEnv
from wide_env.wrappers import TopKSubsetAction


def make_wrapped(**overrides):
    env = TopKSubsetAction(WideDecodeEnv(**overrides))
    env.reset(seed=0)
    return env


@pytest.mark.parametrize("preset, top_k", [("mixtral-8x7b", 2), ("olmoe-1b-7b", 8)])
def test_action_space_size(preset, top_k):
    env = make_wrapped(moe_preset=preset)

    assert env.action_space == gym.spaces.Discrete(2**top_k)


def test_mixtral_actions_map_to_subsets():
    env = make_wrapped()
    first, second = env.unwrapped.state.top_k

    subsets = {action: set(np.flatnonzero(env.action(action)).tolist()) for action in range(4)}

    # Bit 0 selects the largest gate, bit 1 the second largest.
    assert subsets == {0: set(), 1: {first}, 2: {second}, 3: {first, second}}


def test_every_action_maps_to_its_bits():
    env = make_wrapped(moe_preset="olmoe-1b-7b")
    top_k = env.unwrapped.state.top_k

    for action in range(2**8):
        mask = env.action(action)
        expected = np.zeros(64, dtype=np.int8)
        expected[[top_k[k] for k in range(8) if action >> k & 1]] = 1
        np.testing.assert_array_equal(mask, expected)
        assert env.unwrapped.action_space.contains(mask)


def test_all_ones_action_is_top_k():
    for preset, top_k in (("mixtral-8x7b", 2), ("olmoe-1b-7b", 8)):
        env = make_wrapped(moe_preset=preset)
        base = env.unwrapped

        np.testing.assert_array_equal(env.action(2**top_k - 1).astype(bool), base.cost_model.top_k_mask(base.state))


def test_mapping_follows_current_state():
    env = make_wrapped(moe_preset="olmoe-1b-7b")
    seen = []
    for _ in range(5):
        top_k = env.unwrapped.state.top_k
        np.testing.assert_array_equal(np.flatnonzero(env.action(1)), [top_k[0]])
        seen.append(int(top_k[0]))
        env.step(255)

    assert len(set(seen)) > 1


def test_wrapped_step_equals_base_step():
    wrapped = TopKSubsetAction(WideDecodeEnv())
    base = WideDecodeEnv()
    wrapped.reset(seed=3)
    base.reset(seed=3)

    for action in [3, 1, 2, 0, 3, 3, 1]:
        expected_mask = wrapped.action(action)
        _, wrapped_reward, _, _, wrapped_info = wrapped.step(action)
        _, base_reward, _, _, base_info = base.step(expected_mask)
        assert wrapped_reward == base_reward
        assert wrapped_info["energy_j"] == base_info["energy_j"]


def test_top_k_action_reward_matches_topk_energy():
    env = make_wrapped()

    _, _, _, _, info = env.step(3)

    assert info["energy_j"] == info["topk_energy_j"]


@pytest.mark.parametrize(
    "action, error, pattern",
    [
        (4, ValueError, r"invalid action: expected an integer in \[0, 3\], got 4"),
        (-1, ValueError, r"invalid action: expected an integer in \[0, 3\], got -1"),
        (1.0, TypeError, r"invalid action: expected one integer in \[0, 3\], got 1\.0"),
        (True, TypeError, r"invalid action: expected one integer in \[0, 3\], got True"),
        ("1", TypeError, r"invalid action: expected one integer in \[0, 3\], got '1'"),
        (np.array([1, 2]), TypeError, r"invalid action: expected one integer in \[0, 3\]"),
    ],
)
def test_invalid_integer_rejected(action, error, pattern):
    env = make_wrapped()

    with pytest.raises(error, match=pattern):
        env.step(action)


@pytest.mark.parametrize("action", [np.int64(2), np.array(2), np.array([2], dtype=np.int32), np.uint8(2)])
def test_numpy_integers_accepted(action):
    env = make_wrapped()
    second = env.unwrapped.state.top_k[1]

    np.testing.assert_array_equal(np.flatnonzero(env.action(action)), [second])


def test_action_masks_shape_and_empty_set():
    env = make_wrapped(moe_preset="olmoe-1b-7b")

    masks = env.action_masks()

    assert masks.shape == (256,)
    assert masks.dtype == bool
    assert masks[0]


def test_action_masks_follow_reachability():
    env = make_wrapped(moe_preset="olmoe-1b-7b")
    base = env.unwrapped
    reachable = base.reachable_experts()[base.state.top_k]

    masks = env.action_masks()

    for action in range(256):
        needs = np.array([action >> k & 1 for k in range(8)], dtype=bool)
        assert masks[action] == bool(np.all(reachable[needs]))


def test_action_masks_only_empty_set_when_all_unreachable():
    env = make_wrapped(distance_min_m=400.0, distance_max_m=500.0)

    assert env.action_masks().tolist() == [True, False, False, False]


def test_sb3_env_checker_on_wrapper():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(TopKSubsetAction(WideDecodeEnv()), warn=True)

    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


def test_wrapper_rejects_non_multibinary_env():
    with pytest.raises(TypeError, match="TopKSubsetAction wraps a MultiBinary env"):
        TopKSubsetAction(gym.make("CartPole-v1"))
