"""Muon and Adam in MLX follow the formulas of docs/spec.md §6 (tests/numpy_optim.py writes them in
numpy). tests/torch/test_torch_optim.py runs the same tests on backend_torch/optim.py."""

import mlx.core as mx
import numpy as np

from backend_mlx.optim import adam_update, clip_grad_norm, muon_update, newton_schulz
from core.optimizer import bias_corrections
from numpy_optim import adam as numpy_adam, clip_by_global_norm, muon as numpy_muon

# Several matrices of each of three shapes, interleaved: the step stacks them by shape.
SHAPES = [(8, 16), (16, 8), (12, 12), (8, 16), (12, 12), (16, 8), (8, 16)]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_muon_update_over_stacked_shapes_matches_formula_per_matrix():
    rng = np.random.default_rng(0)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    g = [rng.standard_normal(s) for s in SHAPES]
    buf0 = [rng.standard_normal(s) for s in SHAPES]
    # Each matrix scaled differently: a norm taken over the whole stack instead of per matrix shows.
    g = [gi * (i + 1) for i, gi in enumerate(g)]
    lr, mu = 0.05, 0.9
    params, bufs = muon_update([mx.array(p.astype(np.float32)) for p in p0], [mx.array(x.astype(np.float32)) for x in g],
                               [mx.array(b.astype(np.float32)) for b in buf0], lr=mx.array(lr), momentum=mx.array(mu),
                               steps=5, dtype=mx.float32)
    for i in range(len(SHAPES)):
        want_p, want_buf = numpy_muon(p0[i], g[i], buf0[i], lr, mu)
        np.testing.assert_allclose(np.array(bufs[i]), want_buf, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(params[i]), want_p, rtol=1e-5, atol=1e-6)


def test_newton_schulz_in_bf16_still_orthogonalizes_and_returns_fp32():
    u = mx.array(np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32))
    x32 = newton_schulz([u, 3 * u[::-1]], 5, mx.float32)
    x16 = newton_schulz([u, 3 * u[::-1]], 5, mx.bfloat16)
    assert x16.shape == x32.shape == (2, 32, 64) and x16.dtype == mx.float32
    assert 0 < rel(x16, np.array(x32)) <= 0.1   # > 0: the iteration really ran in bf16
    for x in (x32, x16):
        s = np.linalg.svd(np.array(x), compute_uv=False)
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands singular values near 1


def test_adam_matches_formula_over_steps():
    rng = np.random.default_rng(1)
    shapes, lrs = [(5,), (3, 4), (0, 2)], [0.05, 0.02, 0.01]   # one rate per array; an empty array too
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    p, m, v = [mx.array(x) for x in p0], [mx.zeros(s) for s in shapes], [mx.zeros(s) for s in shapes]
    want = [(x.astype(np.float64), np.zeros(s), np.zeros(s)) for x, s in zip(p0, shapes)]
    for step in range(3):
        g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        bc1, bc2 = bias_corrections(0.9, 0.95, step + 1)
        p, m, v = adam_update(p, [mx.array(x) for x in g], m, v, lrs=[mx.array(lr) for lr in lrs], beta1=0.9,
                              beta2=0.95, eps=1e-8, bias_correction1=bc1, bias_correction2=bc2)
        want = [numpy_adam(w[0], gi, w[1], w[2], lr=lr, step=step)
                for w, gi, lr in zip(want, g, lrs)]
    for got_p, got_m, got_v, (pn, mn, vn) in zip(p, m, v, want):
        np.testing.assert_allclose(np.array(got_p), pn, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(got_m), mn, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.array(got_v), vn, rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_scales_all_gradients_by_the_global_norm():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((4, 4)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    for max_norm in (0.5 * norm, 2.0 * norm):
        got = clip_grad_norm([mx.array(g) for g in grads.values()], max_norm)
        for a, want in zip(got, clip_by_global_norm(grads, max_norm).values()):
            np.testing.assert_allclose(np.array(a), want, rtol=1e-6)
