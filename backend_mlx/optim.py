"""Muon and Adam of docs/spec.md §6, written out by hand on MLX arrays (mirrors backend_torch/optim.py).

Each optimizer keeps its state in `.state`, a dict name -> {slot: fp32 array}, with the slot names
of trainer/backend.py, so the session can export it flat and hand it to mx.compile as captured state.
`step` takes the parameters and gradients as dicts name -> array and returns the new parameters;
learning rate, momentum and Adam's bias corrections come in as arguments (scalars or 0-d arrays),
so a compiled step is traced once and never re-traced as the schedule moves them.
"""

from __future__ import annotations

import mlx.core as mx

# Coefficients (a, b, c) of the quintic Newton-Schulz iteration (docs/spec.md §6).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: mx.array, steps: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Approximately orthogonalize a matrix: X = G/(|G|_F + 1e-7), then `steps` quintic iterations.

    The iteration runs in `dtype` (bf16 when the compute dtype is bf16) on the wide orientation,
    so A = X X^T is the smaller square; the result is returned in fp32 and in G's orientation.
    """
    a, b, c = NS_COEFFS
    X = G.astype(mx.float32)
    X = X / (mx.sqrt(mx.sum(X * X)) + 1e-7)
    transposed = G.shape[0] > G.shape[1]
    if transposed:
        X = X.T
    X = X.astype(dtype)
    # B = b*A + c*A@A and X = a*X + B@X as addmm: the scalings happen inside the product, which
    # saves four elementwise passes an iteration (BASE, 54 matrices, CPU: ~50 ms a step).
    for _ in range(steps):
        A = X @ X.T
        B = mx.addmm(A, A, A, alpha=c, beta=b)
        X = mx.addmm(X, B, X, beta=a)
    if transposed:
        X = X.T
    return X.astype(mx.float32)


def clip_grad_norm(grads: dict[str, mx.array], max_norm: float) -> dict[str, mx.array]:
    """Scale all gradients by min(1, max_norm / (global L2 norm + 1e-6)), as torch's clip_grad_norm_."""
    total = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in grads.values()))
    scale = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return {name: g * scale for name, g in grads.items()}


class Adam:
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m/bc1) / (sqrt(v/bc2) + eps); no decay."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], beta1: float, beta2: float, eps: float):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.state = {name: {"exp_avg": mx.zeros(shape), "exp_avg_sq": mx.zeros(shape)}
                      for name, shape in shapes.items()}

    def bias_corrections(self, step: int) -> tuple[float, float]:
        """(1 - b1^t, 1 - b2^t) with t = step + 1, in float64 on the host."""
        t = step + 1
        return 1.0 - self.beta1 ** t, 1.0 - self.beta2 ** t

    def step(self, params: dict, grads: dict, lr, bias_correction1, bias_correction2) -> dict:
        b1, b2 = self.beta1, self.beta2
        out = {}
        for name, s in self.state.items():
            g = grads[name]
            s["exp_avg"] = b1 * s["exp_avg"] + (1 - b1) * g
            s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * mx.square(g)
            m_hat = s["exp_avg"] / bias_correction1
            v_hat = s["exp_avg_sq"] / bias_correction2
            out[name] = params[name] - lr * m_hat / (mx.sqrt(v_hat) + self.eps)
        return out


class Muon:
    """Nesterov momentum, then the Newton-Schulz orthogonalized update, scaled by sqrt(max(1, rows/cols))."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], backend_steps: int, ns_dtype: mx.Dtype = mx.float32):
        self.backend_steps, self.ns_dtype = backend_steps, ns_dtype
        self.state = {name: {"momentum_buffer": mx.zeros(shape)} for name, shape in shapes.items()}

    def step(self, params: dict, grads: dict, lr, momentum, rank: int = 0, world_size: int = 1,
             all_sum=None) -> dict:
        """With several ranks, each orthogonalizes every world_size-th matrix and one all_sum (of the
        concatenated results, zeros for the other ranks' matrices) shares them, as
        backend_torch/optim.py's muon_step does; every rank keeps every momentum buffer current."""
        directions = {}
        for i, (name, s) in enumerate(self.state.items()):
            g = grads[name]
            s["momentum_buffer"] = momentum * s["momentum_buffer"] + g
            if i % world_size == rank:
                u = g + momentum * s["momentum_buffer"]                      # Nesterov
                directions[name] = zeropower_via_newtonschulz5(u, self.backend_steps, self.ns_dtype)
            else:
                directions[name] = mx.zeros(g.shape, dtype=mx.float32)
        if world_size > 1:
            names = list(directions)
            shared = all_sum(mx.concatenate([directions[n].reshape(-1) for n in names]))
            offsets = [0]
            for n in names:
                offsets.append(offsets[-1] + directions[n].size)
            directions = {n: shared[a:b].reshape(directions[n].shape)
                          for n, a, b in zip(names, offsets[:-1], offsets[1:])}
        out = {}
        for name, X in directions.items():
            rows, cols = X.shape
            out[name] = params[name] - (lr * max(1.0, rows / cols) ** 0.5) * X
        return out
