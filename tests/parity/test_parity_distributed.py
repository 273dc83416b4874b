"""docs/spec.md §10, data-parallel rows: the suite's 20-step training run (TRAIN_SETTINGS) by 2 MLX
processes under mlx.launch (ring backend, 127.0.0.1), each reading its half of every batch, against
the same run by 1 MLX process with 2 accumulation steps (the same micro-batches in one process: the
trained_runs fixture) and by torch on 2 gloo ranks (torchrun). The per-step losses and the final
validation agree, and only rank 0 printed and wrote."""

import json
from pathlib import Path

import pytest

from parity_lib import TRAIN_SETTINGS, rel
from trainer_helpers import logged_train_losses, run_mlx_ranks, run_torch_ranks

ITERATIONS = TRAIN_SETTINGS["ITERATIONS"]
# 2 ranks x 1 micro-step against 1 rank x 2 micro-steps; every step logged. The ranks re-execute
# with OpenBLAS (fast), the in-process run keeps this process's BLAS: measured 2e-7, both ways.
TWO_RANKS = dict(TRAIN_SETTINGS, GRAD_ACCUM_STEPS=1, TRAIN_LOG_EVERY=1)


@pytest.fixture(scope="module")
def two_rank_runs(train_env):
    """backend -> (run folder, summary, stdout) of the 20-step run on 2 ranks of that backend."""
    runs = {}
    for backend, launch in (("mlx", run_mlx_ranks), ("torch", run_torch_ranks)):
        env = train_env(**TWO_RANKS, RUN_ID=f"two-ranks-{backend}")
        proc = launch(env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = Path(env["OUT_DIR"]) / env["RUN_ID"]
        runs[backend] = run_dir, json.loads((run_dir / "summary.json").read_text()), proc.stdout
    return runs


def test_two_mlx_ranks_train_as_one_rank_with_two_accumulation_steps_and_as_torch_on_two_ranks(
        two_rank_runs, trained_runs, parity):
    mlx_dir, mlx_summary, stdout = two_rank_runs["mlx"]
    torch_dir, torch_summary, _ = two_rank_runs["torch"]
    one_rank = trained_runs["mlx"]
    log = (mlx_dir / "log.txt").read_text()
    assert "world_size:2" in log and "mx.distributed ring: 2 ranks" in log and "world_size:2" in (torch_dir / "log.txt").read_text()
    # Rank 0 alone prints and writes: each line once in the launcher's output, one run folder of this id.
    assert stdout.count(f"step:{ITERATIONS}/{ITERATIONS} val_loss:") == 1 and stdout.count("step:1/") == 1
    assert sorted(p.name for p in (mlx_dir / "checkpoints").iterdir()) == ["step_000010.safetensors",
                                                                          "step_000020.safetensors"]
    two, torch_two = logged_train_losses(mlx_dir), logged_train_losses(torch_dir)
    assert len(two) == len(torch_two) == len(one_rank.train_losses) == ITERATIONS
    assert two[-1] < two[0] - 0.5   # it learned: the comparison is of a real trajectory
    for step, (a, b, c) in enumerate(zip(two, one_rank.train_losses, torch_two), start=1):
        parity.check("ranks_mlx", rel(a, b), f"step {step}")
        parity.check("ranks_torch", rel(a, c), f"step {step}")
    for key in ("val_loss", "val_bpb"):
        parity.check("ranks_val", rel(mlx_summary[key], getattr(one_rank, key)), f"{key} vs 1 MLX rank")
        parity.check("ranks_val", rel(mlx_summary[key], torch_summary[key]), f"{key} vs torch on 2 ranks")
