"""A trained Stable-Baselines3 agent as a ``Policy``, and ``ExpertFeatures``, the network input its models use."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from agents.base import Policy
from train import (ALGORITHMS, DISCRETE_SUBSET_ALGORITHMS, MASKED_ALGORITHMS, algorithm_class,
                   normalize_algorithm_name)
from wide_env.env import CHANNEL_OBS_LIMIT
from wide_env.wrappers import TopKSubsetAction

MODEL_FILE = "model.zip"
CONFIG_FILE = "config.yaml"
VECNORMALIZE_FILE = "vecnormalize.pkl"
# CheckpointCallback names a checkpoint "<prefix>_<steps>_steps.zip" and its statistics
# "<prefix>_vecnormalize_<steps>_steps.pkl".
CHECKPOINT_NAME = re.compile(r"^(?P<prefix>.+)_(?P<steps>\d+)_steps$")


class SB3Policy(Policy):
    """Deterministic actions of a model saved by ``wide-train`` (or any SB3 ``.zip`` of a supported algorithm).

    ``path`` is the ``.zip`` file or a run directory that contains ``model.zip``.
    ``algo`` is one of ``train.ALGORITHMS``. When it is ``None``, it is read
    from the ``config.yaml`` that ``wide-train`` writes next to the model, or
    one directory up for checkpoints. Observations are normalised with the saved
    ``VecNormalize`` statistics when the run used them.

    ``decide`` reads the observation only. DQN models choose a subset of the
    current Top-K set, which ``TopKSubsetAction`` turns into the MultiBinary
    action; MaskablePPO models get the env's ``action_masks()``, which depend
    on the observed CSI only. Both read the env's current step, so call
    ``decide`` with the observation the env returned last.
    """

    uses_privileged = False

    def __init__(self, env, path: str | Path, algo: str | None = None, device: str = "cpu"):
        super().__init__(env)
        self.model_path = resolve_model_path(path)
        self.run_config = read_run_config(self.model_path)

        if algo is None:
            if self.run_config is None or "algo" not in self.run_config:
                raise ValueError(
                    f"missing algorithm for {self.model_path}: no {CONFIG_FILE} with an 'algo' entry was found "
                    f"next to it. Pass algo= one of {', '.join(ALGORITHMS)}, or prefix the model spec, "
                    "e.g. 'ppo:runs/ppo-0/model.zip'"
                )
            algo = self.run_config["algo"]
        self.algo = normalize_algorithm_name(algo)
        self.name = f"sb3-{self.algo}"

        self.model = _load_model(self.algo, self.model_path, device)
        self._subset_actions = TopKSubsetAction(self.env) if self.algo in DISCRETE_SUBSET_ALGORITHMS else None
        self._check_spaces()
        self._normalizer = self._load_normalizer()

    def decide(self, observation: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        """Return the model's deterministic action for ``observation``; ``info`` is not read."""
        obs = np.asarray(observation, dtype=np.float32)
        if self._normalizer is not None:
            obs = self._normalizer.normalize_obs(obs).astype(np.float32)

        if self.algo in MASKED_ALGORITHMS:
            action, _ = self.model.predict(obs, deterministic=True, action_masks=self.env.action_masks())
        else:
            action, _ = self.model.predict(obs, deterministic=True)

        if self._subset_actions is not None:
            return self._mask_to_action(self._subset_actions.action(np.asarray(action).reshape(())))
        return self._mask_to_action(np.asarray(action).reshape(self.num_experts))

    # -- loading --------------------------------------------------------------

    def _check_spaces(self) -> None:
        expected_obs = self.env.observation_space
        if self.model.observation_space != expected_obs:
            raise ValueError(
                f"model {self.model_path} expects observation space {self.model.observation_space}, but the env "
                f"has {expected_obs}; was it trained on another scenario?"
            )
        expected_action = (self._subset_actions.action_space if self._subset_actions is not None
                           else self.env.action_space)
        if self.model.action_space != expected_action:
            raise ValueError(
                f"model {self.model_path} ({self.algo}) has action space {self.model.action_space}, but the env "
                f"needs {expected_action}; was it trained on another scenario or with another algorithm?"
            )
        extractor = getattr(self.model.policy, "features_extractor", None)
        if isinstance(extractor, ExpertFeatures):
            trained = {"num_experts": extractor.num_experts, "num_nodes": extractor.num_nodes,
                       "top_k": extractor.top_k, "expert_nodes": extractor.expert_nodes.tolist()}
            expected = expert_features_kwargs(self.env)
            if trained != expected:
                raise ValueError(
                    f"model {self.model_path} was trained for Top-K and placement {trained}, but the env has "
                    f"{expected}; train a model for this scenario"
                )

    def _load_normalizer(self):
        """Load the run's saved VecNormalize statistics, or return ``None`` when the run did not normalise."""
        path = vecnormalize_path(self.model_path)
        trained_with_normalization = bool(self.run_config and self.run_config.get("normalize") is not None)
        if not path.is_file():
            if trained_with_normalization:
                raise FileNotFoundError(
                    f"VecNormalize statistics not found: {path}; the run in {self.model_path.parent} normalised "
                    "observations, so the model needs them"
                )
            return None
        with path.open("rb") as handle:
            normalizer = pickle.load(handle)
        normalizer.training = False
        return normalizer


def resolve_model_path(path: str | Path) -> Path:
    """Find the model file for ``path``: the path itself, ``path + ".zip"``, or ``model.zip`` inside a directory.

    Raises ``FileNotFoundError`` naming the path when no model file exists.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
    elif path.suffix != ".zip" and path.with_name(path.name + ".zip").is_file():
        candidate = path.with_name(path.name + ".zip")
    else:
        candidate = path
    if not candidate.is_file():
        raise FileNotFoundError(f"SB3 model file not found: {candidate}")
    return candidate


def read_run_config(model_path: Path) -> dict[str, Any] | None:
    """Read the ``config.yaml`` of the run that saved ``model_path``, or return ``None`` when there is none."""
    for directory in (model_path.parent, model_path.parent.parent):
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            with config_path.open("r", encoding="utf-8") as handle:
                values = yaml.safe_load(handle)
            if not isinstance(values, dict):
                raise ValueError(f"invalid {config_path}: expected a YAML mapping, got {type(values).__name__}")
            return values
    return None


def vecnormalize_path(model_path: Path) -> Path:
    """Return the path where ``wide-train`` saves the VecNormalize statistics of ``model_path``."""
    match = CHECKPOINT_NAME.match(model_path.stem)
    if match:
        return model_path.with_name(f"{match['prefix']}_vecnormalize_{match['steps']}_steps.pkl")
    return model_path.with_name(VECNORMALIZE_FILE)


def _load_model(algo: str, model_path: Path, device: str):
    try:
        return algorithm_class(algo).load(str(model_path), device=device)
    except (KeyError, RuntimeError, TypeError, AttributeError, ValueError) as error:
        raise ValueError(f"could not load {model_path} as a {algo} model: {error}") from error


class ExpertFeatures(BaseFeaturesExtractor):
    """Network input: the observation plus per-expert features computed from it.

    Each expert ``e`` gets three features: whether its gate is among the
    ``top_k`` largest, the standardised channel of its node, and their product.
    One more feature is the worst channel among the Top-K experts' nodes, and
    ``num_layers > 0`` adds a one-hot MoE layer index. A plain MLP learns
    gate ranking and the expert-to-node lookup slowly from the raw observation,
    so these fixed operations are done here. They use only the observation and
    the scenario's placement. Experts at the source get the channel
    ``CHANNEL_OBS_LIMIT`` because they are always reachable. Observations must
    not be normalised per entry, because that changes the order of the gates.
    """

    def __init__(self, observation_space: spaces.Box, num_experts: int, num_nodes: int, top_k: int,
                 expert_nodes: list[int], num_layers: int = 0):
        if len(expert_nodes) != num_experts:
            raise ValueError(f"expert_nodes needs one node per expert ({num_experts}), got {len(expert_nodes)}")
        if observation_space.shape[0] < num_experts + num_nodes:
            raise ValueError(f"observation of size {observation_space.shape[0]} is too small for {num_experts} "
                             f"gates and {num_nodes} channels")
        super().__init__(observation_space,
                         features_dim=observation_space.shape[0] + 3 * num_experts + 1 + num_layers)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.num_nodes = num_nodes
        self.top_k = top_k
        # Column of each expert's channel in [source constant, node 1, ..., node N].
        self.register_buffer("expert_nodes", torch.as_tensor(expert_nodes, dtype=torch.long))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        gates = observations[:, :self.num_experts]
        channels = observations[:, self.num_experts:self.num_experts + self.num_nodes]
        source = torch.full_like(channels[:, :1], CHANNEL_OBS_LIMIT)
        expert_channels = torch.cat([source, channels], dim=1)[:, self.expert_nodes]

        kth_largest = torch.topk(gates, self.top_k, dim=1).values[:, -1:]
        in_top_k = (gates >= kth_largest).to(observations.dtype)
        worst_top_k = torch.where(in_top_k > 0, expert_channels, torch.full_like(expert_channels, CHANNEL_OBS_LIMIT))
        worst_top_k = worst_top_k.min(dim=1, keepdim=True).values
        parts = [observations, in_top_k, expert_channels, in_top_k * expert_channels, worst_top_k]
        if self.num_layers:
            position = observations[:, self.num_experts + self.num_nodes]
            layer = torch.round(position * self.num_layers).long().clamp(0, self.num_layers - 1)
            parts.append(torch.nn.functional.one_hot(layer, self.num_layers).to(observations.dtype))
        return torch.cat(parts, dim=1)


def expert_features_kwargs(env) -> dict[str, Any]:
    """``features_extractor_kwargs`` of ``ExpertFeatures`` for a ``WIDE-Decode-v0`` env."""
    base = env.unwrapped
    return {"num_experts": int(base.num_experts), "num_nodes": int(base.num_nodes),
            "top_k": int(base.profile.top_k), "expert_nodes": [int(n) for n in base.cost_model.expert_nodes]}
