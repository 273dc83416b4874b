"""What both optimizer files share (docs/spec.md §6): the Newton-Schulz coefficients, Adam's bias
corrections, Muon's update scale and how Muon's matrices are shared among ranks.

backend_torch/optim.py and backend_mlx/optim.py write the arithmetic in their framework; every
number and every choice that must agree between them is made here, once.
"""

from __future__ import annotations

from collections import defaultdict

from core.params import EMBED, MATRIX

# Coefficients (a, b, c) of the quintic Newton-Schulz iteration, and the epsilon of its normalization.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# MUON_NS_COEFFS=polar-express (docs/spec.md §6.1): the record's coefficients, one tuple per
# iteration, minimax-fitted so five iterations bring every singular value of a normalised matrix
# close to 1 (Amsel et al., "The Polar Express", 2025; parameter-golf PR #1344).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Row normalisation (MUON_ROW_NORMALIZE): each row divided by max(its L2 norm, this).
ROW_NORM_EPS = 1e-7


def ns_coefficients(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """(a, b, c) of each of `steps` iterations; `kind` is MUON_NS_COEFFS ("fixed" or "polar-express").
    Past the fifth iteration the last Polar Express tuple repeats (the record always runs five)."""
    if kind == "fixed":
        return (NS_COEFFS,) * steps
    if kind == "polar-express":
        return tuple(POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps))
    raise ValueError(f"unknown Newton-Schulz coefficients {kind!r}")


def group_weight_decay(group: str, cfg) -> float:
    """The decoupled weight decay of an optimizer group (docs/spec.md §6.1): MUON_WD for the matrices,
    EMBED_WD for the embedding, ADAM_WD for the scalar group and the untied head."""
    return {MATRIX: cfg.muon_wd, EMBED: cfg.embed_wd}.get(group, cfg.adam_wd)

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
