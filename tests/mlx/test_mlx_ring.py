"""The collectives of several MLX ranks, checked directly (tests/mlx/ring_probe.py under mlx.launch -n 2),
and the replica check's digest: what each rank must share, and what may differ between hosts."""

import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from backend_mlx.distributed import settings_digest
from core.config import TrainConfig
from trainer_helpers import MLX_LAUNCH, REPO, free_port_pair

# Where files are and what each machine's memory or compiler decides: these may differ by host.
# Every other setting shapes the replica (the model, its init seed, the data order, the schedule,
# the optimizer, the precision), so a rank given another value must refuse to train.
PER_HOST = {"data_path", "tokenizer_path", "out_dir", "run_id", "resume_from", "device", "compile",
            "mlx_max_microbatch_tokens", "mlx_eager_eval", "memory_budget_gb", "plan"}


def other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return f"{value}-other"


def test_every_setting_that_shapes_the_replica_is_in_the_digest_and_only_those():
    base = TrainConfig().to_dict()
    for f in fields(TrainConfig):
        if f.name == "resume_from":   # its file's content is: the test below
            continue
        changed = settings_digest(base | {f.name: other_value(base[f.name])}) != settings_digest(base)
        assert changed == (f.name not in PER_HOST), f.name


def test_the_resume_files_content_is_in_the_digest_not_its_path(tmp_path):
    a, a_copy, b = tmp_path / "a.safetensors", tmp_path / "elsewhere.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"checkpoint a")
    a_copy.write_bytes(b"checkpoint a")
    b.write_bytes(b"checkpoint b")
    base = TrainConfig().to_dict()
    assert settings_digest(base | {"resume_from": str(a)}) == settings_digest(base | {"resume_from": str(a_copy)})
    assert settings_digest(base | {"resume_from": str(a)}) != settings_digest(base | {"resume_from": str(b)})
    assert settings_digest(base | {"resume_from": str(a)}) != settings_digest(base)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """What each of 2 ranks found (ring_probe.py)."""
    root = tmp_path_factory.mktemp("ring_probe")
    files = [root / "a.safetensors", root / "a_copy.safetensors", root / "b.safetensors"]
    for path, content in zip(files, (b"weights a", b"weights a", b"weights b")):
        path.write_bytes(content)
    cmd = [str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--starting-port", str(free_port_pair()),
           "--", sys.executable, str(REPO / "tests" / "mlx" / "ring_probe.py")]
    env = os.environ | {"PROBE_OUT": str(root), "PROBE_RESUME_FILES": ",".join(map(str, files)),
                        "PYTHONPATH": str(REPO), "TWINGPT_NO_BLAS_PRELOAD": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    # mlx.launch exits 0 even when a rank raised: each rank's file is the proof it finished.
    missing = [r for r in (0, 1) if not (root / f"rank{r}.json").exists()]
    assert proc.returncode == 0 and not missing, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_ring_averages_sums_and_maximizes(probed):
    for found in probed:
        assert found["world_size"] == 2
        assert np.array_equal(found["average_a"], np.full((5, 3), 1.5))
        assert np.array_equal(found["average_b"], np.arange(7) * 1.5)
        assert found["sum"] == [3.0, 20.0] and found["max"] == [2.0, 0.0]


def test_the_mean_over_ranks_is_the_gradient_of_the_whole_batch(probed):
    # float32 rounding only (measured ~1e-7); a sum over 2 ranks would be off by 1.0.
    for found in probed:
        assert found["loss_rel"] <= 1e-6 and found["grad_rel"] <= 1e-5, found


def test_ranks_refuse_other_resume_content_or_seed_and_accept_a_copy_elsewhere(probed):
    for rank, found in enumerate(probed):
        outcomes = found["settings"]
        assert outcomes["same content, other path"] == "accepted"
        for case in ("other content", "other seed"):
            assert outcomes[case].startswith(f"rank {rank} of 2: the ranks were given different settings"), case
