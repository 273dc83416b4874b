"""make eval (trainer/eval_file.py, python -m backend_{torch,mlx}.eval): a checkpoint or an artifact
scored without training, the same figures in both backends, the file's own run settings by default,
nothing written unless OUT= is given, and every bad input one line with exit status 2."""

import json
from pathlib import Path

import pytest

import backend_mlx.eval as mlx_eval
import backend_torch.eval as torch_eval
from core import artifact
from core.checkpoint import save_checkpoint
from core.config import ModelSpec, TrainConfig
from core.init import random_weights

SPEC = ModelSpec(vocab_size=512, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
MAINS = {"torch": torch_eval.main, "mlx": mlx_eval.main}


@pytest.fixture(scope="module")
def files(tiny_dataset, tmp_path_factory):
    """A checkpoint whose run trained on the tiny dataset at TRAIN_SEQ_LEN=32, and the artifact of
    the same weights in a run folder (with its config.json)."""
    data_path, tokenizer = tiny_dataset
    root = tmp_path_factory.mktemp("eval_files")
    config = TrainConfig(**SPEC.to_dict(), data_path=data_path, tokenizer_path=tokenizer, train_seq_len=32,
                         val_batch_size=2048)
    weights = random_weights(SPEC, seed=5)
    ckpt = root / "run" / "checkpoints" / "step_000003.safetensors"
    save_checkpoint(ckpt, spec=SPEC, config=config, step=3, weights=weights, optimizer_state={}, data_state={})
    (root / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    art = root / "run" / "model.int8.zlib"
    artifact.save_artifact(art, weights)
    roundtrip = root / "roundtrip.safetensors"    # the artifact's weights as a checkpoint
    save_checkpoint(roundtrip, spec=SPEC, config=config, step=3, weights=artifact.load_artifact(art),
                    optimizer_state={}, data_state={})
    return {"checkpoint": ckpt, "artifact": art, "roundtrip": roundtrip, "root": root}


def run(backend, capsys, **env):
    figures = MAINS[backend]([], {"DEVICE": "cpu", **{k: str(v) for k, v in env.items()}})
    line = capsys.readouterr().out.strip()
    return figures, line


def test_a_checkpoint_gives_the_same_figures_in_both_backends_and_writes_only_out(files, capsys, tmp_path):
    before = sorted(p.name for p in files["root"].rglob("*"))
    got = {}
    for backend in MAINS:
        got[backend], line = run(backend, capsys, CHECKPOINT=files["checkpoint"], EVAL_STRIDE=12)
        f = got[backend]
        assert line == (f"eval backend:{backend} checkpoint:{files['checkpoint']} dataset:{f['dataset']} stride:12 "
                        f"seq_len:32 targets:{f['targets']} val_loss:{f['val_loss']:.8f} "
                        f"val_bpb:{f['val_bpb']:.8f} eval_time:{f['eval_time_s']:.1f}s")
    t, m = got["torch"], got["mlx"]
    assert t["eval_seq_len"] == 32 and t["targets"] % 32 == 0   # TRAIN_SEQ_LEN of the checkpoint's run
    assert abs(t["val_bpb"] - m["val_bpb"]) <= 1e-6 * t["val_bpb"]
    assert abs(t["val_loss"] - m["val_loss"]) <= 1e-6 * t["val_loss"]
    assert sorted(p.name for p in files["root"].rglob("*")) == before and not list(tmp_path.iterdir())
    out = tmp_path / "sub" / "eval.json"
    figures, _ = run("torch", capsys, CHECKPOINT=files["checkpoint"], EVAL_STRIDE=12, OUT=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert figures["val_bpb"] == t["val_bpb"]
    standard, line = run("torch", capsys, CHECKPOINT=files["checkpoint"])
    assert " stride:0 seq_len:32 " in line and standard["val_bpb"] != t["val_bpb"]


def test_an_artifact_is_scored_as_the_checkpoint_of_its_weights(files, capsys):
    a, _ = run("mlx", capsys, ARTIFACT=files["artifact"], EVAL_STRIDE=16)
    c, _ = run("mlx", capsys, CHECKPOINT=files["roundtrip"], EVAL_STRIDE=16)
    assert a["eval_seq_len"] == 32 and a["dataset"] == c["dataset"]    # its run folder's settings
    assert a["val_bpb"] == c["val_bpb"] and a["val_loss"] == c["val_loss"]


def test_a_setting_given_beats_the_files_run(files, capsys):
    own, _ = run("mlx", capsys, CHECKPOINT=files["checkpoint"])
    shorter, line = run("mlx", capsys, CHECKPOINT=files["checkpoint"], TRAIN_SEQ_LEN=16)
    assert " stride:0 seq_len:16 " in line and shorter["eval_seq_len"] == 16 and own["eval_seq_len"] == 32
    assert shorter["val_loss"] != own["val_loss"]


def test_val_max_tokens_scores_the_first_targets_and_says_so(files, capsys):
    got = {b: run(b, capsys, CHECKPOINT=files["checkpoint"], VAL_MAX_TOKENS=70) for b in MAINS}
    for figures, line in got.values():
        assert figures["targets"] == 64 and line.endswith("(VAL_MAX_TOKENS=70: only the first targets of the val "
                                                          "split; val_bpb is not the challenge's, which scores all of it)")
    assert abs(got["torch"][0]["val_bpb"] - got["mlx"][0]["val_bpb"]) <= 1e-6 * got["torch"][0]["val_bpb"]
    whole, line = run("mlx", capsys, CHECKPOINT=files["checkpoint"])
    assert whole["targets"] > 64 and "VAL_MAX_TOKENS" not in line   # not inherited from the run: all by default


@pytest.mark.parametrize("env, message", [
    ({}, "give exactly one of CHECKPOINT=<checkpoint.safetensors> or ARTIFACT=<model.int8.zlib>"),
    ({"CHECKPOINT": "{checkpoint}", "ARTIFACT": "{artifact}"}, "(both were given)"),
    ({"CHECKPOINT": "{root}/missing.safetensors"}, "missing.safetensors: no such file"),
    ({"ARTIFACT": "{checkpoint}"}, "this file is a twingpt checkpoint; give it as CHECKPOINT="),
    ({"CHECKPOINT": "{root}/run/config.json"}, "not a twingpt checkpoint (.safetensors) or artifact"),
    ({"CHECKPOINT": "{checkpoint}", "EVAL_STRIDE": "33"}, "EVAL_STRIDE=33: must not exceed the window length 32"),
    ({"CHECKPOINT": "{wide}"}, "vocabulary size 512, but the model of CHECKPOINT="),
])
def test_bad_inputs_are_one_line_errors_with_exit_status_2(files, env, message, capsys):
    wide = files["root"] / "vocab1024.safetensors"
    if not wide.exists():   # a model of another vocabulary than the dataset's
        spec = ModelSpec(vocab_size=1024, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
        save_checkpoint(wide, spec=spec, config={}, step=0, weights=random_weights(spec, seed=1),
                        optimizer_state={}, data_state={})
    names = {k: str(v) for k, v in files.items()} | {"wide": str(wide)}
    env = {k: v.format(**names) for k, v in env.items()}
    with pytest.raises(SystemExit) as e:
        torch_eval.main([], {"DEVICE": "cpu", **tiny_data(files), **env})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def tiny_data(files):
    config = json.loads((files["root"] / "run" / "config.json").read_text())
    return {"DATA_PATH": config["data_path"], "TOKENIZER_PATH": config["tokenizer_path"]}


@pytest.mark.parametrize("backend", list(MAINS))
def test_make_eval_of_a_runs_own_files_reproduces_its_summary(backend, tiny_dataset, tmp_path, capsys):
    """The final checkpoint scores the run's final val_loss/val_bpb, and the artifact its roundtrip
    and sliding figures, with no setting given but the file (and the stride)."""
    from trainer_helpers import tiny_env, train
    result = train(backend, tiny_env(tiny_dataset, tmp_path, RUN_ID="own", ITERATIONS=3, EVAL_STRIDE=16))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    capsys.readouterr()
    final, _ = run(backend, capsys, CHECKPOINT=summary["checkpoint"])
    assert Path(summary["checkpoint"]).name == "step_000003.safetensors"
    assert (final["val_loss"], final["val_bpb"]) == pytest.approx((summary["val_loss"], summary["val_bpb"]), rel=1e-12)
    roundtrip, _ = run(backend, capsys, ARTIFACT=summary["artifact"])
    assert (roundtrip["val_loss"], roundtrip["val_bpb"]) == pytest.approx(
        (summary["roundtrip_val_loss"], summary["roundtrip_val_bpb"]), rel=1e-12)
    sliding, _ = run(backend, capsys, ARTIFACT=summary["artifact"], EVAL_STRIDE=16)
    assert (sliding["val_loss"], sliding["val_bpb"]) == pytest.approx(
        (summary["roundtrip_sliding_val_loss"], summary["roundtrip_sliding_val_bpb"]), rel=1e-12)
    assert roundtrip["val_loss"] != final["val_loss"] and sliding["val_loss"] != roundtrip["val_loss"]
