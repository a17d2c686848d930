"""Skip and replacement costs measured from a model's experts, and how often the bound held.

Cost estimation, per MoE layer, on calibration tokens ``x``, with ``y_K(x)``
the layer's Top-K output for token ``x``:

- ``s_i`` is the ``q``-quantile of ``||E_i(x)|| / ||y_K(x)||`` over the tokens
  whose Top-K set contains ``i``;
- ``r_ij`` is the larger of two ``q``-quantiles of
  ``||E_i(x) - E_j(x)|| / ||y_K(x)||``, one over the tokens that route to ``i``
  and one over those that route to ``j``. Taking the larger one makes the
  table symmetric, and it is then capped at ``s_i + s_j``.

Both are in units of the token's own Top-K output, so skipping all of Top-K
deviates by exactly 1 and its bound is at least 1 for most tokens.

An expert routed to by fewer than ``MIN_ROUTED_TOKENS`` calibration tokens
uses all calibration tokens instead.

The bound check applies a decision ``A`` to one layer: each dropped Top-K
expert moves its weight to the computed expert with the smallest ``r_ij``
when that is below ``s_i``, and is skipped otherwise, exactly as the bound
``delta(A)`` assumes. The measured relative deviation is
``||y_A(x) - y_K(x)|| / ||y_K(x)||``, and the bound held when it is at most
``delta(A)``. By the triangle inequality it held whenever every dropped
expert's distance ratio was within its table entry.

Run ``python -m wide_env.measure`` for the report on the built-in trace.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from wide_env.config import ScenarioConfig, resolve_scenario
from wide_env.profile import softmax, top_k_weights
from wide_env.trace import (
    BUILTIN_TRACES,
    MoEAccess,
    RecordedRun,
    Trace,
    check_trace_fits,
    load_trace,
    record_run,
    trace_layer_map,
    trace_profile,
)

logger = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.99
MIN_ROUTED_TOKENS = 32
# Calibration tokens used per layer; more only cost memory (tokens x E x d floats).
DEFAULT_CALIBRATION_TOKENS = 8192
# A relative deviation counts as within the bound up to this absolute slack.
BOUND_TOLERANCE = 1e-5


@dataclass
class CostTables:
    """Measured cost tables of every MoE layer and how they were estimated."""

    skip_cost: np.ndarray  # (L, E)
    replace_cost: np.ndarray  # (L, E, E)
    output_scale: np.ndarray  # (L,) median Top-K output norm, for information
    routed_tokens: np.ndarray  # (L, E) calibration tokens whose Top-K set contains each expert
    quantile: float
    num_tokens: int

    def describe(self) -> dict[str, Any]:
        """Plain metadata for a trace header."""
        return {"method": "quantile over calibration tokens of expert output norms and distances, "
                          "each relative to the token's Top-K output norm",
                "quantile": self.quantile, "calibration_tokens": self.num_tokens,
                "min_routed_tokens": MIN_ROUTED_TOKENS, "output_scale": self.output_scale.tolist(),
                "min_routed_tokens_per_expert": int(self.routed_tokens.min())}


def routing_of(logits: np.ndarray, top_k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gate probabilities, Top-K indices and weights of logits ``(n, E)``, computed as the environment does."""
    gates = softmax(np.asarray(logits, dtype=np.float64))
    indices, weights = top_k_weights(gates, top_k, renormalize)
    return gates, indices, weights


def _spread_indices(total: int, count: int) -> np.ndarray:
    """``count`` evenly spread indices of ``range(total)`` (all of them when ``count >= total``)."""
    if count >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def _layer_outputs(access: MoEAccess, layer: int, inputs: np.ndarray, chunk: int = 1024) -> np.ndarray:
    import torch

    parts = [access.expert_outputs(layer, torch.from_numpy(np.ascontiguousarray(inputs[s:s + chunk]))).numpy()
             for s in range(0, len(inputs), chunk)]
    return np.concatenate(parts).astype(np.float64)


def _pairwise_distances(outputs: np.ndarray) -> np.ndarray:
    """``||E_i(x) - E_j(x)||`` for every token: ``(n, E, d)`` in, ``(n, E, E)`` out."""
    squared = np.einsum("ned,ned->ne", outputs, outputs)
    gram = np.einsum("nid,njd->nij", outputs, outputs)
    distances = np.sqrt(np.maximum(squared[:, :, None] + squared[:, None, :] - 2.0 * gram, 0.0))
    index = np.arange(outputs.shape[1])
    distances[:, index, index] = 0.0
    return distances


def estimate_layer_costs(outputs: np.ndarray, top_indices: np.ndarray, top_weights: np.ndarray,
                         quantile: float) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Skip costs ``(E,)``, replacement costs ``(E, E)``, output scale and routed counts of one layer.

    ``outputs`` is ``(n, E, d)``, the output of every expert for each calibration token.
    """
    tokens, num_experts, _ = outputs.shape
    rows = np.arange(tokens)[:, None]
    top_norm = np.linalg.norm(np.einsum("nk,nkd->nd", top_weights, outputs[rows, top_indices]), axis=-1)
    scale = float(np.median(top_norm))
    if not np.all(top_norm > 0):
        raise ValueError("the Top-K layer output is zero for some calibration tokens; cannot normalise the costs")

    norms = np.linalg.norm(outputs, axis=-1) / top_norm[:, None]
    distances = _pairwise_distances(outputs) / top_norm[:, None, None]
    routed = np.zeros((tokens, num_experts), dtype=bool)
    routed[rows, top_indices] = True
    counts = routed.sum(axis=0)

    skip = np.empty(num_experts)
    directed = np.empty((num_experts, num_experts))
    for expert in range(num_experts):
        chosen = routed[:, expert] if counts[expert] >= MIN_ROUTED_TOKENS else np.ones(tokens, dtype=bool)
        skip[expert] = np.quantile(norms[chosen, expert], quantile)
        directed[expert] = np.quantile(distances[chosen, expert, :], quantile, axis=0)
    replace = np.maximum(directed, directed.T)
    replace = np.minimum(replace, skip[:, None] + skip[None, :])
    np.fill_diagonal(replace, 0.0)
    return skip, replace, scale, counts


def estimate_cost_tables(access: MoEAccess, calibration: RecordedRun, quantile: float = DEFAULT_QUANTILE,
                         max_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> CostTables:
    """Measure skip and replacement costs of every MoE layer on a run recorded with ``keep_inputs``."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"invalid quantile: expected a value in (0, 1], got {quantile!r}")
    if calibration.inputs is None:
        raise ValueError("the calibration run has no layer inputs; record it with keep_inputs=True")
    chosen = _spread_indices(len(calibration.router_logits), max_tokens)
    skips, replaces, scales, counts = [], [], [], []
    for layer in range(access.num_layers):
        _, indices, weights = routing_of(calibration.router_logits[chosen, layer], access.top_k, access.renormalize)
        outputs = _layer_outputs(access, layer, calibration.inputs[chosen, layer])
        skip, replace, scale, routed = estimate_layer_costs(outputs, indices, weights, quantile)
        skips.append(skip)
        replaces.append(replace)
        scales.append(scale)
        counts.append(routed)
    return CostTables(skip_cost=np.stack(skips), replace_cost=np.stack(replaces), output_scale=np.array(scales),
                      routed_tokens=np.stack(counts), quantile=float(quantile), num_tokens=int(len(chosen)))


# -- applying decisions to one layer ------------------------------------------------


def decision_weights(skip: np.ndarray, replace: np.ndarray, top_indices: np.ndarray, top_weights: np.ndarray,
                     computed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expert weights after a decision, and its bound ``delta``, for ``n`` tokens of one layer.

    ``skip`` is ``(E,)``, ``replace`` ``(E, E)``, ``top_indices``/``top_weights``
    ``(n, K)`` and ``computed`` a boolean ``(n, E)`` mask. Returns dense weights
    ``(n, E)``: a computed Top-K expert keeps its weight, a dropped one gives it
    to the computed expert with the smallest replacement cost when that is
    below its skip cost, and loses it otherwise. Ties go to skipping, which
    gives the same ``delta``.
    """
    computed = np.asarray(computed, dtype=bool)
    tokens, num_experts = computed.shape
    rows = np.arange(tokens)
    weights = np.zeros((tokens, num_experts))
    bound = np.zeros(tokens)
    for k in range(top_indices.shape[1]):
        expert = top_indices[:, k]
        weight = top_weights[:, k]
        kept = computed[rows, expert]
        candidates = np.where(computed, replace[expert], np.inf)
        replacement = np.argmin(candidates, axis=1)
        replace_cost = candidates[rows, replacement]
        moved = ~kept & (replace_cost < skip[expert])
        np.add.at(weights, (rows[kept], expert[kept]), weight[kept])
        np.add.at(weights, (rows[moved], replacement[moved]), weight[moved])
        bound += np.where(kept, 0.0, weight * np.minimum(skip[expert], replace_cost))
    return weights, bound


def top_k_dense(top_indices: np.ndarray, top_weights: np.ndarray, num_experts: int) -> np.ndarray:
    dense = np.zeros((len(top_indices), num_experts))
    np.put_along_axis(dense, top_indices, top_weights, axis=1)
    return dense


def relative_deviation(outputs: np.ndarray, weights: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``||y_A - y_K|| / ||y_K||`` per token, with ``y = sum_e weights[e] * outputs[e]`` and ``outputs`` ``(n, E, d)``."""
    difference = np.einsum("ne,ned->nd", weights - reference, outputs)
    reference_norm = np.linalg.norm(np.einsum("ne,ned->nd", reference, outputs), axis=-1)
    return np.linalg.norm(difference, axis=-1) / reference_norm


# -- bound report -------------------------------------------------------------------

# A decider maps (cost model, step state, generator) to the boolean mask of computed experts.
Decider = Callable[[Any, Any, np.random.Generator], np.ndarray]


def oracle_decider(cost_model, state, rng) -> np.ndarray:
    from agents.oracle import solve_step  # the wide_env package does not import agents at load time

    return solve_step(cost_model, state).x


def random_top_k_decider(cost_model, state, rng) -> np.ndarray:
    """Draw a uniformly random subset of the Top-K experts, like the ``random`` baseline policy."""
    mask = np.zeros(cost_model.num_experts, dtype=bool)
    mask[state.top_k] = rng.integers(0, 2, size=len(state.top_k)).astype(bool)
    return mask


def random_any_decider(cost_model, state, rng) -> np.ndarray:
    """Draw a uniformly random subset of all experts, so that replacements from outside Top-K occur."""
    return rng.integers(0, 2, size=cost_model.num_experts).astype(bool)


DEFAULT_DECIDERS: dict[str, Decider] = {"oracle": oracle_decider, "random": random_top_k_decider,
                                        "random-any": random_any_decider}


@dataclass
class BoundStats:
    """How often ``deviation <= delta`` held for one decision rule, over (token, layer) pairs."""

    name: str
    pairs: int
    held: int
    dropping_pairs: int  # pairs whose decision drops at least one Top-K expert
    dropping_held: int
    mean_bound: float
    mean_deviation: float
    mean_bound_dropping: float
    mean_deviation_dropping: float
    accuracy_violations: int  # pairs with delta above the scenario's budget
    worst_excess: float  # largest deviation - delta

    @property
    def held_rate(self) -> float:
        return self.held / self.pairs if self.pairs else float("nan")

    @property
    def dropping_held_rate(self) -> float:
        return self.dropping_held / self.dropping_pairs if self.dropping_pairs else float("nan")

    def as_row(self) -> dict[str, Any]:
        return {"decisions": self.name, "pairs": self.pairs, "bound_held_rate": self.held_rate,
                "dropping_pairs": self.dropping_pairs, "dropping_bound_held_rate": self.dropping_held_rate,
                "mean_bound": self.mean_bound, "mean_deviation": self.mean_deviation,
                "mean_bound_dropping": self.mean_bound_dropping,
                "mean_deviation_dropping": self.mean_deviation_dropping,
                "accuracy_violations": self.accuracy_violations, "worst_excess": self.worst_excess}


@dataclass
class BoundReport:
    """Bound-held statistics of several decision rules on the same held-out pairs."""

    scenario: ScenarioConfig
    tokens: int
    layers: int
    stats: list[BoundStats] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        return [s.as_row() for s in self.stats]

    def format_table(self) -> str:
        lines = [f"bound check on {self.tokens} held-out tokens x {self.layers} layers, "
                 f"scenario {self.scenario.moe_preset}, accuracy budget {self.scenario.accuracy_budget:g}",
                 f"{'decisions':<12}{'pairs':>8}{'held':>9}{'dropping':>10}{'held':>9}"
                 f"{'mean delta':>12}{'mean dev':>10}{'delta|drop':>12}{'dev|drop':>10}{'worst':>9}{'over eps':>10}"]
        for s in self.stats:
            lines.append(f"{s.name:<12}{s.pairs:>8}{s.held_rate:>9.2%}{s.dropping_pairs:>10}"
                         f"{s.dropping_held_rate:>9.2%}{s.mean_bound:>12.4f}{s.mean_deviation:>10.4f}"
                         f"{s.mean_bound_dropping:>12.4f}{s.mean_deviation_dropping:>10.4f}{s.worst_excess:>9.3f}"
                         f"{s.accuracy_violations / s.pairs:>10.2%}")
        lines.append("held: share of pairs with deviation <= delta. dropping: pairs whose decision drops a Top-K "
                     "expert. worst: largest deviation - delta. over eps: share of pairs with delta above the budget")
        return "\n".join(lines)


def bound_report(access: MoEAccess, heldout: RecordedRun, tables: CostTables | Trace,
                 scenario: ScenarioConfig, deciders: Mapping[str, Decider] | None = None,
                 seed: int = 0) -> BoundReport:
    """Check ``deviation <= delta(A)`` for each decision rule on every (token, layer) pair of ``heldout``.

    The pairs are visited token by token, layer by layer, with the scenario's
    channel running as in the environment (one step per pair, a new episode
    every ``tokens_per_episode`` tokens), so channel-aware rules such as the
    oracle meet realistic gains. Trace layer ``m`` uses the scenario's cost
    tables at the first scenario layer mapped to it, which are trace layer ``m``'s.
    """
    from wide_env.channel import ChannelModel
    from wide_env.cost import CostModel

    if heldout.inputs is None:
        raise ValueError("the held-out run has no layer inputs; record it with keep_inputs=True")
    deciders = dict(DEFAULT_DECIDERS if deciders is None else deciders)
    trace = tables if isinstance(tables, Trace) else _tables_as_trace(access, tables)
    check_trace_fits(trace, scenario.architecture, "for the bound report")
    profile = trace_profile(scenario, trace)
    cost_model = CostModel(scenario, profile)
    layer_map = trace_layer_map(scenario.architecture.num_layers, trace.num_layers)
    scenario_layer = [int(np.flatnonzero(layer_map == m)[0]) if np.any(layer_map == m) else -1
                      for m in range(trace.num_layers)]

    num_tokens, num_layers = heldout.router_logits.shape[:2]
    used_layers = [m for m in range(num_layers) if scenario_layer[m] >= 0]
    routing = [routing_of(heldout.router_logits[:, m], access.top_k, access.renormalize) for m in range(num_layers)]
    decisions = {name: np.zeros((num_tokens, num_layers, access.num_experts), dtype=bool) for name in deciders}
    bounds = {name: np.zeros((num_tokens, num_layers)) for name in deciders}

    channel = ChannelModel(scenario)
    rng = np.random.default_rng(seed)
    decider_rngs = {name: np.random.default_rng([seed, index]) for index, name in enumerate(deciders)}
    for token in range(num_tokens):
        if token % scenario.tokens_per_episode == 0:
            channel.reset(np.random.default_rng(rng.integers(2**63 - 1)))
        for m in used_layers:
            gates = routing[m][0][token]
            state = cost_model.make_state(scenario_layer[m], token, gates, channel.true_gains)
            for name, decide in deciders.items():
                cost = cost_model.evaluate(state, np.asarray(decide(cost_model, state, decider_rngs[name]), bool))
                decisions[name][token, m] = cost.computed
                bounds[name][token, m] = cost.degradation
            channel.advance()

    report = BoundReport(scenario=scenario, tokens=num_tokens, layers=len(used_layers))
    deviations = {name: np.zeros((num_tokens, num_layers)) for name in deciders}
    for m in used_layers:
        _, indices, weights = routing[m]
        outputs = _layer_outputs(access, m, heldout.inputs[:, m])
        reference = top_k_dense(indices, weights, access.num_experts)
        for name in deciders:
            dense, bound = decision_weights(trace.skip_cost[m], trace.replace_cost[m], indices, weights,
                                            decisions[name][:, m])
            if not np.allclose(bound, bounds[name][:, m], atol=1e-9):
                raise AssertionError("decision_weights and CostModel.degradation disagree on delta")
            deviations[name][:, m] = relative_deviation(outputs, dense, reference)
    for name in deciders:
        report.stats.append(_summarise(name, decisions[name][:, used_layers], bounds[name][:, used_layers],
                                       deviations[name][:, used_layers], routing, used_layers,
                                       scenario.accuracy_budget))
    return report


def _tables_as_trace(access: MoEAccess, tables: CostTables) -> Trace:
    from wide_env.trace import make_header

    header = make_header(access.model_metadata(), costs=tables.describe())
    logits = np.zeros((1, access.num_layers, access.num_experts), dtype=np.float32)
    return Trace(router_logits=logits, header=header, skip_cost=tables.skip_cost, replace_cost=tables.replace_cost)


def _summarise(name: str, decisions: np.ndarray, bounds: np.ndarray, deviations: np.ndarray, routing,
               used_layers: Sequence[int], budget: float) -> BoundStats:
    dropping = np.zeros(bounds.shape, dtype=bool)
    for column, m in enumerate(used_layers):
        indices = routing[m][1]
        kept = np.take_along_axis(decisions[:, column], indices, axis=1)
        dropping[:, column] = ~kept.all(axis=1)
    held = deviations <= bounds + BOUND_TOLERANCE

    def mean(values):
        return float(values.mean()) if values.size else float("nan")

    return BoundStats(name=name, pairs=int(bounds.size), held=int(held.sum()), dropping_pairs=int(dropping.sum()),
                      dropping_held=int(held[dropping].sum()), mean_bound=mean(bounds),
                      mean_deviation=mean(deviations), mean_bound_dropping=mean(bounds[dropping]),
                      mean_deviation_dropping=mean(deviations[dropping]),
                      accuracy_violations=int((bounds > budget + 1e-9).sum()),
                      worst_excess=float((deviations - bounds).max()))


# -- command line -------------------------------------------------------------------


def scenario_for_trace(trace: Trace, scenario: ScenarioConfig | None = None) -> ScenarioConfig:
    """Return ``scenario``, or when it is None the first built-in preset whose routing the trace fits."""
    if scenario is not None:
        return scenario
    for preset in BUILTIN_TRACES:
        candidate = ScenarioConfig(moe_preset=preset)
        if (candidate.architecture.num_experts, candidate.architecture.top_k,
                candidate.architecture.renormalize) == (trace.num_experts, trace.top_k, trace.renormalize):
            return candidate
    raise ValueError(f"no built-in preset has {trace.num_experts} experts, Top-{trace.top_k} and renormalize="
                     f"{trace.renormalize}; pass a scenario")


def heldout_run_for_trace(access: MoEAccess, trace: Trace, max_tokens: int | None = None) -> RecordedRun:
    """Re-run the model on a trace's tokens, keeping layer inputs, and check that the logits agree with the trace.

    Raises ``ValueError`` when the trace has no token ids or when the model's
    router logits differ from the trace's, which means the trace came from other weights.
    """
    if trace.token_ids is None:
        raise ValueError("the trace has no token_ids, so its tokens cannot be re-run through the model")
    text = trace.header.get("text", {})
    tokens = trace.token_ids if max_tokens is None else trace.token_ids[:max_tokens]
    run = record_run(access, trace.token_ids, text.get("context_length"), text.get("stride"), keep_inputs=True)
    recorded = trace.router_logits.astype(np.float32)
    # float16 traces round logits to about 3 significant digits.
    if not np.allclose(run.router_logits, recorded, rtol=1e-2, atol=2e-2):
        worst = float(np.abs(run.router_logits - recorded).max())
        raise ValueError(f"the model's router logits differ from the trace's by up to {worst:.3g}; "
                         "the trace was recorded from other weights or other windows")
    count = len(tokens)
    return RecordedRun(router_logits=run.router_logits[:count], inputs=run.inputs[:count], token_ids=tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wide_env.measure",
        description="Report how often the degradation bound delta(A) held against the measured deviation of "
                    "the MoE layer output on a trace's held-out tokens, for oracle and random decisions.")
    parser.add_argument("--trace", type=Path, default=BUILTIN_TRACES["mixtral-8x7b"],
                        help="trace file with cost tables (default: the built-in Mixtral-like trace)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model checkpoint the trace came from (default: the trace header's checkpoint, "
                             "next to the trace)")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens to check (default: 2048)")
    parser.add_argument("--quantile", type=float, nargs="*", default=None,
                        help="re-estimate the cost tables at these quantiles on the validation split and report "
                             "each, in place of the trace's tables")
    parser.add_argument("--accuracy-budget", type=float, default=None,
                        help="oracle's accuracy budget epsilon (default: the scenario's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the channel and the random decisions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from wide_env.corpus import load_corpus
    from wide_env.moe_lm import load_checkpoint
    from wide_env.trace import MoELMAccess

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    trace = load_trace(args.trace)
    if args.checkpoint is None and not trace.model.get("checkpoint"):
        raise SystemExit(f"trace {args.trace} names no model checkpoint; pass --checkpoint")
    checkpoint = args.checkpoint or args.trace.parent / trace.model["checkpoint"]
    model, metadata = load_checkpoint(checkpoint)
    access = MoELMAccess(model)
    scenario = scenario_for_trace(trace)
    if args.accuracy_budget is not None:
        scenario = scenario.replace(accuracy_budget=args.accuracy_budget)
    heldout = heldout_run_for_trace(access, trace, args.tokens)

    if not args.quantile:
        print(bound_report(access, heldout, trace, scenario, seed=args.seed).format_table())
        return 0
    corpus = load_corpus(None if trace.header["text"].get("corpus") == "pydoc_data.topics"
                         else trace.header["text"].get("corpus"))
    calibration = record_run(access, corpus.split("validation"), keep_inputs=True)
    for quantile in args.quantile:
        tables = estimate_cost_tables(access, calibration, quantile)
        print(f"\nquantile {quantile:g}")
        print(bound_report(access, heldout, tables, scenario, seed=args.seed).format_table())
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that its classes are the ones other modules import.
    from wide_env.measure import main as module_main

    raise SystemExit(module_main())
