"""make eval reads the reference trainers' files as they are (ARTIFACT= or CHECKPOINT=), with the
same figures as the checkpoint `make pg-import` writes of them, in both backends."""

import pytest

import backend_mlx.eval as mlx_eval
import backend_torch.eval as torch_eval
from core.config import ModelSpec
from interop.pg_import import main as pg_import
from pg_fixtures import script_weights, write_mlx_int8, write_torch_int8

SPEC = ModelSpec(vocab_size=512, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
MAINS = {"torch": torch_eval.main, "mlx": mlx_eval.main}


@pytest.mark.parametrize("write", [write_torch_int8, write_mlx_int8], ids=["torch-int8", "mlx-int8"])
def test_eval_of_a_reference_artifact_equals_eval_of_its_import(write, tiny_dataset, tmp_path, capsys):
    data_path, tokenizer = tiny_dataset
    source = tmp_path / "final_model.int8.ptz"
    write(source, script_weights(SPEC, seed=3), max_keep=64)
    imported = tmp_path / "imported.safetensors"
    pg_import(["--src", str(source), "--out", str(imported)])
    env = {"DEVICE": "cpu", "DATA_PATH": data_path, "TOKENIZER_PATH": tokenizer, "TRAIN_SEQ_LEN": "32",
           "VAL_BATCH_SIZE": "2048", "EVAL_STRIDE": "16"}
    got = {backend: main([], env | {"ARTIFACT": str(source)}) for backend, main in MAINS.items()}
    via_import = torch_eval.main([], env | {"CHECKPOINT": str(imported)})
    capsys.readouterr()
    assert got["torch"]["val_bpb"] == pytest.approx(got["mlx"]["val_bpb"], rel=1e-6)
    assert got["torch"]["val_loss"] == pytest.approx(via_import["val_loss"], rel=1e-9)
    assert got["torch"]["val_bpb"] == pytest.approx(via_import["val_bpb"], rel=1e-9)
