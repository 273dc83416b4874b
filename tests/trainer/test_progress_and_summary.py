"""What a user sees: the plain-line fallback, the summary text, the unigram baseline and the loss plot."""

import io
import json
import math
import time

import numpy as np

from core.metrics import ByteTables, unigram_baseline
from trainer.plot import plot_losses
from trainer.progress import EvalProgress, Progress, format_seconds
from trainer.summary import format_summary


def test_no_bar_when_output_is_not_a_terminal():
    out = io.StringIO()
    p = Progress(100, 0, enabled=True, stream=out)
    p.update(1, 5.0, 1000.0, 60.0)
    p.print("step:1/100 train_loss:5.0000")
    p.close()
    assert out.getvalue() == "step:1/100 train_loss:5.0000\n"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bars_eta_is_the_loops_which_counts_the_wall_clock_cap():
    """tqdm's own estimate (steps left at its rate) is not shown: under a binding cap it was twice the
    log's eta on the same screen. The bar closes with its line ended."""
    out = Terminal()
    p = Progress(200, 0, enabled=True, stream=out)
    p.update(4, 6.221, 1726.0, eta_s=581.0)
    p.close()
    text = out.getvalue()
    assert "4/200" in text and "loss 6.2210 | 1,726 tok/s | eta 9:41" in text
    assert "<" not in text and text.endswith("\n")


def test_an_evaluations_bar_shows_only_after_its_delay_and_is_cleared_when_done():
    quick = Terminal()
    progress = EvalProgress("val", enabled=True, stream=quick, delay_s=60.0)
    for done in (1, 2, 3):
        progress(done, 3)
    assert quick.getvalue() == ""   # a quick evaluation: no bar at all
    slow = Terminal()
    progress = EvalProgress("val", enabled=True, stream=slow, delay_s=0.0)
    for done in (1, 2, 3):
        time.sleep(0.11)   # past tqdm's 0.1 s between redraws
        progress(done, 3)
    drawn = [part for part in slow.getvalue().split("\r") if part]
    assert "val:  67%" in slow.getvalue() and drawn[-1].strip() == ""   # shown, then its line blanked
    assert slow.getvalue().endswith("\r")   # the next line starts at the line's start, not after the bar


def test_format_seconds():
    assert format_seconds(59.6) == "1:00" and format_seconds(3725) == "1:02:05"


def test_unigram_baseline_is_the_entropy_of_the_frequencies():
    # Two token ids, each one byte, equally frequent in training: 1 bit per byte.
    tables = ByteTables(np.array([1, 1], np.int16), np.array([False, False]), np.array([False, False]))
    loss, bpb = unigram_baseline(np.array([999, 999]), np.array([0, 1, 0, 1, 1]), tables)
    assert math.isclose(loss, math.log(2)) and math.isclose(bpb, 1.0)


def test_summary_says_whether_the_model_beats_the_baseline():
    s = dict(run_id="r", val_loss=2.0, val_bpb=1.5, steps=10, tokens_seen=1000, dataset="d", unigram_val_bpb=2.5,
             roundtrip_val_bpb=1.51, artifact_bytes=8_000_000, artifact_budget_bytes=16_000_000,
             params_unique=10, params_non_embedding=5, params_total=15, params_saved_by_tying=5,
             tokens_per_s=1234.0, step_avg_ms=10.0, achieved_tflops=0.001, peak_memory_bytes=2**30,
             peak_memory_estimate_bytes=2**29, memory_budget_bytes=12 * 2**30, wall_time_s=65, backend="torch", device="cpu", compute_dtype="float32", run_dir="runs/r")
    text = "\n".join(format_summary(s))
    assert "1.0000 bits per byte better" in text and "50.0% of the 16,000,000-byte budget" in text
    assert "peak memory 1,024 MiB measured, 512 MiB estimated by the plan (budget 12.0 GiB)" in text
    resident = "\n".join(format_summary(dict(s, peak_memory_baseline_bytes=2**28)))
    assert "peak memory 1,024 MiB measured (768 MiB above the process's 256 MiB at start), 512 MiB estimated" in resident
    assert "WORSE" in "\n".join(format_summary(dict(s, val_bpb=3.0)))
    assert "MFU" not in text
    assert "MFU 40.0% of the float32 matmul ceiling measured here (250 GFLOP/s)" in "\n".join(
        format_summary(dict(s, mfu=0.4, matmul_gflops=250.0)))
    assert "MFU 40.0% of the bfloat16 matmul ceiling" in "\n".join(
        format_summary(dict(s, mfu=0.4, matmul_gflops=250.0, compute_dtype="bfloat16")))
    assert "VAL_MAX_TOKENS" not in text   # the whole val split: nothing to say
    part = "\n".join(format_summary(dict(s, val_tokens=16384, val_max_tokens=16384)))
    assert "validated on the first 16,384 val targets only (VAL_MAX_TOKENS=16384): not the challenge's val_bpb" in part


def test_loss_plot_is_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": i, "tokens": 100 * i, "train_loss": 5.0 / i} for i in range(1, 20)]
    records.append({"kind": "val", "step": 19, "tokens": 1900, "val_loss": 0.5, "val_bpb": 0.7})
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = plot_losses(metrics, tmp_path / "loss.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
