"""``wide-train``: train a PPO, A2C, DQN or MaskablePPO agent on ``WIDE-Decode-v0``.

Each algorithm's defaults live in ``train/configs/<algo>.yaml``::

    timesteps: 200000        # default of --timesteps
    n_envs: 4                # default of --n-envs
    policy: MlpPolicy        # SB3 policy name
    normalize: null          # or VecNormalize keyword arguments, e.g. {norm_obs: true, norm_reward: false}
    hyperparameters:         # keyword arguments of the SB3 algorithm's constructor
      learning_rate: 1.0e-3

A run writes into ``--out`` (default ``runs/<algo>-<seed>``): ``model.zip``,
``config.yaml`` (everything needed to rebuild the run), ``vecnormalize.pkl``
when observations are normalised, ``best/`` (best model by evaluation reward),
``checkpoints/``, ``eval/evaluations.npz``, ``monitor/`` and ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import importlib.resources
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import gymnasium as gym
import yaml

import wide_env
from train import (ALGORITHMS, DISCRETE_SUBSET_ALGORITHMS, MASKED_ALGORITHMS, algorithm_class,
                   normalize_algorithm_name)
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.wrappers import TopKSubsetAction

ENV_ID = "WIDE-Decode-v0"
MODEL_FILE = "model.zip"
CONFIG_FILE = "config.yaml"
VECNORMALIZE_FILE = "vecnormalize.pkl"
BEST_DIR = "best"
BEST_MODEL_FILE = "best_model.zip"

# Keys allowed at the top level of a train/configs/<algo>.yaml file.
ALGORITHM_CONFIG_KEYS = ("timesteps", "n_envs", "policy", "normalize", "hyperparameters")
# Constructor arguments that wide-train sets from its own options, so --set must not set them.
RESERVED_HYPERPARAMETERS = {
    "policy": "the 'policy' key of the algorithm's YAML file",
    "env": "wide-train itself",
    "seed": "--seed",
    "device": "--device",
    "tensorboard_log": "--out (logs go to OUT/tensorboard)",
    "verbose": "--verbose",
    "_init_setup_model": "SB3 itself",
}
# Names that policy_kwargs.activation_fn may take in YAML, mapped to torch.nn class names.
ACTIVATION_FUNCTIONS = {"relu": "ReLU", "tanh": "Tanh", "elu": "ELU", "leaky_relu": "LeakyReLU", "gelu": "GELU",
                        "silu": "SiLU"}
VEC_ENV_KINDS = ("native", "dummy", "subproc")
# Default of build_run_config's ``normalize``: take the entry of the algorithm's YAML file.
FROM_CONFIG = "from-config"
# Seed offset of the evaluation env, so that it does not replay the training envs' episodes.
EVAL_SEED_OFFSET = 10_000


@dataclass
class RunConfig:
    """Everything one training run needs, resolved from the YAML defaults and the command line."""

    algo: str
    seed: int
    timesteps: int
    n_envs: int
    policy: str
    hyperparameters: dict[str, Any]
    normalize: dict[str, Any] | None
    scenario: ScenarioConfig
    out: Path
    vec_env: str = "native"
    eval_freq: int = 25_000
    eval_episodes: int = 5
    checkpoint_freq: int = 50_000
    progress_bar: bool = False
    device: str = "cpu"
    torch_threads: int = 1
    verbose: int = 0
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form written to ``config.yaml``."""
        return {
            "algo": self.algo,
            "seed": self.seed,
            "timesteps": self.timesteps,
            "n_envs": self.n_envs,
            "vec_env": self.vec_env,
            "policy": self.policy,
            "hyperparameters": copy.deepcopy(self.hyperparameters),
            "normalize": copy.deepcopy(self.normalize),
            "env_id": ENV_ID,
            "action_wrapper": "TopKSubsetAction" if self.algo in DISCRETE_SUBSET_ALGORITHMS else None,
            "scenario": self.scenario.to_dict(),
            "eval_freq": self.eval_freq,
            "eval_episodes": self.eval_episodes,
            "checkpoint_freq": self.checkpoint_freq,
            "device": self.device,
            "torch_threads": self.torch_threads,
            "versions": package_versions(),
            "command": list(self.command),
        }


@dataclass
class TrainResult:
    """Paths written by a training run and its wall time in seconds."""

    out: Path
    model_path: Path
    config_path: Path
    tensorboard_dir: Path
    best_model_path: Path | None
    vecnormalize_path: Path | None
    wall_time_s: float


# -- configuration ------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of wide-env and of the libraries that define the saved model's format."""
    versions = {"wide_env": wide_env.__version__}
    for distribution in ("stable-baselines3", "sb3-contrib", "torch", "gymnasium"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = "not installed"
    return versions


def load_algorithm_config(algo: str) -> dict[str, Any]:
    """Read ``train/configs/<algo>.yaml`` and check its keys."""
    algo = normalize_algorithm_name(algo)
    resource = importlib.resources.files("train") / "configs" / f"{algo}.yaml"
    values = yaml.safe_load(resource.read_text(encoding="utf-8")) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{resource} must contain a YAML mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(ALGORITHM_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in {resource}; "
                         f"valid keys are: {', '.join(ALGORITHM_CONFIG_KEYS)}")
    config = dict(values)
    config.setdefault("hyperparameters", {})
    config["hyperparameters"] = dict(config["hyperparameters"] or {})
    return config


def parse_value(text: str) -> Any:
    """Parse one command-line value as YAML, reading ``1e-3`` as a float (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignments(items: Sequence[str], option: str) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` into a dict, parsing each value with ``parse_value``."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"invalid {option} {item!r}: expected KEY=VALUE, e.g. {option} learning_rate=1e-3")
        result[key] = parse_value(text)
    return result


def allowed_hyperparameters(algo: str) -> tuple[str, ...]:
    """Constructor arguments of the algorithm that YAML files and ``--set`` may set."""
    parameters = inspect.signature(algorithm_class(algo).__init__).parameters
    return tuple(name for name in parameters if name != "self" and name not in RESERVED_HYPERPARAMETERS)


def apply_hyperparameter_overrides(algo: str, hyperparameters: Mapping[str, Any],
                                   overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``hyperparameters`` updated with ``overrides``, rejecting keys the algorithm does not take.

    A dotted key sets one entry of a dict-valued hyperparameter, e.g.
    ``policy_kwargs.net_arch=[64, 64]``.
    """
    allowed = allowed_hyperparameters(algo)
    result = copy.deepcopy(dict(hyperparameters))
    for key, value in overrides.items():
        head, *rest = key.split(".")
        _check_hyperparameter_name(algo, head, allowed)
        if not rest:
            result[head] = value
            continue
        target = result.setdefault(head, {})
        if target is None:
            target = result[head] = {}
        for part in rest[:-1]:
            if not isinstance(target, dict):
                raise ValueError(f"invalid hyperparameter {key!r}: {head!r} is not a mapping")
            target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"invalid hyperparameter {key!r}: {head!r} is not a mapping")
        target[rest[-1]] = value
    for key in result:
        _check_hyperparameter_name(algo, key, allowed)
    return result


def _check_hyperparameter_name(algo: str, name: str, allowed: Sequence[str]) -> None:
    if name in RESERVED_HYPERPARAMETERS:
        raise ValueError(f"hyperparameter {name!r} cannot be set for {algo}: it is set by "
                         f"{RESERVED_HYPERPARAMETERS[name]}")
    if name not in allowed:
        raise ValueError(f"unknown hyperparameter {name!r} for {algo}; valid keys are: {', '.join(allowed)}")


def check_normalize_options(normalize: Any) -> dict[str, Any] | None:
    """Validate the ``normalize`` entry: null/false for none, true or a dict of VecNormalize arguments."""
    if normalize is None or normalize is False:
        return None
    if normalize is True:
        return {}
    if not isinstance(normalize, Mapping):
        raise ValueError(f"invalid normalize: expected null, true or a mapping of VecNormalize arguments, "
                         f"got {normalize!r}")
    from stable_baselines3.common.vec_env import VecNormalize

    allowed = [name for name in inspect.signature(VecNormalize.__init__).parameters if name not in ("self", "venv")]
    unknown = sorted(set(normalize) - set(allowed))
    if unknown:
        raise ValueError(f"unknown normalize key(s) {', '.join(map(repr, unknown))}; "
                         f"valid keys are: {', '.join(allowed)}")
    return dict(normalize)


def _check_integer(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"invalid {name}: expected an integer >= {minimum}, got {value!r}")
    return value


def build_run_config(algo: str, *, seed: int = 0, timesteps: int | None = None, n_envs: int | None = None,
                     scenario: str | Path | ScenarioConfig | None = None,
                     scenario_overrides: Mapping[str, Any] | None = None,
                     hyperparameter_overrides: Mapping[str, Any] | None = None,
                     normalize: Any = FROM_CONFIG, out: str | Path | None = None, vec_env: str = "native",
                     eval_freq: int = 25_000,
                     eval_episodes: int = 5, checkpoint_freq: int = 50_000, progress_bar: bool = False,
                     device: str = "cpu", torch_threads: int = 1, verbose: int = 0,
                     command: Sequence[str] = ()) -> RunConfig:
    """Resolve a run from the algorithm's YAML defaults and explicit settings.

    ``normalize`` replaces the YAML file's ``normalize`` entry when given.
    Raises ``ValueError`` for an unknown algorithm, hyperparameter, scenario
    key or an invalid count, and ``FileNotFoundError`` for a missing scenario file.
    """
    algo = normalize_algorithm_name(algo)
    defaults = load_algorithm_config(algo)

    hyperparameters = apply_hyperparameter_overrides(algo, defaults["hyperparameters"],
                                                     hyperparameter_overrides or {})
    normalize = check_normalize_options(defaults.get("normalize") if normalize == FROM_CONFIG else normalize)
    scenario_config = resolve_scenario(scenario, **dict(scenario_overrides or {}))

    timesteps = defaults.get("timesteps", 100_000) if timesteps is None else timesteps
    n_envs = defaults.get("n_envs", 1) if n_envs is None else n_envs
    _check_integer("seed", seed, minimum=0)
    _check_integer("timesteps", timesteps)
    _check_integer("n_envs", n_envs)
    _check_integer("eval_freq", eval_freq, minimum=0)
    _check_integer("eval_episodes", eval_episodes)
    _check_integer("checkpoint_freq", checkpoint_freq, minimum=0)
    _check_integer("torch_threads", torch_threads)
    if vec_env not in VEC_ENV_KINDS:
        raise ValueError(f"invalid vec_env: expected one of {', '.join(VEC_ENV_KINDS)}, got {vec_env!r}")
    policy_kwargs = hyperparameters.get("policy_kwargs") or {}
    if (normalize is not None and normalize.get("norm_obs", True)
            and policy_kwargs.get("features_extractor_class") == "ExpertFeatures"):
        raise ValueError("ExpertFeatures ranks the raw gate probabilities, so it cannot be combined with "
                         "normalize.norm_obs: set normalize to null or norm_obs to false")
    resolve_policy_kwargs(hyperparameters, scenario_config)  # rejects unknown class names now, not after set-up

    return RunConfig(
        algo=algo, seed=seed, timesteps=timesteps, n_envs=n_envs, policy=defaults.get("policy", "MlpPolicy"),
        hyperparameters=hyperparameters, normalize=normalize, scenario=scenario_config,
        out=Path(out) if out is not None else Path("runs") / f"{algo}-{seed}", vec_env=vec_env,
        eval_freq=eval_freq, eval_episodes=eval_episodes, checkpoint_freq=checkpoint_freq,
        progress_bar=progress_bar, device=device, torch_threads=torch_threads, verbose=verbose,
        command=list(command),
    )


# -- environments -------------------------------------------------------------


class DropPrivilegedInfo(gym.Wrapper):
    """Remove ``info["privileged"]`` so that a learning agent cannot read it.

    It also saves time: SB3's ``DummyVecEnv`` deep-copies every ``info`` dict,
    and the privileged state contains the step's node tables.
    """

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        info.pop("privileged", None)
        return observation, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        info.pop("privileged", None)
        return observation, reward, terminated, truncated, info


def make_env(scenario: ScenarioConfig, discrete_subsets: bool = False) -> gym.Env:
    """Build one ``WIDE-Decode-v0`` env without privileged info, wrapped in ``TopKSubsetAction`` for DQN.

    A module-level function so that ``SubprocVecEnv`` can pickle it; importing
    this module registers the env id in the worker.
    """
    env = DropPrivilegedInfo(gym.make(ENV_ID, scenario=scenario))
    return TopKSubsetAction(env) if discrete_subsets else env


def make_vec_env(run: RunConfig, n_envs: int, seed: int, monitor_dir: Path | None = None):
    """Vectorised, Monitor-wrapped envs for ``run``.

    ``native`` is the batched ``WideDecodeVectorEnv`` behind SB3's VecEnv
    interface; it has a fixed cost per step, so a single env (the evaluation
    env) always uses ``DummyVecEnv``.
    """
    from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if run.vec_env == "native":
        from stable_baselines3.common.vec_env import VecMonitor

        from wide_env.vector import make_sb3_vec_env

        monitor_path = str(monitor_dir / "vec") if monitor_dir is not None else None
        if monitor_dir is not None:
            monitor_dir.mkdir(parents=True, exist_ok=True)
        if n_envs > 1:
            return make_sb3_vec_env(n_envs, seed=seed, scenario=run.scenario,
                                    discrete_subsets=run.algo in DISCRETE_SUBSET_ALGORITHMS,
                                    monitor_path=monitor_path)
        # VecMonitor on top, as on the native env, so VecNormalize can sync train and eval statistics.
        factory = functools.partial(make_env, run.scenario, run.algo in DISCRETE_SUBSET_ALGORITHMS)
        single = DummyVecEnv([factory])
        single.seed(seed)
        return VecMonitor(single, monitor_path)

    factory = functools.partial(make_env, run.scenario, run.algo in DISCRETE_SUBSET_ALGORITHMS)
    vec_env_cls = SubprocVecEnv if run.vec_env == "subproc" and n_envs > 1 else DummyVecEnv
    return sb3_make_vec_env(factory, n_envs=n_envs, seed=seed, vec_env_cls=vec_env_cls,
                            monitor_dir=str(monitor_dir) if monitor_dir is not None else None)


def resolve_policy_kwargs(hyperparameters: Mapping[str, Any], scenario: ScenarioConfig) -> dict[str, Any]:
    """Copy the hyperparameters, turning names in ``policy_kwargs`` into classes.

    ``activation_fn`` names a torch activation (``relu``, ``tanh`` ...).
    ``features_extractor_class: ExpertFeatures`` selects ``agents.sb3_policy.ExpertFeatures``,
    whose arguments come from the scenario, and ``null`` selects SB3's default.
    """
    resolved = copy.deepcopy(dict(hyperparameters))
    policy_kwargs = resolved.get("policy_kwargs")
    if not isinstance(policy_kwargs, dict):
        return resolved

    if "features_extractor_class" in policy_kwargs and policy_kwargs["features_extractor_class"] is None:
        del policy_kwargs["features_extractor_class"]
    extractor = policy_kwargs.get("features_extractor_class")
    if isinstance(extractor, str):
        from agents.sb3_policy import ExpertFeatures, expert_features_kwargs

        if extractor != "ExpertFeatures":
            raise ValueError(f"invalid policy_kwargs.features_extractor_class {extractor!r}: "
                             "expected 'ExpertFeatures' or null")
        env = make_env(scenario)
        policy_kwargs["features_extractor_class"] = ExpertFeatures
        policy_kwargs["features_extractor_kwargs"] = {**expert_features_kwargs(env),
                                                      **(policy_kwargs.get("features_extractor_kwargs") or {})}
        env.close()

    activation = policy_kwargs.get("activation_fn")
    if isinstance(activation, str):
        import torch.nn

        if activation.lower() not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"invalid policy_kwargs.activation_fn {activation!r}: expected one of "
                             f"{', '.join(ACTIVATION_FUNCTIONS)}")
        policy_kwargs["activation_fn"] = getattr(torch.nn, ACTIVATION_FUNCTIONS[activation.lower()])
    return resolved


# -- training -----------------------------------------------------------------


def write_config(run: RunConfig, directory: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.yaml`` for ``run`` into ``directory``."""
    values = run.to_dict()
    values.update(extra or {})
    path = directory / CONFIG_FILE
    with path.open("w", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
    return path


def _build_callbacks(run: RunConfig, train_env, out: Path) -> list:
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
    from stable_baselines3.common.vec_env import VecNormalize

    callbacks = []
    if run.checkpoint_freq > 0:
        callbacks.append(CheckpointCallback(save_freq=max(run.checkpoint_freq // run.n_envs, 1),
                                            save_path=str(out / "checkpoints"), name_prefix="model",
                                            save_vecnormalize=run.normalize is not None))
    if run.eval_freq <= 0:
        return callbacks

    eval_env = make_vec_env(run, n_envs=1, seed=run.seed + EVAL_SEED_OFFSET)
    on_new_best = None
    if run.normalize is not None:
        # EvalCallback copies the training statistics into this env before each evaluation.
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False,
                                **{k: v for k, v in run.normalize.items() if k not in ("training", "norm_reward")})

        class SaveBestNormalization(BaseCallback):
            """Save the VecNormalize statistics that go with each new best model."""

            def _on_step(self) -> bool:
                train_env.save(str(out / BEST_DIR / VECNORMALIZE_FILE))
                return True

        on_new_best = SaveBestNormalization()

    if run.algo in MASKED_ALGORITHMS:
        from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback as eval_callback_cls
    else:
        eval_callback_cls = EvalCallback
    callbacks.append(eval_callback_cls(eval_env, n_eval_episodes=run.eval_episodes,
                                       eval_freq=max(run.eval_freq // run.n_envs, 1),
                                       best_model_save_path=str(out / BEST_DIR), log_path=str(out / "eval"),
                                       deterministic=True, callback_on_new_best=on_new_best,
                                       verbose=run.verbose))
    return callbacks


def train(run: RunConfig) -> TrainResult:
    """Train one agent as ``run`` describes and save it with its ``config.yaml``."""
    import torch
    from stable_baselines3.common.callbacks import EvalCallback
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import VecNormalize

    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    write_config(run, out)
    if run.eval_freq > 0:
        # SB3Policy reads the algorithm of best/best_model.zip from the config.yaml beside it.
        (out / BEST_DIR).mkdir(exist_ok=True)
        write_config(run, out / BEST_DIR)

    torch.set_num_threads(run.torch_threads)
    set_random_seed(run.seed)
    train_env = make_vec_env(run, n_envs=run.n_envs, seed=run.seed, monitor_dir=out / "monitor")
    if run.normalize is not None:
        options = dict(run.normalize)
        options.setdefault("gamma", run.hyperparameters.get("gamma", 0.99))
        train_env = VecNormalize(train_env, **options)

    model = algorithm_class(run.algo)(run.policy, train_env, seed=run.seed, device=run.device,
                                      tensorboard_log=str(out / "tensorboard"), verbose=run.verbose,
                                      **resolve_policy_kwargs(run.hyperparameters, run.scenario))
    callbacks = _build_callbacks(run, train_env, out)

    start = time.perf_counter()
    model.learn(total_timesteps=run.timesteps, callback=callbacks, progress_bar=run.progress_bar,
                tb_log_name=run.algo)
    wall_time_s = time.perf_counter() - start

    model_path = out / MODEL_FILE
    model.save(str(model_path))
    vecnormalize_path = None
    if isinstance(train_env, VecNormalize):
        vecnormalize_path = out / VECNORMALIZE_FILE
        train_env.save(str(vecnormalize_path))
    train_env.close()
    for callback in callbacks:
        if isinstance(callback, EvalCallback):
            callback.eval_env.close()
    config_path = write_config(run, out, {"training_wall_time_s": round(wall_time_s, 2)})

    best = out / BEST_DIR / BEST_MODEL_FILE
    return TrainResult(out=out, model_path=model_path, config_path=config_path,
                       tensorboard_dir=out / "tensorboard", best_model_path=best if best.is_file() else None,
                       vecnormalize_path=vecnormalize_path, wall_time_s=wall_time_s)


# -- command line -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wide-train",
        description=f"Train a Stable-Baselines3 agent on {ENV_ID}. Defaults per algorithm come from "
                    "train/configs/<algo>.yaml.",
    )

    agent = parser.add_argument_group("agent")
    agent.add_argument("--algo", required=True, type=str.lower, metavar="ALGO",
                       help=f"algorithm: one of {', '.join(ALGORITHMS)} (dqn acts on Top-K subsets)")
    agent.add_argument("--timesteps", type=int, default=None,
                       help="total environment steps over all envs (default: the YAML 'timesteps')")
    agent.add_argument("--seed", type=int, default=0, help="seed of the agent and the training envs (default 0)")
    agent.add_argument("--set", dest="hyperparameter_set", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE",
                       help="override hyperparameters, e.g. --set learning_rate=1e-3 "
                            "policy_kwargs.net_arch=[64,64]")

    scenario = parser.add_argument_group("scenario")
    scenario.add_argument("--scenario", type=Path, default=None, metavar="YAML",
                          help="scenario YAML file (default: the built-in default scenario)")
    scenario.add_argument("--scenario-set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                          help="override ScenarioConfig fields in SI units, e.g. --scenario-set "
                               "distance_max_m=100 access=tdma")

    output = parser.add_argument_group("output and evaluation")
    output.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="run directory for the model, config.yaml and logs (default: runs/<algo>-<seed>)")
    output.add_argument("--eval-freq", type=int, default=25_000,
                        help="evaluate every this many environment steps, 0 to disable (default 25000)")
    output.add_argument("--eval-episodes", type=int, default=5,
                        help="episodes per evaluation (default 5, 512 steps each in the default scenario)")
    output.add_argument("--checkpoint-freq", type=int, default=50_000,
                        help="save a checkpoint every this many environment steps, 0 to disable (default 50000)")
    output.add_argument("--progress-bar", action="store_true", help="show SB3's progress bar")
    output.add_argument("--verbose", type=int, choices=(0, 1, 2), default=0, help="SB3 verbosity (default 0)")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--n-envs", type=int, default=None,
                         help="number of training envs stepped together (default: the YAML 'n_envs')")
    runtime.add_argument("--vec-env", choices=VEC_ENV_KINDS, default="native",
                         help="step the training envs as one batched env (native, default), one by one in "
                              "this process (dummy) or one process each (subproc)")
    runtime.add_argument("--device", default="cpu", help="torch device (default cpu)")
    runtime.add_argument("--torch-threads", type=int, default=1,
                         help="torch CPU threads (default 1, because small MLPs gain little from more threads "
                              "and compete with the envs for cores)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wide-train`` and ``python -m train``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = ["wide-train", *(sys.argv[1:] if argv is None else argv)]
    try:
        run = build_run_config(
            args.algo, seed=args.seed, timesteps=args.timesteps, n_envs=args.n_envs, scenario=args.scenario,
            scenario_overrides=parse_assignments(args.scenario_set, "--scenario-set"),
            hyperparameter_overrides=parse_assignments(args.hyperparameter_set, "--set"),
            out=args.out, vec_env=args.vec_env, eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
            checkpoint_freq=args.checkpoint_freq, progress_bar=args.progress_bar, device=args.device,
            torch_threads=args.torch_threads, verbose=args.verbose, command=command,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))

    print(f"Training {run.algo} for {run.timesteps} steps with {run.n_envs} env(s), seed {run.seed}; "
          f"writing to {run.out}")
    result = train(run)
    print(f"Training took {result.wall_time_s:.1f} s")
    print(f"Model:       {result.model_path}")
    print(f"Config:      {result.config_path}")
    if result.vecnormalize_path is not None:
        print(f"VecNormalize statistics: {result.vecnormalize_path}")
    if result.best_model_path is not None:
        print(f"Best model:  {result.best_model_path}")
    print(f"TensorBoard: tensorboard --logdir {result.tensorboard_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
