"""docs/spec.md §10, second row: the gradient of every parameter agrees between torch and MLX (<= 1e-4),
and both agree with central finite differences of the float64 reference loss on tiny specs; on
every device pair (parity_lib.PAIRS)."""

import functools

import numpy as np
import pytest

from core import reference
from core.config import ModelSpec
from core.params import param_shapes
from parity_lib import BACKENDS, CASE_BY_NAME, CASES, loss_and_grads, rel

# Every forward batch with T >= 2. (At T = 1 attention has one key, so the gradients of c_q, c_k
# and q_gain are exactly zero and a relative error is undefined: see the T = 1 test below.)
GRAD_PARAMS = [(c.name, s) for c in CASES for s in c.shapes if s[1] >= 2]


def _grads(case, shape, pair):
    w = case.weights()
    ids, targets = case.batch(shape, salt=1)
    return w, ids, targets, {b: loss_and_grads(pair.of(b), case.spec, w, ids, targets) for b in BACKENDS}


@pytest.mark.parametrize("case_name,shape", GRAD_PARAMS, ids=lambda v: str(v))
def test_every_gradient_agrees_torch_vs_mlx(case_name, shape, pair, parity):
    case = CASE_BY_NAME[case_name]
    on = pair.label
    w, ids, targets, out = _grads(case, shape, pair)
    (loss_t, g_t), (loss_m, g_m) = out["torch"], out["mlx"]
    shapes = param_shapes(case.spec)
    assert set(g_t) == set(g_m) == set(shapes)   # every parameter, nothing else (no lm_head when tied)
    parity.check("logits_fp32", rel(loss_t, loss_m), f"{case.name} {shape} loss of the gradient pass", devices=on)
    for name, shape_ in shapes.items():
        assert g_t[name].shape == g_m[name].shape == shape_, name
        if g_m[name].size == 0:   # skip_weights of a 1-layer model
            continue
        assert np.linalg.norm(g_m[name]) > 0, f"{name}: zero gradient, the path is not exercised"
        parity.check("grads", rel(g_t[name], g_m[name]), f"{case.name} {shape[0]}x{shape[1]} {name}", devices=on)


def test_gradients_at_one_token_are_zero_where_attention_is_constant(pair, parity):
    """T = 1: softmax over one key is 1 whatever q and k, so c_q, c_k and q_gain get no gradient;
    every other parameter still agrees to 1e-4."""
    case = CASE_BY_NAME["tied-gqa-L3"]
    w, ids, targets, out = _grads(case, (1, 1), pair)
    g_t, g_m = out["torch"][1], out["mlx"][1]
    total = np.sqrt(sum(np.sum(g ** 2) for g in g_m.values()))
    for name in g_m:
        if name.endswith(("c_q.weight", "c_k.weight", "q_gain")):
            assert np.linalg.norm(g_t[name]) <= 1e-5 * total and np.linalg.norm(g_m[name]) <= 1e-5 * total, name
        else:
            parity.check("grads", rel(g_t[name], g_m[name]), f"{case.name} 1x1 {name}", devices=pair.label)


FD_SPECS = {
    "fd-tied-gqa-L3-cap5": ModelSpec(vocab_size=24, num_layers=3, model_dim=16, num_heads=4, num_kv_heads=2,
                                     logit_softcap=5.0),
    "fd-untied-mqa-L2-rope100": ModelSpec(vocab_size=20, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1,
                                          tie_embeddings=False, rope_base=100.0, qk_gain_init=0.5),
}


def _fd_problem(name):
    from core.init import random_weights

    spec = FD_SPECS[name]
    w = random_weights(spec, seed=21)
    rng = np.random.default_rng(5)
    ids, targets = rng.integers(0, spec.vocab_size, (2, 6)), rng.integers(0, spec.vocab_size, (2, 6))
    return spec, w, ids, targets, rng


@functools.lru_cache(maxsize=None)
def _central_differences(name):
    """pname -> (coordinates, central differences there) of the float64 reference loss: per parameter,
    the largest-gradient coordinate of torch on the CPU and 3 random ones. Device-independent, so
    computed once per spec (the cost of this test) and compared with every device pair's gradients."""
    spec, w, ids, targets, rng = _fd_problem(name)
    g_cpu = loss_and_grads("torch", spec, w, ids, targets)[1]
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    h = 1e-5
    out = {}
    for pname, value in w64.items():
        if value.size == 0:
            continue
        flat_g = g_cpu[pname].reshape(-1)
        coords = {int(np.argmax(np.abs(flat_g)))} | set(rng.choice(value.size, size=min(3, value.size), replace=False).tolist())
        coords = sorted(coords)
        fd = []
        for c in coords:
            plus, minus = dict(w64), dict(w64)
            plus[pname], minus[pname] = value.copy().reshape(-1), value.copy().reshape(-1)
            plus[pname][c] += h
            minus[pname][c] -= h
            plus[pname], minus[pname] = plus[pname].reshape(value.shape), minus[pname].reshape(value.shape)
            fd.append((reference.loss(spec, plus, ids, targets) - reference.loss(spec, minus, ids, targets)) / (2 * h))
        out[pname] = (coords, np.array(fd))
    return out


@pytest.mark.parametrize("name", sorted(FD_SPECS))
def test_gradients_match_central_differences_of_the_reference(name, pair, parity):
    """For each parameter: its largest-gradient coordinate and 3 random ones, by central
    differences (h = 1e-5) of the float64 reference loss, against both backends' fp32 gradients."""
    spec, w, ids, targets, _ = _fd_problem(name)
    grads = {b: loss_and_grads(pair.of(b), spec, w, ids, targets)[1] for b in BACKENDS}
    for pname, (coords, fd) in _central_differences(name).items():
        assert np.linalg.norm(fd) > 0, pname
        for b in BACKENDS:
            got = grads[b][pname].reshape(-1)[coords]
            parity.check("grads_fd", rel(got, fd), f"{name} {b} {pname}", devices=pair.label)
