"""Training of Stable-Baselines3 agents on ``WIDE-Decode-v0``.

``ALGORITHMS`` lists the algorithm names that ``wide-train --algo`` and
``SB3Policy`` accept. The SB3 classes are imported on first use, so importing
this package stays cheap.
"""

from __future__ import annotations

import importlib

# Algorithm name -> (module, class). DQN acts through TopKSubsetAction, the others on MultiBinary(E).
ALGORITHMS: dict[str, tuple[str, str]] = {
    "ppo": ("stable_baselines3", "PPO"),
    "a2c": ("stable_baselines3", "A2C"),
    "dqn": ("stable_baselines3", "DQN"),
    "maskable_ppo": ("sb3_contrib", "MaskablePPO"),
}

# Algorithms whose action space is Discrete(2^K) over Top-K subsets instead of MultiBinary(E).
DISCRETE_SUBSET_ALGORITHMS = frozenset({"dqn"})

# Algorithms that need the environment's action masks at every step.
MASKED_ALGORITHMS = frozenset({"maskable_ppo"})


def normalize_algorithm_name(name: str) -> str:
    """Return the canonical algorithm name: lower case, ``-`` read as ``_`` (``MaskablePPO`` also works).

    Raises ``ValueError`` listing the allowed names when ``name`` is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"algorithm name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key == "maskableppo":
        key = "maskable_ppo"
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: expected one of {', '.join(ALGORITHMS)}")
    return key


def algorithm_class(name: str) -> type:
    """Import and return the SB3 class of an algorithm name, e.g. ``PPO`` for ``"ppo"``."""
    module_name, class_name = ALGORITHMS[normalize_algorithm_name(name)]
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["ALGORITHMS", "DISCRETE_SUBSET_ALGORITHMS", "MASKED_ALGORITHMS", "algorithm_class",
           "normalize_algorithm_name"]
