"""Muon and Adam (docs/spec.md §6) in MLX. Mirrors backend_torch/optim.py function by function.

The same functions on lists of arrays; MLX arrays are immutable, so where torch updates in place
these return the new parameters (and state). The session keeps the state in the flat dict of
trainer/backend.py and hands it to mx.compile as captured state. Learning rate, momentum and
Adam's bias corrections come in as arguments (0-d arrays in the session), so a compiled step is
traced once and never re-traced as the schedule moves them. The numbers and choices both files
share (coefficients, bias corrections, scale, rank split) are in core/optimizer.py.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from core.optimizer import CLIP_EPS, NS_EPS, ROW_NORM_EPS, muon_scale, ns_coefficients, rank_shares, shape_groups


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------

def clip_grad_norm(grads: list[mx.array], max_norm: float) -> list[mx.array]:
    """Scale all gradients by min(1, max_norm / (global L2 norm + eps)); returns the scaled gradients."""
    total = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for g in grads))
    scale = mx.minimum(max_norm / (total + CLIP_EPS), 1.0)
    return [g * scale for g in grads]


# ---------------------------------------------------------------------------------------------
# Adam (embed, head and scalar groups)
# ---------------------------------------------------------------------------------------------

def adam_update(params: list[mx.array], grads: list[mx.array], ms: list[mx.array], vs: list[mx.array], *,
                lrs: list, beta1: float, beta2: float, eps: float, bias_correction1,
                bias_correction2, weight_decays: list | None = None) -> tuple[list[mx.array], list[mx.array], list[mx.array]]:
    """Bias-corrected Adam on lists of arrays (lrs: one rate per array); returns the new (params, ms, vs).
    weight_decays (one per array, docs/spec.md §6.1): each parameter is first decayed by 1 - lr * wd."""
    new_params, new_ms, new_vs = [], [], []
    for i, (p, g, m, v, lr) in enumerate(zip(params, grads, ms, vs, lrs)):
        if weight_decays is not None and weight_decays[i]:
            p = p * (1 - lr * weight_decays[i])
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * mx.square(g)
        m_hat = m / bias_correction1
        v_hat = v / bias_correction2
        new_params.append(p - lr * m_hat / (mx.sqrt(v_hat) + eps))
        new_ms.append(m)
        new_vs.append(v)
    return new_params, new_ms, new_vs


# ---------------------------------------------------------------------------------------------
# Muon (matrix group)
# ---------------------------------------------------------------------------------------------

def newton_schulz(us: list[mx.array], steps: int, dtype: mx.Dtype, coeffs: str = "fixed",
                  row_normalize: bool = False) -> mx.array:
    """Approximately orthogonalize each matrix of `us` (all one shape), stacked: (n, rows, cols) fp32.

    Normalized in fp32, then the quintic Newton-Schulz iteration runs in `dtype` (bf16 when the
    compute dtype is bf16) on the wide orientation, so A = X X^T is the smaller square, with the
    (a, b, c) of each iteration that `coeffs` (MUON_NS_COEFFS) names; row_normalize
    (MUON_ROW_NORMALIZE) first gives every row unit L2 norm, in fp32.
    """
    x = mx.stack(us).astype(mx.float32)
    if row_normalize:
        x = x / mx.maximum(mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True)), ROW_NORM_EPS)
    x = x / (mx.sqrt(mx.sum(x * x, axis=(-2, -1), keepdims=True)) + NS_EPS)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.swapaxes(-1, -2)
    x = x.astype(dtype)
    # B = b*A + c*A@A and x = a*x + B@x as addmm: the scalings happen inside the product, which
    # saves four elementwise passes an iteration (BASE, 54 matrices, CPU: ~50 ms a step).
    for a, b, c in ns_coefficients(coeffs, steps):
        A = x @ x.swapaxes(-1, -2)
        B = mx.addmm(A, A, A, alpha=c, beta=b)
        x = mx.addmm(x, B, x, beta=a)
    return (x.swapaxes(-1, -2) if transposed else x).astype(mx.float32)


def muon_update(params: list[mx.array], grads: list[mx.array], bufs: list[mx.array], *, lr, momentum,
                steps: int, dtype: mx.Dtype, rank: int = 0, world_size: int = 1,
                all_sum: Callable[[mx.array], mx.array] | None = None, coeffs: str = "fixed",
                row_normalize: bool = False, weight_decay: float = 0.0) -> tuple[list[mx.array], list[mx.array]]:
    """One Muon step: Nesterov momentum, then each matrix orthogonalized, scaled by muon_scale; returns
    the new (params, bufs). With weight_decay (MUON_WD) each matrix is first decayed by 1 - lr * weight_decay.

    The matrices of one shape are orthogonalized together (core.optimizer.shape_groups). With
    several ranks each orthogonalizes its rank_shares of the shape groups and one all_sum of a flat
    buffer (zeros where another rank's matrices go) shares the results; every rank then applies
    all of them and keeps every momentum buffer current.
    """
    bufs = [momentum * buf + g for buf, g in zip(bufs, grads)]
    updates = [g + momentum * buf for g, buf in zip(grads, bufs)]   # Nesterov
    if weight_decay:
        params = [p * (1 - lr * weight_decay) for p in params]
    groups = shape_groups([tuple(p.shape) for p in params])
    if world_size == 1:
        blocks = [newton_schulz([updates[i] for i in idx], steps, dtype, coeffs, row_normalize) for _, _, idx in groups]
    else:
        # One flat buffer, laid out shape group by shape group: each rank writes the matrices it
        # orthogonalized, the others stay zero, the sum over ranks is complete.
        blocks = []
        for (rows, cols, idx), mine in zip(groups, rank_shares(groups, rank, world_size)):
            block = mx.zeros((len(idx), rows, cols), dtype=mx.float32)
            if idx[mine]:
                block[mine] = newton_schulz([updates[i] for i in idx[mine]], steps, dtype, coeffs, row_normalize)
            blocks.append(block)
        flat = all_sum(mx.concatenate([block.reshape(-1) for block in blocks]))
        offsets = [0]
        for block in blocks:
            offsets.append(offsets[-1] + block.size)
        blocks = [flat[start:stop].reshape(block.shape) for block, start, stop in zip(blocks, offsets, offsets[1:])]
    new_params = list(params)
    for (rows, cols, idx), block in zip(groups, blocks):
        for j, i in enumerate(idx):
            new_params[i] = params[i] - (lr * muon_scale(rows, cols)) * block[j]
    return new_params, bufs
