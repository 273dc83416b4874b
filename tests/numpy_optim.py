"""Muon and Adam of docs/spec.md §6 in numpy float64, written from the formulas, to check both backends against.

Not a test module (no test_ prefix): the optimizer tests of both backends import it.
"""

import numpy as np

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


def adam(p, g, m, v, lr, step, beta1=0.9, beta2=0.95, eps=1e-8):
    """One Adam step; `step` = optimizer steps already done. Returns (p, m, v)."""
    t = step + 1
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
    return p, m, v


def newton_schulz(u, steps=5):
    X = u / (np.linalg.norm(u) + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = NS_B * A + NS_C * A @ A
        X = NS_A * X + B @ X
    return X.T if tall else X


def muon(p, g, buf, lr, momentum, steps=5):
    """One Muon step on a matrix. Returns (p, buf)."""
    buf = momentum * buf + g
    u = g + momentum * buf
    rows, cols = p.shape
    return p - lr * np.sqrt(max(1.0, rows / cols)) * newton_schulz(u, steps), buf


def clip_by_global_norm(grads, max_norm):
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    scale = min(1.0, max_norm / (total + 1e-6))
    return {k: g * scale for k, g in grads.items()}
