"""Action wrappers for agents that need a discrete action space."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class TopKSubsetAction(gym.ActionWrapper):
    """``Discrete(2^K)`` actions over subsets of the current Top-K set, for DQN.

    Bit ``k`` of the action (``k = 0`` for the largest gate) computes the
    ``k``-th Top-K expert. Top-K experts that are not computed are replaced by
    a computed one or skipped, whichever the degradation bound prefers; no
    expert outside the Top-K set is ever computed. Action ``2^K - 1`` is
    conventional Top-K routing.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        base = env.unwrapped
        if not isinstance(base.action_space, spaces.MultiBinary):
            raise TypeError(f"TopKSubsetAction wraps a MultiBinary env, got {base.action_space}")
        self.top_k = base.profile.top_k
        self.action_space = spaces.Discrete(2**self.top_k)
        self._bits = (np.arange(2**self.top_k)[:, None] >> np.arange(self.top_k)[None, :]) & 1

    def action(self, action) -> np.ndarray:
        index = np.asarray(action)
        if index.dtype.kind not in "iu" or index.shape not in ((), (1,)):
            raise TypeError(f"invalid action: expected one integer in [0, {self.action_space.n - 1}], "
                            f"got {action!r}")
        value = int(index.reshape(-1)[0])
        if not 0 <= value < self.action_space.n:
            raise ValueError(f"invalid action: expected an integer in [0, {self.action_space.n - 1}], got {value}")
        state = self.env.unwrapped.state
        mask = np.zeros(self.env.unwrapped.num_experts, dtype=np.int8)
        mask[state.top_k[self._bits[value].astype(bool)]] = 1
        return mask

    def action_masks(self) -> np.ndarray:
        """Subsets whose experts all sit on reachable nodes (by the observed CSI); the empty set is always allowed."""
        base = self.env.unwrapped
        reachable = base.reachable_experts()[base.state.top_k]
        needs = self._bits.astype(bool)
        return np.all(~needs | reachable[None, :], axis=1)
