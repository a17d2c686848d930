"""Train the small MoE language model that supplies the environment's real routing.

    python -m train.moe_lm --preset mixtral-like --out wide_env/data/mixtral_like.pt

Training is deterministic for a given seed, corpus, torch version and thread
count: the batches come from a NumPy generator seeded with ``seed``, the
weights from ``torch.manual_seed(seed)``, and the default of one thread keeps
the order of floating-point sums fixed. The log reports the validation loss
(nats per byte) and perplexity, and the checkpoint's metadata stores them with
the unigram baseline and the expert load balance.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from wide_env.corpus import Corpus, load_corpus, unigram_perplexity
from wide_env.moe_lm import MODEL_PRESETS, MoELanguageModel, MoELMConfig, save_checkpoint, state_digest

logger = logging.getLogger("train.moe_lm")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; the defaults produced the shipped checkpoints."""

    steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    seed: int = 0


@dataclass
class TrainResult:
    model: MoELanguageModel
    history: list[dict] = field(default_factory=list)  # one record per evaluation
    wall_time_s: float = 0.0


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_learning_rate`` at the last step."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return settings.min_learning_rate + (settings.learning_rate - settings.min_learning_rate) * cosine


def sample_batch(tokens: np.ndarray, batch_size: int, context_length: int,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``context_length + 1`` tokens, split into inputs and next-token targets."""
    if len(tokens) <= context_length:
        raise ValueError(f"training split has {len(tokens)} tokens, fewer than the context length "
                         f"{context_length} + 1")
    starts = rng.integers(0, len(tokens) - context_length, size=batch_size)
    windows = np.stack([tokens[s:s + context_length + 1] for s in starts])
    batch = torch.from_numpy(windows)
    return batch[:, :-1], batch[:, 1:]


def evaluation_windows(tokens: np.ndarray, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows covering ``tokens``: inputs and next-token targets, ``(W, C)`` each."""
    count = (len(tokens) - 1) // context_length
    if count < 1:
        raise ValueError(f"evaluation split has {len(tokens)} tokens, fewer than one window of "
                         f"{context_length} + 1")
    used = torch.from_numpy(np.asarray(tokens[:count * context_length + 1]))
    inputs = used[:-1].view(count, context_length)
    targets = used[1:].view(count, context_length)
    return inputs, targets


@torch.no_grad()
def evaluate(model: MoELanguageModel, tokens: np.ndarray, batch_size: int = 32) -> dict:
    """Mean next-token cross-entropy (nats per token), perplexity and expert load of ``tokens``.

    ``expert_share[l, e]`` is the share of layer ``l``'s Top-K assignments that
    go to expert ``e``; a perfectly balanced layer has ``1 / E`` everywhere.
    """
    was_training = model.training
    model.eval()
    inputs, targets = evaluation_windows(tokens, model.config.context_length)
    total_loss, total_tokens = 0.0, 0
    counts = torch.zeros(model.config.num_layers, model.config.num_experts)
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        out = model(x, y)
        total_loss += float(out.lm_loss) * y.numel()
        total_tokens += y.numel()
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.topk(model.config.top_k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=model.config.num_experts).float()
    model.train(was_training)
    loss = total_loss / total_tokens
    share = (counts / counts.sum(dim=1, keepdim=True)).numpy()
    return {"loss": loss, "perplexity": math.exp(loss), "expert_share": share}


def load_balance_summary(share: np.ndarray) -> dict:
    """Largest and smallest expert share relative to uniform, and their coefficient of variation, over layers."""
    num_experts = share.shape[1]
    relative = share * num_experts
    return {"max_share_over_uniform": float(relative.max()), "min_share_over_uniform": float(relative.min()),
            "coefficient_of_variation": float((share.std(axis=1) / share.mean(axis=1)).mean())}


def train_model(config: MoELMConfig, corpus: Corpus, settings: TrainSettings,
                log_every: int = 50) -> TrainResult:
    """Train a model from scratch; identical arguments give identical weights (same torch, same threads)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    train_tokens = corpus.split("train")
    validation_tokens = corpus.split("validation")

    model = MoELanguageModel(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.learning_rate, betas=(0.9, 0.95))

    result = TrainResult(model)
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        inputs, targets = sample_batch(train_tokens, settings.batch_size, config.context_length, rng)
        out = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()

        if log_every and (step + 1) % log_every == 0:
            logger.info("step %d/%d  train loss %.4f  aux %.4f  lr %.2e  %.1f s", step + 1, settings.steps,
                        out.lm_loss.item(), out.aux_loss.item(), optimizer.param_groups[0]["lr"],
                        time.perf_counter() - started)
        last = step + 1 == settings.steps
        if settings.eval_every and ((step + 1) % settings.eval_every == 0 or last):
            metrics = evaluate(model, validation_tokens)
            balance = load_balance_summary(metrics["expert_share"])
            result.history.append({"step": step + 1, "validation_loss": metrics["loss"],
                                   "validation_perplexity": metrics["perplexity"], **balance})
            logger.info("step %d  validation loss %.4f nats/byte  perplexity %.3f  max expert share %.2fx uniform",
                        step + 1, metrics["loss"], metrics["perplexity"], balance["max_share_over_uniform"])
    result.wall_time_s = time.perf_counter() - started
    model.eval()
    return result


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m train.moe_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="mixtral-like",
                        help="model shape (default: %(default)s)")
    parser.add_argument("--corpus", default=None,
                        help="UTF-8 text file to train on (default: CPython's pydoc_data.topics)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights and batches")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak AdamW rate")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="steps between validation evaluations")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; results are reproducible only for the same count (default: 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus)
    config = MODEL_PRESETS[args.preset]
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             eval_every=args.eval_every, seed=args.seed)
    logger.info("training %s (%d parameters) on %s, %d training bytes, seed %d", args.preset,
                sum(p.numel() for p in MoELanguageModel(config).parameters()), corpus.source,
                len(corpus.split("train")), args.seed)

    result = train_model(config, corpus, settings)
    final = evaluate(result.model, corpus.split("validation"))
    unigram = unigram_perplexity(corpus.split("train"), corpus.split("validation"))
    balance = load_balance_summary(final["expert_share"])
    logger.info("done in %.0f s: validation perplexity %.3f (unigram byte model %.3f), %s",
                result.wall_time_s, final["perplexity"], unigram, balance)

    metadata = {
        "preset": args.preset, "settings": dataclasses.asdict(settings), "corpus": corpus.describe(),
        "validation_loss": final["loss"], "validation_perplexity": final["perplexity"],
        "unigram_validation_perplexity": unigram, "load_balance": balance,
        "expert_share": final["expert_share"].tolist(), "history": result.history,
        "wall_time_s": result.wall_time_s, "threads": args.threads, "torch": str(torch.__version__),
        "python": platform.python_version(), "command": " ".join(["python -m train.moe_lm", *arguments]),
        "weights_sha256": state_digest(result.model),
    }
    path = save_checkpoint(result.model, args.out, metadata)
    logger.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
