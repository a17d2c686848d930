"""Policies for WIDE-Decode-v0: the SiftMoE oracle, baselines and trained SB3 agents."""

from __future__ import annotations

from pathlib import Path

from agents.base import Policy

# Built-in policy names accepted by make_policy; a path to a saved SB3 model (.zip) is also accepted.
POLICY_NAMES = ("oracle", "oracle-observed", "topk", "random", "greedy", "exhaustive")


def make_policy(spec: str, env, seed: int | None = None, **kwargs) -> Policy:
    """Build a policy bound to ``env`` from a name in ``POLICY_NAMES`` or a saved SB3 model path.

    A model path may carry the algorithm as a prefix, ``ppo:runs/ppo/model.zip``;
    otherwise the algorithm is read from the ``config.yaml`` next to the model.
    """
    if not isinstance(spec, str):
        raise TypeError(f"policy spec must be a string, got {type(spec).__name__}")
    if spec in ("oracle", "oracle-observed"):
        from agents.oracle import SiftMoEPolicy

        return SiftMoEPolicy(env, csi="observed" if spec == "oracle-observed" else "true", **kwargs)
    if spec == "topk":
        from agents.baselines import TopKPolicy

        return TopKPolicy(env)
    if spec == "random":
        from agents.baselines import RandomSubsetPolicy

        return RandomSubsetPolicy(env, seed=seed)
    if spec == "greedy":
        from agents.baselines import GreedyChannelPolicy

        return GreedyChannelPolicy(env)
    if spec == "exhaustive":
        from agents.exhaustive import ExhaustivePolicy

        return ExhaustivePolicy(env)

    algo, _, path = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else ("", "", spec)
    if path.endswith(".zip") or Path(path).suffix == ".zip" or Path(path).is_dir():
        from agents.sb3_policy import SB3Policy

        return SB3Policy(env, path, algo=algo or None, **kwargs)
    raise ValueError(
        f"unknown policy {spec!r}: expected one of {', '.join(POLICY_NAMES)} "
        "or a path to a saved SB3 model (.zip), optionally prefixed with the algorithm, e.g. 'ppo:runs/model.zip'"
    )


__all__ = ["Policy", "POLICY_NAMES", "make_policy"]
