"""QUANT=gptq's arithmetic (core/quantize.py, docs/spec.md §9.2), pinned by a slow, obvious float64
implementation written here from the definition, and its artifact (core/artifact.py) read back."""

import numpy as np
import pytest

from core import artifact
from core.config import ModelSpec, TrainConfig
from core.errors import ArtifactError
from core.init import random_weights
from core.params import is_control, param_table
from core.quantize import (code_max, gptq, layer_error, lqer_factors, quantize_model, round_to_nearest,
                           row_scales)


def slow_gptq(w, h, scale, bits):
    """Optimal Brain Quantization one column at a time, as the definition reads: in order of
    descending diag(H), round the column, then move the rest of the row by the OBS update
    -(w_j - q_j s) / [H_F^-1]_jj * [H_F^-1]_j,:, with H_F^-1 the inverse of H over the columns not
    yet quantized, inverted afresh at every step (no Cholesky factor, no blocks)."""
    m = code_max(bits)
    h = np.array(h, dtype=np.float64)
    w = np.array(w, dtype=np.float64)
    for i in range(h.shape[0]):
        if h[i, i] == 0:          # an input that is never non-zero: its weights do not matter
            h[i, i] = 1.0
            w[:, i] = 0.0
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(h.shape[0])
    order = sorted(range(h.shape[0]), key=lambda i: (-h[i, i], i))
    s = np.asarray(scale, dtype=np.float64)
    codes = np.zeros(w.shape, dtype=np.int64)
    remaining = list(order)
    while remaining:
        j = remaining[0]
        h_inv = np.linalg.inv(h[np.ix_(remaining, remaining)])
        q = np.clip(np.rint(w[:, j] / s), -m, m)
        codes[:, j] = q
        err = w[:, j] - q * s
        for k_pos, k in enumerate(remaining[1:], start=1):
            w[:, k] -= err / h_inv[0, 0] * h_inv[0, k_pos]
        remaining = remaining[1:]
    return codes


def correlated_case(rows, cols, seed, dead=()):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.05
    x = rng.standard_normal((4 * cols, cols)) @ (np.eye(cols) + 0.5 * rng.standard_normal((cols, cols)))
    x[:, list(dead)] = 0.0
    return w.astype(np.float32), (x.T @ x).astype(np.float32)


@pytest.mark.parametrize("rows, cols, bits, block, dead", [
    (6, 10, 6, 128, ()), (5, 12, 4, 4, (3,)), (7, 9, 2, 2, (0, 8)), (4, 16, 8, 5, ()),
])
def test_gptq_gives_the_codes_of_the_slow_column_by_column_definition(rows, cols, bits, block, dead):
    w, h = correlated_case(rows, cols, seed=rows * cols, dead=dead)
    scale = row_scales(w, 3.0, bits)
    assert np.array_equal(gptq(w, h, scale, bits, block_size=block), slow_gptq(w, h, scale, bits))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w, _ = correlated_case(8, 12, seed=1)
    scale = row_scales(w, 4.0, 5)
    h = np.diag(np.arange(1.0, 13.0))
    assert np.array_equal(gptq(w, h, scale, 5), round_to_nearest(w, scale, 5))


def test_gptq_lowers_the_layer_error_below_round_to_nearest():
    w, h = correlated_case(32, 48, seed=3)
    scale = row_scales(w, 3.0, 4)
    rtn = round_to_nearest(w, scale, 4) * scale.astype(np.float64)[:, None]
    opt = gptq(w, h, scale, 4) * scale.astype(np.float64)[:, None]
    assert layer_error(w, opt, h) < 0.8 * layer_error(w, rtn, h)


def test_row_scales_are_clip_sigmas_standard_deviations_per_largest_code_in_fp16():
    w = np.array([[1.0, -1.0, 3.0, -3.0], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    scale = row_scales(w, 2.0, 3)                      # m = 3
    assert scale.dtype == np.float16
    assert scale[0] == np.float16(2.0 * np.std([1, -1, 3, -3], ddof=1) / 3)
    assert scale[1] == 1.0                             # a constant row: std 0, scale 1
    codes = round_to_nearest(w, scale, 3)
    assert codes.min() >= -3 and codes.max() <= 3


def test_lqer_factors_are_the_truncated_svd_with_fixed_signs():
    rng = np.random.default_rng(4)
    e = rng.standard_normal((9, 7))
    a, b = lqer_factors(e, 3)
    u, s, vt = np.linalg.svd(e)
    assert a.shape == (9, 3) and b.shape == (3, 7)
    assert np.allclose(a @ b, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)
    assert all(row[np.argmax(np.abs(row))] > 0 for row in b)
    a2, b2 = lqer_factors(-e, 3)                       # the sign of the input never flips B's
    assert np.allclose(b2, b) and np.allclose(a2, -a)


SPEC = ModelSpec(vocab_size=128, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)


def model_case():
    weights = random_weights(SPEC, seed=2)
    rng = np.random.default_rng(5)
    hessians = {}
    for p in param_table(SPEC):
        if p.group != "scalar":
            x = rng.standard_normal((200, p.shape[1])) * rng.uniform(0.2, 2.0, p.shape[1])
            hessians[p.name] = (x.T @ x).astype(np.float32)
    return weights, hessians


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("compressor", artifact.COMPRESSORS)
def test_a_gptq_artifact_reads_back_as_codes_times_scales_plus_the_lqer_term(asym, compressor):
    weights, hessians = model_case()
    cfg = TrainConfig(**SPEC.to_dict(), quant="gptq", lqer_top_k=2, lqer_rank=2, lqer_asym_enabled=asym,
                      lqer_asym_group=16)
    tensors = quantize_model(weights, param_table(SPEC), hessians, cfg)
    blob = artifact.pack_tensors(tensors, compressor)
    assert artifact.compressor_of(blob) == compressor
    back = artifact.unpack(blob)
    assert sorted(back) == sorted(weights)
    lqer = [name for name, t in tensors.items() if "lqer" in t.info]
    assert len(lqer) == 2 and all(tensors[n].info["lqer"] == ("asym" if asym else "sym") for n in lqer)
    for name, t in tensors.items():
        if t.scheme != "int_per_row":
            assert t.scheme == ("fp32" if is_control(name) else "fp16")   # as in the int8 artifact
            continue
        bits = 7 if name == "tok_emb.weight" else 6
        assert t.info["bits"] == bits and np.abs(t.parts["q"]).max() <= code_max(bits)
        plain = t.parts["q"].astype(np.float32) * t.parts["scale"].astype(np.float32)[:, None]
        if name in lqer:
            p = t.parts
            a = p["lqer_a_q"] * (p["lqer_a_scale"].astype(np.float32) if asym else
                                 p["lqer_a_scale"].astype(np.float32)[:, None])
            b = (p["lqer_b_q"].reshape(-1, 16) * p["lqer_b_scale"].astype(np.float32)[:, None]).reshape(
                p["lqer_b_q"].shape) if asym else p["lqer_b_q"] * p["lqer_b_scale"].astype(np.float32)[:, None]
            assert np.array_equal(back[name], plain + a @ b)
            # the correction helps: it is fitted to this very error
            assert np.linalg.norm(back[name] - weights[name]) < np.linalg.norm(plain - weights[name])
        else:
            assert np.array_equal(back[name], plain)


def test_the_lqer_matrices_are_those_of_largest_error():
    weights, hessians = model_case()
    cfg = TrainConfig(**SPEC.to_dict(), quant="gptq", lqer_top_k=3)
    plain = quantize_model(weights, param_table(SPEC), hessians, cfg.replace(lqer_enabled=False))
    errors = {n: np.linalg.norm(artifact.dequantize_tensor(t) - weights[n].astype(np.float64))
              for n, t in plain.items() if t.scheme == "int_per_row"}
    with_lqer = quantize_model(weights, param_table(SPEC), hessians, cfg)
    assert {n for n, t in with_lqer.items() if "lqer" in t.info} == set(sorted(errors, key=errors.get)[-3:])


def test_embed_lookup_weight_moves_only_the_tied_embeddings_codes_towards_round_to_nearest():
    """EMBED_LOOKUP_WEIGHT adds weight * mean(diag H) * I to the tied embedding's H: its rows' own error
    shrinks as the weight grows, and with H nearly isotropic GPTQ rounds to nearest; other matrices keep
    their codes."""
    weights, hessians = model_case()
    cfg = TrainConfig(**SPEC.to_dict(), quant="gptq", lqer_enabled=False)
    assert cfg.tie_embeddings
    table = param_table(SPEC)
    by_weight = {w: quantize_model(weights, table, hessians, cfg.replace(embed_lookup_weight=w)) for w in (0.0, 1.0, 1e7)}
    rtn = quantize_model(weights, table, hessians, cfg.replace(gptq=False))
    for name, t in by_weight[0.0].items():
        if t.scheme == "int_per_row" and name != "tok_emb.weight":
            assert all(np.array_equal(t.parts["q"], other[name].parts["q"]) for other in by_weight.values())
    codes = {w: tensors["tok_emb.weight"].parts["q"] for w, tensors in by_weight.items()}
    assert np.array_equal(codes[1e7], rtn["tok_emb.weight"].parts["q"])
    assert not np.array_equal(codes[0.0], codes[1.0]) and not np.array_equal(codes[1.0], codes[1e7])
    row_error = {w: np.linalg.norm(artifact.dequantize_tensor(t["tok_emb.weight"]) - weights["tok_emb.weight"])
                 for w, t in by_weight.items()}
    assert row_error[0.0] > row_error[1.0] > row_error[1e7]


def test_the_same_inputs_give_the_same_bytes_and_int8_keeps_format_1():
    weights, hessians = model_case()
    cfg = TrainConfig(**SPEC.to_dict(), quant="gptq")
    one = artifact.pack_tensors(quantize_model(weights, param_table(SPEC), hessians, cfg), "brotli")
    two = artifact.pack_tensors(quantize_model(weights, param_table(SPEC), hessians, cfg), "brotli")
    assert one == two
    assert artifact.pack_tensors(artifact.quantize(weights), "zlib") == artifact.pack(weights)
    assert b'"format":2' in artifact.decompress(one) and b'"format":1' in artifact.decompress(artifact.pack(weights))


@pytest.mark.parametrize("compressor", artifact.COMPRESSORS)
def test_a_truncated_or_corrupt_artifact_is_an_artifact_error(compressor):
    weights, hessians = model_case()
    tensors = quantize_model(weights, param_table(SPEC), hessians, TrainConfig(**SPEC.to_dict(), quant="gptq"))
    blob = artifact.pack_tensors(tensors, compressor)
    for bad in (blob[:len(blob) // 2], blob[:-7], blob[:20] + bytes(len(blob) - 20)):
        with pytest.raises(ArtifactError, match="corrupt or not a twingpt artifact"):
            artifact.unpack(bad)


def test_a_missing_brotli_is_a_config_error_when_writing_and_an_artifact_error_when_reading(monkeypatch):
    blob = artifact.pack_tensors(artifact.quantize(random_weights(SPEC, seed=1)), "brotli")
    monkeypatch.setitem(__import__("sys").modules, "brotli", None)
    with pytest.raises(Exception, match="COMPRESSOR=brotli: the brotli module is not installed"):
        artifact.check_compressor("brotli")
    with pytest.raises(ArtifactError, match="compressed with brotli, which is not installed"):
        artifact.unpack(blob)
