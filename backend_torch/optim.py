"""Muon and Adam (docs/spec.md §6) in PyTorch. backend_mlx/optim.py mirrors this file.

Written by hand rather than with torch.optim so the two backends run the same formulas, the state
is the flat dict of trainer/backend.py, and the step count comes from the training loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NS_COEFFS = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------------------------
# Adam (embed, head and scalar groups)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float,
                beta1: float, beta2: float, eps: float, t: int) -> None:
    """Bias-corrected Adam, no weight decay; t counts steps from 1."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


# ---------------------------------------------------------------------------------------------
# Muon (matrix group)
# ---------------------------------------------------------------------------------------------

def newton_schulz(u: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonalize u (quintic Newton-Schulz iteration), in `dtype`."""
    a, b, c = NS_COEFFS
    x = u.to(dtype)
    x = x / (x.norm() + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    # B = b*A + c*A@A and x = a*x + B@x as addmm: the scalings happen inside the product, which
    # saves four elementwise passes an iteration (BASE, 54 matrices, CPU: fp32 1.19 -> 1.05 s a
    # step, bf16 0.285 -> 0.25 s; the bf16 result is also closer to fp64, 1.1e-2 vs 2.5e-2).
    for _ in range(steps):
        A = x @ x.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        x = torch.addmm(x, B, x, beta=a)
    return x.T if transposed else x


@torch.no_grad()
def muon_direction(g: torch.Tensor, buf: torch.Tensor, *, momentum: float, steps: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Nesterov momentum, then orthogonalize; returns the update scaled by sqrt(max(1, rows/cols))."""
    buf.mul_(momentum).add_(g)
    u = g + momentum * buf
    x = newton_schulz(u, steps, dtype).float()
    return x * max(1.0, g.size(0) / g.size(1)) ** 0.5


@torch.no_grad()
def muon_step(params: list[torch.Tensor], bufs: list[torch.Tensor], *, lr: float, momentum: float,
              steps: int, dtype: torch.dtype, rank: int = 0, world_size: int = 1) -> None:
    """One Muon step. Under DDP each rank orthogonalizes every world_size-th matrix and the updates
    are shared with one all-reduce, as the reference trainer does; every rank then applies all of them."""
    if not params:
        return
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
    offset = 0
    for i, (p, buf) in enumerate(zip(params, bufs)):
        if i % world_size == rank:
            flat[offset:offset + p.numel()] = muon_direction(p.grad, buf, momentum=momentum, steps=steps,
                                                             dtype=dtype).reshape(-1)
        else:
            buf.mul_(momentum).add_(p.grad)  # every rank keeps every buffer current
        offset += p.numel()
    if world_size > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        p.sub_(lr * flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale all gradients so their global L2 norm is at most max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale)
