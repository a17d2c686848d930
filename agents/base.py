"""The policy interface shared by the oracle, the baselines and trained agents."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from wide_env.env import WideDecodeEnv


class Policy(abc.ABC):
    """A decision rule for ``WIDE-Decode-v0``.

    ``decide(observation, info)`` takes the observation and ``info`` that the
    environment returned last (from ``reset`` or ``step``) and returns a
    MultiBinary action: an ``int8`` array of shape ``(E,)``, 1 for each
    computed expert. Policies with ``uses_privileged = True`` read
    ``info["privileged"]``; learned agents must not.
    """

    name: str = "policy"
    uses_privileged: bool = False

    def __init__(self, env: WideDecodeEnv):
        base = getattr(env, "unwrapped", env)
        if not isinstance(base, WideDecodeEnv):
            raise TypeError(f"{type(self).__name__} needs a WIDE-Decode-v0 env, got {type(base).__name__}")
        self.env = base
        self.cost_model = base.cost_model
        self.num_experts = base.num_experts

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode; stateless policies ignore it."""

    @abc.abstractmethod
    def decide(self, observation: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        """Return the MultiBinary action for the current step."""

    def _mask_to_action(self, mask: np.ndarray) -> np.ndarray:
        return np.asarray(mask, dtype=np.int8)
