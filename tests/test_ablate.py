"""make ablate: the record's techniques alone and together, both backends side by side, runs reused."""

import json
import os
import subprocess
import sys

from core.config import load_config
from commands.ablate import SCALED, TECHNIQUES, runnable, variants
from trainer_helpers import REPO, tiny_env


def ablate(env):
    return subprocess.run([sys.executable, "-m", "commands.ablate"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_each_technique_alone_and_all_together_in_both_backends_then_reused(tiny_dataset, tmp_path):
    env = os.environ | tiny_env(tiny_dataset, tmp_path, ITERATIONS=2, ABLATE_ID="abl",
                                ABLATE_TECHNIQUES="weight-decay", VAL_MAX_TOKENS=64)
    first = ablate(env)
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "runs" / "abl"
    record = json.loads((out / "ablation.json").read_text())
    assert list(record["runs"]) == ["baseline", "weight-decay", "all"]
    assert record["settings"]["all"] == record["settings"]["weight-decay"]   # all (one) techniques together
    assert record["settings"]["weight-decay"]["MUON_WD"] == "0.095"          # the preset's values
    for name, by_backend in record["runs"].items():
        assert set(by_backend) == {"torch", "mlx"}
        assert by_backend["torch"]["steps"] == by_backend["mlx"]["steps"] == 2
        assert abs(by_backend["torch"]["val_bpb"] - by_backend["mlx"]["val_bpb"]) < 1e-3   # the same run twice
        assert by_backend["torch"]["val_tokens"] == by_backend["mlx"]["val_tokens"] == 64   # VAL_MAX_TOKENS, both
    assert "VAL_MAX_TOKENS=64: only the first targets" in (out / "mlx-baseline" / "log.txt").read_text()
    assert "first 64 val targets only (VAL_MAX_TOKENS)" in first.stdout
    assert record["runs"]["all"]["torch"]["val_bpb"] != record["runs"]["baseline"]["torch"]["val_bpb"]
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "val_bpb torch" in first.stdout and "val_bpb mlx" in first.stdout and "| all " in first.stdout
    assert first.stderr.count("ablate: [") == 6 and "ablate: [6/6] mlx all: val_bpb" in first.stderr
    second = ablate(env | {"TRAIN_LOG_EVERY": "5"})   # how often a run logs does not change its figures
    assert second.returncode == 0 and second.stderr.count("finished before, reused") == 6
    assert json.loads((out / "ablation.json").read_text())["runs"] == record["runs"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = ablate(env | {"ITERATIONS": "3"})   # other settings: not the old runs' figures
    assert other.returncode == 2 and other.stderr.strip() == (
        f"error: ablate: the run {out / 'torch-baseline'} was made with other settings (ITERATIONS=2 there, 3 now); "
        "choose another ABLATE_ID for these (nothing was written)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_input_is_one_line_and_writes_nothing(tiny_dataset, tmp_path):
    for extra, message in ((dict(ABLATE_TECHNIQUES="magic"), "error: ABLATE_TECHNIQUES: unknown technique 'magic'"),
                           (dict(ABLATE_BACKENDS="jax"), "error: ABLATE_BACKENDS=jax"),
                           (dict(WARMDOWN_FRAC="2"), "error: WARMDOWN_FRAC=2.0: must be in [0, 1]")):
        proc = ablate(os.environ | tiny_env(tiny_dataset, tmp_path, **extra))
        assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_step_and_layer_counts_are_scaled_to_the_run():
    cfg = load_config([], environ={"ITERATIONS": "4945", "NUM_LAYERS": "11"})
    runs, _ = variants(cfg)
    assert runs["ema"]["EMA_DECAY"] == "0.9965" and runs["momentum-0.92-0.97"]["MUON_MOMENTUM_WARMUP_STEPS"] == "1500"
    short = variants(cfg.replace(iterations=989))[0]
    assert short["momentum-0.92-0.97"]["MUON_MOMENTUM_WARMUP_STEPS"] == "300"
    assert short["ema"]["EMA_DECAY"] == "0.9825"   # the same horizon: 1/(1-decay) = 57 of 989 steps
    assert set(SCALED) <= {k for keys in TECHNIQUES.values() for k in keys}


def test_partial_rope_rotates_the_records_share_of_each_head():
    cfg = load_config([], environ={"MODEL_DIM": "512", "NUM_HEADS": "8"})
    assert variants(cfg)[0]["partial-rope"]["ROPE_DIMS"] == "16"           # the record's 16 of 64
    assert variants(cfg.replace(model_dim=64, num_heads=4))[0]["partial-rope"]["ROPE_DIMS"] == "4"   # 4 of 16


def test_a_run_this_size_refuses_is_one_line_saying_why_and_the_others_still_run(monkeypatch):
    for key, value in {"NUM_LAYERS": "2", "MODEL_DIM": "8", "NUM_HEADS": "2", "NUM_KV_HEADS": "1"}.items():
        monkeypatch.setenv(key, value)
    runs, _ = variants(load_config([]), ["sparse-attn-gate", "parallel-lanes", "depth-loops"])
    runs, refused = runnable(runs, [])
    assert list(runs) == ["baseline", "parallel-lanes", "depth-loops"]   # no "all": the two cannot combine here
    assert refused[0].startswith("sparse-attn-gate (at this size: GATE_WINDOW=12: must be in 1..model_dim=8)")
    assert refused[1].startswith("all (at this size: PARALLEL_START_LAYER=1: must be after the looped segment")
    assert len(refused) == 2 and not any("\n" in line for line in refused)
