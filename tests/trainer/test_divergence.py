"""The divergence stop: a run whose loss or weights turn non-finite stops with one line, and no
checkpoint it leaves holds NaN weights: the last one written is always one to resume from.

The loss is read lazily (on log steps, validation and checkpoints only), so a NaN is forced here
between log steps: once into the weights a step's forward reads (the loss of that step is NaN),
once into the weights a step's update writes (that step's loss is still finite)."""

import numpy as np
import pytest

from core.checkpoint import load_checkpoint
from core.config import load_config
from core.errors import TrainingError
from trainer.loop import run_training
from trainer_helpers import make_session, tiny_env

BACKENDS = ["torch", "mlx"]


def poisoned_run(backend, env, *, before_step=None, after_step=None):
    """Train with NaN written into one weight before the step of 0-based index `before_step`, or
    after the step of index `after_step`; returns the TrainingError the run stops with."""
    cfg = load_config([], environ=env)
    session = make_session(backend, cfg)
    train_step = session.train_step

    def poison():
        weights = session.export_weights()
        weights["blocks.0.attn.c_q.weight"] = np.full_like(weights["blocks.0.attn.c_q.weight"], np.nan)
        session.load_weights(weights)

    def step(micro_batches, lrs, muon_momentum, index):
        if index == before_step:
            poison()
        loss = train_step(micro_batches, lrs, muon_momentum, index)
        if index == after_step:
            poison()
        return loss

    session.train_step = step
    try:
        with pytest.raises(TrainingError) as err:
            run_training(cfg, session)
    finally:
        session.close()
    return str(err.value)


def checkpoints(tmp_path, run_id):
    return sorted((tmp_path / "runs" / run_id / "checkpoints").glob("*.safetensors"))


def assert_finite(path):
    for name, w in load_checkpoint(path).weights.items():
        assert np.isfinite(w).all(), f"{path.name}: {name} is not finite"


# Steps 1-10 are log steps (their losses are read at once); 11 and later are read at step 12's checkpoint.
LAZY = dict(ITERATIONS=16, TRAIN_LOG_EVERY=100, CHECKPOINT_EVERY=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_loss_between_log_steps_stops_the_run_before_its_checkpoint(backend, tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, tmp_path, RUN_ID="nan-loss", **LAZY)
    message = poisoned_run(backend, env, before_step=10)   # step 11's forward reads NaN weights
    assert message.startswith("step 11: the training loss is nan; lower the learning rates")
    assert message.endswith("step_000006.safetensors)")
    assert [p.name for p in checkpoints(tmp_path, "nan-loss")] == ["step_000006.safetensors"]
    assert_finite(checkpoints(tmp_path, "nan-loss")[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("when", ["checkpoint", "last step"])
def test_nan_weights_after_a_finite_loss_are_never_saved(backend, when, tiny_dataset, tmp_path):
    # The update of step 12 writes NaN: its loss was computed before, and is finite. Step 12 is a
    # checkpoint step, or the run's last step (whose checkpoint follows the final validation).
    settings = LAZY if when == "checkpoint" else dict(LAZY, ITERATIONS=12)
    env = tiny_env(tiny_dataset, tmp_path, RUN_ID="nan-weights", **settings)
    message = poisoned_run(backend, env, after_step=11)
    assert message.startswith("step 12: the weights are not finite (blocks.0.attn.c_q.weight); "
                              "lower the learning rates")
    assert [p.name for p in checkpoints(tmp_path, "nan-weights")] == ["step_000006.safetensors"]
    assert_finite(checkpoints(tmp_path, "nan-weights")[0])
    assert not (tmp_path / "runs" / "nan-weights" / "model.int8.zlib").exists()
