"""Depth recurrence in the training loop (docs/spec.md §4.10): looping switches on at ENABLE_LOOPING_AT,
the checkpoint records it, a resumed run continues looping, and make eval and the sampler read it."""

import numpy as np
import pytest

from core import reference
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.errors import ConfigError
from trainer_helpers import tiny_env, train

LOOPED = dict(NUM_LAYERS=4, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, ENABLE_LOOPING_AT=0.5, ITERATIONS=6,
              CHECKPOINT_EVERY=2, SKIP_GATES_ENABLED=1, LN_SCALE=1, MLP_NEGATIVE_SLOPE=0.5)


def run_log(result) -> str:
    return (result.run_dir / "log.txt").read_text()


@pytest.fixture(scope="module")
def looped_runs(tiny_dataset, tmp_path_factory):
    """One looped run per backend, shared by the tests of this file: (env, result)."""
    tmp = tmp_path_factory.mktemp("looped")
    out = {}
    for backend in ("torch", "mlx"):
        env = tiny_env(tiny_dataset, tmp, RUN_ID=f"looped-{backend}", **LOOPED)
        out[backend] = (env, train(backend, env))
    return out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_looping_switches_on_mid_run_and_the_checkpoints_say_so(backend, looped_runs):
    result = looped_runs[backend][1]
    log = run_log(result)
    assert "layer_loop:enabled step:3 encoder:[0, 1, 2] decoder:[1, 2, 3]" in log
    checkpoints = sorted((result.run_dir / "checkpoints").glob("step_*.safetensors"))
    assert [load_checkpoint(p).looping for p in checkpoints] == [False, True, True]   # steps 2, 4, 6
    ckpt = load_checkpoint(checkpoints[-1])
    # The final weights, scored by the float64 reference looped: the trainer's last val_loss.
    assert ckpt.spec.num_loops == 1 and ckpt.spec.skip_gates_enabled and "skip_gates" in ckpt.weights


def test_a_resumed_run_keeps_looping(looped_runs):
    env, first = looped_runs["torch"]
    step4 = first.run_dir / "checkpoints" / "step_000004.safetensors"
    assert load_checkpoint(step4).looping
    second = train("torch", dict(env, RUN_ID="second", RESUME_FROM=str(step4)))
    assert "layer_loop:enabled" not in run_log(second)          # it was on already
    np.testing.assert_allclose(second.train_losses, first.train_losses[4:], rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_layers_loop_in_eval_as_the_checkpoint_says(backend, looped_runs):
    from trainer.eval_file import parse_eval_settings, run_eval
    from trainer_helpers import make_session

    result = looped_runs[backend][1]
    path = result.run_dir / "checkpoints" / "step_000006.safetensors"
    ckpt = load_checkpoint(path)
    settings, path, kind, cfg = parse_eval_settings([f"--checkpoint={path}"], {}, "eval")
    session = make_session(backend, cfg)
    figures = run_eval(settings, path, kind, cfg, session, out=open("/dev/null", "w"), err=open("/dev/null", "w"))
    assert figures["val_loss"] == pytest.approx(result.val_loss, rel=1e-6)
    ids = np.arange(16).reshape(1, 16) % ckpt.spec.vocab_size
    assert not np.allclose(reference.logits(ckpt.spec, ckpt.weights, ids, True),
                           reference.logits(ckpt.spec, ckpt.weights, ids, False))


@pytest.mark.parametrize("env, message", [
    (dict(NUM_LAYERS=4, NUM_LOOPS=2, LOOP_START=1, LOOP_END=4), "LOOP_END=4: the looped segment"),
    (dict(NUM_LAYERS=4, PARALLEL_START_LAYER=4), "PARALLEL_START_LAYER=4: must be below num_layers=4"),
    (dict(NUM_LAYERS=6, NUM_LOOPS=1, LOOP_START=1, LOOP_END=3, PARALLEL_START_LAYER=3),
     "PARALLEL_START_LAYER=3: must be after the looped segment"),
    (dict(ENABLE_LOOPING_AT=1.5), "ENABLE_LOOPING_AT=1.5: must be a fraction"),
    (dict(PARALLEL_FINAL_LANE="both"), "PARALLEL_FINAL_LANE='both': must be one of"),
    (dict(MLP_MULT="0.001"), "MLP_MULT=0.001: must be a positive number"),
])
def test_an_inconsistent_layout_is_one_line(env, message):
    with pytest.raises(ConfigError) as err:
        load_config([], environ={k: str(v) for k, v in env.items()})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_mlp_mult_takes_a_float_and_keeps_whole_numbers_int():
    assert load_config([], environ={"MLP_MULT": "4.0"}).model_spec().to_dict()["mlp_mult"] == 4
    assert isinstance(load_config([], environ={"MLP_MULT": "4.0"}).mlp_mult, int)
    spec = load_config([], environ={"MLP_MULT": "2.75", "MODEL_DIM": "64", "NUM_HEADS": "4"}).model_spec()
    assert spec.hidden_dim == 176
