"""make ablate-tying: tied and untied runs side by side, reused when finished, continued when not."""

import json
import os
import subprocess
import sys

import pytest

from core.config import load_config
from core.errors import ConfigError
from core.params import count_params
from commands.ablate_tying import check_reusable, matched_width, run_env
from trainer_helpers import REPO, tiny_env


def ablate(env):
    return subprocess.run([sys.executable, "-m", "commands.ablate_tying"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_ablation_trains_both_reuses_them_and_continues_an_unfinished_run(tiny_dataset, tmp_path):
    env = os.environ | tiny_env(tiny_dataset, tmp_path, ITERATIONS=4, CHECKPOINT_EVERY=2, BACKEND="torch",
                                ABLATE_ID="abl", ABLATE_MATCH_PARAMS="1", VAL_LOSS_EVERY=2)
    first = ablate(env)
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "runs" / "abl"
    record = json.loads((out / "ablation.json").read_text())
    runs = record["runs"]
    assert list(runs) == ["tied", "untied", "untied-matched"]
    assert runs["tied"]["symmetry"] < 1e-6 < runs["untied"]["symmetry"]
    assert runs["untied"]["params_unique"] > runs["tied"]["params_unique"] >= runs["untied-matched"]["params_unique"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "==== tied vs untied: torch" in first.stdout and "val_bpb" in first.stdout
    for name in runs:
        assert f"ablate-tying: {name}: training" in first.stderr

    # An interrupted run: its folder without summary.json is kept and continued from its checkpoint.
    (out / "untied" / "summary.json").unlink()
    refused = ablate(env | {"ITERATIONS": "6"})   # not these settings: nothing reused, moved or trained
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: ablate-tying: the run {out / 'tied'} was made with other settings (ITERATIONS=4 there, 6 now); "
        "choose another ABLATE_ID for these (nothing was written)")
    assert not (out / "untied.unfinished-1").exists()
    second = ablate(env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "ablate-tying: tied: finished before, reused" in second.stderr
    assert "ablate-tying: untied: unfinished before, kept as" in second.stderr and "continuing from" in second.stderr
    assert (out / "untied.unfinished-1" / "checkpoints").is_dir()
    again = json.loads((out / "ablation.json").read_text())["runs"]
    assert again["untied"]["val_loss"] == runs["untied"]["val_loss"]   # resumed exactly
    assert again["tied"]["val_loss"] == runs["tied"]["val_loss"]


def test_the_matched_untied_width_is_the_widest_that_fits_the_tied_parameter_count():
    cfg = load_config([], environ={"NUM_LAYERS": "4", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2"})
    d = matched_width(cfg)
    spec = cfg.model_spec()
    tied = count_params(spec).unique
    untied = lambda width: count_params(spec.__class__(**dict(spec.to_dict(), model_dim=width,   # noqa: E731
                                                              tie_embeddings=False))).unique
    assert d % 8 == 0 and untied(d) <= tied < untied(d + 8)


def test_a_run_is_reused_only_with_the_settings_it_was_made_with(tmp_path):
    """What its config.json holds against what this invocation would give it (flags too): an auto the run
    resolved, how often it logged and a setting an older build did not record (its default) still match."""
    extra = {"TIE_EMBEDDINGS": "0"}
    (tmp_path / "r").mkdir()
    made = load_config([], environ=run_env(tmp_path, "r", extra)).to_dict()
    made |= {"grad_accum_steps": 4, "memory_budget_gb": 3.2, "train_log_every": 9}
    del made["ema_decay"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(made))
    check_reusable(tmp_path, {"r": extra}, [], "ablate")
    with pytest.raises(ConfigError, match=r"the run .*r was made with other settings \(ITERATIONS=\d+ there, 7 now\)"):
        check_reusable(tmp_path, {"r": extra}, ["--iterations", "7"], "ablate")
    with pytest.raises(ConfigError, match=r"\(TIE_EMBEDDINGS=0 there, 1 now\)"):
        check_reusable(tmp_path, {"r": {"TIE_EMBEDDINGS": "1"}}, [], "ablate")
    (tmp_path / "r" / "config.json").unlink()
    (tmp_path / "r" / "log.txt").write_text("")
    with pytest.raises(ConfigError, match="no config.json records its settings"):
        check_reusable(tmp_path, {"r": extra}, [], "ablate")
