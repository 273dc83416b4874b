"""The sliding-window plan (data/eval_windows.py, docs/spec.md §7): every target scored exactly once,
each with the context the rule promises, the last window ending at the last target, the same
targets for any batch size and world size."""

import numpy as np
import pytest

from core.errors import ConfigError
from data.eval_windows import plan_windows, scored_mask, window_batches
from data.stream import rank_share

# (N, L, S): S dividing N - L and not, S = 1, S = L, N = L, N < L, N = 1.
CASES = [(1000, 64, 16), (1000, 64, 20), (1001, 64, 64), (997, 64, 1), (64, 64, 8), (40, 64, 8), (1, 8, 3),
         (513, 256, 64), (300, 32, 31)]


def scored_targets(tokens, plan, batch_seqs=3, world_size=1):
    """Target positions (index into tokens) each rank's batches score, all ranks together, in order."""
    out = []
    for rank in range(world_size):
        k = rank_share(plan.num_windows, rank, world_size).start   # the first window of this rank
        for x, y, first in window_batches(tokens, plan, batch_seqs, rank, world_size):
            assert x.shape == y.shape == (len(first), plan.seq_len) and len(first) <= batch_seqs
            rows, cols = np.nonzero(scored_mask(first, plan.seq_len))
            positions = plan.starts[k + rows] + cols + 1          # y[i, j] is tokens[start + j + 1]
            assert np.array_equal(y[rows, cols], tokens[positions])
            assert np.array_equal(x[rows, cols], tokens[positions - 1])
            out.extend(positions.tolist())
            k += len(first)
    return np.asarray(out)


@pytest.mark.parametrize("n, L, S", CASES)
def test_every_target_is_scored_exactly_once_with_its_context(n, L, S):
    tokens = np.arange(n + 1, dtype=np.int64) * 7 % 1009       # distinct enough to check y against tokens
    plan = plan_windows(n, L, S)
    positions = scored_targets(tokens, plan)
    assert np.array_equal(np.sort(positions), np.arange(1, n + 1))   # N targets, each once, none dropped
    assert np.array_equal(positions, np.arange(1, n + 1))            # in stream order
    assert plan.starts[0] == 0 and plan.starts[-1] + plan.seq_len == n  # the last window ends at the last target
    assert plan.seq_len == min(L, n)
    assert np.all(plan.starts[1:] <= np.arange(1, plan.num_windows) * S)   # window k starts at min(k*S, N-L)
    # Context: position j of a window sees j tokens before its target inside the window; after the first
    # window every scored target has at least L - S.
    assert np.all(plan.first[1:] >= plan.seq_len - S)
    assert plan.first[0] == 0 and int(plan.scored_per_window.sum()) == n


@pytest.mark.parametrize("n, L, S", [(1000, 64, 20), (997, 64, 1), (40, 64, 8)])
@pytest.mark.parametrize("batch_seqs, world_size", [(1, 1), (5, 2), (7, 3), (1000, 4)])
def test_the_targets_do_not_depend_on_batch_size_or_world_size(n, L, S, batch_seqs, world_size):
    tokens = np.arange(n + 1, dtype=np.int64)
    plan = plan_windows(n, L, S)
    assert np.array_equal(scored_targets(tokens, plan, batch_seqs, world_size), np.arange(1, n + 1))


def test_stride_equal_to_the_window_is_the_non_overlapping_evaluation():
    plan = plan_windows(4 * 32, 32, 32)
    assert plan.starts.tolist() == [0, 32, 64, 96] and plan.first.tolist() == [0, 0, 0, 0]
    tail = plan_windows(4 * 32 + 5, 32, 32)   # the tail is kept: a last window scoring its 5 new targets
    assert tail.starts.tolist() == [0, 32, 64, 96, 101] and tail.first.tolist() == [0, 0, 0, 0, 27]


@pytest.mark.parametrize("n, L, S, match", [(100, 32, 33, "EVAL_STRIDE=33"), (100, 32, 0, "EVAL_STRIDE=0"),
                                            (0, 32, 8, "at least one"), (100, 0, 1, "EVAL_SEQ_LEN=0")])
def test_bad_plans_are_refused(n, L, S, match):
    with pytest.raises(ConfigError, match=match):
        plan_windows(n, L, S)
