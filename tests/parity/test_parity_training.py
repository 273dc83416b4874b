"""docs/spec.md §10, training rows: both real trainers, same settings, seed and data, fp32, 20 steps on a
real dataset (the stdlib-subset `tiny_dataset`): per-step losses agree (<= 1e-4), on every device
pair; and, on the CPU, validation from the same weights agrees (<= 1e-6), and a checkpoint written
by either trainer loads in the other (RESUME_FROM), gives the same logits, and continues there as it
does in its own backend."""

import numpy as np
import pytest

from core import reference
from core.checkpoint import load_checkpoint
from core.init import random_weights
from trainer.plan import eval_geometry
from trainer.validation import evaluate
from parity_lib import BACKENDS, RESUME_STEP, TRAIN_SETTINGS, logits, make_session, rel
from trainer_helpers import train

OTHER = {"torch": "mlx", "mlx": "torch"}
ITERATIONS = TRAIN_SETTINGS["ITERATIONS"]


def checkpoint_path(run, step):
    return run.run_dir / "checkpoints" / f"step_{step:06d}.safetensors"


def test_twenty_training_steps_give_the_same_losses(pair, trained_runs_on, parity):
    runs = trained_runs_on(pair)
    torch_run, mlx_run = runs["torch"], runs["mlx"]
    assert torch_run.summary["backend"] == "torch" and mlx_run.summary["backend"] == "mlx"
    # Each trainer ran where the pair says ("cpu", "cuda:0 (...)", "mps"; "mlx cpu", "mlx gpu (Metal)").
    assert torch_run.summary["device"].split(":")[0] == pair.torch.name, torch_run.summary["device"]
    assert (mlx_run.summary["device"] == "mlx cpu") == pair.mlx.is_cpu, mlx_run.summary["device"]
    assert ITERATIONS == 20
    assert len(torch_run.train_losses) == len(mlx_run.train_losses) == ITERATIONS
    assert torch_run.step == mlx_run.step == ITERATIONS
    # A real trajectory: the model learns, so the comparison is not of a stuck model.
    assert np.mean(torch_run.train_losses[-3:]) < torch_run.train_losses[0] - 0.5
    for step, (a, b) in enumerate(zip(torch_run.train_losses, mlx_run.train_losses), start=1):
        parity.check("train_losses", rel(a, b), f"step {step}", devices=pair.label)
    # The final validation of the two runs, whose weights differ by the rounding of 20 steps.
    parity.check("trained_val", rel(torch_run.val_loss, mlx_run.val_loss), "val_loss after 20 steps", devices=pair.label)
    parity.check("trained_val", rel(torch_run.val_bpb, mlx_run.val_bpb), "val_bpb after 20 steps", devices=pair.label)


def evaluate_in(backend, weights, validation):
    cfg, val_tokens, tables = validation
    session = make_session(backend, cfg)
    session.load_weights(weights)
    try:
        return evaluate(session, val_tokens, tables, cfg.train_seq_len, eval_geometry(cfg, 1).val_batch_seqs)
    finally:
        session.close()


@pytest.mark.parametrize("weights_from", ["random", "torch-trained", "mlx-trained"])
def test_validation_from_the_same_weights_agrees(weights_from, trained_runs, validation, parity):
    cfg = validation[0]
    if weights_from == "random":
        weights = random_weights(cfg.model_spec(), seed=17)
    else:
        run = trained_runs[weights_from.split("-")[0]]
        weights = load_checkpoint(checkpoint_path(run, ITERATIONS)).weights
    (loss_t, bpb_t), (loss_m, bpb_m) = (evaluate_in(b, weights, validation) for b in BACKENDS)
    assert 0 < bpb_t < 20 and 0 < loss_t < 20
    parity.check("val", rel(loss_t, loss_m), f"val_loss, {weights_from} weights")
    parity.check("val", rel(bpb_t, bpb_m), f"val_bpb, {weights_from} weights")
    if weights_from != "random":   # the trainer's own final validation used these very weights
        run = trained_runs[weights_from.split("-")[0]]
        assert abs(run.val_loss - (loss_t if run.summary["backend"] == "torch" else loss_m)) <= 1e-12 * run.val_loss


@pytest.mark.parametrize("writer", BACKENDS)
def test_checkpoint_continues_in_the_other_backend_as_in_its_own(writer, trained_runs, train_env, validation, parity):
    reader = OTHER[writer]
    original = trained_runs[writer]
    path = checkpoint_path(original, RESUME_STEP)
    ckpt = load_checkpoint(path)
    assert ckpt.backend == writer and ckpt.step == RESUME_STEP

    # The same logits from the checkpoint's weights in both backends (a validation batch).
    cfg, val_tokens, _ = validation
    T = cfg.train_seq_len
    ids = val_tokens[:4 * T].reshape(4, T).astype(np.int64)
    z = {b: logits(b, ckpt.spec, ckpt.weights, ids) for b in BACKENDS}
    ref_z = reference.logits(ckpt.spec, ckpt.weights, ids)
    parity.check("checkpoint", rel(z[reader], z[writer]), f"{writer} checkpoint: {reader} vs {writer} logits",
                 tol=1e-5)
    parity.check("checkpoint", rel(z[reader], ref_z), f"{writer} checkpoint: {reader} logits vs reference", tol=1e-5)

    runs = {b: train(b, train_env(RUN_ID=f"{writer}-resumed-in-{b}", RESUME_FROM=str(path))) for b in BACKENDS}
    own, other = runs[writer], runs[reader]
    # Continued in its own backend, the run is the uninterrupted one exactly.
    assert own.train_losses == original.train_losses[RESUME_STEP:] and own.val_loss == original.val_loss
    for run, b in ((own, writer), (other, reader)):
        assert run.step == ITERATIONS and len(run.train_losses) == ITERATIONS - RESUME_STEP
        log = (run.run_dir / "log.txt").read_text()
        assert f"resumed from {path} at step:{RESUME_STEP} (trained by {writer})" in log and f"backend:{b}" in log
    for step, (a, b) in enumerate(zip(other.train_losses, own.train_losses), start=RESUME_STEP + 1):
        parity.check("checkpoint", rel(a, b), f"{writer}->{reader} continued loss, step {step}")
    # As tight as the validation of two runs that trained in different backends throughout.
    parity.check("checkpoint", rel(other.val_loss, own.val_loss), f"{writer}->{reader} final val_loss", tol=1e-6)
    parity.check("checkpoint", rel(other.val_bpb, own.val_bpb), f"{writer}->{reader} final val_bpb", tol=1e-6)
