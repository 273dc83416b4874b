"""What only the torch trainer does: several processes under torchrun, and CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from trainer_helpers import REPO, TORCHRUN, fault_script, run_until, tiny_env, train


def test_two_ranks_with_gloo_and_two_accumulation_steps_match_one_rank_with_four(tiny_dataset, tmp_path):
    # Two micro-steps a rank: DDP's no_sync on the first, the gradient all-reduce on the last. Syncing
    # after the first micro-step instead leaves each rank its own last micro-batch: replicas apart.
    base = tiny_env(tiny_dataset, tmp_path, ITERATIONS=4)
    one = subprocess.run([sys.executable, "-m", "backend_torch.train"], cwd=REPO, capture_output=True, text=True,
                         env=os.environ | base | {"RUN_ID": "one", "GRAD_ACCUM_STEPS": "4"})
    assert one.returncode == 0, one.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "backend_torch.train"],
                         cwd=REPO, capture_output=True, text=True,
                         env=os.environ | base | {"RUN_ID": "two", "GRAD_ACCUM_STEPS": "2"})
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run_id):
        lines = (tmp_path / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
        return [r["train_loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    def summary(run_id):
        return json.loads((tmp_path / "runs" / run_id / "summary.json").read_text())

    assert len(losses("two")) == 4
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    assert summary("two")["val_loss"] == pytest.approx(summary("one")["val_loss"], rel=1e-6)
    log = (tmp_path / "runs" / "two" / "log.txt").read_text()
    assert "world_size:2" in log and "grad_accum_steps:2" in log


def test_two_ranks_train_a_one_layer_model(tiny_dataset, tmp_path):
    # One layer has no skip connection: skip_weights is (0, d) and never gets a gradient.
    env = os.environ | tiny_env(tiny_dataset, tmp_path, NUM_LAYERS=1, ITERATIONS=2, RUN_ID="one-layer")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "backend_torch.train"],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step:2/2 val_loss:" in (tmp_path / "runs" / "one-layer" / "log.txt").read_text()


# A device this machine lacks is a one-line error; devices it has give no item here (they train).
ABSENT = [d for d, present in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
          if not present]
ABSENT_MESSAGE = {"cuda": "DEVICE=cuda: CUDA is not available on this machine",
                  "mps": "DEVICE=mps: torch's Apple GPU backend is not available on this machine"}


@pytest.mark.parametrize("device", ABSENT)
def test_a_device_this_machine_lacks_is_a_one_line_error(device, tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match=ABSENT_MESSAGE[device]):
        train("torch", tiny_env(tiny_dataset, tmp_path, DEVICE=device))
    assert not (tmp_path / "runs").exists()


def test_an_error_in_one_rank_ends_the_whole_job_within_a_minute_in_one_line(tiny_dataset, tmp_path):
    # Rank 1 fails alone at step 3 (as out of memory would); rank 0 is then in a collective it never
    # completes. Before: rank 1 waited in close()'s barrier, rank 0 in its all-reduce, until killed.
    script = fault_script(tmp_path, "torch", rank=1, step=3, fault="raise")
    env = tiny_env(tiny_dataset, tmp_path, ITERATIONS=1000, RUN_ID="fault")
    proc, seconds = run_until([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script)], env, timeout=90)
    assert proc.returncode not in (0, None) and seconds < 60, (seconds, proc.stderr[-3000:])
    assert "error: rank 1 of 2: RuntimeError: injected fault at step 3" in proc.stderr.splitlines()
