"""interop/bfloat16.py against torch's own bfloat16 casts."""

import numpy as np
import torch

from interop.bfloat16 import BF16, bf16_to_float32, float32_to_bf16


def test_rounding_and_widening_match_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.3895314e38], np.float32)])
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | np.uint32(0x8000)).view(np.float32)   # exactly halfway
    x = np.concatenate([x, ties]).astype(np.float32)
    ours = float32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16)
    assert ours.dtype == BF16
    assert ours.view(np.uint16).tobytes() == theirs.view(torch.int16).numpy().tobytes()
    assert np.array_equal(bf16_to_float32(ours), theirs.float().numpy())


def test_nan_stays_nan():
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.array([np.nan, -np.nan], np.float32)))).all()
