"""make ablate-tying: tied and untied runs side by side, reused when finished, continued when not."""

import json
import os
import subprocess
import sys

from core.config import load_config
from core.params import count_params
from commands.ablate_tying import matched_width
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
