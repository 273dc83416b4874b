"""The record's banked final_model.pt (interop/record_layout.py): make pg-export writes it from our
checkpoint, make pg-import and make eval read it back with the record's settings, exactly, and it
loops as the record's own evaluation does. Fixtures come from our own code only."""

import numpy as np
import pytest

import backend_mlx.eval as mlx_eval
import backend_torch.eval as torch_eval
from core import reference
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import ModelSpec, TrainConfig
from core.init import random_weights
from interop import pg_export, pg_import
from interop.conventions import TORCH_SCRIPT_EPS
from interop.torch_files import load_torch_bytes

SETTINGS = dict(LN_SCALE="1", PARALLEL_START_LAYER="4", NUM_LOOPS="1", LOOP_START="1", LOOP_END="2")
SPEC = ModelSpec(vocab_size=512, num_layers=5, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=3,
                 norm_eps=TORCH_SCRIPT_EPS, mlp_negative_slope=0.5, ln_scale=True, skip_gates_enabled=True,
                 parallel_start_layer=4, num_loops=1, loop_start=1, loop_end=2)


def checkpoint(path, spec=SPEC):
    w = random_weights(spec, 5)
    w["tok_emb.weight"] = w["tok_emb.weight"].astype(np.float32)
    save_checkpoint(path, spec=spec, config=TrainConfig(**spec.to_dict()), step=0, weights=w, optimizer_state={},
                    data_state={}, looping=True)
    return w


@pytest.fixture
def record_file(tmp_path, capsys):
    ours = tmp_path / "ours.safetensors"
    checkpoint(ours)
    out = tmp_path / "final_model.pt"
    pg_export.main(["--checkpoint", str(ours), "--out", str(out)], environ={})
    capsys.readouterr()
    return ours, out


def test_export_writes_the_banked_layout(record_file):
    _, out = record_file
    sd = load_torch_bytes(out.read_bytes(), str(out))
    assert sd["qo_bank"].shape == (10, 32, 32) and sd["kv_bank"].shape == (10, 16, 32)
    assert sd["mlp_up_bank"].shape == (5, 96, 32) and sd["mlp_down_bank"].shape == (5, 32, 96)
    assert sd["skip_gates"].shape == sd["skip_weights"].shape == (3, 32)       # looped order: 3 skips
    assert sd["parallel_post_lambdas"].shape == (5, 2, 2) and not any(n.endswith("c_q.weight") for n in sd)


def test_import_with_the_settings_gives_back_the_model_and_it_loops(record_file, tmp_path, capsys):
    ours, out = record_file
    back = tmp_path / "back.safetensors"
    pg_import.main([], environ={"SRC": str(out), "OUT": str(back), **SETTINGS})
    assert "record-state-dict" in capsys.readouterr().out
    a, b = load_checkpoint(ours), load_checkpoint(back)
    assert b.spec == a.spec and b.looping
    ids = np.arange(24).reshape(2, 12) * 7 % 512
    for name, w in a.weights.items():   # tok_emb went through bfloat16
        np.testing.assert_allclose(b.weights[name], w, rtol=1e-2 if name == "tok_emb.weight" else 0, atol=0)
    got = reference.logits(b.spec, b.weights, ids, True)
    assert np.abs(got - reference.logits(a.spec, b.weights, ids, True)).max() == 0


def test_make_eval_reads_the_record_file_in_both_backends(record_file, tiny_dataset, tmp_path, capsys):
    ours, out = record_file
    back = tmp_path / "back.safetensors"
    pg_import.main([], environ={"SRC": str(out), "OUT": str(back), **SETTINGS})
    data_path, tokenizer = tiny_dataset
    env = {"DEVICE": "cpu", "DATA_PATH": data_path, "TOKENIZER_PATH": tokenizer, "TRAIN_SEQ_LEN": "32",
           "VAL_BATCH_SIZE": "2048", **SETTINGS}
    got = {b: main([], env | {"CHECKPOINT": str(out)}) for b, main in (("torch", torch_eval.main), ("mlx", mlx_eval.main))}
    via_import = torch_eval.main([], env | {"CHECKPOINT": str(back)})
    capsys.readouterr()
    assert got["torch"]["val_loss"] == pytest.approx(via_import["val_loss"], rel=1e-9)
    assert got["mlx"]["val_loss"] == pytest.approx(got["torch"]["val_loss"], rel=1e-6)


@pytest.mark.parametrize("wrong", [dict(NUM_LOOPS="0"), dict(LOOP_END="3"), dict(LOOP_END="7")])
def test_settings_that_do_not_fit_the_file_are_one_line_and_nothing_is_written(wrong, record_file, tmp_path, capsys):
    _, out = record_file
    back = tmp_path / "back.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        pg_import.main([], environ={"SRC": str(out), "OUT": str(back), **SETTINGS, **wrong})
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err and str(out) in err
    assert not back.exists()


def test_a_record_export_of_another_activation_is_refused(tmp_path, capsys):
    spec = ModelSpec(**{**SPEC.to_dict(), "mlp_negative_slope": 0.0})
    ours, out = tmp_path / "relu.safetensors", tmp_path / "final_model.pt"
    checkpoint(ours, spec)
    with pytest.raises(SystemExit) as exit_info:
        pg_export.main(["--checkpoint", str(ours), "--out", str(out), "--layout", "record"], environ={})
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "MLP_NEGATIVE_SLOPE=0" in err and "\n" not in err and not out.exists()
