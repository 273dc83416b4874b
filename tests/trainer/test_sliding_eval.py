"""trainer.validation.evaluate_sliding (docs/spec.md §7): the same sums for any batch size and world
size; the progress of a long evaluation; and the end of training reporting the sliding figures
beside the standard ones (log line, summary.json, metrics.jsonl) when EVAL_STRIDE > 0 (the other
runs of the suite, at EVAL_STRIDE=0, check that nothing else changed: their figures are compared
with the independent ones of tests/independent)."""

import io
import json
import math

import numpy as np
import pytest

from core.config import TrainConfig
from core.errors import ConfigError
from core.metrics import ByteTables, token_bytes
from trainer.plan import eval_geometry
from trainer.progress import EvalProgress
from trainer.validation import evaluate_sliding
from trainer_helpers import tiny_env, train

V = 50
TABLES = ByteTables(base_bytes=np.arange(V, dtype=np.int16) % 4, has_leading_space=np.arange(V) % 3 == 0,
                    is_boundary=np.arange(V) == 1)


class FakeBackend:
    """A loss that depends on the target, the token before it and the column it is scored in, so
    a window placed or cut differently changes the figures; all_reduce_sum keeps each rank's sums."""

    def __init__(self, rank, world_size, reduced):
        self.rank, self.world_size, self.reduced = rank, world_size, reduced

    def eval_token_losses(self, x, y):
        column = np.arange(x.shape[1])[None, :]
        return 1.0 + 0.5 * np.sin(0.3 * y + 0.7 * x) + 1.0 / (1.0 + column)

    def all_reduce_sum(self, values):
        self.reduced.append(list(values))
        return [1.0] * len(values)   # this rank's figures alone are not the test's (a rank may have no window)


def sliding_over_ranks(tokens, cfg, world_size):
    """(val_loss, val_bpb) of world_size ranks' evaluate_sliding, their sums added as all_reduce does."""
    reduced = []
    for rank in range(world_size):
        evaluate_sliding(FakeBackend(rank, world_size, reduced), tokens, TABLES, cfg.eval_window, cfg.eval_stride,
                         eval_geometry(cfg, world_size).sliding_batch_seqs)
    loss_sum, n_tokens, n_bytes = np.sum(reduced, axis=0)
    assert n_tokens == len(tokens) - 1
    return loss_sum / n_tokens, loss_sum / math.log(2) / n_bytes


def expected_figures(tokens, L, S):
    """Target t (1..N) is scored in the first window that holds it, at column t - 1 - start."""
    n = len(tokens) - 1
    loss = n_bytes = 0.0
    for t in range(1, n + 1):
        k = 0 if t <= L else -(-(t - L) // S)               # the first window whose end reaches t
        start = min(k * S, n - L)
        j = t - 1 - start
        loss += 1.0 + 0.5 * np.sin(0.3 * tokens[t] + 0.7 * tokens[t - 1]) + 1.0 / (1.0 + j)
        n_bytes += token_bytes(TABLES, tokens[t - 1:t], tokens[t:t + 1]).sum()
    return loss / n, loss / math.log(2) / n_bytes


@pytest.mark.parametrize("n, L, S", [(700, 64, 16), (701, 64, 23), (40, 64, 8)])
def test_sliding_figures_are_the_same_for_any_batch_size_and_world_size(n, L, S):
    tokens = np.random.default_rng(n).integers(0, V, n + 1)
    expected = expected_figures(tokens, min(L, n), S)
    for batch_seqs, world_size in [(1, 1), (4, 1), (3, 2), (1000, 3), (2, 8)]:
        cfg = TrainConfig(train_seq_len=L, eval_stride=S, eval_batch_seqs=batch_seqs)
        got = sliding_over_ranks(tokens, cfg, world_size)
        assert np.allclose(got, expected, rtol=1e-12, atol=0), (batch_seqs, world_size)


def test_a_stride_longer_than_the_window_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="EVAL_STRIDE=65: must not exceed the window length 64"):
        TrainConfig(train_seq_len=64, eval_stride=65)
    TrainConfig(train_seq_len=32, eval_seq_len=64, eval_stride=64)   # EVAL_SEQ_LEN is the window


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_long_evaluation_prints_val_progress_lines_when_not_on_a_terminal():
    out, clock = io.StringIO(), Clock()
    progress = EvalProgress("sliding val", enabled=True, stream=out, every_s=10.0, clock=clock)
    for done in range(1, 11):
        clock.now += 4.0                        # 4 s a batch: a line every 3rd batch (>= 10 s apart)
        progress(done, 10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("val_progress sliding val batches:") for line in lines)
    assert lines[0].startswith("val_progress sliding val batches:3/10 (30%) elapsed:0:12 eta:0:28")
    quiet = io.StringIO()
    EvalProgress("val", enabled=False, stream=quiet, every_s=0.0)(1, 2)   # ranks other than 0 print nothing
    assert quiet.getvalue() == ""


def test_the_end_of_training_reports_sliding_figures_beside_the_standard_ones(tiny_dataset, tmp_path):
    """One backend: the reporting is the loop's (trainer/loop.py finish), the same for both."""
    run = train("torch", tiny_env(tiny_dataset, tmp_path, RUN_ID="sliding", ITERATIONS=4, EVAL_STRIDE=8))
    s = json.loads((run.run_dir / "summary.json").read_text())
    assert s["eval_stride"] == 8 and s["eval_seq_len"] == 32
    bpb = s["roundtrip_sliding_val_bpb"]
    assert 0 < bpb < 20 and bpb != run.roundtrip_val_bpb and s["roundtrip_val_bpb"] == run.roundtrip_val_bpb
    log = (run.run_dir / "log.txt").read_text()
    assert f"final_int8_zlib_roundtrip_sliding val_loss:{s['roundtrip_sliding_val_loss']:.8f} val_bpb:{bpb:.8f} stride:8" in log
    assert f"sliding (stride 8) val_bpb {bpb:.4f}" in log
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["kind"] == "sliding_val"]
    assert record["val_bpb"] == bpb and record["eval_stride"] == 8 and record["step"] == 4
