"""The forward pass of docs/spec.md §4 in numpy float64: the executable form of the spec.

Written for clarity, not speed, in the manner of picoGPT: the weights are a dict keyed by the
checkpoint's names, read by functions named after the modules that own them. Both backends are
tested against this file; it is the arbiter when they disagree.

Shapes: B batch, T sequence, d model_dim, H heads, K kv heads, hd head_dim, V vocab.
"""

from __future__ import annotations

import numpy as np

from core.config import ModelSpec


def rms_norm(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, base):
    """Half-split RoPE, positive rotation: x (..., T, hd) with position t along axis -2."""
    T, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    inv_freq = base ** (-2.0 * np.arange(half) / hd)     # (hd/2,)
    theta = np.arange(T)[:, None] * inv_freq[None, :]   # (T, hd/2)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def attn(x, w, prefix, spec: ModelSpec):
    B, T, _ = x.shape
    H, K, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = (x @ w[prefix + "c_q.weight"].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k = (x @ w[prefix + "c_k.weight"].T).reshape(B, T, K, hd).transpose(0, 2, 1, 3)  # (B, K, T, hd)
    v = (x @ w[prefix + "c_v.weight"].T).reshape(B, T, K, hd).transpose(0, 2, 1, 3)  # (B, K, T, hd)
    q = rope(rms_norm(q, spec.norm_eps), spec.rope_base)
    k = rope(rms_norm(k, spec.norm_eps), spec.rope_base)
    q = q * w[prefix + "q_gain"][None, :, None, None]
    # Grouped-query attention: query head h reads KV head h // (H/K).
    k = np.repeat(k, H // K, axis=1)                                                   # (B, H, T, hd)
    v = np.repeat(v, H // K, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)                                  # (B, H, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    y = softmax(scores) @ v                                                            # (B, H, T, hd)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)                                  # (B, T, d)
    return y @ w[prefix + "proj.weight"].T


def mlp(x, w, prefix, spec: ModelSpec):
    h = x @ w[prefix + "fc.weight"].T
    h = np.where(h > 0, h, spec.mlp_negative_slope * h)   # leaky ReLU; slope 0 is the baseline's ReLU
    return np.square(h) @ w[prefix + "proj.weight"].T


def ln_scale(i, spec: ModelSpec):
    """The factor on block i's normed inputs (§4.7): 1/sqrt(i+1) with LN_SCALE, else 1."""
    return 1.0 / np.sqrt(i + 1) if spec.ln_scale else 1.0


def block(x, x0, w, i, spec: ModelSpec):
    p = f"blocks.{i}."
    mix = w[p + "resid_mix"]
    x = mix[0] * x + mix[1] * x0
    s = ln_scale(i, spec)
    x = x + w[p + "attn_scale"] * attn(rms_norm(x, spec.norm_eps) * s, w, p + "attn.", spec)
    x = x + w[p + "mlp_scale"] * mlp(rms_norm(x, spec.norm_eps) * s, w, p + "mlp.", spec)
    return x


def parallel_block(lane0, lane1, x0, w, i, spec: ModelSpec):
    """Block i of the two-lane decoder (§4.9): attention reads lane 0 (mixed with x0), the MLP reads
    lane 1, and each lane keeps lambda_resid of itself plus a learned share of both outputs."""
    p = f"blocks.{i}."
    mix = w[p + "resid_mix"]
    s = ln_scale(i, spec)
    a = w[p + "attn_scale"] * attn(rms_norm(mix[0] * lane0 + mix[1] * x0, spec.norm_eps) * s, w, p + "attn.", spec)
    m = w[p + "mlp_scale"] * mlp(rms_norm(lane1, spec.norm_eps) * s, w, p + "mlp.", spec)
    resid, post = w["parallel_resid_lambdas"][i], w["parallel_post_lambdas"][i]   # (2,), (2, 2)
    return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
            resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


def add_skip(x, skip, w, j, spec: ModelSpec):
    """The U-Net skip j (§4.8): x + w_j skip, or with gates lerp(w_j skip, x, sigmoid(g_j))."""
    scaled = w["skip_weights"][j] * skip
    if not spec.skip_gates_enabled:
        return x + scaled
    g = 1.0 / (1.0 + np.exp(-w["skip_gates"][j]))
    return scaled + g * (x - scaled)


def logits(spec: ModelSpec, weights, ids, looping: bool = False):
    """float64 logits (B, T, V) from a dict of weights and integer ids (B, T); `looping`: whether
    the layers loop (§4.10; only with NUM_LOOPS > 0)."""
    w = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
    ids = np.asarray(ids)
    x = rms_norm(w["tok_emb.weight"][ids], spec.norm_eps)                              # (B, T, d)
    x0 = x
    encoder, decoder = spec.layer_order(looping)
    skips = []
    for i in encoder:
        x = block(x, x0, w, i, spec)
        skips.append(x)
    lanes = None                     # (lane0, lane1) once the parallel decoder has begun
    for j, i in enumerate(decoder):
        parallel = 0 < spec.parallel_start_layer <= i
        if parallel and lanes is None:
            lanes = (x, x)
        if skips and j < spec.num_skip_weights:
            if parallel:
                lanes = (add_skip(lanes[0], skips.pop(), w, j, spec), lanes[1])
            else:
                x = add_skip(x, skips.pop(), w, j, spec)
        if parallel:
            lanes = parallel_block(*lanes, x0, w, i, spec)
        else:
            x = block(x, x0, w, i, spec)
    if lanes is not None:
        x = {"mean": 0.5 * (lanes[0] + lanes[1]), "attn": lanes[0], "mlp": lanes[1]}[spec.parallel_final_lane]
    h = rms_norm(x, spec.norm_eps)
    head = w["tok_emb.weight"] if spec.tie_embeddings else w["lm_head.weight"]
    raw = h @ head.T                                                                   # (B, T, V)
    c = spec.logit_softcap
    return c * np.tanh(raw / c)


def cross_entropy(z, targets):
    """float64 cross-entropy of every target token of logits z (B, T, V), shape (B, T)."""
    z_max = np.max(z, axis=-1, keepdims=True)
    log_norm = np.log(np.sum(np.exp(z - z_max), axis=-1)) + z_max[..., 0]
    picked = np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return log_norm - picked


def token_losses(spec: ModelSpec, weights, ids, targets, looping: bool = False):
    """float64 cross-entropy of every target token, shape (B, T)."""
    return cross_entropy(logits(spec, weights, ids, looping), targets)


def loss(spec: ModelSpec, weights, ids, targets, looping: bool = False) -> float:
    """Mean token cross-entropy (nats)."""
    return float(np.mean(token_losses(spec, weights, ids, targets, looping)))
