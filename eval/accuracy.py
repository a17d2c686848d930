"""Measured accuracy: apply each policy's decisions inside the real small MoE model.

For every window of held-out text, the environment replays the model's own
router logits and the policy decides for each (token, MoE layer) step. A
forward pass of the model then applies the decisions. Each computed Top-K
expert keeps its weight. Each dropped one moves its weight to the computed
expert with the smallest replacement cost when that beats skipping, and is
skipped otherwise, which is the rule behind ``delta``. Experts on a node that
missed the latency budget count as not computed, as in the environment.

A decision changes the hidden state, so the router logits of later layers
change too, and the policy should have decided on those. The evaluation
therefore repeats: decide on the current logits, run the model with the
decisions, and replay the new logits, until the logits no longer change.
For a policy whose decision depends only on the current step, layer ``l`` is
final after ``l + 1`` rounds, because layer ``l``'s input depends only on the
decisions of layers below it. The channel repeats exactly in every round
because each episode restarts from the same seed.

The environment runs with the scenario's settings except that it replays the
model's trace (``gate_source="trace"``) and has the model's number of MoE
layers, so that every decision applies to exactly one layer of the model.
The energy columns refer to that environment.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from agents import make_policy
from agents.base import Policy
from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.env import WideDecodeEnv
from wide_env.measure import decision_weights, relative_deviation, routing_of, top_k_dense
from wide_env.moe_lm import MoELanguageModel, load_checkpoint
from wide_env.trace import Trace, TraceGateSource, check_trace_fits, load_trace, make_header, scenario_trace_path

logger = logging.getLogger(__name__)

# Signature of ``agents.make_policy``: (spec, env, seed) -> Policy.
PolicyFactory = Callable[[str, WideDecodeEnv, int], Policy]
# Slack when comparing a measured deviation with its bound.
BOUND_TOLERANCE = 1e-5


@dataclass
class PolicyAccuracy:
    """Measured accuracy of one policy against Top-K routing on the same held-out tokens.

    Cross-entropies are in nats per token. Deviations and bounds are means over
    (token, layer) pairs, in units of the token's Top-K layer output.
    """

    policy: str
    tokens: int
    cross_entropy: float
    cross_entropy_increase: float
    perplexity: float
    perplexity_increase: float
    perplexity_increase_percent: float
    top1_agreement: float
    mean_deviation: float
    mean_bound: float
    bound_held_rate: float
    accuracy_violation_rate: float
    latency_violation_rate: float
    energy_ratio: float  # policy energy / Top-K energy on the same steps
    experts_computed: float  # mean per step
    rounds: int  # most decide-and-run rounds any window needed
    converged: bool  # every window reached logits that no longer change

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AccuracyReport:
    """Measured accuracy of several policies, with the Top-K reference."""

    scenario: ScenarioConfig
    checkpoint: str
    tokens: int
    top_k_cross_entropy: float
    top_k_perplexity: float
    policies: list[PolicyAccuracy] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        return [p.as_row() for p in self.policies]

    def by_policy(self) -> dict[str, PolicyAccuracy]:
        return {p.policy: p for p in self.policies}

    def format_table(self) -> str:
        lines = [f"measured accuracy on {self.tokens} held-out tokens of {self.checkpoint}: Top-K perplexity "
                 f"{self.top_k_perplexity:.3f} ({self.top_k_cross_entropy:.4f} nats/token)",
                 f"{'policy':<16}{'ppl +':>9}{'ppl +%':>9}{'CE +':>9}{'top-1 agree':>13}{'deviation':>11}"
                 f"{'bound':>9}{'held':>8}{'energy/topk':>13}"]
        for p in self.policies:
            lines.append(f"{p.policy:<16}{p.perplexity_increase:>9.4f}{p.perplexity_increase_percent:>8.2f}%"
                         f"{p.cross_entropy_increase:>9.4f}{p.top1_agreement:>12.2%} {p.mean_deviation:>10.4f}"
                         f"{p.mean_bound:>9.4f}{p.bound_held_rate:>8.2%}{p.energy_ratio:>13.3f}")
        return "\n".join(lines)


@dataclass
class _WindowDecisions:
    computed: np.ndarray  # (T, L, E) bool, experts that arrived in time
    bound: np.ndarray  # (T, L)
    accuracy_violation: np.ndarray  # (T, L) bool
    latency_violation: np.ndarray  # (T, L) bool
    energy_j: np.ndarray  # (T, L)
    top_k_energy_j: np.ndarray  # (T, L)


@dataclass
class _PolicyTotals:
    nll: float = 0.0
    agree: int = 0
    tokens: int = 0
    deviation: list = field(default_factory=list)
    bound: list = field(default_factory=list)
    accuracy_violation: list = field(default_factory=list)
    latency_violation: list = field(default_factory=list)
    energy_j: float = 0.0
    top_k_energy_j: float = 0.0
    experts: list = field(default_factory=list)
    rounds: int = 0
    converged: bool = True


def accuracy_scenario(scenario: ScenarioConfig, trace_path: Path, num_layers: int) -> ScenarioConfig:
    """Return the scenario of the measured-accuracy runs: ``scenario`` with the model's trace and layer count."""
    return scenario.replace(gate_source="trace", gate_trace_path=str(trace_path), num_layers=num_layers)


def _model_for_trace(trace: Trace, trace_path: Path, checkpoint: str | Path | None) -> tuple[MoELanguageModel, Path]:
    path = Path(checkpoint) if checkpoint is not None else trace_path.parent / str(trace.model.get("checkpoint", ""))
    if checkpoint is None and not trace.model.get("checkpoint"):
        raise ValueError(f"trace {trace_path} names no model checkpoint; pass checkpoint=")
    model, _ = load_checkpoint(path)
    config = model.config
    shape = (config.num_layers, config.num_experts, config.top_k, config.renormalize)
    expected = (trace.num_layers, trace.num_experts, trace.top_k, trace.renormalize)
    if shape != expected:
        raise ValueError(f"model checkpoint {path} has (layers, experts, top_k, renormalize) = {shape}, but trace "
                         f"{trace_path} was recorded with {expected}")
    return model, path


def _decide_window(env: WideDecodeEnv, source: TraceGateSource, live_logits: np.ndarray, make: Callable[[], Policy],
                   episode_seeds: Sequence[int]) -> _WindowDecisions:
    """Run the policy on the environment over one window whose router logits are ``live_logits`` (T, L, E)."""
    tokens, layers, experts = live_logits.shape
    source.trace = Trace(router_logits=live_logits, header=source.trace.header)
    result = _WindowDecisions(np.zeros((tokens, layers, experts), dtype=bool), np.zeros((tokens, layers)),
                              np.zeros((tokens, layers), dtype=bool), np.zeros((tokens, layers), dtype=bool),
                              np.zeros((tokens, layers)), np.zeros((tokens, layers)))
    per_episode = env.scenario.tokens_per_episode
    expert_nodes = env.cost_model.expert_nodes
    policy = make()
    for episode, first in enumerate(range(0, tokens, per_episode)):
        source.seek(first)
        observation, info = env.reset(seed=int(episode_seeds[episode]))
        policy.reset(seed=int(episode_seeds[episode]))
        steps = min(per_episode, tokens - first) * layers
        for _ in range(steps):
            state = info["privileged"]["state"]
            action = np.asarray(policy.decide(observation, info)).astype(bool)
            observation, _, _, _, info = env.step(action)
            token, layer = first + state.token, state.layer
            failed = np.isin(expert_nodes, info["failed_nodes"])
            result.computed[token, layer] = action & ~failed
            result.bound[token, layer] = info["degradation"]
            result.accuracy_violation[token, layer] = info["accuracy_violation"]
            result.latency_violation[token, layer] = info["latency_violation"]
            result.energy_j[token, layer] = info["energy_j"]
            result.top_k_energy_j[token, layer] = info["topk_energy_j"]
    return result


def _top_k_routing(top_k: int, renormalize: bool):
    """Routing override for plain Top-K, with weights computed in float64 like ``_decision_routing``'s."""

    def override(layer: int, router_logits: torch.Tensor) -> torch.Tensor:
        logits = router_logits.reshape(-1, router_logits.shape[-1]).numpy()
        _, indices, weights = routing_of(logits, top_k, renormalize)
        dense = top_k_dense(indices, weights, logits.shape[-1])
        return torch.from_numpy(dense).float().reshape(router_logits.shape)

    return override


def _decision_routing(profile, decisions: np.ndarray, top_k: int, renormalize: bool):
    """Routing override that applies ``decisions`` (T, L, E) to a batch of one window."""

    def override(layer: int, router_logits: torch.Tensor) -> torch.Tensor:
        logits = router_logits[0].numpy()
        _, indices, weights = routing_of(logits, top_k, renormalize)
        dense, _ = decision_weights(profile.skip_cost[layer], profile.replace_cost[layer], indices, weights,
                                    decisions[:, layer])
        return torch.from_numpy(dense).float()[None]

    return override


def _layer_deviations(model: MoELanguageModel, moe_inputs: list[torch.Tensor], router_logits: list[torch.Tensor],
                      decisions: np.ndarray, profile) -> np.ndarray:
    """Relative deviation ``||y_A - y_K|| / ||y_K||`` of every (token, layer) on the layer's actual input."""
    config = model.config
    deviations = np.zeros(decisions.shape[:2])
    for layer, block in enumerate(model.blocks):
        with torch.no_grad():
            outputs = block.moe.all_expert_outputs(moe_inputs[layer][0]).double().numpy()
        _, indices, weights = routing_of(router_logits[layer][0].numpy(), config.top_k, config.renormalize)
        dense, _ = decision_weights(profile.skip_cost[layer], profile.replace_cost[layer], indices, weights,
                                    decisions[:, layer])
        deviations[:, layer] = relative_deviation(outputs, dense, top_k_dense(indices, weights, config.num_experts))
    return deviations


def measure_policy_accuracy(policy_specs: Sequence[str],
                            scenario: ScenarioConfig | Mapping[str, Any] | str | Path | None = None, *,
                            checkpoint: str | Path | None = None, tokens: int = 1024, window: int | None = None,
                            seed: int = 0, policy_factory: PolicyFactory | None = None,
                            max_rounds: int | None = None) -> AccuracyReport:
    """Measure each policy's next-token accuracy inside the small MoE model that produced the scenario's trace.

    ``scenario`` is anything ``resolve_scenario`` accepts. Its trace is
    ``gate_trace_path`` or the preset's built-in trace. The model is
    ``checkpoint`` or the checkpoint that the trace header names, in the
    trace's folder. ``tokens`` held-out tokens from the trace are cut into windows of
    ``window`` tokens (default: the model's context length). ``policy_factory``
    replaces ``agents.make_policy``; a fresh policy is built for every round.
    ``max_rounds`` caps the decide-and-run rounds per window (default: layers + 2).

    Raises ``ValueError`` naming the file when the trace does not fit the
    scenario, or the checkpoint does not fit the trace.
    """
    started = time.perf_counter()
    base = resolve_scenario(scenario)
    trace_path = scenario_trace_path(base.replace(gate_source="trace"))
    trace = load_trace(trace_path)
    check_trace_fits(trace, base.architecture, str(trace_path))
    model, model_path = _model_for_trace(trace, trace_path, checkpoint)
    config = model.config
    if trace.token_ids is None:
        raise ValueError(f"trace {trace_path} has no token_ids, so there is no held-out text to evaluate on")
    window = int(window or config.context_length)
    if not 1 <= window <= config.context_length:
        raise ValueError(f"invalid window {window}: expected 1 to the context length {config.context_length}")
    num_windows = min(tokens, len(trace.token_ids) - 1) // window
    if num_windows < 1:
        raise ValueError(f"tokens={tokens} is less than one window of {window} tokens")
    rounds_cap = int(max_rounds or config.num_layers + 2)
    factory = make_policy if policy_factory is None else policy_factory

    run_scenario = accuracy_scenario(base, trace_path, config.num_layers)
    env = WideDecodeEnv(run_scenario)
    profile = env.profile
    source = TraceGateSource(Trace(np.zeros((window, config.num_layers, config.num_experts), np.float32),
                                   make_header(trace.model)), config.num_layers, run_scenario.tokens_per_episode)
    # NOTE: this swaps the environment's gate_source attribute, which WideDecodeEnv reads in
    # reset() and at each new token. The profile stays the one built from the trace file.
    env.gate_source = source

    text = np.asarray(trace.token_ids[:num_windows * window + 1], dtype=np.int64)
    inputs = torch.from_numpy(text[:-1].reshape(num_windows, window))
    targets = torch.from_numpy(text[1:].reshape(num_windows, window))
    # The reference runs through the same float64 weight computation as the decisions, so that
    # a decision equal to Top-K reproduces the reference bit for bit.
    with torch.no_grad():
        reference = model(inputs, routing=_top_k_routing(config.top_k, config.renormalize))
    reference_logits = reference.logits
    reference_nll = torch.nn.functional.cross_entropy(reference_logits.reshape(-1, config.vocab_size),
                                                      targets.reshape(-1), reduction="sum").item()
    reference_top1 = reference_logits.argmax(-1)
    reference_router = torch.stack(reference.router_logits, dim=2).numpy()  # (W, T, L, E)
    total_tokens = num_windows * window
    report = AccuracyReport(scenario=run_scenario, checkpoint=str(model_path), tokens=total_tokens,
                            top_k_cross_entropy=reference_nll / total_tokens,
                            top_k_perplexity=math.exp(reference_nll / total_tokens))

    episodes = -(-window // run_scenario.tokens_per_episode)
    for spec in policy_specs:
        totals = _PolicyTotals()
        for w in range(num_windows):
            seeds = [seed * 1_000_003 + w * episodes + e for e in range(episodes)]
            live = reference_router[w].astype(np.float64)
            for round_index in range(1, rounds_cap + 1):
                decisions = _decide_window(env, source, live, lambda: factory(spec, env, seed), seeds)
                routing = _decision_routing(profile, decisions.computed, config.top_k, config.renormalize)
                with torch.no_grad():
                    out = model(inputs[w:w + 1], routing=routing, capture=True)
                new_live = torch.stack(out.router_logits, dim=2)[0].double().numpy()
                if np.array_equal(new_live, live):
                    break
                live = new_live
            else:
                totals.converged = False
                logger.warning("policy %s, window %d: router logits still changed after %d rounds; the last "
                               "decisions were applied to logits they were not made on", spec, w, rounds_cap)
            totals.rounds = max(totals.rounds, round_index)
            totals.nll += torch.nn.functional.cross_entropy(out.logits[0], targets[w], reduction="sum").item()
            totals.agree += int((out.logits[0].argmax(-1) == reference_top1[w]).sum())
            totals.tokens += window
            deviation = _layer_deviations(model, out.moe_inputs, out.router_logits, decisions.computed, profile)
            totals.deviation.append(deviation.ravel())
            totals.bound.append(decisions.bound.ravel())
            totals.accuracy_violation.append(decisions.accuracy_violation.ravel())
            totals.latency_violation.append(decisions.latency_violation.ravel())
            totals.energy_j += float(decisions.energy_j.sum())
            totals.top_k_energy_j += float(decisions.top_k_energy_j.sum())
            totals.experts.append(decisions.computed.sum(axis=-1).ravel())
        report.policies.append(_summarise(spec, totals, report))
        logger.info("measured accuracy of %s: perplexity +%.4f, %d rounds at most, %.1f s since start", spec,
                    report.policies[-1].perplexity_increase, totals.rounds, time.perf_counter() - started)
    env.close()
    return report


def _summarise(name: str, totals: _PolicyTotals, report: AccuracyReport) -> PolicyAccuracy:
    cross_entropy = totals.nll / totals.tokens
    perplexity = math.exp(cross_entropy)
    deviation = np.concatenate(totals.deviation)
    bound = np.concatenate(totals.bound)
    return PolicyAccuracy(
        policy=name, tokens=totals.tokens, cross_entropy=cross_entropy,
        cross_entropy_increase=cross_entropy - report.top_k_cross_entropy, perplexity=perplexity,
        perplexity_increase=perplexity - report.top_k_perplexity,
        perplexity_increase_percent=100.0 * (perplexity / report.top_k_perplexity - 1.0),
        top1_agreement=totals.agree / totals.tokens, mean_deviation=float(deviation.mean()),
        mean_bound=float(bound.mean()), bound_held_rate=float(np.mean(deviation <= bound + BOUND_TOLERANCE)),
        accuracy_violation_rate=float(np.concatenate(totals.accuracy_violation).mean()),
        latency_violation_rate=float(np.concatenate(totals.latency_violation).mean()),
        energy_ratio=totals.energy_j / totals.top_k_energy_j if totals.top_k_energy_j > 0 else math.nan,
        experts_computed=float(np.concatenate(totals.experts).mean()), rounds=totals.rounds,
        converged=totals.converged)


__all__ = ["AccuracyReport", "PolicyAccuracy", "accuracy_scenario", "measure_policy_accuracy"]
