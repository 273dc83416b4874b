"""EMA_DECAY (docs/spec.md §6): the moving average of the weights, in both trainers.

- It is what the final validation scores and the artifact holds, and it never changes training:
  the per-step losses are those of the same run without it.
- Checkpoints keep it beside the weights: a run stopped at a checkpoint and resumed gives the
  uninterrupted run's losses, validation and moving average exactly.
- Each step it is decay * average + (1 - decay) * weights (tests/numpy_optim.py's ema, float64).
"""

import numpy as np
import pytest

import numpy_optim as ref
from core import artifact
from core.checkpoint import load_checkpoint
from core.init import random_weights
from trainer_helpers import make_session, tiny_env, train

BACKENDS = ["torch", "mlx"]
DECAY = 0.7   # short runs: a decay this low moves the average visibly in a few steps


def final_checkpoint(run):
    return load_checkpoint(run.run_dir / "checkpoints" / f"step_{run.step:06d}.safetensors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_is_evaluated_and_exported_and_resumes_exactly(backend, tiny_dataset, tmp_path):
    settings = dict(ITERATIONS=6, CHECKPOINT_EVERY=3)
    plain = train(backend, tiny_env(tiny_dataset, tmp_path, RUN_ID="plain", **settings))
    full = train(backend, tiny_env(tiny_dataset, tmp_path, RUN_ID="full", EMA_DECAY=DECAY, **settings))
    assert full.train_losses == plain.train_losses          # the average never feeds back into training
    ckpt = final_checkpoint(full)
    assert ckpt.ema is not None and set(ckpt.ema) == set(ckpt.weights)
    assert all(np.any(ckpt.ema[n] != ckpt.weights[n]) for n in ckpt.weights if ckpt.weights[n].size)
    assert full.val_loss != plain.val_loss                  # the final validation scored the average
    shipped = (full.run_dir / "model.int8.zlib").read_bytes()
    assert shipped == artifact.pack(ckpt.ema) != artifact.pack(ckpt.weights)   # the average ships
    assert full.summary["exported_weights"] == "ema" and plain.summary["exported_weights"] == "trained"

    middle = full.run_dir / "checkpoints" / "step_000003.safetensors"
    assert load_checkpoint(middle).ema is not None
    resumed = train(backend, tiny_env(tiny_dataset, tmp_path, RUN_ID="resumed", EMA_DECAY=DECAY,
                                      RESUME_FROM=middle, **settings))
    assert resumed.train_losses == full.train_losses[3:]
    assert (resumed.val_loss, resumed.val_bpb) == (full.val_loss, full.val_bpb)
    again = final_checkpoint(resumed)
    for name in ckpt.ema:
        np.testing.assert_array_equal(again.ema[name], ckpt.ema[name])
        np.testing.assert_array_equal(again.weights[name], ckpt.weights[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_step_moves_the_average_by_the_formula(backend, tiny_dataset, tmp_path):
    from core.config import load_config

    cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path, EMA_DECAY=DECAY))
    spec = cfg.model_spec()
    session = make_session(backend, cfg)
    session.setup(spec, cfg)
    try:
        w0 = random_weights(spec, seed=3)
        session.load_weights(w0)
        assert session.export_ema() is None                  # off until the loop starts it
        session.load_ema(w0)
        want = {k: v.astype(np.float64) for k, v in w0.items()}
        rng = np.random.default_rng(0)
        for step in range(3):
            x = rng.integers(0, spec.vocab_size, (4, 32))
            session.train_step([(x, np.roll(x, -1, axis=1))], {"embed": 0.05, "matrix": 0.04, "scalar": 0.04},
                               0.9, step)
            w = session.export_weights()
            want = {k: ref.ema(want[k], w[k].astype(np.float64), DECAY) for k in want}
        got = session.export_ema()
        for name, value in want.items():
            if value.size:
                err = np.linalg.norm(got[name] - value) / np.linalg.norm(value)
                assert err <= 1e-6, f"{name}: {err:.1e}"
    finally:
        session.close()
