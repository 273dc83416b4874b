"""The initial weights, shared by both backends (docs/spec.md §3).

One function draws every initial weight from numpy's PCG64 generator, in the order of the
parameter table (core.params.param_table), so the same (spec, seed) gives bit-identical float32
weights on every machine and for every backend. No backend draws its own initial weights.

Draw order and rules (only "normal" and "linear_uniform" parameters consume random numbers):
    tok_emb.weight      normal(0, tied_embed_init_std) when tied, normal(0, 1) when untied
    lm_head.weight      zeros (untied only)
    skip_weights        ones
    skip_gates          zeros (SKIP_GATES_ENABLED only)
    parallel_post_lambdas ones, parallel_resid_lambdas 1.1 (PARALLEL_START_LAYER > 0 only)
    per block, in order c_q, c_k, c_v (uniform on [-1/sqrt(in), 1/sqrt(in)], torch's Linear default),
    attn.proj zeros, q_gain = qk_gain_init, mlp.fc uniform, mlp.proj zeros, attn_scale and
    mlp_scale ones, resid_mix row 0 ones and row 1 zeros.
Random numbers are drawn in float64 and rounded to float32.
"""

from __future__ import annotations

import numpy as np

from core.config import ModelSpec
from core.params import EMBED, HEAD, MATRIX, optimizer_slots, param_table


def init_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed))
    weights = {}
    for p in param_table(spec):
        if p.init == "normal":
            w = rng.standard_normal(p.shape) * p.init_value
        elif p.init == "linear_uniform":
            bound = 1.0 / np.sqrt(p.shape[1])  # shape is (out, in)
            w = rng.uniform(-bound, bound, p.shape)
        elif p.init == "zeros":
            w = np.zeros(p.shape)
        elif p.init == "ones":
            w = np.ones(p.shape)
        elif p.init == "const":
            w = np.full(p.shape, p.init_value)
        elif p.init == "resid_mix":
            w = np.stack([np.ones(p.shape[1]), np.zeros(p.shape[1])])
        else:
            raise AssertionError(f"unknown init rule {p.init!r} for {p.name}")
        weights[p.name] = np.ascontiguousarray(w, dtype=np.float32)
    return weights


def random_weights(spec: ModelSpec, seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random, non-trivial weights: every parameter perturbed, no zero projections (docs/spec.md §10).

    For tests and parity: with init_weights the projections start at zero and the residual
    mixes at (1, 0), which would leave whole paths of the network unexercised.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    init = init_weights(spec, seed)
    weights = {}
    for p in param_table(spec):
        if p.group == MATRIX:  # unit-variance outputs: y = x W^T with W ~ N(0, 1/in)
            w = rng.standard_normal(p.shape) / np.sqrt(p.shape[1])
        elif p.group in (EMBED, HEAD):
            w = rng.standard_normal(p.shape) * scale
        else:  # control parameters: around their init, never all equal
            w = init[p.name] + scale * rng.standard_normal(p.shape)
        weights[p.name] = np.ascontiguousarray(w, dtype=np.float32)
    return weights


def random_optimizer_state(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """A non-empty optimizer state, as after some training, for tests and parity: moments and
    buffers of gradient size (~1e-2), and, as Adam's moments always are, a second moment no
    smaller than the square of the first (a state that is not gives updates no run could)."""
    rng = np.random.default_rng(seed)
    state = {}
    for p in param_table(spec):
        draw = rng.standard_normal(p.shape) * 1e-2
        for slot in optimizer_slots(p.group):
            value = draw ** 2 + (1e-2 * rng.standard_normal(p.shape)) ** 2 if slot == "exp_avg_sq" else draw
            state[f"{p.name}.{slot}"] = value.astype(np.float32)
    return state
