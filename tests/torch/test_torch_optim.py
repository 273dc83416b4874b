"""Muon and Adam in torch follow the formulas of SPEC §6, written here again in numpy."""

import numpy as np
import pytest
import torch

from backend_torch.optim import adam_update, muon_direction, newton_schulz


def numpy_newton_schulz(u, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u / (np.linalg.norm(u) + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


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
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 0.05
    for t in range(1, 4):
        g = rng.standard_normal(5)
        adam_update(p, torch.tensor(g), m, v, lr=lr, beta1=b1, beta2=b2, eps=eps, t=t)
        mn = b1 * mn + (1 - b1) * g
        vn = b2 * vn + (1 - b2) * g * g
        pn = pn - lr * (mn / (1 - b1 ** t)) / (np.sqrt(vn / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p.numpy(), pn, rtol=1e-12)
