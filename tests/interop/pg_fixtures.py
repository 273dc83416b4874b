"""The reference trainers' four files, written from their formats (not their code) for the tests.

    final_model.pt             torch.save({name: tensor}); tok_emb.weight bfloat16, the rest float32
    final_model.int8.ptz       zlib(torch.save(int8 object)), tensors
    <run>_mlx_model.npz        mx.savez(**{name: array}); tok_emb.weight bfloat16 (written as '<V2')
    <run>_mlx_model.int8.ptz   zlib(pickle.dumps(int8 object, HIGHEST_PROTOCOL)), numpy arrays

The int8 object ("int8_clean_per_row_v1"): float tensors above `max_keep` elements are int8 codes
with one fp16 scale per row (2-D) or one fp32 scale (0-d, otherwise), their original dtype in
"dtypes" and {"scheme": "per_row", "axis": 0} in "qmeta"; smaller ones pass through, control
tensors in float32, the others in float16 with their original dtype in "passthrough_orig_dtypes".
The scales here are simply max|w|/127 per row: the readers do not depend on how they were chosen.
The real scripts keep tensors of up to 65,536 elements; the tests' small models use a lower bound
so that every storage appears.
"""

from __future__ import annotations

import io
import pickle
import zlib

import mlx.core as mx
import numpy as np
import torch

from core.init import random_weights
from core.params import is_control

BF16_NAMES = ("tok_emb.weight",)


def script_weights(spec, seed: int) -> dict[str, np.ndarray]:
    """Random weights as a reference script holds them: an embedding of the scripts' init scale
    (std ~0.005, where the RMSNorm epsilon matters) rounded to bfloat16, the rest float32."""
    w = random_weights(spec, seed)
    w["tok_emb.weight"] = torch.tensor(w["tok_emb.weight"] * 0.01).to(torch.bfloat16).float().numpy()
    return w


def negate_second_halves(spec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The RoPE conversion written out for the tests: rows hd/2..hd-1 of every head of c_q, c_k negated."""
    out = {k: v.copy() for k, v in weights.items()}
    hd = spec.head_dim
    for name, w in out.items():
        if name.endswith(("attn.c_q.weight", "attn.c_k.weight")):
            for head in range(w.shape[0] // hd):
                w[head * hd + hd // 2:(head + 1) * hd] *= -1.0
    return out


def torch_state_dict(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(w).to(torch.bfloat16 if name in BF16_NAMES else torch.float32)
            for name, w in weights.items()}


def write_torch_state_dict(path, weights: dict[str, np.ndarray]) -> None:
    torch.save(torch_state_dict(weights), path)


def int8_object(weights: dict[str, np.ndarray], max_keep: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(the int8 object with numpy arrays, the float32 weights it dequantizes to as the scripts do)."""
    quantized, scales, dtypes, passthrough, orig, qmeta, expected = {}, {}, {}, {}, {}, {}, {}
    for name, w in weights.items():
        w = np.asarray(w, np.float32)
        dtype = "bfloat16" if name in BF16_NAMES else "float32"
        if w.size > max_keep:
            if w.ndim == 2:
                scale = np.maximum(np.abs(w).max(axis=1) / 127.0, 1.0 / 127.0).astype(np.float16)
                s32 = scale.astype(np.float32)[:, None]
                qmeta[name] = {"scheme": "per_row", "axis": 0}
            else:
                scale = np.array(np.abs(w).max() / 127.0, dtype=np.float32)
                s32 = scale
            q = np.clip(np.round(w / s32), -127, 127).astype(np.int8)
            quantized[name], scales[name], dtypes[name] = q, scale, dtype
            value = q.astype(np.float32) * s32
        elif is_control(name):
            passthrough[name] = w.copy()
            value = w
        else:
            passthrough[name] = w.astype(np.float16)
            orig[name] = dtype
            value = passthrough[name].astype(np.float32)
        if dtype == "bfloat16":   # the scripts cast back to the original dtype (torch's rounding here)
            value = torch.tensor(value).to(torch.bfloat16).float().numpy()
        expected[name] = np.asarray(value, np.float32)
    obj = {"__quant_format__": "int8_clean_per_row_v1", "quantized": quantized, "scales": scales,
           "dtypes": dtypes, "passthrough": passthrough}
    if qmeta:
        obj["qmeta"] = qmeta
    if orig:
        obj["passthrough_orig_dtypes"] = orig
    return obj, expected


def _tensors(obj):
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    return torch.from_numpy(obj) if isinstance(obj, np.ndarray) else obj


def write_torch_int8(path, weights, max_keep: int) -> dict[str, np.ndarray]:
    obj, expected = int8_object(weights, max_keep)
    buffer = io.BytesIO()
    torch.save(_tensors(obj), buffer)
    path.write_bytes(zlib.compress(buffer.getvalue(), 9))
    return expected


def write_mlx_npz(path, weights: dict[str, np.ndarray]) -> None:
    arrays = {name: mx.array(w).astype(mx.bfloat16) if name in BF16_NAMES else mx.array(w)
              for name, w in weights.items()}
    mx.savez(str(path), **arrays)


def write_mlx_int8(path, weights, max_keep: int) -> dict[str, np.ndarray]:
    obj, expected = int8_object(weights, max_keep)
    path.write_bytes(zlib.compress(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), 9))
    return expected
