"""Training text for the small MoE language model: corpus, byte tokenizer and splits.

The default corpus is CPython's bundled documentation, ``pydoc_data.topics``
(about 460 KB of English prose and code examples in CPython 3.11), which every
CPython install ships, so training and evaluation need no download. Any UTF-8
text file can take its place.

Text is tokenized as raw UTF-8 bytes (vocabulary of 256). The byte stream is
cut into blocks of ``block_size`` bytes, and block ``i`` goes to the validation
split when ``i % 10 == 8``, to the held-out split when ``i % 10 == 9`` and to
the training split otherwise (80/10/10). Each split is the concatenation of
its blocks in corpus order. The rule depends on nothing but the text, so the
splits are the same on every machine for the same text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("train", "validation", "heldout")
DEFAULT_BLOCK_SIZE = 4096
# Block index modulo SPLIT_PERIOD decides the split of a block.
SPLIT_PERIOD = 10
VALIDATION_BLOCK = 8
HELDOUT_BLOCK = 9
# Name of the built-in corpus in metadata and messages.
PYDOC_CORPUS = "pydoc_data.topics"


class ByteTokenizer:
    """UTF-8 byte tokenizer: token ``i`` is the byte value ``i``."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, token_ids) -> str:
        """Decode token ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        data = bytes(np.asarray(token_ids, dtype=np.uint8).tolist())
        return data.decode("utf-8", errors="replace")


def pydoc_topics_text() -> str:
    """Return CPython's ``pydoc_data.topics`` as one text, topics in sorted key order."""
    from pydoc_data.topics import topics

    parts = [f"{key}\n\n{topics[key].strip()}\n" for key in sorted(topics)]
    return "\n".join(parts)


@dataclass(frozen=True)
class Corpus:
    """A tokenized text and its deterministic train, validation and held-out splits."""

    source: str  # PYDOC_CORPUS or the path of the text file
    tokens: np.ndarray  # (n,) int64 byte values
    block_size: int
    sha256: str  # of the UTF-8 bytes

    @property
    def num_blocks(self) -> int:
        return -(-len(self.tokens) // self.block_size)

    def split(self, name: str) -> np.ndarray:
        """Tokens of one split (``train``, ``validation`` or ``heldout``), blocks in corpus order."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"invalid split {name!r}: expected one of {', '.join(SPLIT_NAMES)}")
        blocks = np.arange(self.num_blocks)
        phase = blocks % SPLIT_PERIOD
        if name == "validation":
            chosen = blocks[phase == VALIDATION_BLOCK]
        elif name == "heldout":
            chosen = blocks[phase == HELDOUT_BLOCK]
        else:
            chosen = blocks[phase < VALIDATION_BLOCK]
        pieces = [self.tokens[b * self.block_size:(b + 1) * self.block_size] for b in chosen]
        return np.concatenate(pieces)

    def describe(self) -> dict:
        """Plain metadata for checkpoints and trace headers."""
        return {"source": self.source, "num_tokens": int(len(self.tokens)), "block_size": self.block_size,
                "sha256": self.sha256, "tokenizer": "utf-8 bytes"}


def load_corpus(path: str | Path | None = None, block_size: int = DEFAULT_BLOCK_SIZE) -> Corpus:
    """Load the corpus from a UTF-8 text file, or CPython's ``pydoc_data.topics`` when ``path`` is None.

    Raises ``FileNotFoundError`` for a missing file, and ``ValueError`` naming
    the source for an empty text, a text that is not UTF-8, or a text too short
    to give every split at least one block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"invalid block_size: expected a positive integer, got {block_size!r}")
    if path is None:
        source = PYDOC_CORPUS
        text = pydoc_topics_text()
    else:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise FileNotFoundError(f"corpus file not found: {file}")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"corpus file {file} is not valid UTF-8 text: {error}") from error

    data = text.encode("utf-8")
    if not data.strip():
        raise ValueError(f"corpus {source} is empty: it contains no text to train or evaluate on")
    min_bytes = (SPLIT_PERIOD - 1) * block_size + 1
    if len(data) < min_bytes:
        raise ValueError(
            f"corpus {source} is too short: {len(data)} bytes, but the train/validation/held-out split "
            f"needs at least {min_bytes} bytes with block_size={block_size}; use a longer text "
            "or a smaller block size"
        )
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    return Corpus(source=source, tokens=tokens, block_size=block_size, sha256=hashlib.sha256(data).hexdigest())


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int = 256) -> float:
    """Perplexity on ``eval_tokens`` of a unigram model fitted on ``train_tokens`` (add-one smoothing)."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(np.exp(-log_probs[np.asarray(eval_tokens)].mean()))


__all__ = ["ByteTokenizer", "Corpus", "SPLIT_NAMES", "load_corpus", "pydoc_topics_text", "unigram_perplexity"]
