"""Scenario configuration: MoE architecture presets and the validated scenario.

Every physical quantity carries its unit in the field name (``_hz``, ``_dbm``,
``_m``, ``_s``, ``_j_per_flop`` ...). Quantities in dB say so (``_db``, ``_dbm``);
everything else is linear SI.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml


def _reject(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"invalid {name}: expected {allowed}, got {value!r}")


def _check_type(name: str, value: Any, kinds: tuple[type, ...]) -> None:
    # bool is an int subclass; a flag passed where a number is expected is a mistake.
    if isinstance(value, bool) and bool not in kinds:
        raise TypeError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got bool {value!r}")
    if not isinstance(value, kinds):
        hint = ""
        if isinstance(value, str) and float in kinds:
            # PyYAML reads exponents without a dot, such as 80e6, as strings.
            hint = "; in YAML write numbers with a dot, such as 80.0e6"
        raise TypeError(
            f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r}{hint}"
        )


def _check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _reject(name, "a finite number", value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if low is None:
            lo = "(-inf"
        else:
            lo = ("(" if low_open else "[") + f"{low:g}"
        if high is None:
            hi = "inf)"
        else:
            hi = f"{high:g}" + (")" if high_open else "]")
        raise _reject(name, f"a value in {lo}, {hi}", value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _reject(name, "one of " + ", ".join(repr(c) for c in choices), value)


@dataclass(frozen=True)
class MoEArchitecture:
    """Public architecture numbers of one MoE language model.

    ``ffn_size`` is the intermediate size of one routed expert. Shared experts
    always run at the source, so they are not part of the selection problem.
    """

    name: str
    num_layers: int
    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    renormalize: bool

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _reject(name, "a positive integer", value)
        if self.top_k > self.num_experts:
            raise _reject("top_k", f"an integer in [1, num_experts={self.num_experts}]", self.top_k)

    @property
    def flops_per_expert(self) -> float:
        """FLOPs of one SwiGLU expert for one token: three d x d_ff matrices, 2 FLOPs per MAC."""
        return 6.0 * self.hidden_size * self.ffn_size


MOE_PRESETS: dict[str, MoEArchitecture] = {
    arch.name: arch
    for arch in (
        MoEArchitecture("mixtral-8x7b", 32, 4096, 14336, 8, 2, True),
        MoEArchitecture("olmoe-1b-7b", 16, 2048, 1024, 64, 8, False),
        MoEArchitecture("qwen1.5-moe-a2.7b", 24, 2048, 1408, 60, 4, False),
        MoEArchitecture("deepseek-v2-lite", 26, 2048, 1408, 64, 6, False),
        MoEArchitecture("qwen3-30b-a3b", 48, 2048, 768, 128, 8, True),
        MoEArchitecture("deepseek-v3", 58, 7168, 2048, 256, 8, True),
    )
}

PATHLOSS_MODELS = ("umi-nlos", "umi-los", "uma-nlos", "uma-los")
FADING_DISTRIBUTIONS = ("rayleigh", "rician")
FADING_MODES = ("fast", "slow")
ACCESS_SCHEMES = ("fdma", "tdma")
ACCURACY_BUDGET_MODES = ("per_step", "average")
GATE_SOURCES = ("synthetic", "trace")
# Routing traces shipped in wide_env/data, recorded from small models with the preset's E, K and
# renormalisation; gate_source="trace" without gate_trace_path replays the preset's trace.
BUILTIN_TRACE_FILES = {"mixtral-8x7b": "mixtral_like.trace.npz", "olmoe-1b-7b": "olmoe_like.trace.npz"}


@dataclass(frozen=True)
class ScenarioConfig:
    """One WIDE scenario: the MoE model, the nodes, the radio and the budgets.

    The defaults are the reference scenario: mixtral-8x7b over four edge nodes
    at 3.5 GHz with 80 MHz, a 2 ms layer budget, fast Rayleigh fading and a
    per-step accuracy budget of 0.15. Construction validates every field and
    raises ``ValueError``/``TypeError`` naming the field, the allowed range and
    the received value.
    """

    # MoE model
    moe_preset: str = "mixtral-8x7b"
    top_k: int | None = None
    num_layers: int | None = None
    activation_bits: int = 16
    gate_source: str = "trace"
    gate_trace_path: str | None = None
    gate_logit_std: float = 0.75
    gate_popularity_std: float = 0.5
    gate_token_correlation: float = 0.5
    expert_cluster_size: int = 2
    profile_seed: int = 0

    # Nodes and placement
    num_nodes: int = 4
    placement: tuple[int, ...] | None = None
    local_experts: tuple[int, ...] = ()
    distance_min_m: float = 20.0
    distance_max_m: float = 160.0

    # Radio
    carrier_frequency_ghz: float = 3.5
    bandwidth_total_hz: float = 80e6
    access: str = "fdma"
    noise_psd_dbm_per_hz: float = -174.0
    noise_figure_db: float = 7.0
    source_tx_power_dbm: float = 23.0
    node_tx_power_dbm: float = 30.0
    latency_budget_s: float = 2e-3

    # Computation
    node_flops_per_s: float = 20e12
    node_energy_j_per_flop: float = 0.5e-12
    source_flops_per_s: float = 5e12
    source_energy_j_per_flop: float = 1.0e-12

    # Channel
    pathloss_model: str = "umi-nlos"
    shadowing_std_db: float = 0.0
    fading: str = "rayleigh"
    rician_k_db: float = 6.0
    fading_mode: str = "fast"
    doppler_hz: float = 100.0
    step_duration_s: float | None = None
    csi_delay_steps: int = 0
    csi_error_std: float = 0.0

    # Budgets, episode and reward
    accuracy_budget: float = 0.15
    accuracy_budget_mode: str = "per_step"
    tokens_per_episode: int = 16
    prompt_tokens: int = 16
    prefill_latency_budget_s: float | None = None
    accuracy_violation_penalty: float = 3.0
    latency_violation_penalty: float = 1.0

    def __post_init__(self) -> None:
        self._normalise_sequences()
        self._validate()

    # -- construction helpers -------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ScenarioConfig":
        """Build a scenario from a mapping, rejecting unknown keys."""
        if not isinstance(values, Mapping):
            raise TypeError(f"scenario must be a mapping of field names to values, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown scenario key(s) {', '.join(map(repr, unknown))}; valid keys are: "
                + ", ".join(cls.field_names())
            )
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ScenarioConfig":
        """Load a scenario from a YAML mapping; missing keys take their defaults."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scenario file not found: {path}")
        with path.open("r", encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"scenario file {path} must contain a YAML mapping, got {type(values).__name__}")
        return cls.from_dict(values)

    def replace(self, **overrides: Any) -> "ScenarioConfig":
        """Return a copy with some fields changed, rejecting unknown keys."""
        merged = self.to_dict()
        unknown = sorted(set(overrides) - set(merged))
        if unknown:
            raise ValueError(
                f"unknown scenario key(s) {', '.join(map(repr, unknown))}; valid keys are: "
                + ", ".join(self.field_names())
            )
        merged.update(overrides)
        return ScenarioConfig(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, with tuples as lists so it dumps to YAML and JSON."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    # -- derived quantities ---------------------------------------------------

    @property
    def architecture(self) -> MoEArchitecture:
        """The preset's architecture, with ``top_k`` and ``num_layers`` overridden when the scenario sets them."""
        preset = MOE_PRESETS[self.moe_preset]
        overrides = {}
        if self.top_k is not None and self.top_k != preset.top_k:
            overrides["top_k"] = self.top_k
        if self.num_layers is not None and self.num_layers != preset.num_layers:
            overrides["num_layers"] = self.num_layers
        return dataclasses.replace(preset, **overrides) if overrides else preset

    @property
    def payload_bits(self) -> float:
        """Bits of one hidden-state vector, the payload of each uplink and downlink."""
        return float(self.architecture.hidden_size * self.activation_bits)

    @property
    def node_bandwidth_hz(self) -> float:
        """Band of one edge node under FDMA; TDMA links use the whole band."""
        return self.bandwidth_total_hz / self.num_nodes if self.access == "fdma" else self.bandwidth_total_hz

    @property
    def noise_psd_w_per_hz(self) -> float:
        """Noise power spectral density including the receiver noise figure, in W/Hz."""
        return 10.0 ** ((self.noise_psd_dbm_per_hz + self.noise_figure_db - 30.0) / 10.0)

    @property
    def source_tx_power_w(self) -> float:
        return 10.0 ** ((self.source_tx_power_dbm - 30.0) / 10.0)

    @property
    def node_tx_power_w(self) -> float:
        return 10.0 ** ((self.node_tx_power_dbm - 30.0) / 10.0)

    @property
    def fading_step_s(self) -> float:
        """Time between two decision steps, used for the fading correlation."""
        return self.latency_budget_s if self.step_duration_s is None else self.step_duration_s

    @property
    def prefill_budget_s(self) -> float:
        """Latency budget of one prefill step (one MoE layer over the prompt), in s.

        Unless ``prefill_latency_budget_s`` sets it, the prompt gets the decoding
        budget once per token, ``prompt_tokens * latency_budget_s``.
        """
        if self.prefill_latency_budget_s is not None:
            return float(self.prefill_latency_budget_s)
        return self.prompt_tokens * self.latency_budget_s

    @property
    def steps_per_episode(self) -> int:
        return self.tokens_per_episode * self.architecture.num_layers

    def expert_nodes(self) -> tuple[int, ...]:
        """Node index of every expert: 0 is the source, 1..N the edge nodes."""
        num_experts = self.architecture.num_experts
        if self.placement is not None:
            nodes = list(self.placement)
        else:
            nodes = [1 + (e * self.num_nodes) // num_experts for e in range(num_experts)]
        for expert in self.local_experts:
            nodes[expert] = 0
        return tuple(nodes)

    # -- validation -----------------------------------------------------------

    def _normalise_sequences(self) -> None:
        # YAML and JSON give lists; the frozen dataclass stores tuples so it stays hashable.
        for name in ("placement", "local_experts"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        # A pathlib.Path is stored as str so that to_dict() dumps to YAML and JSON.
        if isinstance(self.gate_trace_path, Path):
            object.__setattr__(self, "gate_trace_path", str(self.gate_trace_path))

    def _validate(self) -> None:
        if not isinstance(self.moe_preset, str) or self.moe_preset not in MOE_PRESETS:
            raise _reject("moe_preset", "one of " + ", ".join(repr(n) for n in MOE_PRESETS), self.moe_preset)
        if self.top_k is not None:
            _check_type("top_k", self.top_k, (int,))
            num_experts = MOE_PRESETS[self.moe_preset].num_experts
            _check_range("top_k", self.top_k, 1, num_experts)
        if self.num_layers is not None:
            _check_type("num_layers", self.num_layers, (int,))
            _check_range("num_layers", self.num_layers, 1, 10_000)
        arch = self.architecture

        int_fields = ("activation_bits", "expert_cluster_size", "profile_seed", "num_nodes",
                      "csi_delay_steps", "tokens_per_episode", "prompt_tokens")
        for name in int_fields:
            _check_type(name, getattr(self, name), (int,))
        float_fields = ("gate_logit_std", "gate_popularity_std", "gate_token_correlation",
                        "distance_min_m", "distance_max_m", "carrier_frequency_ghz", "bandwidth_total_hz",
                        "noise_psd_dbm_per_hz", "noise_figure_db", "source_tx_power_dbm", "node_tx_power_dbm",
                        "latency_budget_s", "node_flops_per_s", "node_energy_j_per_flop", "source_flops_per_s",
                        "source_energy_j_per_flop", "shadowing_std_db", "rician_k_db", "doppler_hz",
                        "csi_error_std", "accuracy_budget", "accuracy_violation_penalty",
                        "latency_violation_penalty")
        for name in float_fields:
            _check_type(name, getattr(self, name), (int, float))
        for name in ("gate_source", "access", "pathloss_model", "fading", "fading_mode", "accuracy_budget_mode"):
            _check_type(name, getattr(self, name), (str,))

        _check_range("activation_bits", self.activation_bits, 1, 64)
        _check_range("gate_logit_std", self.gate_logit_std, 0.0, low_open=True)
        _check_range("gate_popularity_std", self.gate_popularity_std, 0.0)
        _check_range("gate_token_correlation", self.gate_token_correlation, 0.0, 1.0, high_open=True)
        _check_range("expert_cluster_size", self.expert_cluster_size, 1, arch.num_experts)
        _check_range("profile_seed", self.profile_seed, 0)
        _check_range("num_nodes", self.num_nodes, 1, 1024)
        _check_range("distance_min_m", self.distance_min_m, 1.0)
        _check_range("distance_max_m", self.distance_max_m, self.distance_min_m)
        _check_range("carrier_frequency_ghz", self.carrier_frequency_ghz, 0.5, 100.0)
        _check_range("bandwidth_total_hz", self.bandwidth_total_hz, 0.0, low_open=True)
        _check_range("noise_psd_dbm_per_hz", self.noise_psd_dbm_per_hz, -250.0, -100.0)
        _check_range("noise_figure_db", self.noise_figure_db, 0.0, 30.0)
        _check_range("source_tx_power_dbm", self.source_tx_power_dbm, -30.0, 60.0)
        _check_range("node_tx_power_dbm", self.node_tx_power_dbm, -30.0, 60.0)
        _check_range("latency_budget_s", self.latency_budget_s, 0.0, 10.0, low_open=True)
        for name in ("node_flops_per_s", "source_flops_per_s"):
            _check_range(name, getattr(self, name), 0.0, low_open=True)
        for name in ("node_energy_j_per_flop", "source_energy_j_per_flop"):
            _check_range(name, getattr(self, name), 0.0)
        _check_range("shadowing_std_db", self.shadowing_std_db, 0.0, 30.0)
        _check_range("rician_k_db", self.rician_k_db, -30.0, 40.0)
        _check_range("doppler_hz", self.doppler_hz, 0.0, 1e5)
        if self.step_duration_s is not None:
            _check_type("step_duration_s", self.step_duration_s, (int, float))
            _check_range("step_duration_s", self.step_duration_s, 0.0, 10.0, low_open=True)
        _check_range("csi_delay_steps", self.csi_delay_steps, 0, 10_000)
        _check_range("csi_error_std", self.csi_error_std, 0.0, 1.0)
        _check_range("accuracy_budget", self.accuracy_budget, 0.0, 100.0)
        _check_range("tokens_per_episode", self.tokens_per_episode, 1, 1_000_000)
        _check_range("prompt_tokens", self.prompt_tokens, 1, 65_536)
        if self.prefill_latency_budget_s is not None:
            _check_type("prefill_latency_budget_s", self.prefill_latency_budget_s, (int, float))
            _check_range("prefill_latency_budget_s", self.prefill_latency_budget_s, 0.0, 100.0, low_open=True)
        _check_range("accuracy_violation_penalty", self.accuracy_violation_penalty, 0.0)
        _check_range("latency_violation_penalty", self.latency_violation_penalty, 0.0)

        _check_choice("gate_source", self.gate_source, GATE_SOURCES)
        self._validate_gate_trace()
        _check_choice("access", self.access, ACCESS_SCHEMES)
        _check_choice("pathloss_model", self.pathloss_model, PATHLOSS_MODELS)
        _check_choice("fading", self.fading, FADING_DISTRIBUTIONS)
        _check_choice("fading_mode", self.fading_mode, FADING_MODES)
        _check_choice("accuracy_budget_mode", self.accuracy_budget_mode, ACCURACY_BUDGET_MODES)

        self._validate_placement(arch)

    def _validate_gate_trace(self) -> None:
        # The trace file itself is checked when the environment loads it, so that a scenario
        # that never builds gates (channel studies) does not need one.
        if self.gate_trace_path is not None:
            _check_type("gate_trace_path", self.gate_trace_path, (str,))
            if not self.gate_trace_path:
                raise _reject("gate_trace_path", "a trace file path or None", self.gate_trace_path)

    def _validate_placement(self, arch: MoEArchitecture) -> None:
        num_experts = arch.num_experts
        if arch.top_k > num_experts:
            raise _reject("top_k", f"at most num_experts={num_experts}", arch.top_k)
        if not isinstance(self.local_experts, tuple):
            raise TypeError(f"local_experts must be a list of expert indices, got {self.local_experts!r}")
        for expert in self.local_experts:
            if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
                raise _reject("local_experts", f"expert indices in [0, {num_experts - 1}]", self.local_experts)
        if len(set(self.local_experts)) != len(self.local_experts):
            raise _reject("local_experts", "distinct expert indices", self.local_experts)

        if self.placement is None:
            if self.num_nodes > num_experts:
                raise _reject("num_nodes", f"at most num_experts={num_experts} for the contiguous placement",
                              self.num_nodes)
            return
        if not isinstance(self.placement, tuple):
            raise TypeError(f"placement must be a list with one node index per expert, got {self.placement!r}")
        if len(self.placement) != num_experts:
            raise _reject("placement", f"one node index per expert ({num_experts} entries)",
                          f"{len(self.placement)} entries")
        for expert, node in enumerate(self.placement):
            if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= self.num_nodes:
                raise ValueError(
                    f"invalid placement: expert {expert} is on node {node!r}, but nodes are 0 (the source) "
                    f"to num_nodes={self.num_nodes}; every expert needs a node"
                )


def resolve_scenario(scenario: ScenarioConfig | Mapping[str, Any] | str | Path | None = None,
                     **overrides: Any) -> ScenarioConfig:
    """Turn a scenario object, mapping, YAML path or ``None`` (default) into a ScenarioConfig.

    Keyword overrides are applied last, so ``gymnasium.make("WIDE-Decode-v0", access="tdma")``
    changes one field of the default scenario.
    """
    if scenario is None:
        base = ScenarioConfig()
    elif isinstance(scenario, ScenarioConfig):
        base = scenario
    elif isinstance(scenario, Mapping):
        base = ScenarioConfig.from_dict(scenario)
    elif isinstance(scenario, (str, Path)):
        base = ScenarioConfig.from_yaml(scenario)
    else:
        raise TypeError(
            "scenario must be a ScenarioConfig, a mapping, a YAML path or None, "
            f"got {type(scenario).__name__}"
        )
    return base.replace(**overrides) if overrides else base


__all__ = ["MoEArchitecture", "MOE_PRESETS", "ScenarioConfig", "resolve_scenario"]
