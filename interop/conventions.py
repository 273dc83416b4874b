"""Where the two Parameter Golf reference scripts' models differ from ours, and the exact conversions.

Names. Both scripts name every parameter as docs/spec.md §2 does (tok_emb.weight, skip_weights,
blocks.N.attn.c_q.weight, ..., blocks.N.resid_mix; lm_head.weight when untied): their modules
are the ones the naming came from. A state dict saved from a torch.compile'd or DDP-wrapped
model carries an "_orig_mod." or "module." prefix; it is dropped.

RoPE. Ours (core/reference.py) is half-split with a positive rotation: for the halves (a, b) of a
head, a' = a cos θ - b sin θ, b' = a sin θ + b cos θ. train_gpt_mlx.py uses mx nn.RoPE
(traditional=False), the same rotation. train_gpt.py rotates by -θ: a' = a cos θ + b sin θ,
b' = -a sin θ + b cos θ. Negating the second half b of every q and k head makes our +θ rotation
give (a cos θ + b sin θ, -(-a sin θ + b cos θ)): train_gpt.py's rotated vector with its second
half negated, the same sign flip D = diag(1, ..., 1, -1, ..., -1) for q and for k. Attention only
uses q·k, and (Dq)·(Dk) = q·k, so the scores, and everything after them, are train_gpt.py's.
The flip commutes with the RMSNorm before the rotation (same squares) and with q_gain (per head).
Negating b is negating the rows of c_q and c_k that produce it: rows h*hd + hd/2 ... (h+1)*hd - 1
of head h. (Negating the first half instead would do as well; the second is the documented choice.)
The flip is exact in floating point and is its own inverse, so export applies it again.

Epsilons. train_gpt.py calls F.rms_norm(x, (d,)) with eps=None, which torch resolves to the
machine epsilon of float32, 2^-23 = 1.1920929e-07, also for bfloat16 inputs (checked in the test
suite against torch itself). train_gpt_mlx.py's rms_norm has eps=1e-6, our default.

dtypes. train_gpt.py keeps tok_emb.weight in bfloat16 (the model is cast to bfloat16, then its
linear layers and control parameters back to float32) and saves it so; everything else float32.
train_gpt_mlx.py keeps tok_emb.weight in bfloat16 too (written by mx.savez as '<V2').
"""

from __future__ import annotations

import numpy as np

from core.config import ModelSpec

TORCH_SCRIPT_EPS = float(np.finfo(np.float32).eps)   # 1.1920928955078125e-07
MLX_SCRIPT_EPS = 1e-6
BF16_PARAMS = ("tok_emb.weight",)                    # what train_gpt.py holds (and saves) in bfloat16
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrapper_prefixes(weights: dict) -> dict:
    """Names as the bare model has them (torch.compile's "_orig_mod.", DDP's "module." dropped)."""
    out = {}
    for name, value in weights.items():
        bare = name
        while bare.startswith(WRAPPER_PREFIXES):
            bare = bare.split(".", 1)[1]
        out[bare] = value
    return out


def flip_rope_halves(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Negate the second half of every head's rows of c_q and c_k (see the docstring): converts
    weights between train_gpt.py's -θ RoPE and ours, in either direction. Returns a new dict.

    With partial RoPE (ROPE_DIMS = r < hd, docs/spec.md §4.2) the rotated pairs are (i, i + r/2) for
    i < r/2, in both scripts' layout and ours: rows r/2 ... r-1 of each head are negated, and the
    unrotated rows r ... hd-1 are left alone. (r = hd is the full RoPE above.)"""
    hd, d, r = spec.head_dim, spec.model_dim, spec.rotary_dims
    sign = np.ones(hd, dtype=np.float32)
    sign[r // 2:r] = -1.0
    out = dict(weights)
    for i in range(spec.num_layers):
        for proj, heads in (("c_q", spec.num_heads), ("c_k", spec.num_kv_heads)):
            name = f"blocks.{i}.attn.{proj}.weight"
            w = np.asarray(out[name], dtype=np.float32)
            out[name] = (w.reshape(heads, hd, d) * sign[None, :, None]).reshape(heads * hd, d)
    return out
