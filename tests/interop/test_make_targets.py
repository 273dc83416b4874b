"""make pg-import and make pg-export, through the Makefile (settings as make variables)."""

import os
import subprocess
import sys

import torch
from safetensors import safe_open

from core.checkpoint import load_checkpoint
from core.config import ModelSpec
from interop.conventions import MLX_SCRIPT_EPS
from pg_fixtures import script_weights, write_mlx_npz
from trainer_helpers import REPO

SPEC = ModelSpec(vocab_size=128, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)


def make(target: str, tmp_path, **variables) -> subprocess.CompletedProcess:
    stamp = tmp_path / "installed"   # newer than pyproject.toml: make sees the venv as built
    stamp.touch()
    args = [f"{k}={v}" for k, v in variables.items()]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(["make", "--no-print-directory", target, f"PY={sys.executable}", f"STAMP={stamp}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_make_pg_import_then_pg_export(tmp_path):
    src, ckpt, out = tmp_path / "run_mlx_model.npz", tmp_path / "imported.safetensors", tmp_path / "final_model.pt"
    write_mlx_npz(src, script_weights(SPEC, 0))
    imported = make("pg-import", tmp_path, SRC=src, OUT=ckpt)
    assert imported.returncode == 0, imported.stderr
    assert f"imported {src} (mlx-npz)" in imported.stdout
    with safe_open(str(ckpt), framework="np") as f:
        assert "tok_emb.weight" in f.keys()
    exported = make("pg-export", tmp_path, CHECKPOINT=ckpt, OUT=out, EPS_CHECK_SEQS=0)
    assert exported.returncode == 0, exported.stderr
    assert "norm_eps=1e-06, train_gpt.py uses 1.1920929e-07" in exported.stderr   # the MLX script's epsilon
    assert torch.load(out, weights_only=True)["tok_emb.weight"].dtype == torch.bfloat16


def test_make_pg_import_keeps_the_source_runs_softcap_and_rope_base(tmp_path):
    # No tensor holds them: LOGIT_SOFTCAP= and ROPE_BASE= given to make reach the checkpoint's spec,
    # and the line saying how to train on from it repeats them.
    src, ckpt = tmp_path / "run_mlx_model.npz", tmp_path / "imported.safetensors"
    write_mlx_npz(src, script_weights(SPEC, 0))
    proc = make("pg-import", tmp_path, SRC=src, OUT=ckpt, LOGIT_SOFTCAP=12, ROPE_BASE=500)
    assert proc.returncode == 0, proc.stderr
    spec = load_checkpoint(ckpt).spec
    assert (spec.logit_softcap, spec.rope_base, spec.norm_eps) == (12.0, 500.0, MLX_SCRIPT_EPS)
    assert "LOGIT_SOFTCAP=12 ROPE_BASE=500" in proc.stdout


def test_make_pg_import_of_a_bad_file_fails_in_one_line_and_writes_nothing(tmp_path):
    src, ckpt = tmp_path / "final_model.pt", tmp_path / "imported.safetensors"
    src.write_text("not a model")
    proc = make("pg-import", tmp_path, SRC=src, OUT=ckpt)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and str(src) in errors[0]
    assert not ckpt.exists()
