"""The coefficients of Muon's quintic Newton-Schulz iteration (docs/spec.md §6), for both backends
and the float64 reference step.

Each iteration maps X to a X + (b A + c A A) X with A = X X^T. The reference trainers use one (a, b, c)
for every iteration ("fixed"). The record uses Polar Express coefficients: one tuple per iteration,
minimax-fitted so five iterations bring every singular value of a normalised matrix close to 1
(Amsel et al., "The Polar Express", 2025; parameter-golf PR #1344). Past the fifth iteration the
last tuple repeats (the record's code would run only five then; it always runs five).
"""

from __future__ import annotations

FIXED = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(kind: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """(a, b, c) of each of `steps` iterations; `kind` is MUON_NS_COEFFS ("fixed" or "polar-express")."""
    if kind == "fixed":
        return (FIXED,) * steps
    if kind == "polar-express":
        return tuple(POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps))
    raise ValueError(f"unknown Newton-Schulz coefficients {kind!r}")
