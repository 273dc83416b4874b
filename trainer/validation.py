"""Validation (docs/spec.md §7, §8): val_loss and val_bpb over the whole validation set, and the
unigram baseline's token counts."""

from __future__ import annotations

import numpy as np

from core.config import AUTO, TrainConfig
from core.metrics import EvalAccumulator, token_bytes
from data.stream import leading_shards, validation_batches
from trainer.backend import TrainerBackend


def evaluate(backend: TrainerBackend, val_tokens: np.ndarray, tables, cfg: TrainConfig) -> tuple[float, float]:
    """(val_loss, val_bpb) over the whole validation set, summed across ranks.

    Each rank scores batches of VAL_BATCH_SIZE / (WORLD_SIZE x GRAD_ACCUM_STEPS) tokens, as the
    reference trainers do: the micro-steps that fit training's memory keep validation's small too.
    The batch size changes only how the sums are grouped, not what they add up to."""
    accum = 1 if cfg.grad_accum_steps == AUTO else cfg.grad_accum_steps
    local_tokens = max(cfg.val_batch_size // (backend.world_size * accum), cfg.train_seq_len)
    batch_seqs = local_tokens // cfg.train_seq_len
    loss_sum = tokens = n_bytes = 0.0
    for x, y in validation_batches(val_tokens, cfg.train_seq_len, batch_seqs, backend.rank, backend.world_size):
        loss_sum += backend.eval_loss_sum(x, y)
        tokens += y.size
        n_bytes += float(token_bytes(tables, x, y).sum())
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
