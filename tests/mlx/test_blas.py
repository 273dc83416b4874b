"""Which BLAS MLX's CPU backend really calls, as the trainer's log reports it (Linux)."""

import os
import subprocess
import sys

import pytest

from backend_mlx.blas import find_openblas
from trainer_helpers import REPO

PROBE = "import numpy, mlx.core; from backend_mlx.blas import blas_note; print(blas_note())"
LINUX_WITH_OPENBLAS = ["openblas installed"] if sys.platform.startswith("linux") and find_openblas() else []


def note(env) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("machine", LINUX_WITH_OPENBLAS)
def test_the_log_names_openblas_only_when_it_is_preloaded(machine):
    """numpy maps an OpenBLAS of its own in every process: that one must not count."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert note(env).startswith("blas: MLX's bundled reference BLAS")
    assert note(env | {"LD_PRELOAD": find_openblas()}) == f"blas: OpenBLAS (preloaded from {find_openblas()})"
