"""make quantize (trainer/quantize_file.py, python -m backend_{torch,mlx}.quantize) on a small trained
checkpoint: GPTQ beats round-to-nearest at 6 bits on every matrix and after the round trip, both
backends write the same bytes, the default is today's int8 artifact, make eval reads the new ones,
and every bad input is one line with exit status 2 and nothing written."""

import numpy as np
import pytest

import backend_mlx.eval as mlx_eval
import backend_mlx.quantize as mlx_quantize
import backend_torch.eval as torch_eval
import backend_torch.quantize as torch_quantize
from backend_torch.session import TorchSession
from core import artifact
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.params import param_table
from core.quantize import layer_error, quantize_model
from data.datasets import resolve_dataset
from tests.trainer_helpers import tiny_env, train
from trainer.quantize_file import calibration_batches

MAINS = {"torch": torch_quantize.main, "mlx": mlx_quantize.main}
GPTQ6 = {"QUANT": "gptq", "MATRIX_BITS": "6", "EMBED_BITS": "6", "GPTQ_CALIBRATION_BATCHES": "8"}


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    """A tiny model trained 200 steps on the tiny dataset (about 10 s), and its run's settings. At 60
    steps GPTQ's 6-bit round trip is the worse: its tied embedding's codes, chosen for the head, cost
    the input lookup more than they gain the head (README, "GPTQ against round-to-nearest at 6 bits")."""
    env = tiny_env(tiny_dataset, tmp_path_factory.mktemp("quantize"), ITERATIONS=200, WARMDOWN_ITERS=60,
                   TRAIN_LOG_EVERY=1000)
    return train("torch", env).checkpoint, env


def quantize(backend, path, capsys, **env):
    figures = MAINS[backend]([], {"DEVICE": "cpu", "CHECKPOINT": str(path), **{k: str(v) for k, v in env.items()}})
    return figures, capsys.readouterr().out


def test_gptq_has_a_lower_layer_error_than_round_to_nearest_on_every_6_bit_matrix(checkpoint):
    path, env = checkpoint
    ckpt = load_checkpoint(path)
    cfg = load_config([], environ={**env, **GPTQ6, "LQER_ENABLED": "0"})
    session = TorchSession(cfg, environ={})
    session.setup(ckpt.spec, cfg)
    session.load_weights(ckpt.weights)
    batches = calibration_batches(cfg, resolve_dataset(cfg.data_path, cfg.tokenizer_path, 512).train_files, 0, 1, 512)
    sums = session.input_second_moments(batches)
    tokens = sum(x.size for x, _ in batches)
    table = param_table(ckpt.spec)
    gptq = quantize_model(ckpt.weights, table, sums, cfg)
    rtn = quantize_model(ckpt.weights, table, sums, cfg.replace(gptq=False))
    assert sorted(sums) == sorted(n for n, t in gptq.items() if t.scheme == "int_per_row")   # every matrix
    print()
    for name in sorted(sums):
        h = sums[name].astype(np.float64) / tokens
        e_gptq = layer_error(ckpt.weights[name], artifact.dequantize_tensor(gptq[name]), h)
        e_rtn = layer_error(ckpt.weights[name], artifact.dequantize_tensor(rtn[name]), h)
        print(f"{name:28s} ||WX - QX|| per token: rtn {e_rtn:.5f} gptq {e_gptq:.5f} ({e_gptq / e_rtn:.3f})")
        assert e_gptq < e_rtn, name


def test_gptq_has_a_lower_round_trip_val_bpb_than_round_to_nearest_at_6_bits(checkpoint, capsys):
    path, _ = checkpoint
    got = {}
    for method in ("1", "0"):
        got[method], _ = quantize("torch", path, capsys, **GPTQ6, LQER_ENABLED=0, GPTQ=method)
    with capsys.disabled():
        print(f"\nround-trip val_bpb at 6 bits: rtn {got['0']['roundtrip_val_bpb']:.5f} "
              f"gptq {got['1']['roundtrip_val_bpb']:.5f}")
    assert got["1"]["roundtrip_val_bpb"] < got["0"]["roundtrip_val_bpb"]


@pytest.mark.parametrize("compressor", ["brotli", "pergroup"])
def test_torch_and_mlx_write_the_same_bytes_and_make_eval_reads_them(checkpoint, capsys, tmp_path, compressor):
    path, env = checkpoint
    got = {}
    for backend in MAINS:
        out = tmp_path / f"{backend}.gptq.{compressor}"
        got[backend], text = quantize(backend, path, capsys, **GPTQ6, COMPRESSOR=compressor, LQER_TOP_K=2,
                                      LQER_ASYM_GROUP=16, OUT=out)
        lines = text.strip().splitlines()
        assert lines[0].startswith(f"quantize backend:{backend} checkpoint:{path} gptq6_{compressor} in ")
        assert lines[1] == artifact.size_report(out.stat().st_size)
        assert lines[2].startswith(f"budget: artifact {out.stat().st_size:,} + code ")
        assert f".py files of core/, data/, interop/, trainer/, backend_{backend}/)" in lines[2]
        assert lines[3] == (f"final_gptq6_{compressor}_roundtrip val_loss:{got[backend]['roundtrip_val_loss']:.8f} "
                            f"val_bpb:{got[backend]['roundtrip_val_bpb']:.8f}")
    assert (tmp_path / f"torch.gptq.{compressor}").read_bytes() == (tmp_path / f"mlx.gptq.{compressor}").read_bytes()
    run_settings = {k: env[k] for k in ("DATA_PATH", "TOKENIZER_PATH", "TRAIN_SEQ_LEN", "VAL_BATCH_SIZE")}
    evaluated = torch_eval.main([], {"DEVICE": "cpu", "ARTIFACT": str(tmp_path / f"mlx.gptq.{compressor}"), **run_settings})
    capsys.readouterr()
    assert abs(evaluated["val_bpb"] - got["torch"]["roundtrip_val_bpb"]) < 1e-9


def test_the_default_is_todays_int8_zlib_artifact(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    figures, text = quantize("torch", path, capsys, OUT=tmp_path / "model.int8.zlib")
    assert (tmp_path / "model.int8.zlib").read_bytes() == artifact.pack(load_checkpoint(path).weights)
    assert "final_int8_zlib_roundtrip val_loss:" in text and figures["label"] == "int8_zlib"
    assert "VAL_MAX_TOKENS" not in text
    _, part = quantize("torch", path, capsys, VAL_MAX_TOKENS=4096)   # the roundtrip on the first targets only
    assert "(VAL_MAX_TOKENS=4096: only the first targets of the val split" in part


def run_failing(main, env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([], {"DEVICE": "cpu", **{k: str(v) for k, v in env.items()}})
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.parametrize("bad, message", [
    ({"QUANT": "gptq", "MATRIX_BITS": "9"}, "MATRIX_BITS=9: unsupported; must be 2 to 8"),
    ({"QUANT": "gptq", "EMBED_BITS": "1"}, "EMBED_BITS=1: unsupported; must be 2 to 8"),
    ({"COMPRESSOR": "zstd"}, "COMPRESSOR='zstd': must be one of zlib, lzma, brotli, pergroup"),
    ({"QUANT": "int4"}, "QUANT='int4': must be one of int8, gptq"),
    ({"QUANT": "gptq", "EMBED_LOOKUP_WEIGHT": "-1"}, "EMBED_LOOKUP_WEIGHT=-1.0: must not be negative"),
])
def test_a_bad_setting_is_one_line_exit_2_and_nothing_written(checkpoint, capsys, tmp_path, bad, message):
    path, _ = checkpoint
    out = tmp_path / "model.bin"
    out.write_bytes(b"keep me")
    code, err = run_failing(torch_quantize.main, {"CHECKPOINT": path, "OUT": out, **bad}, capsys)
    assert code == 2 and err.startswith(f"error: {message}")
    assert "\n" not in err and out.read_bytes() == b"keep me" and sorted(tmp_path.iterdir()) == [out]


def test_a_missing_brotli_is_one_line_exit_2_and_nothing_written(checkpoint, capsys, tmp_path, monkeypatch):
    path, _ = checkpoint
    monkeypatch.setitem(__import__("sys").modules, "brotli", None)
    code, err = run_failing(mlx_quantize.main, {"CHECKPOINT": path, "COMPRESSOR": "brotli",
                                                "OUT": tmp_path / "a.bin"}, capsys)
    assert code == 2 and err == "error: COMPRESSOR=brotli: the brotli module is not installed (pip install brotli)"
    assert not list(tmp_path.iterdir())


def test_a_missing_lrzip_is_one_line_exit_2_and_nothing_written(checkpoint, capsys, tmp_path, monkeypatch):
    path, _ = checkpoint
    blob = artifact.pack_tensors(artifact.quantize(load_checkpoint(path).weights), "pergroup")
    (tmp_path / "model.int8.pergroup").write_bytes(blob)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))    # lrzip is nowhere on it
    message = "COMPRESSOR=pergroup needs lrzip: apt-get install lrzip or brew install lrzip"
    code, err = run_failing(torch_quantize.main, {"CHECKPOINT": path, "COMPRESSOR": "pergroup",
                                                  "OUT": tmp_path / "a.bin"}, capsys)
    assert code == 2 and err == f"error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.pergroup"]
    code, err = run_failing(mlx_eval.main, {"ARTIFACT": tmp_path / "model.int8.pergroup"}, capsys)
    assert code == 2 and err == f"error: artifact {tmp_path / 'model.int8.pergroup'}: {message}"


@pytest.mark.parametrize("compressor", ["lzma", "brotli", "pergroup"])
def test_a_truncated_artifact_is_one_line_exit_2_in_make_eval(checkpoint, capsys, tmp_path, compressor):
    path, _ = checkpoint
    blob = artifact.pack_tensors(artifact.quantize(load_checkpoint(path).weights), compressor)
    bad = tmp_path / f"model.int8.{compressor}"
    bad.write_bytes(blob[:len(blob) // 2])
    for main in (torch_eval.main, mlx_eval.main):
        code, err = run_failing(main, {"ARTIFACT": bad}, capsys)
        assert code == 2 and err.startswith(f"error: artifact {bad}: corrupt or not a twingpt artifact ({compressor}:")
        assert "\n" not in err


def test_the_quantize_grid_reads_the_quantizer_settings_as_make_quantize_does(checkpoint):
    """bench/quantize_grid.py: what it does not vary is the user's (a clip sigma, the lookup weight), the
    rest the checkpoint's run's; QUANT is gptq and DEVICE cpu unless given."""
    from bench.quantize_grid import grid_settings

    path, env = checkpoint
    given, cfg = grid_settings({"CHECKPOINT": str(path), "EMBED_LOOKUP_WEIGHT": "0.5", "MLP_CLIP_SIGMAS": "9",
                                "EMBED_BITS": "8", "QUANT": "int8"})
    assert given == str(path) and cfg.quant == "gptq" and cfg.device == "cpu"
    assert (cfg.embed_lookup_weight, cfg.mlp_clip_sigmas, cfg.embed_bits) == (0.5, 9.0, 8)
    assert (cfg.data_path, cfg.train_seq_len) == (env["DATA_PATH"], int(env["TRAIN_SEQ_LEN"]))   # the run's
