"""wide-train: tiny training runs, saved files, seeding and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from stable_baselines3 import PPO

import wide_env
from train import ALGORITHMS, normalize_algorithm_name
from train.cli import (apply_hyperparameter_overrides, build_run_config, load_algorithm_config, main,
                       parse_assignments, parse_value, train)
from wide_env.config import ScenarioConfig

# One token per episode (32 steps) so that tiny runs finish episodes, evaluations and checkpoints.
TINY_SCENARIO = {"tokens_per_episode": 1}
TINY_HYPERPARAMETERS = {
    "ppo": {"n_steps": 64, "batch_size": 64, "n_epochs": 1},
    "maskable_ppo": {"n_steps": 64, "batch_size": 64, "n_epochs": 1},
    "a2c": {"n_steps": 8},
    "dqn": {"learning_starts": 64, "buffer_size": 1000, "batch_size": 32, "target_update_interval": 64},
}


def tiny_run(algo: str, out, seed: int = 0, timesteps: int = 256, **kwargs):
    """Build the config of a short training run that finishes episodes, evaluations and checkpoints."""
    options = {"n_envs": 2, "eval_freq": 128, "eval_episodes": 1, "checkpoint_freq": 128}
    options.update(kwargs)
    return build_run_config(algo, seed=seed, timesteps=timesteps, scenario_overrides=TINY_SCENARIO,
                            hyperparameter_overrides=TINY_HYPERPARAMETERS[algo], out=out, **options)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_tiny_run_writes_model_and_config(algo, tmp_path):
    result = train(tiny_run(algo, tmp_path / algo, timesteps=256))

    assert result.model_path == tmp_path / algo / "model.zip"
    assert result.model_path.is_file()
    assert result.config_path.is_file()
    assert result.best_model_path is not None and result.best_model_path.is_file()
    assert (tmp_path / algo / "best" / "config.yaml").is_file()
    assert any((tmp_path / algo / "checkpoints").glob("model_*_steps.zip"))
    assert any(result.tensorboard_dir.rglob("events.out.tfevents.*"))

    config = yaml.safe_load(result.config_path.read_text())
    assert config["algo"] == algo
    assert config["seed"] == 0
    assert config["timesteps"] == 256
    assert config["n_envs"] == 2
    assert config["scenario"] == ScenarioConfig(**TINY_SCENARIO).to_dict()
    assert config["versions"]["wide_env"] == wide_env.__version__
    assert config["training_wall_time_s"] > 0
    for key, value in TINY_HYPERPARAMETERS[algo].items():
        assert config["hyperparameters"][key] == value
    assert config["action_wrapper"] == ("TopKSubsetAction" if algo == "dqn" else None)


def test_normalized_run_saves_statistics(tmp_path):
    run = build_run_config("ppo", timesteps=256, n_envs=2, scenario_overrides=TINY_SCENARIO,
                           hyperparameter_overrides={**TINY_HYPERPARAMETERS["ppo"],
                                                     "policy_kwargs.features_extractor_class": None},
                           normalize={"norm_obs": True, "norm_reward": False}, out=tmp_path, eval_freq=64,
                           eval_episodes=1, checkpoint_freq=128)
    result = train(run)

    assert result.vecnormalize_path == tmp_path / "vecnormalize.pkl"
    assert result.vecnormalize_path.is_file()
    assert (tmp_path / "best" / "vecnormalize.pkl").is_file()
    assert any((tmp_path / "checkpoints").glob("model_vecnormalize_*_steps.pkl"))


def test_same_seed_same_parameters(tmp_path):
    params = []
    for name, seed in (("first", 7), ("second", 7), ("other", 8)):
        run = tiny_run("ppo", tmp_path / name, seed=seed, timesteps=128, eval_freq=0, checkpoint_freq=0)
        train(run)
        model = PPO.load(tmp_path / name / "model.zip", device="cpu")
        params.append({k: v.detach().numpy().copy() for k, v in model.policy.state_dict().items()})

    first, second, other = params
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert any(not np.array_equal(first[key], other[key]) for key in first)


def test_main_prints_output_paths(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["--algo", "PPO", "--timesteps", "64", "--seed", "1", "--n-envs", "1", "--out", str(out),
                   "--eval-freq", "0", "--checkpoint-freq", "0", "--scenario-set", "tokens_per_episode=1",
                   "--set", "n_steps=32", "batch_size=32", "--set", "n_epochs=1",
                   "--set", "policy_kwargs.net_arch=[16]"])

    assert status == 0
    printed = capsys.readouterr().out
    assert str(out / "model.zip") in printed
    assert str(out / "config.yaml") in printed
    assert str(out / "tensorboard") in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["algo"] == "ppo"
    assert config["hyperparameters"]["batch_size"] == 32
    assert config["hyperparameters"]["policy_kwargs"]["net_arch"] == [16]
    assert config["command"][:3] == ["wide-train", "--algo", "PPO"]


def test_scenario_file_and_overrides(tmp_path):
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text("num_nodes: 2\ndistance_max_m: 100.0\n")
    run = build_run_config("ppo", scenario=scenario_file, scenario_overrides={"distance_max_m": 90.0})

    assert run.scenario.num_nodes == 2
    assert run.scenario.distance_max_m == 90.0


def test_default_out_dir_and_yaml_defaults():
    run = build_run_config("a2c", seed=3)
    defaults = load_algorithm_config("a2c")

    assert str(run.out) == "runs/a2c-3"
    assert run.timesteps == defaults["timesteps"]
    assert run.n_envs == defaults["n_envs"]
    assert run.hyperparameters == defaults["hyperparameters"]


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_shipped_configs_are_valid(algo):
    config = load_algorithm_config(algo)

    assert apply_hyperparameter_overrides(algo, config["hyperparameters"], {}) == config["hyperparameters"]
    assert config["hyperparameters"]["gamma"] == 0.0


def test_parse_value_reads_yaml_and_floats():
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("3.0e-4") == pytest.approx(3e-4)
    assert parse_value("64") == 64
    assert parse_value("[64, 64]") == [64, 64]
    assert parse_value("true") is True
    assert parse_value("null") is None
    assert parse_value("tanh") == "tanh"


def test_dotted_override_sets_nested_value():
    result = apply_hyperparameter_overrides("ppo", {"policy_kwargs": {"net_arch": [128, 128]}},
                                            {"policy_kwargs.net_arch": [32], "policy_kwargs.activation_fn": "relu"})

    assert result["policy_kwargs"] == {"net_arch": [32], "activation_fn": "relu"}


def test_algorithm_name_aliases():
    assert normalize_algorithm_name("MaskablePPO") == "maskable_ppo"
    assert normalize_algorithm_name("maskable-ppo") == "maskable_ppo"
    assert normalize_algorithm_name("DQN") == "dqn"


# -- input errors -------------------------------------------------------------


def test_unknown_algorithm_raises():
    with pytest.raises(ValueError, match=r"unknown algorithm 'sac': expected one of ppo, a2c, dqn, maskable_ppo"):
        build_run_config("sac")


def test_unknown_algorithm_cli_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--algo", "sac"])

    assert exit_info.value.code == 2
    assert "unknown algorithm 'sac': expected one of ppo, a2c, dqn, maskable_ppo" in capsys.readouterr().err


def test_unknown_hyperparameter_raises():
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'learnin_rate' for ppo; valid keys are: "
                                         r"learning_rate, n_steps"):
        build_run_config("ppo", hyperparameter_overrides={"learnin_rate": 1e-3})


def test_unknown_hyperparameter_cli_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--algo", "dqn", "--set", "n_epochs=3"])

    assert exit_info.value.code == 2
    assert "unknown hyperparameter 'n_epochs' for dqn" in capsys.readouterr().err


def test_normalized_expert_features_raise():
    with pytest.raises(ValueError, match=r"ExpertFeatures ranks the raw gate probabilities"):
        build_run_config("ppo", normalize={"norm_obs": True})


def test_unknown_normalize_key_raises():
    with pytest.raises(ValueError, match=r"unknown normalize key\(s\) 'norm_obj'; valid keys are: "):
        build_run_config("ppo", normalize={"norm_obj": True})


@pytest.mark.parametrize("key, value, message", [
    ("policy_kwargs.activation_fn", "swish", r"invalid policy_kwargs.activation_fn 'swish': expected one of relu"),
    ("policy_kwargs.features_extractor_class", "Cnn", r"invalid policy_kwargs.features_extractor_class 'Cnn'"),
])
def test_invalid_policy_class_name_raises(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_run_config("ppo", hyperparameter_overrides={key: value})


def test_reserved_hyperparameter_raises():
    with pytest.raises(ValueError, match=r"hyperparameter 'seed' cannot be set for ppo: it is set by --seed"):
        build_run_config("ppo", hyperparameter_overrides={"seed": 1})


def test_unknown_scenario_key_raises():
    with pytest.raises(ValueError, match=r"unknown scenario key\(s\) 'num_node'; valid keys are: moe_preset"):
        build_run_config("ppo", scenario_overrides={"num_node": 2})


def test_invalid_scenario_value_raises():
    with pytest.raises(ValueError, match=r"invalid num_nodes"):
        build_run_config("ppo", scenario_overrides={"num_nodes": 0})


def test_missing_scenario_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"scenario file not found: .*missing\.yaml"):
        build_run_config("ppo", scenario=tmp_path / "missing.yaml")


def test_malformed_assignment_raises():
    with pytest.raises(ValueError, match=r"invalid --set 'learning_rate': expected KEY=VALUE"):
        parse_assignments(["learning_rate"], "--set")


@pytest.mark.parametrize("name, value", [("timesteps", 0), ("n_envs", 0), ("eval_episodes", 0),
                                         ("eval_freq", -1)])
def test_invalid_counts_raise(name, value):
    with pytest.raises(ValueError, match=rf"invalid {name}: expected an integer >= "):
        build_run_config("ppo", **{name: value})
