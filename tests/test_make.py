"""Makefile targets a user runs, where they can be run here without a GPU."""

import subprocess
import sys

import pytest
import torch

from trainer_helpers import REPO

# On a machine without CUDA only (on a GPU machine make train-cuda trains): no test item otherwise.
WITHOUT_CUDA = [] if torch.cuda.is_available() else ["no cuda"]


@pytest.mark.parametrize("machine", WITHOUT_CUDA)
def test_make_train_cuda_without_cuda_says_so_before_building_any_dataset(machine, tmp_path):
    stamp = tmp_path / "installed"   # newer than pyproject.toml: make sees the venv as built
    stamp.touch()
    proc = subprocess.run(["make", "--no-print-directory", "train-cuda", f"PY={sys.executable}", f"STAMP={stamp}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[0].startswith("error: make train-cuda: CUDA is not available on this machine")
    assert "corpus" not in proc.stdout + proc.stderr and "data.build_default" not in proc.stdout
