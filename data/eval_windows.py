"""Sliding-window evaluation (docs/spec.md §7): which windows are scored, and which targets of each.

The validation stream of N targets (tokens[1:], each predicted from the tokens before it) is read in
windows of L inputs, whose starts advance by the stride S (1 <= S <= L):

    window k reads inputs tokens[s_k : s_k + L] and predicts targets tokens[s_k + 1 : s_k + L + 1],
    s_k = min(k*S, N - L), for k = 0, 1, ... until a window ends at the last target (s_k = N - L).

Window 0 scores all its L targets; window k > 0 scores only its targets no earlier window scored,
its last s_k - s_(k-1) positions. So every target is scored exactly once (N in all, no tail
dropped), and every target after the first window sees at least L - S tokens of context. S = L is
the non-overlapping evaluation with its tail kept; S > L would skip targets and is refused. With
N < L, one window of N inputs scores everything.

Pure numpy, written once for both backends: a backend returns per-token losses of whole windows,
and the caller keeps positions first[i]: of row i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from core.errors import ConfigError
from data.stream import rank_share


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one sliding evaluation: starts[k] and the first scored position first[k]."""

    n_targets: int
    seq_len: int          # L, or N when the stream is shorter than L
    stride: int
    starts: np.ndarray    # int64 (K,)
    first: np.ndarray     # int64 (K,): window k scores its positions first[k] .. seq_len - 1

    @property
    def num_windows(self) -> int:
        return int(self.starts.size)

    @property
    def scored_per_window(self) -> np.ndarray:
        return self.seq_len - self.first


def plan_windows(n_targets: int, seq_len: int, stride: int) -> WindowPlan:
    """The windows and scored ranges of the rule above for N targets, window length L, stride S."""
    if n_targets < 1:
        raise ConfigError(f"sliding evaluation of {n_targets} targets: there must be at least one")
    if seq_len < 1:
        raise ConfigError(f"EVAL_SEQ_LEN={seq_len}: must be positive")
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"EVAL_STRIDE={stride}: must be between 1 and the window length {seq_len} "
                          "(a stride longer than the window would skip targets)")
    L = min(seq_len, n_targets)
    last = n_targets - L
    count = 1 + -(-last // stride)                       # 1 + ceil((N - L) / S) windows
    starts = np.minimum(np.arange(count, dtype=np.int64) * stride, last)
    first = np.zeros(count, dtype=np.int64)
    first[1:] = L - (starts[1:] - starts[:-1])           # the window before ended at starts[k-1] + L
    return WindowPlan(n_targets, L, stride, starts, first)


def window_batches(tokens: np.ndarray, plan: WindowPlan, batch_seqs: int, rank: int = 0,
                   world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x, y, first) of at most batch_seqs windows of this rank's share: int64 (B, L), (B, L), (B,)."""
    if batch_seqs < 1:
        raise ConfigError(f"EVAL_BATCH_SEQS={batch_seqs}: must be at least 1")
    if len(tokens) != plan.n_targets + 1:
        raise ValueError(f"window plan for {plan.n_targets} targets given a stream of {len(tokens)} tokens")
    share = rank_share(plan.num_windows, rank, world_size)
    offsets = np.arange(plan.seq_len + 1, dtype=np.int64)
    for lo in range(share.start, share.stop, batch_seqs):
        ks = np.arange(lo, min(lo + batch_seqs, share.stop))
        rows = np.asarray(tokens)[plan.starts[ks][:, None] + offsets[None, :]].astype(np.int64)
        yield rows[:, :-1], rows[:, 1:], plan.first[ks]


def scored_mask(first: np.ndarray, seq_len: int) -> np.ndarray:
    """(B, L) bool: position j of row i is scored when j >= first[i]."""
    return np.arange(seq_len)[None, :] >= np.asarray(first)[:, None]
