"""Checkpoints: exact round trip, atomic saves, clear errors for missing, corrupt and mismatched files."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

import core.checkpoint as checkpoint
from core.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from core.config import ModelSpec, TrainConfig
from core.errors import CheckpointError, UserError
from core.params import param_shapes

SPEC = ModelSpec(vocab_size=32, num_layers=3, model_dim=16, num_heads=2, num_kv_heads=1)


def random_weights(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in param_shapes(spec).items()}


def save(path, spec=SPEC, **overrides):
    weights = random_weights(spec)
    args = dict(
        spec=spec, config=TrainConfig(num_layers=spec.num_layers, model_dim=spec.model_dim,
                                      vocab_size=spec.vocab_size, num_heads=spec.num_heads,
                                      num_kv_heads=spec.num_kv_heads, tie_embeddings=spec.tie_embeddings),
        step=1234, weights=weights,
        optimizer_state={"tok_emb.weight.exp_avg": weights["tok_emb.weight"] * 0.5,
                         "blocks.0.attn.c_q.weight.momentum_buffer": np.arange(256, dtype=np.float32).reshape(16, 16),
                         "adam_step": 1234, "muon_momentum": 0.9123456789012345},
        data_state={"shard": 3, "position": 123_456_789},
        rng_state={"numpy": {"bit_generator": "PCG64", "state": 2**127 + 12345}, "torch_cpu": np.arange(5, dtype=np.uint8)},
        backend="torch", extra={"note": "hello"},
    )
    args.update(overrides)
    save_checkpoint(path, **args)
    return args


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    saved = save(path)
    ck = load_checkpoint(path)
    assert ck.path == str(path)
    assert ck.spec == SPEC
    assert ck.config == saved["config"].to_dict()
    assert ck.step == 1234 and ck.backend == "torch" and ck.extra == {"note": "hello"}
    assert ck.data_state == {"shard": 3, "position": 123_456_789}
    assert sorted(ck.weights) == sorted(saved["weights"])
    for name, w in saved["weights"].items():
        assert ck.weights[name].dtype == np.float32
        np.testing.assert_array_equal(ck.weights[name], w)
    assert sorted(ck.optimizer_state) == sorted(saved["optimizer_state"])
    for key, value in saved["optimizer_state"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(ck.optimizer_state[key], value)
            assert ck.optimizer_state[key].dtype == value.dtype
        else:
            assert ck.optimizer_state[key] == value and type(ck.optimizer_state[key]) is type(value)
    assert ck.rng_state["numpy"] == {"bit_generator": "PCG64", "state": 2**127 + 12345}
    np.testing.assert_array_equal(ck.rng_state["torch_cpu"], np.arange(5, dtype=np.uint8))
    ck.weights["tok_emb.weight"][0, 0] = 1.0  # loaded arrays are ordinary writable arrays


def test_file_is_plain_safetensors_with_json_metadata(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path, rng_state=None)
    tensors = safetensors.numpy.load_file(path)
    assert "optim/tok_emb.weight.exp_avg" in tensors and "tok_emb.weight" in tensors
    assert not any(k.startswith("rng/") for k in tensors)
    assert load_checkpoint(path).rng_state is None


def test_tied_spec_stores_no_lm_head_and_untied_does(tmp_path):
    save(tmp_path / "tied.safetensors")
    assert "lm_head.weight" not in safetensors.numpy.load_file(tmp_path / "tied.safetensors")
    untied = ModelSpec(vocab_size=32, num_layers=3, model_dim=16, num_heads=2, num_kv_heads=1, tie_embeddings=False)
    save(tmp_path / "untied.safetensors", spec=untied)
    assert "lm_head.weight" in load_checkpoint(tmp_path / "untied.safetensors").weights


def test_save_refuses_weights_of_another_spec(tmp_path):
    weights = random_weights(SPEC)
    weights["lm_head.weight"] = weights["tok_emb.weight"]
    with pytest.raises(CheckpointError, match="unexpected parameter.*lm_head.weight"):
        save(tmp_path / "c.safetensors", weights=weights)
    assert not (tmp_path / "c.safetensors").exists()


def test_failed_save_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save(path, step=1)
    before = path.read_bytes()

    def disk_full(fd):  # the data has been written to the temp file; flushing it fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: cannot write it \\(No space left on device\\)"):
        save(path, step=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1


def test_interrupted_save_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save(path, step=1)
    before = path.read_bytes()
    real_save = safetensors.numpy.save

    def half_then_interrupt(tensors, metadata=None):  # half the bytes reach the file, then Ctrl-C
        blob = real_save(tensors, metadata=metadata)
        monkeypatch.setattr(os, "fsync", interrupt)
        return blob[: len(blob) // 2]

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.safetensors.numpy, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save(path, step=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_save_creates_the_folder_and_overwrites(tmp_path):
    path = tmp_path / "run" / "ckpt" / "last.safetensors"
    save(path, step=1)
    save(path, step=2)
    assert load_checkpoint(path).step == 2
    assert os.listdir(path.parent) == ["last.safetensors"]


def one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return str(e.value)


def test_missing_and_folder(tmp_path):
    one_line_error(tmp_path / "nope.safetensors", f"^checkpoint {tmp_path / 'nope.safetensors'}: no such file$")
    one_line_error(tmp_path, "is a folder")


def test_corrupt_files(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path)
    good = path.read_bytes()
    cases = {
        "empty": b"",
        "text": b"this is not a checkpoint at all",
        "truncated": good[: len(good) - 100],
        "header only": good[:50],
    }
    for label, data in cases.items():
        path.write_bytes(data)
        msg = one_line_error(path, f"^checkpoint {path}: corrupt or not a twingpt checkpoint \\(")
        assert msg.endswith(")"), label
    safetensors.numpy.save_file({"x": np.zeros(3, dtype=np.float32)}, path)
    one_line_error(path, "without twingpt metadata")
    safetensors.numpy.save_file({"x": np.zeros(3, dtype=np.float32)}, path, metadata={"twingpt": "{oops"})
    one_line_error(path, "metadata is not JSON")


def test_newer_format_and_bad_spec(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path)
    tensors = safetensors.numpy.load_file(path)
    meta = json.loads(safetensors.safe_open(str(path), "np").metadata()["twingpt"])
    safetensors.numpy.save_file(tensors, path, metadata={"twingpt": json.dumps({**meta, "format": 2})})
    one_line_error(path, "format 2, this twingpt reads format 1")
    bad_spec = {**meta, "spec": {**meta["spec"], "num_heads": 3}}
    safetensors.numpy.save_file(tensors, path, metadata={"twingpt": json.dumps(bad_spec)})
    one_line_error(path, "bad spec: num_heads=3")
    del meta["data_state"]
    safetensors.numpy.save_file(tensors, path, metadata={"twingpt": json.dumps(meta)})
    one_line_error(path, "metadata lacks data_state")


def test_weights_checked_against_stored_spec(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path)
    tensors = safetensors.numpy.load_file(path)
    meta = safetensors.safe_open(str(path), "np").metadata()
    tensors["blocks.1.mlp.fc.weight"] = np.zeros((5, 16), dtype=np.float32)
    safetensors.numpy.save_file(tensors, path, metadata=meta)
    one_line_error(path, "blocks.1.mlp.fc.weight has shape \\(5, 16\\), this model spec needs \\(32, 16\\)")
    del tensors["blocks.2.attn_scale"]
    safetensors.numpy.save_file(tensors, path, metadata=meta)
    one_line_error(path, "missing parameter\\(s\\) blocks.2.attn_scale")


def test_check_compatible_names_the_first_difference(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path)
    ck = load_checkpoint(path)
    check_compatible(ck, SPEC)
    check_compatible(ck, ModelSpec(**{**SPEC.to_dict(), "qk_gain_init": 3.0}))  # init-only: fine
    other = ModelSpec(**{**SPEC.to_dict(), "num_layers": 9, "model_dim": 32})
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} was trained with num_layers=3, "
                                              "this run has num_layers=9 \\(set NUM_LAYERS=3 to continue it\\)$"):
        check_compatible(ck, other)
    with pytest.raises(CheckpointError, match="tie_embeddings=True, this run has tie_embeddings=False"):
        check_compatible(ck, ModelSpec(**{**SPEC.to_dict(), "tie_embeddings": False}))
