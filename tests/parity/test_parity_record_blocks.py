"""Parity of the record's block and layout options (docs/spec.md §4.6-§4.10): MLP_MULT as a float with
the leaky ReLU², LN_SCALE, SKIP_GATES_ENABLED, the two-lane parallel decoder and the looped layers.

For each option alone, and for all of them at once, on every device pair: logits (fp32) of torch and
MLX against the float64 reference, looping off and on; the gradient of every parameter, torch vs MLX
and vs central differences of the reference; one Muon + Adam step through the sessions; and an
8-step curve through the sessions with looping switched on at ENABLE_LOOPING_AT=0.5 (from step 5 on), as
the training loop switches it (core.schedule.looping_due).
"""

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import backend_mlx.model as mlx_model
from core import reference
from core.config import ModelSpec
from core.init import random_optimizer_state, random_weights
from core.schedule import learning_rates, looping_due, momentum
from parity_lib import BACKENDS, _torch_ids, _torch_model, on_device, open_session, rel, to_numpy, train_config

BASE = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2)
OPTIONS = {
    "mlp-mult-2.5-leaky0.5": dict(mlp_mult=2.5, mlp_negative_slope=0.5),
    "ln-scale": dict(ln_scale=True),
    "skip-gates": dict(skip_gates_enabled=True),
    "parallel-from-3-mean": dict(parallel_start_layer=3),
    "parallel-from-4-mlp": dict(parallel_start_layer=4, parallel_final_lane="mlp"),
    "parallel-from-5-attn": dict(parallel_start_layer=5, parallel_final_lane="attn"),
    "loops-2-of-1..2": dict(num_loops=2, loop_start=1, loop_end=2),
    "all-L7": dict(num_layers=7, mlp_mult=3.5, mlp_negative_slope=0.5, ln_scale=True, skip_gates_enabled=True,
                   num_loops=1, loop_start=1, loop_end=3, parallel_start_layer=5),
}
LOOPING = (False, True)


def spec_of(name: str) -> ModelSpec:
    return ModelSpec(**{**BASE, **OPTIONS[name]})


def batch(spec: ModelSpec, seed: int, shape=(2, 13)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.vocab_size, shape), rng.integers(0, spec.vocab_size, shape)


def backend_logits(device, spec, w, ids, looping):
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, "float32", device)
            model.looping = looping
            with torch.no_grad():
                return to_numpy(model.logits(_torch_ids(ids, device)))
        model = mlx_model.GPT(spec).load_weights(w)
        model.looping = looping
        return np.array(model.logits(mx.array(np.asarray(ids, np.int32))), dtype=np.float64)


def backend_grads(device, spec, w, ids, targets, looping):
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, "float32", device)
            model.looping = looping
            model.loss(_torch_ids(ids, device), _torch_ids(targets, device)).backward()
            return {name: to_numpy(p.grad) for name, p in model.named_parameters()}
        model = mlx_model.GPT(spec).load_weights(w)
        model.looping = looping
        _, grads = mlx_nn.value_and_grad(model, model.loss)(mx.array(np.asarray(ids, np.int32)),
                                                           mx.array(np.asarray(targets, np.int32)))
        return {name: np.array(g, dtype=np.float64) for name, g in tree_flatten(grads)}


@pytest.mark.parametrize("looping", LOOPING, ids=["flat", "looping"])
@pytest.mark.parametrize("option", OPTIONS)
def test_logits_match_the_reference(option, looping, pair, parity):
    spec = spec_of(option)
    w = random_weights(spec, 3)
    ids, _ = batch(spec, 4)
    ref = reference.logits(spec, w, ids, looping)
    for b in BACKENDS:
        got = backend_logits(pair.of(b), spec, w, ids, looping)
        parity.check("blocks_logits", rel(got, ref), f"{option} looping={looping} {b}", devices=pair.label)
    if looping and spec.num_loops:   # looping changes the function: the check above can fail
        assert rel(reference.logits(spec, w, ids, False), ref) > 1e-3


@pytest.mark.parametrize("looping", LOOPING, ids=["flat", "looping"])
@pytest.mark.parametrize("option", OPTIONS)
def test_gradients_match(option, looping, pair, parity):
    spec = spec_of(option)
    w = random_weights(spec, 5)
    ids, targets = batch(spec, 6)
    grads = {b: backend_grads(pair.of(b), spec, w, ids, targets, looping) for b in BACKENDS}
    assert set(grads["torch"]) == set(grads["mlx"]) == set(w)
    for name in w:
        parity.check("blocks_grads", rel(grads["torch"][name], grads["mlx"][name]),
                     f"{option} looping={looping} {name}", devices=pair.label)
    # The option's own parameters against central differences of the float64 reference.
    own = [n for n in w if n.startswith(("skip_gates", "parallel_", "skip_weights"))] or ["blocks.1.mlp.fc.weight"]
    rng = np.random.default_rng(7)
    for name in own:
        idx = tuple(int(rng.integers(0, s)) for s in w[name].shape)
        h = 1e-4
        plus, minus = {k: v.astype(np.float64) for k, v in w.items()}, {k: v.astype(np.float64) for k, v in w.items()}
        plus[name][idx] += h
        minus[name][idx] -= h
        fd = (reference.loss(spec, plus, ids, targets, looping) - reference.loss(spec, minus, ids, targets, looping)) / (2 * h)
        got = grads["torch"][name][idx]
        if abs(fd) > 1e-6:
            parity.check("blocks_grads", abs(got - fd) / abs(fd), f"{option} looping={looping} {name}{list(idx)} vs ref",
                         devices=pair.label)


@pytest.mark.parametrize("option", ["all-L7", "parallel-from-3-mean", "skip-gates"])
def test_one_optimizer_step_matches(option, pair, parity):
    spec = spec_of(option)
    T = 16
    cfg = train_config(spec, iterations=400, warmdown_iters=100, train_seq_len=T, mlx_max_microbatch_tokens=2 * T)
    lrs, mu = learning_rates(cfg, 350, 0.0), momentum(cfg, 350)
    w0, state0 = random_weights(spec, 8), random_optimizer_state(spec, 8)
    rng = np.random.default_rng(9)
    batches = [tuple(rng.integers(0, spec.vocab_size, (3, T)) for _ in range(2)) for _ in range(2)]
    weights = {}
    for b in BACKENDS:
        with open_session(pair.of(b), cfg) as session:
            session.load_weights(w0)
            session.load_optimizer_state(state0)
            session.set_looping(bool(spec.num_loops))
            session.train_step(batches, lrs, mu, 350)
            weights[b] = session.export_weights()
    for name in w0:
        assert rel(weights["mlx"][name], w0[name]) > 1e-4, f"{name}: the step barely moved it"
        parity.check("blocks_step", rel(weights["torch"][name], weights["mlx"][name]), f"{option} {name}",
                     devices=pair.label)


@pytest.mark.parametrize("option", ["all-L7", "loops-2-of-1..2"])
def test_curve_with_looping_switched_on_mid_run(option, pair, parity):
    spec = spec_of(option)
    T, steps = 16, 8
    cfg = train_config(spec, iterations=steps, warmdown_iters=3, train_seq_len=T, max_wallclock_seconds=0,
                       enable_looping_at=0.5, mlx_max_microbatch_tokens=4 * T)
    rng = np.random.default_rng(10)
    data = [[tuple(rng.integers(0, spec.vocab_size, (4, T)) for _ in range(2))] for _ in range(steps)]
    switched = [looping_due(cfg, step, 0.0) for step in range(steps)]
    assert switched == [False] * 4 + [True] * 4
    losses = {}
    for b in BACKENDS:
        with open_session(pair.of(b), cfg) as session:
            session.load_weights(random_weights(spec, 11))
            session.load_optimizer_state({})
            losses[b] = []
            for step in range(steps):
                session.set_looping(switched[step])
                losses[b].append(float(session.train_step(data[step], learning_rates(cfg, step, 0.0),
                                                          momentum(cfg, step), step)))
    for step in range(steps):
        parity.check("blocks_curve", rel(losses["torch"][step], losses["mlx"][step]), f"{option} step {step + 1}",
                     devices=pair.label)
    assert all(np.isfinite(losses["torch"]))
