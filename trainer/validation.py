"""Validation (docs/spec.md §7, §8): val_loss and val_bpb over the whole validation set, and the
unigram baseline's token counts."""

from __future__ import annotations

from typing import Callable

import numpy as np

from core.metrics import EvalAccumulator, token_bytes
from data.eval_windows import plan_windows, scored_mask, window_batches
from data.stream import leading_shards, rank_share, validation_batches
from trainer.backend import TrainerBackend


OnBatch = Callable[[int, int], None]   # (batches done, batches in all) on this rank, after each batch


def evaluate(backend: TrainerBackend, val_tokens: np.ndarray, tables, seq_len: int, batch_seqs: int,
             on_batch: OnBatch | None = None) -> tuple[float, float]:
    """(val_loss, val_bpb) over the whole validation set, summed across ranks.

    Each rank scores batches of `batch_seqs` sequences of `seq_len` (the plan's
    RunGeometry.val_batch_seqs). The batch size changes only how the sums are grouped, not what they
    add up to."""
    total_seqs = (len(val_tokens) - 1) // seq_len
    share = rank_share(total_seqs, backend.rank, backend.world_size)
    n_batches = -(-len(share) // batch_seqs)
    loss_sum = tokens = n_bytes = 0.0
    batches = validation_batches(val_tokens, seq_len, batch_seqs, backend.rank, backend.world_size)
    for i, (x, y) in enumerate(batches, start=1):
        loss_sum += backend.eval_loss_sum(x, y)
        tokens += y.size
        n_bytes += float(token_bytes(tables, x, y).sum())
        if on_batch is not None:
            on_batch(i, n_batches)
    return _figures(backend, loss_sum, tokens, n_bytes)


def evaluate_sliding(backend: TrainerBackend, val_tokens: np.ndarray, tables, window: int, stride: int,
                     batch_seqs: int, on_batch: OnBatch | None = None) -> tuple[float, float]:
    """(val_loss, val_bpb) of the sliding windows of data/eval_windows.py (`stride`: EVAL_STRIDE,
    `window`: EVAL_SEQ_LEN or TRAIN_SEQ_LEN) over the same N targets as evaluate(), summed across
    ranks, in batches of `batch_seqs` windows (the plan's RunGeometry.sliding_batch_seqs).

    The backend scores whole windows (per-token losses); only each window's new targets count, so
    the sums are the same (up to float64 rounding) for any batch size and world size."""
    plan = plan_windows(len(val_tokens) - 1, window, stride)
    n_batches = -(-len(rank_share(plan.num_windows, backend.rank, backend.world_size)) // batch_seqs)
    loss_sum = tokens = n_bytes = 0.0
    batches = window_batches(val_tokens, plan, batch_seqs, backend.rank, backend.world_size)
    for i, (x, y, first) in enumerate(batches, start=1):
        scored = scored_mask(first, plan.seq_len)
        loss_sum += float(backend.eval_token_losses(x, y)[scored].sum())
        tokens += float(scored.sum())
        n_bytes += float(token_bytes(tables, x, y)[scored].sum())
        if on_batch is not None:
            on_batch(i, n_batches)
    return _figures(backend, loss_sum, tokens, n_bytes)


def _figures(backend: TrainerBackend, loss_sum: float, tokens: float, n_bytes: float) -> tuple[float, float]:
    loss_sum, tokens, n_bytes = backend.all_reduce_sum([loss_sum, tokens, n_bytes])
    acc = EvalAccumulator()
    acc.add(loss_sum, int(tokens), int(n_bytes))
    return acc.val_loss, acc.val_bpb


def train_token_counts(files, vocab_size: int, max_tokens: int = 200_000_000) -> np.ndarray:
    """How often each token id occurs in the training shards (the first `max_tokens` of them)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for tokens in leading_shards(files, max_tokens):
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts
