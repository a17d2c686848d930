"""Routing traces: file format, recording from MoE language models, and replay as a gate source.

A trace contains the router logits of real MoE layers, token by token,
together with the model's routing metadata and the skip and replacement cost
tables measured from its experts (see ``wide_env.measure``).

File format (``.npz``, written by ``numpy.savez_compressed``, read without pickle):

- ``header``: UTF-8 JSON as a ``uint8`` array. ``format`` is ``"wide-trace"`` and
  ``version`` is 1. ``model`` contains ``num_layers``, ``num_experts``, ``top_k``,
  ``renormalize``, ``hidden_size``, ``expert_ffn_size`` and where the model came
  from. ``text`` describes the tokens, and ``costs`` the cost estimation
  (``null`` when the trace has no cost tables).
- ``router_logits``: ``(T, L, E)`` float16 or float32, the logits of MoE layer
  ``l`` for token ``t`` before the softmax.
- ``token_ids``: ``(T,)`` int64, the token at each position (optional).
- ``skip_cost``: ``(L, E)`` and ``replace_cost``: ``(L, E, E)`` float64, in units
  of the typical Top-K layer output (optional, needed to drive the environment).

Replay. The environment simulates the communication of the scenario's MoE
profile (for the default, mixtral-8x7b: 32 layers, hidden size 4096), while
the routing comes from a small model with fewer layers. Scenario layer ``l``
of ``L`` replays trace layer ``floor(l * L_trace / L)``, so each trace layer
stands for a block of consecutive scenario layers, and the cost tables follow
the same map. The number of experts, Top-K and renormalisation must match the
scenario. An episode starts at a random trace position and reads consecutive
tokens, wrapping to the start of the trace at its end.
"""

from __future__ import annotations

import abc
import functools
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from wide_env.config import BUILTIN_TRACE_FILES, MoEArchitecture, ScenarioConfig
from wide_env.profile import GateSource, MoEProfile

TRACE_FORMAT = "wide-trace"
TRACE_VERSION = 1
DATA_DIR = Path(__file__).resolve().parent / "data"
# Built-in traces recorded on held-out text from the shipped small models, by scenario preset.
BUILTIN_TRACES = {preset: DATA_DIR / name for preset, name in BUILTIN_TRACE_FILES.items()}
MODEL_FIELDS = ("num_layers", "num_experts", "top_k", "renormalize", "hidden_size", "expert_ffn_size")
# Slack when checking that loaded cost tables are symmetric with a zero diagonal.
COST_TABLE_TOLERANCE = 1e-9


class TraceFormatError(ValueError):
    """A trace file that cannot be read, or whose contents are inconsistent."""


@dataclass(eq=False)
class Trace:
    """Router logits of every MoE layer for a token sequence, with routing metadata and cost tables."""

    router_logits: np.ndarray  # (T, L, E)
    header: dict[str, Any]
    token_ids: np.ndarray | None = None  # (T,)
    skip_cost: np.ndarray | None = None  # (L, E)
    replace_cost: np.ndarray | None = None  # (L, E, E)

    @property
    def model(self) -> dict[str, Any]:
        return self.header["model"]

    @property
    def num_tokens(self) -> int:
        return int(self.router_logits.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.model["top_k"])

    @property
    def renormalize(self) -> bool:
        return bool(self.model["renormalize"])

    @property
    def has_costs(self) -> bool:
        return self.skip_cost is not None and self.replace_cost is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        arrays = ("router_logits", "token_ids", "skip_cost", "replace_cost")
        for name in arrays:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                return False
            if a is not None and (a.dtype != b.dtype or not np.array_equal(a, b)):
                return False
        return self.header == other.header


def make_header(model: dict[str, Any], text: dict[str, Any] | None = None, costs: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    """Header of a new trace; ``model`` needs every key in ``MODEL_FIELDS``."""
    missing = [name for name in MODEL_FIELDS if name not in model]
    if missing:
        raise ValueError(f"trace model metadata is missing {', '.join(missing)}")
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "model": dict(model), "text": dict(text or {}),
            "costs": costs, **extra}


# -- validation, save and load --------------------------------------------------


def validate_trace(trace: Trace, source: str = "trace") -> None:
    """Check shapes, dtypes and values of a trace; raise ``TraceFormatError`` naming ``source``."""
    header = trace.header
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"{source} is not a {TRACE_FORMAT} file: its header has no format {TRACE_FORMAT!r}")
    if header.get("version") != TRACE_VERSION:
        raise TraceFormatError(f"{source} has trace format version {header.get('version')!r}, "
                               f"but this code reads version {TRACE_VERSION}")
    model = header.get("model")
    if not isinstance(model, dict) or any(name not in model for name in MODEL_FIELDS):
        raise TraceFormatError(f"{source} header has no complete 'model' entry; it needs {', '.join(MODEL_FIELDS)}")
    for name in MODEL_FIELDS:
        value = model[name]
        expected_bool = name == "renormalize"
        if expected_bool != isinstance(value, bool) or (not expected_bool and (not isinstance(value, int) or value < 1)):
            raise TraceFormatError(f"{source} header has an invalid model.{name}: {value!r}")
    layers, experts, top_k = model["num_layers"], model["num_experts"], model["top_k"]
    if top_k > experts:
        raise TraceFormatError(f"{source} header has top_k={top_k} larger than num_experts={experts}")

    logits = trace.router_logits
    if not isinstance(logits, np.ndarray) or logits.dtype not in (np.float16, np.float32, np.float64):
        raise TraceFormatError(f"{source} router_logits must be a float16/32/64 array, got "
                               f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.ndim != 3 or logits.shape[1:] != (layers, experts) or logits.shape[0] < 1:
        raise TraceFormatError(f"{source} router_logits has shape {logits.shape}, but the header expects "
                               f"(tokens >= 1, num_layers={layers}, num_experts={experts})")
    if not np.all(np.isfinite(logits)):
        raise TraceFormatError(f"{source} router_logits contains NaN or infinite values")
    if trace.token_ids is not None:
        if trace.token_ids.shape != (logits.shape[0],) or trace.token_ids.dtype.kind not in "iu":
            raise TraceFormatError(f"{source} token_ids has shape {trace.token_ids.shape} and dtype "
                                   f"{trace.token_ids.dtype}, expected ({logits.shape[0]},) integers")

    if (trace.skip_cost is None) != (trace.replace_cost is None):
        raise TraceFormatError(f"{source} has only one of skip_cost and replace_cost; it needs both or neither")
    if trace.skip_cost is not None:
        _validate_cost_tables(trace.skip_cost, trace.replace_cost, layers, experts, source)


def _validate_cost_tables(skip: np.ndarray, replace: np.ndarray, layers: int, experts: int, source: str) -> None:
    if skip.shape != (layers, experts):
        raise TraceFormatError(f"{source} skip_cost has shape {skip.shape}, expected ({layers}, {experts})")
    if replace.shape != (layers, experts, experts):
        raise TraceFormatError(f"{source} replace_cost has shape {replace.shape}, "
                               f"expected ({layers}, {experts}, {experts})")
    for name, table in (("skip_cost", skip), ("replace_cost", replace)):
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise TraceFormatError(f"{source} {name} must be finite and non-negative")
    diagonal = np.diagonal(replace, axis1=1, axis2=2)
    if np.any(np.abs(diagonal) > COST_TABLE_TOLERANCE):
        raise TraceFormatError(f"{source} replace_cost has a non-zero diagonal")
    if np.any(np.abs(replace - np.swapaxes(replace, 1, 2)) > COST_TABLE_TOLERANCE):
        raise TraceFormatError(f"{source} replace_cost is not symmetric")


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Validate and write a trace; the file appears only once it is complete."""
    path = Path(path)
    validate_trace(trace, f"trace for {path}")
    arrays = {"header": np.frombuffer(json.dumps(trace.header, sort_keys=True).encode("utf-8"), dtype=np.uint8),
              "router_logits": trace.router_logits}
    for name in ("token_ids", "skip_cost", "replace_cost"):
        value = getattr(trace, name)
        if value is not None:
            arrays[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(file, **arrays)
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file.

    Raises ``FileNotFoundError`` for a missing file and ``TraceFormatError``
    naming the file for a truncated or corrupt file, a missing array or an
    inconsistent header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            members = set(archive.files)
            missing = {"header", "router_logits"} - members
            if missing:
                raise TraceFormatError(f"trace file {path} has no {', '.join(sorted(missing))} array")
            arrays = {name: archive[name] for name in members}
    except TraceFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        raise TraceFormatError(f"cannot read trace file {path}: it is truncated or corrupt "
                               f"({type(error).__name__}: {error})") from error
    try:
        header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TraceFormatError(f"trace file {path} has a header that is not valid JSON: {error}") from error
    unknown = set(arrays) - {"router_logits", "token_ids", "skip_cost", "replace_cost"}
    if unknown:
        raise TraceFormatError(f"trace file {path} has unknown arrays: {', '.join(sorted(unknown))}")
    trace = Trace(router_logits=arrays["router_logits"], header=header, token_ids=arrays.get("token_ids"),
                  skip_cost=arrays.get("skip_cost"), replace_cost=arrays.get("replace_cost"))
    validate_trace(trace, f"trace file {path}")
    return trace


@functools.lru_cache(maxsize=8)
def _load_trace_cached(path: str, modified_ns: int, size: int) -> Trace:
    trace = load_trace(path)
    for value in (trace.router_logits, trace.token_ids, trace.skip_cost, trace.replace_cost):
        if value is not None:
            value.setflags(write=False)
    return trace


def load_trace_cached(path: str | Path) -> Trace:
    """``load_trace`` with a cache keyed by path, modification time and size; the arrays are read-only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    stat = path.stat()
    return _load_trace_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# -- scenario binding -------------------------------------------------------------


def scenario_trace_path(scenario: ScenarioConfig) -> Path:
    """Trace file of a scenario: ``gate_trace_path``, or the built-in trace of its preset."""
    if scenario.gate_trace_path is not None:
        return Path(scenario.gate_trace_path)
    try:
        return BUILTIN_TRACES[scenario.moe_preset]
    except KeyError:
        raise ValueError(
            f"moe_preset {scenario.moe_preset!r} has no built-in routing trace (built-in: "
            f"{', '.join(BUILTIN_TRACES)}); set gate_trace_path to a trace file or gate_source='synthetic'"
        ) from None


def check_trace_fits(trace: Trace, architecture: MoEArchitecture, source: str, need_costs: bool = True) -> None:
    """Raise ``ValueError`` naming ``source`` when the trace's routing differs from the architecture's."""
    problems = []
    if trace.num_experts != architecture.num_experts:
        problems.append(f"it has {trace.num_experts} experts per layer, the scenario {architecture.num_experts}")
    if trace.top_k != architecture.top_k:
        problems.append(f"it routes Top-{trace.top_k}, the scenario Top-{architecture.top_k}")
    if trace.renormalize != architecture.renormalize:
        problems.append(f"it {'renormalises' if trace.renormalize else 'does not renormalise'} the Top-K weights "
                        f"and the scenario {'does' if architecture.renormalize else 'does not'}")
    if problems:
        raise ValueError(f"trace {source} does not fit moe_preset {architecture.name!r}: " + "; ".join(problems)
                         + ". Use a trace of a model with the same routing, or gate_source='synthetic'")
    if need_costs and not trace.has_costs:
        raise ValueError(f"trace {source} has no skip_cost/replace_cost tables, which the environment needs; "
                         "record it with cost estimation (python -m wide_env.trace)")


def trace_layer_map(num_layers: int, trace_layers: int) -> np.ndarray:
    """Trace layer replayed at each scenario layer: ``floor(l * trace_layers / num_layers)``."""
    return (np.arange(num_layers) * trace_layers) // num_layers


def scenario_trace(scenario: ScenarioConfig) -> tuple[Trace, Path]:
    """Load the scenario's trace (cached) and check that it fits the scenario's routing."""
    path = scenario_trace_path(scenario)
    trace = load_trace_cached(path)
    check_trace_fits(trace, scenario.architecture, str(path))
    return trace, path


def trace_profile(scenario: ScenarioConfig, trace: Trace) -> MoEProfile:
    """Profile whose cost tables are the trace's measured tables, mapped onto the scenario's layers."""
    layer_map = trace_layer_map(scenario.architecture.num_layers, trace.num_layers)
    return MoEProfile(
        architecture=scenario.architecture,
        expert_nodes=np.asarray(scenario.expert_nodes(), dtype=np.int64),
        skip_cost=np.array(trace.skip_cost[layer_map], dtype=np.float64),
        replace_cost=np.array(trace.replace_cost[layer_map], dtype=np.float64),
        cluster_of_expert=None,
    )


class TraceGateSource(GateSource):
    """Replays a trace's router logits: consecutive tokens from a random start, layers mapped by ``trace_layer_map``."""

    def __init__(self, trace: Trace, num_layers: int, tokens_per_episode: int):
        self.trace = trace
        self.num_layers = num_layers
        self.num_experts = trace.num_experts
        self.tokens_per_episode = tokens_per_episode
        self.layer_map = trace_layer_map(num_layers, trace.num_layers)
        self.position = -1  # trace index of the last token returned
        self._start: int | None = None
        self._next_start: int | None = None
        self._offset = 0

    def seek(self, position: int) -> None:
        """Make the next ``reset`` start at ``position`` instead of a random position."""
        if not 0 <= position < self.trace.num_tokens:
            raise ValueError(f"invalid trace position {position}: the trace has {self.trace.num_tokens} tokens")
        self._next_start = int(position)

    def reset(self, rng: np.random.Generator) -> None:
        # The draw happens even after seek(), so the generator advances the same way in both cases.
        last_start = max(0, self.trace.num_tokens - self.tokens_per_episode)
        start = int(rng.integers(0, last_start + 1))
        if self._next_start is not None:
            start, self._next_start = self._next_start, None
        self._start = start
        self._offset = 0

    def next_token(self) -> np.ndarray:
        if self._start is None:
            raise RuntimeError("TraceGateSource.next_token() called before reset()")
        self.position = (self._start + self._offset) % self.trace.num_tokens
        self._offset += 1
        return self.trace.router_logits[self.position][self.layer_map].astype(np.float64)


# -- reading MoE layers of a language model ------------------------------------------


class MoEAccess(abc.ABC):
    """Read access to the MoE layers of a language model: router logits, layer inputs and expert outputs."""

    num_layers: int
    num_experts: int
    top_k: int
    renormalize: bool
    hidden_size: int
    expert_ffn_size: int
    context_length: int  # maximum window length the model accepts, in tokens

    @abc.abstractmethod
    def run(self, input_ids) -> tuple[list, list]:
        """Run the model on ``(B, T)`` token ids (a torch tensor).

        Returns per MoE layer the router logits ``(B*T, E)`` and the layer
        inputs ``(B*T, d)``, both as float32 torch tensors on the CPU.
        """

    @abc.abstractmethod
    def expert_outputs(self, layer: int, inputs) -> Any:
        """Output of every expert of ``layer`` for inputs ``(n, d)``: a float32 ``(n, E, d)`` tensor."""

    def model_metadata(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in MODEL_FIELDS}


class MoELMAccess(MoEAccess):
    """``MoEAccess`` for ``wide_env.moe_lm.MoELanguageModel``."""

    def __init__(self, model, description: dict[str, Any] | None = None):
        config = model.config
        self.model = model.eval()
        self.num_layers = config.num_layers
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.renormalize = config.renormalize
        self.hidden_size = config.hidden_size
        self.expert_ffn_size = config.expert_ffn_size
        self.context_length = config.context_length
        self.description = {"source": "wide_env.moe_lm", **(description or {})}

    def run(self, input_ids):
        import torch

        with torch.no_grad():
            out = self.model(input_ids, capture=True)
        width = self.hidden_size
        logits = [t.reshape(-1, self.num_experts).float() for t in out.router_logits]
        inputs = [t.reshape(-1, width).float() for t in out.moe_inputs]
        return logits, inputs

    def expert_outputs(self, layer, inputs):
        import torch

        with torch.no_grad():
            return self.model.blocks[layer].moe.all_expert_outputs(inputs)

    def model_metadata(self) -> dict[str, Any]:
        return {**super().model_metadata(), **self.description}


class TransformersMoEAccess(MoEAccess):
    """``MoEAccess`` for Hugging Face ``transformers`` MoE causal LMs (Mixtral, Qwen2-MoE, OLMoE and alike).

    MoE blocks are the modules with a ``gate`` (the router) and ``experts``.
    Router logits come from ``output_router_logits=True`` (``method="output"``)
    or from forward hooks on the routers (``method="hooks"``). ``"auto"`` uses
    the output and falls back to the hooks when the model returns no logits.
    Layer inputs always come from forward pre-hooks on the MoE blocks. Shared
    experts (Qwen2-MoE) always run, so they are not part of the traced routing.
    Tested with transformers 5.25; ``experts`` may be a fused module called as
    ``experts(x, top_k_index, top_k_weights)`` or a ``ModuleList``.
    """

    def __init__(self, model, method: str = "auto", renormalize: bool | None = None,
                 description: dict[str, Any] | None = None):
        if method not in ("auto", "output", "hooks"):
            raise ValueError(f"invalid method: expected 'auto', 'output' or 'hooks', got {method!r}")
        self.model = model.eval()
        self.method = method
        config = model.config
        self.blocks = [module for _, module in model.named_modules()
                       if hasattr(module, "gate") and hasattr(module, "experts")]
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE blocks (modules with 'gate' and 'experts')")
        num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        if not num_experts:
            raise ValueError(f"{type(model).__name__} config has neither num_local_experts nor num_experts")
        self.num_layers = len(self.blocks)
        self.num_experts = int(num_experts)
        self.top_k = int(config.num_experts_per_tok)
        if renormalize is None:
            renormalize = True if config.model_type == "mixtral" else getattr(config, "norm_topk_prob", None)
        if renormalize is None:
            raise ValueError(f"cannot tell whether {type(model).__name__} renormalises its Top-K weights; "
                             "pass renormalize=True or False")
        self.renormalize = bool(renormalize)
        self.hidden_size = int(config.hidden_size)
        self.expert_ffn_size = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.description = {"source": "transformers", "class": type(model).__name__,
                            "model_type": config.model_type, **(description or {})}

    @staticmethod
    def _logits_of(output):
        return output[0] if isinstance(output, (tuple, list)) else output

    def run(self, input_ids):
        import torch

        gate_logits: list = []
        inputs: list = []
        handles = []
        use_hooks = self.method == "hooks"
        def keep_input(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs.append(hidden.detach().reshape(-1, self.hidden_size).float())

        for block in self.blocks:
            handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
            handles.append(block.gate.register_forward_hook(
                lambda module, args, output: gate_logits.append(
                    self._logits_of(output).detach().reshape(-1, self.num_experts).float())))
        try:
            with torch.no_grad():
                if use_hooks:
                    self.model(input_ids=input_ids)
                    routed = None
                else:
                    routed = self.model(input_ids=input_ids, output_router_logits=True).router_logits
        finally:
            for handle in handles:
                handle.remove()
        if routed is None:
            if self.method == "output":
                raise RuntimeError(f"{type(self.model).__name__} returned no router_logits; use method='hooks'")
            logits = gate_logits
        else:
            logits = [t.detach().reshape(-1, self.num_experts).float() for t in routed]
        if len(logits) != self.num_layers or len(inputs) != self.num_layers:
            raise RuntimeError(f"expected router logits and inputs of {self.num_layers} MoE layers, got "
                               f"{len(logits)} and {len(inputs)}")
        return logits, inputs

    def expert_outputs(self, layer, inputs):
        import torch

        experts = self.blocks[layer].experts
        dtype = next(experts.parameters()).dtype
        x = inputs.to(dtype)
        outputs = []
        with torch.no_grad():
            for expert in range(self.num_experts):
                if isinstance(experts, torch.nn.ModuleList):
                    outputs.append(experts[expert](x))
                else:
                    index = torch.full((len(x), 1), expert, dtype=torch.long)
                    weight = torch.ones((len(x), 1), dtype=dtype)
                    outputs.append(experts(x, index, weight))
        return torch.stack(outputs, dim=1).float()

    def model_metadata(self) -> dict[str, Any]:
        return {**super().model_metadata(), **self.description}


# -- recording ------------------------------------------------------------------------


def window_plan(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int]]:
    """Windows ``(start, first_recorded)`` that record every position of a token stream once.

    Windows of ``context_length`` tokens start every ``stride`` tokens, the
    last one ends at the stream's end, and each records only the positions
    that no earlier window recorded. So every token after the first window
    has at least ``context_length - stride`` tokens of context.
    """
    if num_tokens <= context_length:
        return [(0, 0)]
    if not 1 <= stride <= context_length:
        raise ValueError(f"invalid stride {stride}: expected 1 <= stride <= context_length={context_length}")
    starts = list(range(0, num_tokens - context_length, stride)) + [num_tokens - context_length]
    plan, covered = [], 0
    for start in starts:
        if start + context_length > covered:
            plan.append((start, covered))
            covered = start + context_length
    return plan


@dataclass
class RecordedRun:
    """Router logits ``(T, L, E)`` and, when kept, layer inputs ``(T, L, d)`` of a token stream."""

    router_logits: np.ndarray
    inputs: np.ndarray | None = None
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def record_run(access: MoEAccess, token_ids: np.ndarray, context_length: int | None = None,
               stride: int | None = None, batch_size: int = 16, keep_inputs: bool = False) -> RecordedRun:
    """Run a model over a token stream in overlapping windows and collect each position once.

    ``context_length`` defaults to the model's, ``stride`` to half of it (see ``window_plan``).
    """
    import torch

    token_ids = np.asarray(token_ids, dtype=np.int64)
    if token_ids.ndim != 1 or len(token_ids) == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {token_ids.shape}")
    context = int(context_length or access.context_length)
    context = min(context, len(token_ids))
    plan = window_plan(len(token_ids), context, int(stride or max(1, context // 2)))

    logits = np.zeros((len(token_ids), access.num_layers, access.num_experts), dtype=np.float32)
    inputs = np.zeros((len(token_ids), access.num_layers, access.hidden_size), dtype=np.float32) \
        if keep_inputs else None
    for first in range(0, len(plan), batch_size):
        group = plan[first:first + batch_size]
        batch = torch.from_numpy(np.stack([token_ids[start:start + context] for start, _ in group]))
        layer_logits, layer_inputs = access.run(batch)
        for layer in range(access.num_layers):
            per_window = layer_logits[layer].reshape(len(group), context, -1).numpy()
            per_window_inputs = layer_inputs[layer].reshape(len(group), context, -1).numpy() if keep_inputs else None
            for row, (start, recorded_from) in enumerate(group):
                skip = max(0, recorded_from - start)
                logits[start + skip:start + context, layer] = per_window[row, skip:]
                if keep_inputs:
                    inputs[start + skip:start + context, layer] = per_window_inputs[row, skip:]
    return RecordedRun(router_logits=logits, inputs=inputs, token_ids=token_ids)


def iter_layer_inputs(run: RecordedRun) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(layer, router_logits (T, E), inputs (T, d))`` of a run recorded with ``keep_inputs``."""
    if run.inputs is None:
        raise ValueError("this run has no layer inputs; record it with keep_inputs=True")
    for layer in range(run.router_logits.shape[1]):
        yield layer, run.router_logits[:, layer], run.inputs[:, layer]


def record_trace(access: MoEAccess, token_ids: np.ndarray, calibration_ids: np.ndarray | None = None, *,
                 context_length: int | None = None, stride: int | None = None, quantile: float | None = None,
                 logits_dtype=np.float32, text: dict[str, Any] | None = None,
                 batch_size: int = 16) -> Trace:
    """Record a trace of ``token_ids``; with ``calibration_ids``, also measure its cost tables.

    The costs come from ``wide_env.measure.estimate_cost_tables`` on the
    calibration tokens, which should not overlap the traced ones.
    """
    run = record_run(access, token_ids, context_length, stride, batch_size)
    costs_header = None
    skip = replace = None
    if calibration_ids is not None:
        from wide_env import measure

        calibration = record_run(access, calibration_ids, context_length, stride, batch_size, keep_inputs=True)
        tables = measure.estimate_cost_tables(access, calibration,
                                              quantile=measure.DEFAULT_QUANTILE if quantile is None else quantile)
        skip, replace = tables.skip_cost, tables.replace_cost
        costs_header = tables.describe()
    context = int(context_length or access.context_length)
    text_header = {"num_tokens": int(len(token_ids)), "context_length": min(context, len(token_ids)),
                   "stride": int(stride or max(1, min(context, len(token_ids)) // 2)), **(text or {})}
    header = make_header(access.model_metadata(), text_header, costs_header)
    return Trace(router_logits=run.router_logits.astype(logits_dtype), header=header,
                 token_ids=np.asarray(token_ids, dtype=np.int64), skip_cost=skip, replace_cost=replace)


# -- command line -------------------------------------------------------------------


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m wide_env.trace",
        description="Record a routing trace of a wide_env.moe_lm checkpoint on held-out text, with cost tables "
                    "measured on the validation split and a bound report in its header.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    parser.add_argument("--corpus", default=None,
                        help="UTF-8 text file (default: CPython's pydoc_data.topics, as in training)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="trace only the first N held-out tokens (default: all)")
    parser.add_argument("--quantile", type=float, default=None, help="cost quantile (default: wide_env.measure's)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="storage type of the router logits (default: %(default)s)")
    parser.add_argument("--report-tokens", type=int, default=2048,
                        help="held-out tokens for the bound report stored in the header (0 skips it)")
    return parser


def main(argv=None) -> int:
    import logging

    import torch

    from wide_env import measure
    from wide_env.corpus import load_corpus
    from wide_env.moe_lm import load_checkpoint, state_digest

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("wide_env.trace")
    torch.set_num_threads(1)

    model, metadata = load_checkpoint(args.checkpoint)
    corpus = load_corpus(args.corpus)
    trained_on = (metadata.get("corpus") or {}).get("sha256")
    if trained_on and trained_on != corpus.sha256:
        log.warning("corpus %s differs from the one %s was trained on (sha256 %s, expected %s); the held-out "
                    "split may overlap its training text", corpus.source, args.checkpoint, corpus.sha256, trained_on)
    tokens = corpus.split("heldout")
    if args.max_tokens is not None:
        tokens = tokens[:args.max_tokens]
    description = {"name": metadata.get("preset", args.checkpoint.stem), "checkpoint": args.checkpoint.name,
                   "weights_sha256": state_digest(model)}
    access = MoELMAccess(model, description)
    text = {"corpus": corpus.source, "corpus_sha256": corpus.sha256, "split": "heldout",
            "tokenizer": "utf-8 bytes", "calibration_split": "validation"}
    trace = record_trace(access, tokens, corpus.split("validation"), quantile=args.quantile,
                         logits_dtype=np.dtype(args.dtype), text=text)
    log.info("recorded %d tokens x %d layers; cost tables at quantile %g", trace.num_tokens, trace.num_layers,
             trace.header["costs"]["quantile"])

    if args.report_tokens:
        scenario = measure.scenario_for_trace(trace)
        run = record_run(access, tokens, keep_inputs=True)
        heldout = RecordedRun(run.router_logits[:args.report_tokens], run.inputs[:args.report_tokens],
                              tokens[:args.report_tokens])
        report = measure.bound_report(access, heldout, trace, scenario)
        log.info("\n%s", report.format_table())
        trace.header["bound_report"] = {"scenario": scenario.moe_preset,
                                        "accuracy_budget": scenario.accuracy_budget,
                                        "tokens": report.tokens, "rows": report.rows()}
    path = save_trace(trace, args.out)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    return 0


__all__ = ["BUILTIN_TRACES", "MoEAccess", "MoELMAccess", "RecordedRun", "Trace", "TraceFormatError",
           "TraceGateSource", "TransformersMoEAccess", "check_trace_fits", "load_trace", "load_trace_cached",
           "make_header", "record_run", "record_trace", "save_trace", "scenario_trace", "scenario_trace_path",
           "trace_layer_map", "trace_profile", "validate_trace"]


if __name__ == "__main__":
    # Run the imported module's main, so that its classes are the ones other modules import.
    from wide_env.trace import main as module_main

    raise SystemExit(module_main())
