"""What both optimizer files share (docs/spec.md §6): the Newton-Schulz coefficients, Adam's bias
corrections, Muon's update scale and how Muon's matrices are shared among ranks.

backend_torch/optim.py and backend_mlx/optim.py write the arithmetic in their framework; every
number and every choice that must agree between them is made here, once.
"""

from __future__ import annotations

from collections import defaultdict

# Coefficients (a, b, c) of the quintic Newton-Schulz iteration, and the epsilon of its normalization.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7

# Added to the global gradient norm before dividing by it, as torch's clip_grad_norm_.
CLIP_EPS = 1e-6


def bias_corrections(beta1: float, beta2: float, t: int) -> tuple[float, float]:
    """Adam's (1 - beta1^t, 1 - beta2^t), with t counting optimizer steps from 1, in float64 on the host."""
    return 1 - beta1 ** t, 1 - beta2 ** t


def muon_scale(rows: int, cols: int) -> float:
    """Muon's update of a rows x cols matrix is scaled by sqrt(max(1, rows/cols))."""
    return max(1.0, rows / cols) ** 0.5


def shape_groups(shapes: list[tuple[int, ...]]) -> list[tuple[int, int, list[int]]]:
    """(rows, cols, indices into shapes) for each matrix shape, in order of first appearance: Muon
    orthogonalizes the matrices of one shape together, stacked."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        groups[tuple(shape)].append(i)
    return [(rows, cols, idx) for (rows, cols), idx in groups.items()]


def rank_shares(groups: list[tuple[int, int, list[int]]], rank: int, world_size: int) -> list[slice]:
    """For each shape group, the slice of its matrices this rank orthogonalizes (the others' results
    arrive through one all-reduce). One round-robin over every matrix, group after group, as the
    reference deals out i % world_size over all its matrices: each rank gets its count to within one.
    A round-robin restarted in every group gave the lowest ranks every group's remainder (BASE, 8
    ranks: rank 0 got 8 of the 36 matrices, rank 7 got 4)."""
    slices, before = [], 0
    for _, _, idx in groups:
        slices.append(slice((rank - before) % world_size, None, world_size))
        before += len(idx)
    return slices
