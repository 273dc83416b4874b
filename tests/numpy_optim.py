"""Muon and Adam of docs/spec.md §6 in numpy float64, written from the formulas, to check both backends against.

Not a test module (no test_ prefix): the optimizer tests of both backends import it. The record's
options (Polar Express coefficients, row normalisation, decoupled weight decay, the EMA) are
arguments whose defaults are off.
"""

import numpy as np

from core.optimizer import ns_coefficients


def adam(p, g, m, v, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.0):
    """One Adam step; `step` = optimizer steps already done; `wd` decays p by (1 - lr*wd) first
    (decoupled, as AdamW). Returns (p, m, v)."""
    t = step + 1
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
    return p, m, v


def newton_schulz(u, steps=5, coeffs="fixed"):
    X = u / (np.linalg.norm(u) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for a, b, c in ns_coefficients(coeffs, steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if tall else X


def muon(p, g, buf, lr, momentum, steps=5, coeffs="fixed", row_normalize=False, wd=0.0):
    """One Muon step on a matrix. Returns (p, buf)."""
    buf = momentum * buf + g
    u = g + momentum * buf
    if row_normalize:   # each row of the update to unit L2 norm, before Newton-Schulz
        u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-7)
    rows, cols = p.shape
    p = p * (1 - lr * wd)
    return p - lr * np.sqrt(max(1.0, rows / cols)) * newton_schulz(u, steps, coeffs), buf


def ema(avg, w, decay):
    """One step of the weights' moving average: decay * avg + (1 - decay) * w."""
    return decay * avg + (1 - decay) * w


def clip_by_global_norm(grads, max_norm):
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    return {k: g * scale for k, g in grads.items()}


def train_step(cfg, weights, grads, state, lrs, momentum, step):
    """One whole optimizer step of docs/spec.md §6 and §6.1 for a TrainConfig `cfg`, in float64:
    clipping, Muon for the matrix group, Adam for the rest, every option of the record as `cfg`
    sets it. weights, grads: name -> array; state: the flat "<name>.<slot>" dict of trainer/backend.py.
    Returns (weights, state)."""
    from core.params import EMBED, MATRIX, SCALAR, param_table

    f64 = lambda d: {k: np.asarray(v, np.float64) for k, v in d.items()}   # noqa: E731
    weights, grads, state = f64(weights), f64(grads), f64(state)
    if cfg.grad_clip_norm > 0:
        grads = clip_by_global_norm(grads, cfg.grad_clip_norm)
    wd_of = {EMBED: cfg.embed_wd, MATRIX: cfg.muon_wd, SCALAR: cfg.adam_wd}
    for p in param_table(cfg.model_spec()):
        name, lr, wd = p.name, lrs[p.group], wd_of.get(p.group, cfg.adam_wd)   # the untied head: ADAM_WD
        if p.group == MATRIX:
            weights[name], state[f"{name}.momentum_buffer"] = muon(
                weights[name], grads[name], state[f"{name}.momentum_buffer"], lr, momentum,
                steps=cfg.muon_backend_steps, coeffs=cfg.muon_ns_coeffs, row_normalize=cfg.muon_row_normalize, wd=wd)
        else:
            weights[name], state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"] = adam(
                weights[name], grads[name], state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"], lr, step,
                beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.adam_eps, wd=wd)
    return weights, state
