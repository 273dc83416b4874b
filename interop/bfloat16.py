"""bfloat16 without a framework: numpy has no bfloat16, so interop carries one as its raw 16 bits.

A bfloat16 array is a numpy array of dtype BF16 ("V2", two opaque bytes per element): exactly how
MLX's `mx.savez` writes a bfloat16 array into an .npy ('<V2'), and how interop/torch_files.py hands
over a torch.bfloat16 tensor. bfloat16 is the top half of a float32, so widening is exact and
narrowing rounds to nearest, ties to even (as torch's and MLX's casts do).
"""

from __future__ import annotations

import numpy as np

BF16 = np.dtype("V2")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of a BF16 array (exact)."""
    wide = np.ascontiguousarray(bits).view(np.uint16).astype(np.uint32) << 16
    return wide.view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """A BF16 array of float32 values, rounded to nearest, ties to even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(x)
    if nan.any():  # a quiet NaN of the same sign (rounding could carry a NaN into inf)
        rounded = np.where(nan, (u >> 16) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16).view(BF16)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values as a bfloat16 parameter holds them (float32 out)."""
    return bf16_to_float32(float32_to_bf16(x))
