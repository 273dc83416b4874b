"""Bits per byte (docs/spec.md §8): validation loss measured per byte of text, so tokenizers compare fairly.

From the SentencePiece model, per token id:
  - control, unknown and unused ids are boundary tokens worth 0 bytes;
  - byte-fallback ids (<0x41>) are worth 1 byte;
  - any other id is worth the UTF-8 length of its piece without a leading "▁", and has a leading
    space when the piece starts with "▁".
A target token y after the token x is worth base_bytes[y] + (has_leading_space[y] and not
is_boundary[x]): the space a "▁" stands for is counted, except right after a boundary (BOS).

One refinement, identical to the rule above for every piece that has no "▁" past its first
character (all pieces of the FineWeb tokenizers): a "▁" inside a piece counts as the one byte of
the space it stands for, not the 3 bytes of the "▁" character. Our code tokenizer has whitespace-only
pieces such as "▁▁▁▁" (indentation); counted literally they would be worth 9 bytes instead of 3,
and the sum of token bytes would no longer be the length of the text.

val_bpb = (Σ cross-entropy in nats / ln 2) / Σ bytes, and val_loss = Σ cross-entropy / Σ tokens,
accumulated in float64. sentencepiece is imported lazily: core/ needs no tokenizer to import.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DatasetError

SPACE = "\u2581"  # "▁", SentencePiece's marker for a space


@dataclass(frozen=True)
class ByteTables:
    """Per token id: bytes of text it stands for, leading space, boundary (arrays of length V)."""

    base_bytes: np.ndarray  # int16
    has_leading_space: np.ndarray  # bool
    is_boundary: np.ndarray  # bool

    @property
    def vocab_size(self) -> int:
        return len(self.base_bytes)


def load_sentencepiece(path: str | os.PathLike):
    """A SentencePieceProcessor from a .model file; a missing or malformed file is a DatasetError."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"tokenizer {path} does not exist")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(f"tokenizer {path}: not a SentencePiece model ({first})") from None


def build_byte_tables(tokenizer, vocab_size: int) -> ByteTables:
    """ByteTables from a SentencePiece model path or a loaded SentencePieceProcessor."""
    if isinstance(tokenizer, (str, os.PathLike)):
        name, sp = str(tokenizer), load_sentencepiece(tokenizer)
    else:
        name, sp = "the tokenizer", tokenizer
    sp_size = int(sp.vocab_size())
    if sp_size != vocab_size:
        raise DatasetError(f"{name} has vocabulary size {sp_size} but VOCAB_SIZE={vocab_size}")

    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_leading_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            is_boundary[i] = True  # 0 bytes
            continue
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.replace(SPACE, " ").encode("utf-8"))
    return ByteTables(base_bytes, has_leading_space, is_boundary)


def token_bytes(tables: ByteTables, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bytes of text each target y stands for, x being the token before it (same shapes), int64."""
    x = np.asarray(x).astype(np.int64, copy=False)  # int64 also lets an empty list index
    y = np.asarray(y).astype(np.int64, copy=False)
    space = tables.has_leading_space[y] & ~tables.is_boundary[x]
    return tables.base_bytes[y].astype(np.int64) + space


class EvalAccumulator:
    """Sums of cross-entropy (nats), tokens and bytes over validation batches, in float64."""

    def __init__(self):
        self.loss_sum = 0.0
        self.tokens = 0.0
        self.bytes = 0.0

    def add(self, loss_sum: float, tokens: int, bytes: int) -> None:
        self.loss_sum += float(loss_sum)
        self.tokens += float(tokens)
        self.bytes += float(bytes)

    def totals(self) -> np.ndarray:
        """[loss_sum, tokens, bytes] as float64, e.g. to sum over ranks."""
        return np.array([self.loss_sum, self.tokens, self.bytes], dtype=np.float64)

    @property
    def val_loss(self) -> float:
        if self.tokens <= 0:
            raise ValueError("val_loss: no validation tokens were scored")
        return self.loss_sum / self.tokens

    @property
    def val_bpb(self) -> float:
        if self.bytes <= 0:
            raise ValueError("val_bpb: no validation bytes were scored")
        return (self.loss_sum / math.log(2)) / self.bytes


def unigram_baseline(train_counts: np.ndarray, val_tokens: np.ndarray, tables: ByteTables) -> tuple[float, float]:
    """(val_loss, val_bpb) of the unigram model of the training data, scored like the GPT.

    The baseline a language model must beat: each target token predicted with its frequency in the
    training tokens (add-one smoothed so no target has probability 0), ignoring all context.
    `val_tokens` is the validation stream (x = tokens[:-1], y = tokens[1:]).
    """
    counts = np.asarray(train_counts, dtype=np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    x, y = val_tokens[:-1].astype(np.int64), val_tokens[1:].astype(np.int64)
    acc = EvalAccumulator()
    acc.add(float(-log_p[y].sum()), y.size, int(token_bytes(tables, x, y).sum()))
    return acc.val_loss, acc.val_bpb
