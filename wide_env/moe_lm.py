"""A small decoder-only MoE language model whose routing drives the environment.

Every feed-forward layer is an MoE layer with ``E`` SwiGLU experts and a
softmax router. The router picks the Top-K experts and may renormalise their
weights to sum to 1, as Mixtral does. Training adds the load-balancing loss of
Switch Transformer (Fedus et al., 2021), ``E * sum_e f_e * P_e``, where ``f_e``
is expert ``e``'s share of the Top-K assignments and ``P_e`` its mean router
probability.

The forward pass can replace the Top-K combination of any layer by dense
per-token expert weights (``routing``), which is how the accuracy evaluation
applies a policy's decisions. Only experts with a non-zero weight are computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_FORMAT = "wide-moe-lm"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class MoELMConfig:
    """Shape and routing of the small MoE language model."""

    vocab_size: int = 256
    context_length: int = 128
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int = 192
    renormalize: bool = True
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "hidden_size", "num_layers", "num_heads", "num_experts",
                     "top_k", "expert_ffn_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name}: expected a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"invalid top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"invalid num_heads: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"invalid renormalize: expected a bool, got {self.renormalize!r}")
        if not math.isfinite(self.aux_loss_coef) or self.aux_loss_coef < 0:
            raise ValueError(f"invalid aux_loss_coef: expected a finite value >= 0, got {self.aux_loss_coef!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MoELMConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown MoE model config key(s): {', '.join(unknown)}")
        return cls(**values)


# Two shipped shapes: 8 experts Top-2 with renormalised weights like Mixtral-8x7B,
# and 64 fine-grained experts Top-8 without renormalisation like OLMoE-1B-7B.
# E, K and renormalisation match the scenario presets of the same family, so
# their traces can drive those presets.
MODEL_PRESETS: dict[str, MoELMConfig] = {
    "mixtral-like": MoELMConfig(num_experts=8, top_k=2, expert_ffn_size=192, renormalize=True),
    "olmoe-like": MoELMConfig(num_experts=64, top_k=8, expert_ffn_size=32, renormalize=False),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, config: MoELMConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        shape = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


@dataclass
class MoELayerOutput:
    output: torch.Tensor  # (B, T, d)
    router_logits: torch.Tensor  # (B, T, E) float32
    aux_loss: torch.Tensor  # scalar


# A routing override takes the layer index and that layer's router logits (B, T, E)
# and returns the dense expert weights (B, T, E) to combine the expert outputs with.
RoutingOverride = Callable[[int, torch.Tensor], torch.Tensor]


class MoELayer(nn.Module):
    """Softmax router, Top-K and ``E`` SwiGLU experts stored as stacked weights."""

    def __init__(self, config: MoELMConfig):
        super().__init__()
        d, f, e = config.hidden_size, config.expert_ffn_size, config.num_experts
        self.num_experts = e
        self.top_k = config.top_k
        self.renormalize = config.renormalize
        self.router = nn.Linear(d, e, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(e, d, f))
        self.up_proj = nn.Parameter(torch.empty(e, d, f))
        self.down_proj = nn.Parameter(torch.empty(e, f, d))

    def top_k_weights(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities, Top-K indices and Top-K weights (renormalised if configured)."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, indices, weights

    def expert_output(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Output of one expert for tokens ``x`` of shape ``(n, d)``."""
        hidden = F.silu(x @ self.gate_proj[expert]) * (x @ self.up_proj[expert])
        return hidden @ self.down_proj[expert]

    def all_expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Output of every expert for every token: ``(n, d)`` in, ``(n, E, d)`` out."""
        gate = torch.einsum("nd,edf->nef", x, self.gate_proj)
        up = torch.einsum("nd,edf->nef", x, self.up_proj)
        return torch.einsum("nef,efd->ned", F.silu(gate) * up, self.down_proj)

    def combine(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_e weights[n, e] * expert_e(x[n])``, computing only experts with a non-zero weight.

        The (token, expert) pairs are grouped by expert into a zero-padded
        ``(E, capacity, d)`` buffer, so all experts run in three batched matmuls.
        """
        pairs = torch.nonzero(weights)
        if pairs.numel() == 0:
            return torch.zeros_like(x)
        order = torch.argsort(pairs[:, 1], stable=True)
        tokens, experts = pairs[order, 0], pairs[order, 1]
        counts = torch.bincount(experts, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.arange(len(experts)) - starts[experts]
        capacity = int(counts.max())

        grouped = x.new_zeros(self.num_experts, capacity, x.shape[-1])
        grouped = grouped.index_put((experts, slots), x[tokens])
        hidden = F.silu(torch.bmm(grouped, self.gate_proj)) * torch.bmm(grouped, self.up_proj)
        expert_out = torch.bmm(hidden, self.down_proj)[experts, slots]
        scaled = expert_out * weights[tokens, experts, None].to(x.dtype)
        return torch.zeros_like(x).index_add(0, tokens, scaled)

    def forward(self, x: torch.Tensor, layer_index: int = 0, routing: RoutingOverride | None = None) -> MoELayerOutput:
        batch, length, width = x.shape
        router_logits = self.router(x).float()
        probs, indices, top_weights = self.top_k_weights(router_logits)
        if routing is None:
            dense = torch.zeros_like(probs).scatter(-1, indices, top_weights)
        else:
            dense = routing(layer_index, router_logits.detach())
            if dense.shape != probs.shape:
                raise ValueError(f"routing override for layer {layer_index} returned shape {tuple(dense.shape)}, "
                                 f"expected {tuple(probs.shape)}")
            dense = dense.to(probs.dtype)

        # Switch Transformer load-balancing loss on the model's own Top-K assignments.
        assigned = torch.zeros_like(probs).scatter(-1, indices, 1.0)
        share = assigned.reshape(-1, self.num_experts).mean(0) / self.top_k
        mean_prob = probs.reshape(-1, self.num_experts).mean(0)
        aux_loss = self.num_experts * (share * mean_prob).sum()

        flat = self.combine(x.reshape(-1, width), dense.reshape(-1, self.num_experts))
        return MoELayerOutput(flat.view(batch, length, width), router_logits, aux_loss)


class Block(nn.Module):
    def __init__(self, config: MoELMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.moe_norm = RMSNorm(config.hidden_size)
        self.moe = MoELayer(config)


@dataclass
class MoELMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # next-token cross-entropy (nats) plus the weighted aux loss
    lm_loss: torch.Tensor | None  # next-token cross-entropy alone, in nats
    aux_loss: torch.Tensor  # mean load-balancing loss over layers
    router_logits: list[torch.Tensor] = field(default_factory=list)  # per layer (B, T, E)
    moe_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer (B, T, d), when requested
    moe_outputs: list[torch.Tensor] = field(default_factory=list)  # per layer (B, T, d), when requested


class MoELanguageModel(nn.Module):
    """Decoder-only transformer with learned positions, pre-norm blocks and MoE feed-forward layers."""

    def __init__(self, config: MoELMConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.context_length, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * layers)."""
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, parameter in self.named_parameters():
            if name.endswith("norm.weight") or name == "final_norm.weight":
                nn.init.ones_(parameter)
            elif name.endswith("attn.out.weight") or name.endswith("down_proj"):
                nn.init.normal_(parameter, std=residual_std)
            else:
                nn.init.normal_(parameter, std=std)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.moe for block in self.blocks]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                routing: RoutingOverride | None = None, capture: bool = False) -> MoELMOutput:
        """Run the model on ``(B, T)`` token ids.

        ``targets`` (``(B, T)``, the next token of each position) adds the loss.
        ``routing`` replaces the Top-K combination of every MoE layer, see
        ``RoutingOverride``. ``capture`` also returns each MoE layer's input
        (after its norm) and output.
        """
        batch, length = input_ids.shape
        if length > self.config.context_length:
            raise ValueError(f"input of {length} tokens exceeds the context length {self.config.context_length}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]

        router_logits, moe_inputs, moe_outputs, aux_losses = [], [], [], []
        for index, block in enumerate(self.blocks):
            x = x + block.attn(block.attn_norm(x))
            moe_in = block.moe_norm(x)
            layer = block.moe(moe_in, layer_index=index, routing=routing)
            x = x + layer.output
            router_logits.append(layer.router_logits)
            aux_losses.append(layer.aux_loss)
            if capture:
                moe_inputs.append(moe_in)
                moe_outputs.append(layer.output)

        logits = F.linear(self.final_norm(x), self.token_embedding.weight)
        aux_loss = torch.stack(aux_losses).mean()
        loss = lm_loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss = lm_loss + self.config.aux_loss_coef * aux_loss
        return MoELMOutput(logits, loss, lm_loss, aux_loss, router_logits, moe_inputs, moe_outputs)


# -- checkpoints ---------------------------------------------------------------


class CheckpointError(ValueError):
    """A model checkpoint that is missing fields or does not fit its model shape."""


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters in float16, to tie a trace to the weights it came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(model: MoELanguageModel, path: str | Path, metadata: dict | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Save the config, the weights (cast to ``dtype``) and JSON metadata with ``torch.save``.

    The metadata goes through a JSON round trip, so that ``load_checkpoint`` can
    read the file with ``weights_only=True``; values JSON cannot hold raise ``TypeError``.
    """
    metadata = json.loads(json.dumps(metadata or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to(dtype).clone() for name, tensor in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": model.config.to_dict(),
               "state_dict": state, "metadata": metadata}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, expected: MoELMConfig | None = None) -> tuple[MoELanguageModel, dict]:
    """Load a checkpoint into a float32 model in eval mode; return ``(model, metadata)``.

    With ``expected``, the checkpoint's config must equal it. Raises
    ``FileNotFoundError`` for a missing file and ``CheckpointError`` naming the
    file for an unreadable file, a config mismatch, or a tensor that is missing
    or has the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, pickle and zip errors for damaged files
        raise CheckpointError(f"cannot read model checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (missing or wrong 'format' field)")
    try:
        config = MoELMConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"invalid model config in checkpoint {path}: {error}") from error
    if expected is not None and config != expected:
        diffs = [f"{name}={getattr(config, name)!r} (expected {getattr(expected, name)!r})"
                 for name in config.to_dict() if getattr(config, name) != getattr(expected, name)]
        raise CheckpointError(f"model checkpoint {path} has the wrong shape: " + ", ".join(diffs))

    model = MoELanguageModel(config)
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"model checkpoint {path} has no state_dict")
    reference = model.state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise CheckpointError(f"model checkpoint {path} does not match its config: missing tensors {missing}, "
                              f"unexpected tensors {unexpected}")
    for name, tensor in reference.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"model checkpoint {path} has the wrong shape for {name}: {tuple(state[name].shape)}, "
                f"but its config needs {tuple(tensor.shape)}"
            )
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    model.eval()
    return model, dict(payload.get("metadata") or {})


__all__ = ["MODEL_PRESETS", "CheckpointError", "MoELMConfig", "MoELanguageModel", "MoELayer", "load_checkpoint",
           "save_checkpoint", "state_digest"]
