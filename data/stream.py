"""Token streams and batches (docs/spec.md §7), as the reference trainers read them.

Training reads the train shards in sorted order, sequentially, wrapping around to the first shard
after the last. For a global batch of T tokens, world size W and A accumulation steps, each
micro-step takes W·(T/(W·A) + 1) consecutive tokens from the stream; rank r keeps the r-th span of
T/(W·A) + 1 tokens and trains on x = span[:-1], y = span[1:]. Every rank reads the same stream, so
every rank's position is the same and one small `state()` dict resumes all of them exactly.

Validation concatenates the val shards, cuts them to a multiple of seq_len plus one, and scores
non-overlapping windows; rank r takes the r-th contiguous share of the sequences.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from core.errors import ConfigError, DatasetError
from data.shards import read_header, read_shard


class TokenStream:
    """The train shards, one after the other, forever."""

    def __init__(self, files: Sequence[str | os.PathLike], vocab_size: int | None = None):
        self.files = [Path(f) for f in files]
        self.vocab_size = vocab_size  # when given, every shard's token range is checked as it is read
        if not self.files:
            raise DatasetError("token stream: no shard files given")
        self.counts = [read_header(f) for f in self.files]  # validates every shard up front
        if sum(self.counts) == 0:
            raise DatasetError(f"token stream: the {len(self.files)} shard(s) starting at {self.files[0]} hold no tokens")
        self._load(0)
        self.offset = 0

    def _load(self, file_index: int) -> None:
        self.file_index = file_index
        self.tokens = read_shard(self.files[file_index], self.vocab_size)

    def take(self, n: int) -> np.ndarray:
        """The next n tokens (uint16), crossing shard boundaries and wrapping around."""
        chunks = []
        remaining = n
        while remaining > 0:
            available = len(self.tokens) - self.offset
            if available <= 0:  # end of this shard: move to the next one, wrapping around
                self._load((self.file_index + 1) % len(self.files))
                self.offset = 0
                continue
            k = min(remaining, available)
            chunks.append(self.tokens[self.offset:self.offset + k])
            self.offset += k
            remaining -= k
        if not chunks:
            return np.zeros(0, dtype=np.uint16)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def state(self) -> dict:
        """The read position, as a small JSON-able dict (stored in checkpoints)."""
        return {"file_index": self.file_index, "offset": self.offset, "file": self.files[self.file_index].name}

    def restore(self, state: dict) -> None:
        """Continue from a position returned by `state()` (of a stream over the same shards)."""
        try:
            file_index, offset, name = int(state["file_index"]), int(state["offset"]), str(state["file"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"data position {state!r}: expected keys file_index, offset and file") from None
        if not 0 <= file_index < len(self.files):
            raise DatasetError(
                f"data position: shard index {file_index} is out of range, the dataset has {len(self.files)} train shards"
            )
        if self.files[file_index].name != name:
            raise DatasetError(
                f"data position: shard {file_index} was {name}, but it is {self.files[file_index].name} in this dataset"
            )
        if not 0 <= offset <= self.counts[file_index]:
            raise DatasetError(
                f"data position: offset {offset} is outside shard {name} of {self.counts[file_index]} tokens"
            )
        if file_index != self.file_index:
            self._load(file_index)
        self.offset = offset


class DistributedTokenLoader:
    """Per-rank training batches from the shared TokenStream (the reference trainers' loader)."""

    def __init__(self, files: Sequence[str | os.PathLike], rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} of world size {world_size}: need 0 <= rank < world size")
        self.rank = rank
        self.world_size = world_size
        self.stream = TokenStream(files, vocab_size)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One micro-step's (x, y) for this rank, `local_tokens` tokens (whole sequences: the plan's
        RunGeometry.micro_batch_tokens): int64 arrays of shape (-1, seq_len). Every rank takes its
        span of the same world_size spans from the shared stream."""
        span = local_tokens + 1  # one extra token: the last target
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)

    def state(self) -> dict:
        return self.stream.state()

    def restore(self, state: dict) -> None:
        self.stream.restore(state)


def leading_shards(files: Sequence[str | os.PathLike], max_tokens: int,
                   vocab_size: int | None = None) -> Iterator[np.ndarray]:
    """The tokens of whole shards, in order, until at least max_tokens have been read: the sample
    of the training set that statistics (the unigram baseline, the tying analysis) are taken on."""
    seen = 0
    for path in files:
        tokens = read_shard(path, vocab_size)
        yield tokens
        seen += tokens.size
        if seen >= max_tokens:
            return


def load_validation_tokens(files: Sequence[str | os.PathLike], seq_len: int,
                           vocab_size: int | None = None, max_tokens: int = 0) -> np.ndarray:
    """All val shards concatenated, cut to a multiple of seq_len plus one (uint16); with
    `vocab_size`, a token id >= vocab_size is a ShardError naming its shard. `max_tokens` > 0
    (VAL_MAX_TOKENS) keeps only the first max_tokens targets (max_tokens + 1 tokens) before the cut."""
    if not files:
        raise DatasetError("validation: no val shard files given")
    tokens = np.concatenate([read_shard(f, vocab_size) for f in files])
    if max_tokens > 0:
        tokens = tokens[:max_tokens + 1]
    usable = ((tokens.size - 1) // seq_len) * seq_len if tokens.size else 0
    if usable <= 0:
        raise DatasetError(
            f"validation shards ({Path(files[0]).parent}) hold {tokens.size} tokens, "
            f"fewer than TRAIN_SEQ_LEN+1 = {seq_len + 1}"
        )
    return tokens[:usable + 1]


def rank_share(count: int, rank: int, world_size: int) -> range:
    """The contiguous part of `count` validation sequences (or sliding windows) rank r scores."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def validation_batches(tokens: np.ndarray, seq_len: int, batch_seqs: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) int64 batches of at most batch_seqs non-overlapping windows of this rank's share."""
    if batch_seqs < 1:
        raise ConfigError(f"validation batch of {batch_seqs} sequences: must be at least 1")
    share = rank_share((len(tokens) - 1) // seq_len, rank, world_size)
    for start in range(share.start, share.stop, batch_seqs):
        stop = min(start + batch_seqs, share.stop)
        local = tokens[start * seq_len:stop * seq_len + 1].astype(np.int64)
        yield local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
