"""Adam's bias correction in the first steps (docs/spec.md §6), in both backends' train_step.

The optimizer parity row compares torch with MLX (the same bug in both passes), and at step 350 the
bias corrections 1 - 0.9^351 and 1 - 0.95^351 are 1 to within 1e-8: a missing correction is invisible
there. Here each backend's train_step is checked on its own, at steps 0 and 1 (t = 1, 2), where the
corrections are 0.1 and 0.05, then 0.19 and 0.0975:

- against tests/numpy_optim.py (the formulas of §6 in float64) for every parameter and state slot,
  from a random non-empty state, the gradient taken from the backend's plain model;
- without any gradient at all: from a zero state, the first Adam step moves every entry whose
  gradient is not ~0 by lr * |g| / (|g| + eps) = lr (m_hat = g, v_hat = g^2). Without the
  corrections it would move by lr * 0.1 / sqrt(0.05) = 0.447 lr.
"""

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import backend_mlx.model as mlx_model
import backend_torch.model as torch_model
import numpy_optim as ref
from backend_torch.threads import single_thread
from core.config import ModelSpec, TrainConfig
from core.init import random_optimizer_state, random_weights
from core.params import MATRIX, param_groups
from trainer_helpers import make_session

SPEC = ModelSpec(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, tie_embeddings=False)
T = 8
LRS = {"embed": 0.03, "head": 0.02, "matrix": 0.05, "scalar": 0.01}   # distinct, so miswiring shows
BACKENDS = ["torch", "mlx"]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, SPEC.vocab_size, (4, T)), rng.integers(0, SPEC.vocab_size, (4, T))


def plain_gradients(backend, weights, x, y):
    """The gradient of the mean loss from the backend's model (no session, no optimizer), float64."""
    w32 = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    if backend == "torch":
        model = torch_model.GPT(SPEC, torch.float32).load_weights(w32)
        model.loss(torch.from_numpy(x), torch.from_numpy(y)).backward()
        return {name: p.grad.double().numpy() for name, p in model.named_parameters()}
    model = mlx_model.GPT(SPEC).load_weights(w32)
    _, grads = mlx_nn.value_and_grad(model, model.loss)(mx.array(x.astype(np.int32)), mx.array(y.astype(np.int32)))
    return {name: np.array(g, dtype=np.float64) for name, g in tree_flatten(grads)}


def open_session(backend):
    cfg = TrainConfig(**SPEC.to_dict(), device="cpu", compute_dtype="float32", compile="0", train_seq_len=T,
                      grad_clip_norm=0.0)
    session = make_session(backend, cfg)
    session.setup(SPEC, cfg)
    return session


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_0_and_1_are_the_numpy_optimizers(backend):
    group_of = {name: group for group, names in param_groups(SPEC).items() for name in names}
    w = {k: v.astype(np.float64) for k, v in random_weights(SPEC, seed=5).items()}
    state = {k: v.astype(np.float64) for k, v in random_optimizer_state(SPEC, seed=5).items()}
    with single_thread():
        session = open_session(backend)
        try:
            session.load_weights({k: v.astype(np.float32) for k, v in w.items()})
            session.load_optimizer_state({k: v.astype(np.float32) for k, v in state.items()})
            for step, momentum in ((0, 0.85), (1, 0.8502)):
                x, y = batch(step)
                grads = plain_gradients(backend, w, x, y)
                session.train_step([(x, y)], LRS, momentum, step)
                for name, g in grads.items():
                    lr = LRS[group_of[name]]
                    if group_of[name] == MATRIX:
                        w[name], state[f"{name}.momentum_buffer"] = ref.muon(
                            w[name], g, state[f"{name}.momentum_buffer"], lr, momentum)
                    else:
                        w[name], state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"] = ref.adam(
                            w[name], g, state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"], lr, step)
                got_w, got_state = session.export_weights(), session.export_optimizer_state()
                for name in w:
                    if w[name].size:
                        assert rel(got_w[name], w[name]) <= 1e-5, f"step {step} {name}: {rel(got_w[name], w[name]):.2e}"
                for key in state:
                    if state[key].size:
                        assert rel(got_state[key], state[key]) <= 1e-5, f"step {step} {key}"
        finally:
            session.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_adam_step_from_a_zero_state_moves_each_weight_by_the_learning_rate(backend):
    w0 = random_weights(SPEC, seed=6)
    x, y = batch(6)
    with single_thread():
        session = open_session(backend)
        try:
            session.load_weights(w0)
            session.load_optimizer_state({})     # zero moments: a fresh run
            session.train_step([(x, y)], LRS, 0.85, 0)
            w1 = session.export_weights()
        finally:
            session.close()
    for group, names in param_groups(SPEC).items():
        if group == MATRIX:
            continue
        lr = LRS[group]
        for name in names:
            step = np.abs(w1[name].astype(np.float64) - w0[name])
            moved = step[step > 0.01 * lr]       # entries with a gradient (unseen embedding rows have none)
            assert moved.size >= 0.2 * step.size, name
            assert np.all(step <= lr * (1 + 1e-4)), f"{name}: a step larger than lr ({step.max() / lr:.4f} lr)"
            assert np.median(moved) >= 0.999 * lr, f"{name}: median step {np.median(moved) / lr:.4f} lr, not lr"
