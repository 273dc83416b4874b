"""The int8+zlib artifact (docs/spec.md §9) pinned from outside core/artifact.py.

The parity row "byte-identical across backends" packs the same weights with the same function on both
sides, so a change to the quantizer (its rounding, its clip, its scale floor, which tensors it keeps in
fp16 or fp32) passes it. Two pins here:

- golden digests: the sha256 of the payload (and of the zlib bytes) of fixed weights, hard-coded. A
  format pin, not a measured figure: any change of the bytes must be deliberate, and come with new
  digests (and a new FORMAT_VERSION if old artifacts no longer read the same);
- a second quantizer, written in this file from §9 and the reference trainer's format
  (train_gpt.py quantize_float_tensor), must give the very codes and scales that pack() stores, and
  its dequantization must be unpack(pack(w)) bit for bit. Its clip is also checked against
  torch.quantile itself, the function the reference trainer calls.
"""

import hashlib
import zlib

import numpy as np
import pytest
import torch

from core import artifact
from core.config import ModelSpec
from core.init import init_weights, random_weights

# Untied (its lm_head starts all zero: rows with clip 0), mlp_mult 3: tok_emb, lm_head (512 x 160 =
# 81,920) and both MLP matrices (480 x 160 = 76,800) are > 65,536 elements, hence int8 rows; the
# attention matrices (160 x 160) stay fp16, the control tensors fp32.
SPEC = ModelSpec(vocab_size=512, num_layers=2, model_dim=160, num_heads=4, num_kv_heads=2, mlp_mult=3,
                 tie_embeddings=False)
LIMIT = 65_536
CONTROL = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
           "skip_weight", "skip_weights")   # docs/spec.md §6


def mixed_weights() -> dict[str, np.ndarray]:
    """Every scheme of §9 and its edge cases, from a fixed generator."""
    rng = np.random.Generator(np.random.PCG64(2024))
    matrix = rng.standard_normal((300, 257)).astype(np.float32)
    matrix[0] = 0.0                                     # clip 0: the scale floor 1/127
    matrix[1] *= 1e-3                                   # clip < 1: still the floor
    matrix[2, 5] = 40.0                                 # an outlier beyond the clip of its row
    matrix[3] = np.linspace(-300.0, 300.0, 257)         # a wide row
    return {
        "rows": matrix,                                                          # int8_per_row
        "cube": (rng.standard_normal((40, 40, 50)) * 0.02).astype(np.float32),   # int8_per_tensor
        "blocks.0.attn_scale": (1 + rng.standard_normal(70_000)).astype(np.float32),  # big control: int8
        "big.float64": rng.standard_normal((70_000,)),                           # float64, per tensor
        "blocks.0.q_gain": rng.standard_normal(8).astype(np.float32),            # control: fp32
        "skip_weights": rng.standard_normal((3, 16)).astype(np.float32),         # control: fp32
        "small": rng.standard_normal((256, 256)).astype(np.float32),             # 65,536 exactly: fp16
        "counts": rng.integers(-5, 5, (7, 3)),                                   # int64: raw
        "flags": rng.integers(0, 2, 10).astype(bool),                            # bool: raw
    }


WEIGHTS = {
    "init": lambda: init_weights(SPEC, seed=0),
    "random": lambda: random_weights(SPEC, seed=23),
    "mixed": mixed_weights,
}

# Produced once, on main at the commit that added this file (numpy 2.x, stock zlib 1.2.13), with
#   payload = zlib.decompress(artifact.pack(WEIGHTS[k]()))
#   hashlib.sha256(payload).hexdigest(), hashlib.sha256(artifact.pack(WEIGHTS[k]())).hexdigest()
GOLDEN_PAYLOAD = {
    "init": "eddb0c0dcb9d5a1c287b282d061d189b0dcd23dce3e5ed44cb59fecfc5eb8c7d",
    "random": "5476bac462a7cef27ceb462e33220a77dffb4a869ba8aae12d912672e1e3bcc2",
    "mixed": "840d15ab9f6978674cd059b9b8f1d6faacbc54eac2c84142a5b82abe94076dae",
}
GOLDEN_ZLIB = {   # the compressed bytes: stock zlib only (zlib-ng deflates differently, §9)
    "init": "535195e42d1992e48df1c7bbe7159bf3e1dcf15294d033fb757d633dee41aac6",
    "random": "de5d65d934e7d823c8a96d7b280b5500e053d018314606d0d7a2b648503844c7",
    "mixed": "da27049a7684eb4e69e255d348e63328f411f63bfece8411d0981916bb978442",
}
STOCK_ZLIB = "1.2.13"


# ---------------------------------------------------------------------------------------------
# The second quantizer, from docs/spec.md §9
# ---------------------------------------------------------------------------------------------

def percentile_clip(a: np.ndarray) -> np.float32:
    """torch.quantile(a, 0.9999984) of a 1-D float32 array of |w|, as §9 spells it out."""
    q = np.float32(0.9999984)
    n = a.size
    rank = np.float64(q) * (n - 1)
    lo = int(np.floor(rank))
    hi = min(lo + 1, n - 1)
    t = np.float32(rank - lo)
    part = np.partition(a, (lo, hi))                   # the two order statistics, no full sort
    s_lo, s_hi = part[lo], part[hi]
    if t < np.float32(0.5):
        return np.float32(s_lo + t * (s_hi - s_lo))
    return np.float32(s_hi - (s_hi - s_lo) * (np.float32(1) - t))


def second_quantizer(name: str, w: np.ndarray):
    """(scheme, parts) with parts as §9 stores them: {"q", "scale"} or {"data"}."""
    if w.dtype.kind in "biu":
        return "raw", {"data": w}
    w = w.astype(np.float32)
    if w.size > LIMIT and w.ndim == 2:
        clips = np.array([percentile_clip(np.abs(row)) for row in w], dtype=np.float32)
        scales = np.array([max(c / np.float32(127), np.float32(1) / np.float32(127)) for c in clips], np.float32)
        q = np.empty(w.shape, np.int8)
        for i, row in enumerate(w):
            clipped = np.minimum(np.maximum(row, -clips[i]), clips[i])
            q[i] = np.clip(np.round(clipped / scales[i]), -127, 127)   # np.round: half to even
        return "int8_per_row", {"q": q, "scale": scales.astype(np.float16)}
    if w.size > LIMIT:
        clip = percentile_clip(np.abs(w).ravel())
        scale = np.float32(clip / 127.0) if clip > 0 else np.float32(1.0)
        clipped = np.minimum(np.maximum(w, -clip), clip)
        return "int8_per_tensor", {"q": np.clip(np.round(clipped / scale), -127, 127).astype(np.int8),
                                   "scale": np.float32(scale)}
    if any(c in name for c in CONTROL):
        return "fp32", {"data": w}
    return "fp16", {"data": w.astype(np.float16)}


def second_dequantize(scheme, parts):
    if scheme == "int8_per_row":
        return parts["q"].astype(np.float32) * parts["scale"].astype(np.float32)[:, None]
    if scheme == "int8_per_tensor":
        return parts["q"].astype(np.float32) * parts["scale"]
    return parts["data"].astype(np.float32) if scheme != "raw" else parts["data"]


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", sorted(WEIGHTS))
def test_golden_digests(which):
    blob = artifact.pack(WEIGHTS[which]())
    payload = zlib.decompress(blob)
    assert blob == zlib.compress(payload, 9)
    assert hashlib.sha256(payload).hexdigest() == GOLDEN_PAYLOAD[which]
    if zlib.ZLIB_RUNTIME_VERSION == STOCK_ZLIB:
        assert hashlib.sha256(blob).hexdigest() == GOLDEN_ZLIB[which]


@pytest.mark.parametrize("which", sorted(WEIGHTS))
def test_a_second_quantizer_gives_the_stored_codes_and_scales(which):
    w = WEIGHTS[which]()
    blob = artifact.pack(w)
    stored = artifact.deserialize(zlib.decompress(blob))    # what the artifact holds, part by part
    restored = artifact.unpack(blob)
    assert set(stored) == set(restored) == set(w)
    schemes = set()
    for name in sorted(w):
        scheme, parts = second_quantizer(name, w[name])
        schemes.add(scheme)
        assert stored[name].scheme == scheme, name
        assert stored[name].dtype == w[name].dtype.name and stored[name].shape == w[name].shape, name
        assert set(stored[name].parts) == set(parts), name
        for part, expected in parts.items():
            got = stored[name].parts[part]
            assert got.dtype == np.asarray(expected).dtype and got.shape == np.shape(expected), (name, part)
            mismatched = int(np.sum(got != expected))
            assert mismatched == 0, f"{name} {part}: {mismatched} of {got.size} differ from the second quantizer"
        deq = second_dequantize(scheme, parts)
        assert restored[name].dtype == deq.dtype and np.array_equal(restored[name], deq), name
    expected_schemes = {"init": {"int8_per_row", "fp16", "fp32"}, "random": {"int8_per_row", "fp16", "fp32"},
                        "mixed": {"int8_per_row", "int8_per_tensor", "fp16", "fp32", "raw"}}
    assert schemes == expected_schemes[which]


def test_the_clip_is_torch_quantile_and_codes_use_the_whole_range():
    """The reference trainer clips at torch.quantile(|w|, 0.9999984) per row (float32)."""
    w = mixed_weights()["rows"]
    clips = torch.quantile(torch.from_numpy(np.abs(w)), 0.9999984, dim=1).numpy()
    np.testing.assert_array_equal(np.array([percentile_clip(np.abs(r)) for r in w]), clips)
    cube = mixed_weights()["cube"]
    assert percentile_clip(np.abs(cube).ravel()) == torch.quantile(torch.from_numpy(np.abs(cube).ravel()), 0.9999984).item()
    q = artifact.deserialize(zlib.decompress(artifact.pack({"rows": w})))["rows"].parts["q"]
    assert q[3].min() == -127 and q[3].max() == 127 and not q[0].any()
    assert q[2, 5] == 127                               # the outlier is clipped, not wrapped
