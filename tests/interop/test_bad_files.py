"""What the readers refuse: pickles that would run code, damaged files, other files, foreign shapes.
Every refusal is one line naming the file, and nothing is run or written."""

import os
import pickle
import zlib

import numpy as np
import pytest
import torch

from core.checkpoint import save_checkpoint
from core.config import ModelSpec, TrainConfig
from core.errors import CheckpointError, UserError
from interop import pg_import, read_reference_file
from interop.safe_pickle import safe_loads
from pg_fixtures import int8_object, script_weights, write_mlx_int8, write_mlx_npz, write_torch_int8, write_torch_state_dict

SPEC = ModelSpec(vocab_size=128, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)


class RunsAShellCommand:
    """Unpickling this with plain pickle.loads runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_plain_pickle_would_run_the_fixtures_code(tmp_path):
    """The fixture is real: the ordinary unpickler runs it (this is what the reader must prevent)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsAShellCommand(marker)))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_an_mlx_int8_artifact_that_runs_code_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "ran"
    obj, _ = int8_object(script_weights(SPEC, 0), max_keep=512)
    obj["passthrough"]["blocks.0.attn_scale"] = RunsAShellCommand(marker)   # hidden among real arrays
    path = tmp_path / "evil_mlx_model.int8.ptz"
    path.write_bytes(zlib.compress(pickle.dumps(obj, protocol=protocol), 9))
    with pytest.raises(CheckpointError) as err:
        read_reference_file(path)
    assert str(err.value).startswith(f"refused pickle global {os.system.__module__}.system in {path}")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_torch_file_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "final_model.pt"
    weights = {k: torch.tensor(v) for k, v in script_weights(SPEC, 1).items()}
    torch.save({**weights, "evil": RunsAShellCommand(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        read_reference_file(path)
    assert str(err.value).startswith("refused pickle global") and str(path) in str(err.value)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_pickle_reader_reads_numpy_arrays_of_every_protocol(protocol):
    obj = {"a": np.arange(6, dtype=np.int8).reshape(2, 3), "b": [np.float16(1.5), np.array(2.0, np.float32)],
           "c": ("text", 3, 4.5, None, True)}
    back = safe_loads(pickle.dumps(obj, protocol=protocol), "x")
    assert np.array_equal(back["a"], obj["a"]) and back["a"].dtype == np.int8
    assert back["b"][0] == np.float16(1.5) and back["b"][1].dtype == np.float32 and back["c"] == obj["c"]


@pytest.mark.parametrize("holder", [dict, list, tuple])
def test_an_array_of_python_objects_is_refused(holder):
    objects = np.array([1, "x"], dtype=object)
    held = {"q": {"a": objects}} if holder is dict else holder([np.zeros(2), objects])
    with pytest.raises(CheckpointError, match="array of Python objects"):
        safe_loads(pickle.dumps(held), "x")


class _Rot13:
    """Pickles as _codecs.encode("text", "rot13"): the one admitted function, asked for another codec."""
    def __reduce__(self):
        import codecs
        return codecs.encode, ("text", "rot13")


def test_codecs_encode_is_admitted_for_latin1_only():
    assert safe_loads(pickle.dumps(np.arange(3, dtype=np.int16), protocol=2), "x").tolist() == [0, 1, 2]
    data = pickle.dumps(_Rot13(), protocol=2)
    assert b"_codecs" in data
    with pytest.raises(CheckpointError, match="admitted for latin1 text only, not 'rot13'"):
        safe_loads(data, "x")


def _checkpoint(path):
    save_checkpoint(path, spec=SPEC, config=TrainConfig(**SPEC.to_dict()), step=0,
                    weights=script_weights(SPEC, 2), optimizer_state={}, data_state={})


def _bad_files(tmp_path):
    """name -> (path, a piece of the expected message)."""
    w = script_weights(SPEC, 3)
    files = {}
    good = {"pt": tmp_path / "good.pt", "ptz": tmp_path / "good.int8.ptz", "npz": tmp_path / "good.npz",
            "mlx_ptz": tmp_path / "good_mlx.int8.ptz"}
    write_torch_state_dict(good["pt"], w)
    write_torch_int8(good["ptz"], w, max_keep=512)
    write_mlx_npz(good["npz"], w)
    write_mlx_int8(good["mlx_ptz"], w, max_keep=512)
    for name, path in good.items():
        cut = tmp_path / f"truncated_{path.name}"
        raw = path.read_bytes()
        cut.write_bytes(raw[: len(raw) // 2])
        files[f"truncated {name}"] = (cut, "")
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    files["text file"] = (text, "not a Parameter Golf reference file")
    ckpt = tmp_path / "ours.safetensors"
    _checkpoint(ckpt)
    files["our checkpoint"] = (ckpt, "not a Parameter Golf reference file")
    files["missing"] = (tmp_path / "nope.pt", "no such file")
    files["folder"] = (tmp_path, "is a folder")
    extra = tmp_path / "extra.pt"
    torch.save({**{k: torch.tensor(v) for k, v in w.items()}, "blocks.0.attn.rotary.inv_freq": torch.ones(8)}, extra)
    files["foreign tensor"] = (extra, "unexpected parameter(s) blocks.0.attn.rotary.inv_freq")
    shape = tmp_path / "shape.pt"
    torch.save({**{k: torch.tensor(v) for k, v in w.items()}, "blocks.1.mlp.fc.weight": torch.ones(64, 31)}, shape)
    files["foreign shape"] = (shape, "blocks.1.mlp.fc.weight has shape (64, 31)")
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(2)], listed)
    files["not a dict"] = (listed, "not a state dict")
    objects = tmp_path / "objects.npz"
    np.savez(objects, **{"tok_emb.weight": np.array([1, "x"], dtype=object)})
    files["npz of Python objects"] = (objects, "allow_pickle=False")
    obj, _ = int8_object(w, max_keep=512)
    obj["__quant_format__"] = "int6_something_else"
    other = tmp_path / "other_mlx.int8.ptz"
    other.write_bytes(zlib.compress(pickle.dumps(obj), 9))
    files["other int8 format"] = (other, "expected 'int8_clean_per_row_v1'")
    obj, _ = int8_object(w, max_keep=512)
    obj["scales"]["tok_emb.weight"] = obj["scales"]["tok_emb.weight"][:-1]
    rows = tmp_path / "rows_mlx.int8.ptz"
    rows.write_bytes(zlib.compress(pickle.dumps(obj), 9))
    files["scales of other rows"] = (rows, "do not match")
    return files


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    for case, (path, expected) in _bad_files(tmp_path).items():
        with pytest.raises(UserError) as err:
            read_reference_file(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and expected in message, (case, message)


def test_pg_import_writes_nothing_on_an_error(tmp_path, capsys):
    path = tmp_path / "final_model.pt"
    path.write_bytes(b"PK\x03\x04 broken")
    out = tmp_path / "ckpt.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        pg_import.main([], environ={"SRC": str(path), "OUT": str(out)})
    assert exit_info.value.code == 2 and not out.exists() and list(tmp_path.iterdir()) == [path]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
