"""Muon and Adam in torch follow the formulas of docs/spec.md §6 (tests/numpy_optim.py writes them in
numpy). tests/mlx/test_mlx_optim.py runs the same tests on backend_mlx/optim.py."""

import numpy as np
import torch

from backend_torch.optim import adam_update, clip_grad_norm, muon_update, newton_schulz
from core.optimizer import bias_corrections
from numpy_optim import adam as numpy_adam, clip_by_global_norm, muon as numpy_muon

# Several matrices of each of three shapes, interleaved: the step stacks them by shape.
SHAPES = [(8, 16), (16, 8), (12, 12), (8, 16), (12, 12), (16, 8), (8, 16)]


def test_muon_update_over_stacked_shapes_matches_formula_per_matrix():
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    g = [rng.standard_normal(s) for s in SHAPES]
    buf0 = [rng.standard_normal(s) for s in SHAPES]
    # Each matrix scaled differently: a norm taken over the whole stack instead of per matrix shows.
    g = [gi * (i + 1) for i, gi in enumerate(g)]
    lr, mu = 0.05, 0.9
    params = [torch.tensor(p, dtype=torch.float32) for p in p0]
    bufs = [torch.tensor(b, dtype=torch.float32) for b in buf0]
    muon_update(params, [torch.tensor(x, dtype=torch.float32) for x in g], bufs, lr=lr, momentum=mu, steps=5,
                dtype=torch.float32)
    for i in range(len(SHAPES)):
        want_p, want_buf = numpy_muon(p0[i], g[i], buf0[i], lr, mu)
        np.testing.assert_allclose(bufs[i].numpy(), want_buf, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(params[i].numpy(), want_p, rtol=1e-5, atol=1e-6)


def test_newton_schulz_in_bf16_still_orthogonalizes_and_returns_fp32():
    u = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x32 = newton_schulz([u, 3 * u.flip(0)], 5, torch.float32)
    x16 = newton_schulz([u, 3 * u.flip(0)], 5, torch.bfloat16)
    assert x16.shape == x32.shape == (2, 32, 64) and x16.dtype == torch.float32
    assert 0 < (x16 - x32).norm() / x32.norm() <= 0.1   # > 0: the iteration really ran in bf16
    for x in (x32, x16):
        s = torch.linalg.svdvals(x)
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands singular values near 1


def test_adam_matches_formula_over_steps():
    rng = np.random.default_rng(1)
    shapes, lrs = [(5,), (3, 4), (0, 2)], [0.05, 0.02, 0.01]   # one rate per tensor; an empty tensor too
    p = [torch.tensor(rng.standard_normal(s)) for s in shapes]
    m, v = [torch.zeros(s, dtype=torch.float64) for s in shapes], [torch.zeros(s, dtype=torch.float64) for s in shapes]
    want = [(x.numpy().copy(), np.zeros(s), np.zeros(s)) for x, s in zip(p, shapes)]
    for step in range(3):
        g = [rng.standard_normal(s) for s in shapes]
        bc1, bc2 = bias_corrections(0.9, 0.95, step + 1)
        adam_update(p, [torch.tensor(x) for x in g], m, v, lrs=lrs, beta1=0.9, beta2=0.95, eps=1e-8,
                    bias_correction1=bc1, bias_correction2=bc2)
        want = [numpy_adam(w[0], gi, w[1], w[2], lr=lr, step=step)
                for w, gi, lr in zip(want, g, lrs)]
    for got_p, got_m, got_v, (pn, mn, vn) in zip(p, m, v, want):
        np.testing.assert_allclose(got_p.numpy(), pn, rtol=1e-12)
        np.testing.assert_allclose(got_m.numpy(), mn, rtol=1e-12)
        np.testing.assert_allclose(got_v.numpy(), vn, rtol=1e-12)


def test_clip_grad_norm_scales_all_gradients_by_the_global_norm():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((4, 4)), "b": rng.standard_normal(3)}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    for max_norm in (0.5 * norm, 2.0 * norm):
        got = [torch.tensor(g) for g in grads.values()]
        clip_grad_norm(got, max_norm)
        for t, want in zip(got, clip_by_global_norm(grads, max_norm).values()):
            np.testing.assert_allclose(t.numpy(), want, rtol=1e-12)
