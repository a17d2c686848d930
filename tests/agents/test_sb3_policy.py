"""SB3Policy: loading saved wide-train models and turning their predictions into MultiBinary actions."""

from __future__ import annotations

import shutil

import gymnasium as gym
import numpy as np
import pytest

import wide_env  # noqa: F401  (registers WIDE-Decode-v0)
from agents import make_policy
from agents.sb3_policy import SB3Policy, vecnormalize_path
from train.cli import build_run_config, train

# One token per episode (32 steps) keeps each training run short.
TINY_SCENARIO = {"tokens_per_episode": 1}
TINY_HYPERPARAMETERS = {
    "ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 1},
    "maskable_ppo": {"n_steps": 32, "batch_size": 32, "n_epochs": 1},
    "a2c": {"n_steps": 8},
    "dqn": {"learning_starts": 32, "buffer_size": 500, "batch_size": 16},
}


class PrivilegedGuard(dict):
    """An ``info`` dict that fails the test when anyone reads ``privileged``."""

    def __getitem__(self, key):
        if key == "privileged":
            raise AssertionError("SB3Policy read info['privileged']")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "privileged":
            raise AssertionError("SB3Policy read info['privileged']")
        return super().get(key, default)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """A tiny saved run of every algorithm, keyed by algorithm name."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for algo, hyperparameters in TINY_HYPERPARAMETERS.items():
        run = build_run_config(algo, seed=0, timesteps=128, n_envs=2, scenario_overrides=TINY_SCENARIO,
                               hyperparameter_overrides=hyperparameters, out=root / algo, eval_freq=0,
                               checkpoint_freq=64)
        train(run)
        dirs[algo] = root / algo

    # A run with VecNormalize statistics, which ExpertFeatures cannot use, so with SB3's default extractor.
    run = build_run_config("ppo", seed=0, timesteps=128, n_envs=2, scenario_overrides=TINY_SCENARIO,
                           hyperparameter_overrides={**TINY_HYPERPARAMETERS["ppo"],
                                                     "policy_kwargs.features_extractor_class": None},
                           normalize={"norm_obs": True, "norm_reward": False}, out=root / "ppo_normalized",
                           eval_freq=0, checkpoint_freq=64)
    train(run)
    dirs["ppo_normalized"] = root / "ppo_normalized"
    return dirs


def make_env(**overrides):
    return gym.make("WIDE-Decode-v0", **{**TINY_SCENARIO, **overrides})


def play(policy, env, steps: int = 40, seed: int = 0):
    """Step ``env`` with ``policy`` and return every action, checking each one's type and values."""
    observation, info = env.reset(seed=seed)
    actions = []
    for _ in range(steps):
        action = policy.decide(observation, PrivilegedGuard({k: v for k, v in info.items() if k != "privileged"}))
        assert action.dtype == np.int8
        assert action.shape == (env.unwrapped.num_experts,)
        assert set(np.unique(action).tolist()) <= {0, 1}
        actions.append((action, env.unwrapped.state))
        observation, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            observation, info = env.reset()
    return actions


@pytest.mark.parametrize("algo", list(TINY_HYPERPARAMETERS))
def test_loads_run_dir_and_acts(algo, run_dirs):
    env = make_env()
    policy = SB3Policy(env, run_dirs[algo])

    assert policy.algo == algo
    assert policy.model_path == run_dirs[algo] / "model.zip"
    assert policy.uses_privileged is False
    play(policy, env)


def test_dqn_action_is_top_k_subset(run_dirs):
    env = make_env()
    policy = SB3Policy(env, run_dirs["dqn"] / "model.zip", algo="dqn")

    for action, state in play(policy, env):
        computed = set(np.flatnonzero(action).tolist())
        assert computed <= set(state.top_k.tolist())


def test_maskable_ppo_respects_masks(run_dirs):
    env = make_env()
    policy = SB3Policy(env, run_dirs["maskable_ppo"])
    observation, info = env.reset(seed=3)
    for _ in range(64):
        allowed = env.unwrapped.action_masks().reshape(-1, 2)[:, 1]
        action = policy.decide(observation, info)
        assert not np.any(action.astype(bool) & ~allowed)
        observation, _, _, truncated, info = env.step(action)
        if truncated:
            observation, info = env.reset()


def test_loads_normalized_run(run_dirs):
    env = make_env()
    policy = SB3Policy(env, run_dirs["ppo_normalized"])

    assert (run_dirs["ppo_normalized"] / "vecnormalize.pkl").is_file()
    assert policy._normalizer is not None
    assert policy._normalizer.training is False
    play(policy, env, steps=8)


def test_unnormalized_run_has_no_normalizer(run_dirs):
    assert SB3Policy(make_env(), run_dirs["ppo"])._normalizer is None


def test_loads_checkpoint_with_its_statistics(run_dirs):
    checkpoint = sorted((run_dirs["ppo_normalized"] / "checkpoints").glob("model_*_steps.zip"))[0]
    env = make_env()
    policy = SB3Policy(env, checkpoint)

    assert policy.algo == "ppo"
    assert vecnormalize_path(checkpoint).is_file()
    play(policy, env, steps=4)


def test_deterministic_decisions(run_dirs):
    env = make_env()
    first = [action for action, _ in play(SB3Policy(env, run_dirs["ppo"]), env, seed=5)]
    second = [action for action, _ in play(SB3Policy(env, run_dirs["ppo"]), env, seed=5)]

    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_make_policy_builds_sb3_policy(run_dirs):
    env = make_env()
    from_path = make_policy(str(run_dirs["a2c"] / "model.zip"), env)
    with_prefix = make_policy(f"a2c:{run_dirs['a2c'] / 'model.zip'}", env)

    assert isinstance(from_path, SB3Policy) and from_path.algo == "a2c"
    assert isinstance(with_prefix, SB3Policy) and with_prefix.algo == "a2c"


# -- errors -------------------------------------------------------------------


def test_missing_model_file_raises(tmp_path):
    missing = tmp_path / "nowhere" / "model.zip"
    with pytest.raises(FileNotFoundError, match=r"SB3 model file not found: .*nowhere/model\.zip"):
        SB3Policy(make_env(), missing, algo="ppo")


def test_missing_config_needs_algo(run_dirs, tmp_path):
    shutil.copy(run_dirs["ppo"] / "model.zip", tmp_path / "model.zip")
    with pytest.raises(ValueError, match=r"missing algorithm for .*model\.zip: no config\.yaml"):
        SB3Policy(make_env(), tmp_path / "model.zip")

    assert SB3Policy(make_env(), tmp_path / "model.zip", algo="ppo").algo == "ppo"


def test_unknown_algorithm_raises(run_dirs):
    with pytest.raises(ValueError, match=r"unknown algorithm 'sac': expected one of"):
        SB3Policy(make_env(), run_dirs["ppo"], algo="sac")


def test_observation_space_mismatch_raises(run_dirs):
    # Two edge nodes instead of four: the observation has two fewer channel entries.
    env = make_env(num_nodes=2)
    with pytest.raises(ValueError, match=r"expects observation space .* but the env has"):
        SB3Policy(env, run_dirs["ppo"])


def test_action_space_mismatch_raises(run_dirs):
    # Top-1 routing: the same observation, but Discrete(2) subsets instead of the model's Discrete(4).
    env = make_env(top_k=1, gate_source="synthetic")
    with pytest.raises(ValueError, match=r"has action space Discrete\(4\), but the env needs Discrete\(2\)"):
        SB3Policy(env, run_dirs["dqn"])


def test_placement_mismatch_raises(run_dirs):
    # Same spaces, but expert 0 sits on node 4: the model's ExpertFeatures would read the wrong channel.
    env = make_env(placement=[4, 1, 2, 2, 3, 3, 4, 1])
    with pytest.raises(ValueError, match=r"was trained for Top-K and placement .* but the env has"):
        SB3Policy(env, run_dirs["ppo"])


def test_missing_statistics_raise(run_dirs, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(run_dirs["ppo_normalized"], run_copy)
    (run_copy / "vecnormalize.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"VecNormalize statistics not found: .*vecnormalize\.pkl"):
        SB3Policy(make_env(), run_copy)
