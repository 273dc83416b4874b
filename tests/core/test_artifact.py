"""The int8+zlib artifact (docs/spec.md §9): schemes, round-trip error, determinism, corrupt input, size."""

import zlib

import numpy as np
import pytest

from core.artifact import (ARTIFACT_BUDGET_BYTES, MAGIC, clip_abs, load_artifact, pack, quantize,
                           save_artifact, serialize, size_report, unpack)
from core.config import ModelSpec
from core.errors import ArtifactError, UserError
from core.params import param_table


def rand(shape, std=1.0, seed=0):
    return (np.random.default_rng(seed).normal(0, std, shape)).astype(np.float32)


def test_schemes_follow_size_shape_and_name():
    w = {
        "blocks.0.mlp.fc.weight": rand((300, 256)),           # 76,800 > 65,536, 2-D
        "big3d": rand((50, 40, 40)),                           # 80,000, not 2-D
        "blocks.0.attn.c_k.weight": rand((256, 256)),          # exactly 65,536: kept
        "blocks.0.attn_scale": rand((512,)),                   # control
        "skip_weights": rand((300, 300)),                      # control but large: quantized
        "token_ids": np.arange(10, dtype=np.int64),
    }
    q = quantize(w)
    assert {n: t.scheme for n, t in q.items()} == {
        "blocks.0.mlp.fc.weight": "int8_per_row", "big3d": "int8_per_tensor",
        "blocks.0.attn.c_k.weight": "fp16", "blocks.0.attn_scale": "fp32",
        "skip_weights": "int8_per_row", "token_ids": "raw",
    }
    assert q["blocks.0.mlp.fc.weight"].parts["scale"].dtype == np.float16
    assert q["blocks.0.mlp.fc.weight"].parts["scale"].shape == (300,)
    assert q["big3d"].parts["scale"].dtype == np.float32 and q["big3d"].parts["scale"].shape == ()


def test_roundtrip_names_shapes_and_exact_small_tensors():
    w = {
        "m": rand((512, 256), seed=1),
        "t": rand((70_000,), seed=2),
        "small": rand((64, 64), seed=3),
        "blocks.3.resid_mix": rand((2, 512), seed=4),
        "blocks.3.attn.q_gain": rand((8,), seed=5),
        "ids": np.array([[1, -2], [3, 4]], dtype=np.int32),
        "mask": np.array([True, False]),
    }
    out = unpack(pack(w))
    assert list(out) == sorted(w)
    for name in w:
        assert out[name].shape == w[name].shape
    for name in ("m", "t", "small", "blocks.3.resid_mix", "blocks.3.attn.q_gain"):
        assert out[name].dtype == np.float32
    np.testing.assert_array_equal(out["small"], w["small"].astype(np.float16).astype(np.float32))
    assert not np.array_equal(out["small"], w["small"])  # really went through fp16
    np.testing.assert_array_equal(out["blocks.3.resid_mix"], w["blocks.3.resid_mix"])
    np.testing.assert_array_equal(out["blocks.3.attn.q_gain"], w["blocks.3.attn.q_gain"])
    np.testing.assert_array_equal(out["ids"], w["ids"])
    assert out["ids"].dtype == np.int32
    np.testing.assert_array_equal(out["mask"], w["mask"])


def test_int8_roundtrip_error_is_small_per_row():
    w = rand((512, 1024), std=0.7, seed=6)
    out = unpack(pack({"w": w}))["w"]
    rel = np.linalg.norm(out - w, axis=1) / np.linalg.norm(w, axis=1)
    # step = max|row|/127 ~ 4.3 std/127; uniform rounding error std = step/sqrt(12) ~ 1% of std
    assert rel.max() < 0.015
    assert rel.mean() > 0.003  # it really is quantized
    t = rand((70_000,), std=2.0, seed=7)
    out_t = unpack(pack({"t": t}))["t"]
    assert np.linalg.norm(out_t - t) / np.linalg.norm(t) < 0.015


def test_int8_values_are_q_times_scale():
    w = rand((300, 300), seed=8)
    q = quantize({"w": w})["w"]
    codes, scale = q.parts["q"], q.parts["scale"]
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() == 127
    np.testing.assert_array_equal(unpack(pack({"w": w}))["w"], codes * scale.astype(np.float32)[:, None])


def test_clip_is_linear_interpolated_quantile_and_scale_has_floor():
    row = np.arange(1, 513, dtype=np.float32)  # |w| sorted = 1..512
    # rank = 0.9999984 * 511 = 510.99918..: between 511 and 512, near 512
    np.testing.assert_allclose(clip_abs(row), 511.99918, atol=1e-3)
    w = np.full((300, 300), 1e-3, dtype=np.float32)
    w[0, 0] = 5.0  # one outlier in row 0
    q = quantize({"w": w})["w"]
    # tiny rows: clip = 1e-3, scale floored at 1/127 (fp16), so they quantize to 0
    assert q.parts["scale"][1] == np.float16(1 / 127)
    assert (q.parts["q"][1:] == 0).all()
    # the outlier row: clip just under 5 (the quantile of 299 x 1e-3 and one 5.0)
    assert 4.99 < float(q.parts["scale"][0]) * 127 < 5.0


def test_pack_is_byte_deterministic():
    w = {"b": rand((400, 200), seed=9), "a": rand((10,), seed=10), "blocks.0.mlp_scale": rand((16,))}
    blob = pack(w)
    assert pack(w) == blob
    copy = {name: np.array(w[name], order="F") for name in reversed(list(w))}  # other order, layout
    assert pack(copy) == blob
    w["a"] = w["a"].copy()
    w["a"][3] += 1.0
    assert pack(w) != blob


def test_payload_layout_has_magic_and_is_zlib():
    payload = zlib.decompress(pack({"x": rand((4,))}))
    assert payload.startswith(MAGIC)
    assert payload == serialize(quantize({"x": rand((4,))}))


@pytest.mark.parametrize("blob, why", [
    (b"", "zlib"),
    (b"hello, not an artifact", "zlib"),
    (zlib.compress(b"PK\x03\x04 some zip"), "magic"),
    (zlib.compress(MAGIC + (999).to_bytes(8, "little") + b"{}"), "truncated header"),
    (zlib.compress(MAGIC + (2).to_bytes(8, "little") + b"{]"), "not JSON"),
])
def test_unpack_garbage_is_a_one_line_error(blob, why):
    with pytest.raises(ArtifactError, match=why) as e:
        unpack(blob)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_unpack_truncated_or_tampered_data():
    payload = serialize(quantize({"w": rand((300, 300))}))
    with pytest.raises(ArtifactError, match="tensor w: data runs past the end"):
        unpack(zlib.compress(payload[:-1]))
    with pytest.raises(ArtifactError, match="belong to no tensor"):
        unpack(zlib.compress(payload + b"\0"))
    with pytest.raises(ArtifactError, match="tensor w: tensor scheme 'int8_per_xyz'"):
        unpack(zlib.compress(payload.replace(b'"int8_per_row"', b'"int8_per_xyz"')))  # same length
    with pytest.raises(ArtifactError, match="format 7"):
        unpack(zlib.compress(payload.replace(b'"format":1', b'"format":7')))


def test_bad_weights_are_refused():
    with pytest.raises(ArtifactError, match="tensor w holds NaN or inf"):
        pack({"w": np.array([1.0, np.nan], dtype=np.float32)})
    with pytest.raises(ArtifactError, match="tensor s has dtype <U1"):
        pack({"s": np.array(["a"])})
    with pytest.raises(ArtifactError, match="tensor w is too large in magnitude for its fp16"):
        pack({"w": np.array([1e6], dtype=np.float32)})


def test_files_name_the_path(tmp_path):
    path = tmp_path / "model.int8.ptz"
    n = save_artifact(path, {"w": rand((3,))})
    assert n == path.stat().st_size
    np.testing.assert_array_equal(load_artifact(path)["w"], rand((3,)).astype(np.float16).astype(np.float32))
    with pytest.raises(ArtifactError, match=f"artifact {tmp_path / 'nope'}: no such file"):
        load_artifact(tmp_path / "nope")
    path.write_bytes(b"junk")
    with pytest.raises(ArtifactError, match=f"artifact {path}: corrupt"):
        load_artifact(path)


def test_size_report():
    assert size_report(12_345_678) == "artifact: 12,345,678 bytes (77.2% of the 16,000,000-byte budget)"
    assert size_report(16_000_001).endswith("budget), 1 bytes over")


def test_default_spec_fits_the_budget():
    # init-like but non-trivial: every matrix random (no zero projections), as after a little training
    rng = np.random.default_rng(0)
    weights = {}
    for p in param_table(ModelSpec()):
        if p.init == "normal":
            weights[p.name] = rng.normal(0, p.init_value, p.shape).astype(np.float32)
        elif len(p.shape) == 2 and p.group == "matrix":
            bound = 1 / np.sqrt(p.shape[1])
            weights[p.name] = rng.uniform(-bound, bound, p.shape).astype(np.float32)
        else:
            weights[p.name] = np.ones(p.shape, dtype=np.float32)
    blob = pack(weights)
    assert len(blob) < ARTIFACT_BUDGET_BYTES * 0.6
    out = unpack(blob)
    assert {n: a.shape for n, a in out.items()} == {n: a.shape for n, a in weights.items()}
