"""Muon and Adam in torch follow the formulas of docs/spec.md §6 (tests/numpy_optim.py writes them in numpy)."""

import numpy as np
import pytest
import torch

from backend_torch.optim import adam_update, muon_direction, newton_schulz
from numpy_optim import adam as numpy_adam, newton_schulz as numpy_newton_schulz


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (12, 12)])
def test_muon_direction_matches_formula(shape):
    rng = np.random.default_rng(0)
    g, buf = rng.standard_normal(shape), rng.standard_normal(shape)
    mu = 0.9
    expected_buf = mu * buf + g
    u = g + mu * expected_buf
    expected = numpy_newton_schulz(u, 5) * max(1.0, shape[0] / shape[1]) ** 0.5
    tb = torch.tensor(buf, dtype=torch.float32)
    got = muon_direction(torch.tensor(g, dtype=torch.float32), tb, momentum=mu, steps=5, dtype=torch.float32)
    np.testing.assert_allclose(tb.numpy(), expected_buf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_newton_schulz_roughly_orthogonalizes():
    u = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(u, 5, torch.float32)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands singular values near 1


def test_adam_matches_formula_over_steps():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(5)
    p, m, v = torch.tensor(p0), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    pn, mn, vn = p0.copy(), np.zeros(5), np.zeros(5)
    for step in range(3):
        g = rng.standard_normal(5)
        adam_update(p, torch.tensor(g), m, v, lr=0.05, beta1=0.9, beta2=0.95, eps=1e-8, t=step + 1)
        pn, mn, vn = numpy_adam(pn, g, mn, vn, lr=0.05, step=step)
    np.testing.assert_allclose(p.numpy(), pn, rtol=1e-12)
