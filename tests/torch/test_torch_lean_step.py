"""The torch step a GPU runs is lean, proven with CPU proxies (bench/launches.py has the counters):
few aten ops per optimizer step, no host read of a device value on non-log steps, one collective
per step under DDP besides the gradients', and no recompile after the first compiled step."""

import json

import numpy as np

from bench.launches import SyncCounter, count_recompiles, make_session, optimizer_ops
from trainer_helpers import make_session as make_bare_session, tiny_env
from core.config import load_config
from core.schedule import learning_rates, momentum
from trainer.loop import run_training


def test_an_optimizer_step_at_the_default_size_dispatches_at_most_300_aten_ops():
    """ModelSpec()'s default (9 layers x 512, 54 matrices): about 2,400 ops written per parameter."""
    session, cfg = make_session(compile_ns=False, compute_dtype="float32")
    try:
        ops = optimizer_ops(session, cfg)
    finally:
        session.close()
    assert 0 < ops.total <= 300, ops.by_op.most_common(8)


def test_a_training_run_reads_no_device_value_between_log_steps(tiny_dataset, tmp_path):
    """Steps 1-10 and the last are log steps (each reads the losses since the last one); steps
    11-15 read nothing and run no collective. Every step's loss still reaches TrainResult."""
    env = tiny_env(tiny_dataset, tmp_path, ITERATIONS=16, TRAIN_LOG_EVERY=100)
    cfg = load_config([], environ=env)
    session = make_bare_session("torch", cfg)
    marks = []
    original = session.train_step

    def train_step(*args):
        marks.append((counter.reads(), counter.collectives()))
        return original(*args)

    session.train_step = train_step
    try:
        with SyncCounter() as counter:
            result = run_training(cfg, session)
    finally:
        session.close()
    per_step = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]   # steps 1..15
    assert all(reads >= 1 for reads, _ in per_step[:10])    # log steps: the counter sees the reads
    assert per_step[10:] == [(0, 0)] * 5
    assert len(result.train_losses) == 16 and all(np.isfinite(result.train_losses))
    logged = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert [r["step"] for r in logged] == list(range(1, 11)) + [16]
    assert [r["train_loss"] for r in logged] == [result.train_losses[s - 1] for s in range(1, 11)] + [result.train_losses[15]]


def test_with_two_ranks_the_loss_rides_in_muons_all_reduce():
    """Under DDP a step's only collective besides the gradients' is Muon's update all-reduce, which
    carries the loss too; nothing is read on the host. (Collectives faked: one process.)"""
    session, cfg = make_session(compile_ns=False, compute_dtype="float32", seq_len=64, vocab_size=64, num_layers=2,
                                model_dim=32, num_heads=2, num_kv_heads=1)
    session.world_size = 2
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (2, 64))
    try:
        with SyncCounter(fake_collectives=True) as counter:
            session.train_step([(x, x)], learning_rates(cfg, 0, 0.0), momentum(cfg, 0), 0)
    finally:
        session.world_size = 1
        session.close()
    assert counter.collectives() == counter.counts["all_reduce"] == 1
    assert counter.reads() == 0


def test_no_recompile_after_the_first_compiled_step_across_lr_changes_and_a_resume():
    """torch.compile with the aot_eager backend: dynamo's guards (what triggers a recompile) are
    those of inductor, without ~100 s of C++ code generation on this CPU."""
    compiled = count_recompiles()
    assert compiled["graphs_first_step"] >= 2     # the model and Newton-Schulz were compiled
    assert compiled["recompiles_after"] == 0
