"""Adam, Muon and gradient clipping of backend_mlx.optim against numpy written from docs/spec.md §6."""

import mlx.core as mx
import numpy as np
import pytest

import numpy_optim as ref
from backend_mlx.optim import Adam, Muon, clip_grad_norm, zeropower_via_newtonschulz5


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_adam_two_steps_match_numpy():
    rng = np.random.default_rng(0)
    shapes = {"a": (5, 3), "b": (7,)}
    p = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    opt = Adam(shapes, beta1=0.9, beta2=0.95, eps=1e-8)
    params = {k: mx.array(v) for k, v in p.items()}
    expected = {k: (v.astype(np.float64), np.zeros(v.shape), np.zeros(v.shape)) for k, v in p.items()}
    for step, lr in ((0, 0.05), (1, 0.03)):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        bc1, bc2 = opt.bias_corrections(step)
        params = opt.step(params, {k: mx.array(g) for k, g in grads.items()}, mx.array(lr), bc1, bc2)
        expected = {k: ref.adam(expected[k][0], grads[k], expected[k][1], expected[k][2], lr, step) for k in shapes}
    for k in shapes:
        assert rel(params[k], expected[k][0]) <= 1e-6
        assert rel(opt.state[k]["exp_avg"], expected[k][1]) <= 1e-6
        assert rel(opt.state[k]["exp_avg_sq"], expected[k][2]) <= 1e-6


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_muon_two_steps_match_numpy(shape):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(shape).astype(np.float32)
    opt = Muon({"w": shape}, backend_steps=5)
    params = {"w": mx.array(p0)}
    p, buf = p0.astype(np.float64), np.zeros(shape)
    for lr, momentum in ((0.04, 0.85), (0.02, 0.9)):
        g = rng.standard_normal(shape).astype(np.float32)
        params = opt.step(params, {"w": mx.array(g)}, mx.array(lr), mx.array(momentum))
        p, buf = ref.muon(p, g, buf, lr, momentum)
    assert rel(params["w"], p) <= 1e-5
    assert rel(opt.state["w"]["momentum_buffer"], buf) <= 1e-6


def test_newton_schulz_in_bf16_still_orthogonalizes_and_returns_fp32():
    G = mx.array(np.random.default_rng(2).standard_normal((12, 20)).astype(np.float32))
    x32 = zeropower_via_newtonschulz5(G, 5, mx.float32)
    x16 = zeropower_via_newtonschulz5(G, 5, mx.bfloat16)
    assert x16.dtype == mx.float32 and x16.shape == (12, 20)
    assert 0 < rel(x16, np.array(x32)) <= 0.1   # > 0: the iteration really ran in bf16
    # Five quintic steps leave every singular value in about [0.68, 1.14]; the normalization
    # alone leaves them in [0.10, 0.48] for this matrix.
    for X in (x32, x16):
        s = np.linalg.svd(np.array(X), compute_uv=False)
        assert 0.6 <= s.min() and s.max() <= 1.2


def test_clip_grad_norm_scales_only_above_the_threshold():
    rng = np.random.default_rng(3)
    grads = {"a": rng.standard_normal((4, 4)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    for max_norm in (0.5 * norm, 2.0 * norm):
        got = clip_grad_norm({k: mx.array(g) for k, g in grads.items()}, max_norm)
        want = ref.clip_by_global_norm(grads, max_norm)
        for k in grads:
            assert rel(got[k], want[k]) <= 1e-6
    clipped = clip_grad_norm({k: mx.array(g) for k, g in grads.items()}, 0.5 * norm)
    assert abs(np.sqrt(sum(float(mx.sum(g * g)) for g in clipped.values())) - 0.5 * norm) <= 1e-5 * norm
