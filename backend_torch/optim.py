"""Muon and Adam (docs/spec.md §6) in PyTorch. backend_mlx/optim.py mirrors this file function by function.

Written by hand rather than with torch.optim so the two backends run the same formulas, the state
is the flat dict of trainer/backend.py, and the step count comes from the training loop. The
numbers and choices both files share (coefficients, bias corrections, scale, rank split) are in
core/optimizer.py.

Few launches: on a GPU every op of an optimizer step is a kernel launch of a few microseconds on a
tensor of a few hundred kilobytes, so a step written per parameter (about 2,400 aten ops at the
default size) is launch-bound. Adam runs as multi-tensor (torch._foreach_*) ops over all its
parameters at once, and Newton-Schulz runs once per matrix shape on the stacked matrices of that
shape (four stacks at the default size), compiled when the session compiles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.optimizer import CLIP_EPS, NS_EPS, ROW_NORM_EPS, muon_scale, ns_coefficients, rank_shares, shape_groups


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale all gradients by min(1, max_norm / (global L2 norm + eps)), in place; returns them."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
    torch._foreach_mul_(grads, scale)
    return grads


# ---------------------------------------------------------------------------------------------
# Adam (embed, head and scalar groups)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def adam_update(params: list[torch.Tensor], grads: list[torch.Tensor], ms: list[torch.Tensor],
                vs: list[torch.Tensor], *, lrs: list, beta1: float, beta2: float, eps: float,
                bias_correction1, bias_correction2, weight_decays: list | None = None) -> list[torch.Tensor]:
    """Bias-corrected Adam on lists of tensors (lrs: one rate per tensor), in place; returns the
    parameters. weight_decays (one per tensor, docs/spec.md §6.1): each parameter is first decayed by
    1 - lr * wd, as AdamW. The same operations in the same order as per tensor, so the same rounding."""
    if not params:
        return params
    if weight_decays is not None and any(weight_decays):
        torch._foreach_mul_(params, [1 - lr * wd for lr, wd in zip(lrs, weight_decays)])
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, grads, alpha=1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = torch._foreach_div(vs, bias_correction2)          # v_hat
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(ms, bias_correction1)          # m_hat
    torch._foreach_mul_(update, lrs)
    torch._foreach_div_(update, denom)
    torch._foreach_sub_(params, update)
    return params


# ---------------------------------------------------------------------------------------------
# Muon (matrix group)
# ---------------------------------------------------------------------------------------------

def newton_schulz(us: list[torch.Tensor], steps: int, dtype: torch.dtype, coeffs: str = "fixed",
                  row_normalize: bool = False) -> torch.Tensor:
    """Approximately orthogonalize each matrix of `us` (all one shape), stacked: (n, rows, cols) fp32.

    The quintic Newton-Schulz iteration runs in `dtype` on the wide orientation, with the (a, b, c)
    of each iteration that `coeffs` (MUON_NS_COEFFS) names; row_normalize (MUON_ROW_NORMALIZE) first
    gives every row unit L2 norm, in fp32. Compiled with fullgraph=True when the session compiles:
    the stack, the casts and the norms then fuse.
    """
    x = torch.stack(us)
    if row_normalize:
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)
    x = x.to(dtype)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + NS_EPS)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    # B = b*A + c*A@A and x = a*x + B@x as baddbmm: the scalings happen inside the product, which
    # saves four elementwise passes an iteration (BASE, 54 matrices, CPU: fp32 1.19 -> 1.05 s a
    # step, bf16 0.285 -> 0.25 s; the bf16 result is also closer to fp64, 1.1e-2 vs 2.5e-2).
    for a, b, c in ns_coefficients(coeffs, steps):
        A = x @ x.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        x = torch.baddbmm(x, B, x, beta=a)
    return (x.mT if transposed else x).float()


@torch.no_grad()
def muon_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *, lr,
                momentum, steps: int, dtype: torch.dtype, rank: int = 0, world_size: int = 1,
                orthogonalize=newton_schulz, also_sum: torch.Tensor | None = None, coeffs: str = "fixed",
                row_normalize: bool = False, weight_decay: float = 0.0) -> torch.Tensor | None:
    """One Muon step, in place: Nesterov momentum, then each matrix orthogonalized, scaled by muon_scale.
    With weight_decay (MUON_WD) each matrix is first decayed by 1 - lr * weight_decay.

    The matrices of one shape are orthogonalized together (core.optimizer.shape_groups). With
    several ranks each orthogonalizes its rank_shares of the shape groups and one all-reduce of a
    flat buffer (zeros where another rank's matrices go) shares the results; every rank then
    applies all of them and keeps every momentum buffer current. `also_sum` (a small fp32 vector,
    e.g. the loss) rides in the same all-reduce: its sum over ranks is returned, no other collective.
    """
    if not params:
        return also_sum
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    updates = torch._foreach_add(grads, bufs, alpha=momentum)   # Nesterov: g + momentum * buf
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    groups = shape_groups([tuple(p.shape) for p in params])
    if world_size == 1:
        for rows, cols, idx in groups:
            x = orthogonalize([updates[i] for i in idx], steps, dtype, coeffs, row_normalize)
            torch._foreach_add_([params[i] for i in idx], x.unbind(0), alpha=-lr * muon_scale(rows, cols))
        return also_sum
    # One flat buffer, laid out shape group by shape group, then also_sum: each rank writes the
    # rows of the matrices it orthogonalized, the others stay zero, the sum over ranks is complete.
    extra = 0 if also_sum is None else also_sum.numel()
    flat = torch.zeros(sum(p.numel() for p in params) + extra, device=params[0].device, dtype=torch.float32)
    blocks, offset = [], 0
    for (rows, cols, idx), mine in zip(groups, rank_shares(groups, rank, world_size)):
        block = flat[offset:offset + len(idx) * rows * cols].view(len(idx), rows, cols)
        if idx[mine]:
            block[mine] = orthogonalize([updates[i] for i in idx[mine]], steps, dtype, coeffs, row_normalize)
        blocks.append(block)
        offset += block.numel()
    if also_sum is not None:
        flat[offset:] = also_sum.reshape(-1)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for (rows, cols, idx), block in zip(groups, blocks):
        torch._foreach_add_([params[i] for i in idx], block.unbind(0), alpha=-lr * muon_scale(rows, cols))
    return None if also_sum is None else flat[offset:].clone()
