"""The forward pass of docs/spec.md §4 in numpy float64: the executable form of the spec.

Written for clarity, not speed, in the manner of picoGPT: the weights are a dict keyed by the
checkpoint's names, read by functions named after the modules that own them. Both backends are
tested against this file; it is the arbiter when they disagree.

Shapes: B batch, T sequence, d model_dim, H heads, K kv heads, hd head_dim, V vocab.
"""

from __future__ import annotations

import numpy as np

from core.config import BOS_ID, ModelSpec


def rms_norm(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, base, rotary_dims=None):
    """Half-split RoPE, positive rotation, of the first r = rotary_dims dims of each head (default all;
    the rest pass unchanged): x (..., T, hd) with position t along axis -2."""
    T = x.shape[-2]
    r = rotary_dims or x.shape[-1]
    half = r // 2
    inv_freq = base ** (-2.0 * np.arange(half) / r)     # (r/2,)
    theta = np.arange(T)[:, None] * inv_freq[None, :]   # (T, r/2)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b, rest = x[..., :half], x[..., half:r], x[..., r:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos, rest], axis=-1)


def document_ids(ids):
    """docs/spec.md §4.5: the document of each position of each row, the count of BOS at or before it."""
    return np.cumsum(np.asarray(ids) == BOS_ID, axis=-1)


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def attn(x, w, prefix, spec: ModelSpec, xsa: bool = False, docs=None):
    B, T, _ = x.shape
    H, K, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = (x @ w[prefix + "c_q.weight"].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    k = (x @ w[prefix + "c_k.weight"].T).reshape(B, T, K, hd).transpose(0, 2, 1, 3)  # (B, K, T, hd)
    v = (x @ w[prefix + "c_v.weight"].T).reshape(B, T, K, hd).transpose(0, 2, 1, 3)  # (B, K, T, hd)
    base = spec.rope_base_for(T)
    q = rope(rms_norm(q, spec.norm_eps), base, spec.rotary_dims)
    k = rope(rms_norm(k, spec.norm_eps), base, spec.rotary_dims)
    q = q * w[prefix + "q_gain"][None, :, None, None]
    # Grouped-query attention: query head h reads KV head h // (H/K).
    k = np.repeat(k, H // K, axis=1)                                                   # (B, H, T, hd)
    v = np.repeat(v, H // K, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)                                  # (B, H, T, T)
    hidden = np.triu(np.ones((T, T), dtype=bool), k=1)[None]                           # (1, T, T)
    if spec.doc_attention_enabled:   # §4.5: nor a key of another document
        hidden = hidden | (docs[:, :, None] != docs[:, None, :])                      # (B, T, T)
    scores = np.where(hidden[:, None], -np.inf, scores)
    y = softmax(scores) @ v                                                            # (B, H, T, hd)
    if xsa:   # §4.1: drop the component along the token's own value
        v_unit = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        y = y - np.sum(y * v_unit, axis=-1, keepdims=True) * v_unit
    if spec.sparse_attn_gate_enabled:   # §4.3: one sigmoid gate per token and head
        g = 1.0 / (1.0 + np.exp(-spec.sparse_attn_gate_scale * (x[..., :spec.gate_window] @ w[prefix + "attn_gate_w"].T)))
        y = y * g.transpose(0, 2, 1)[..., None]                                        # g (B, T, H)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)                                  # (B, T, d)
    return y @ w[prefix + "proj.weight"].T


def smear(e, w, ids, spec: ModelSpec):
    """docs/spec.md §4.4: e_t + lambda * sigmoid(W e_t[:window]) * e_(t-1), except where ids[t] is BOS."""
    g = w["smear_lambda"][0] / (1.0 + np.exp(-(e[:, 1:, :spec.gate_window] @ w["smear_gate.weight"].T)))  # (B, T-1, 1)
    keep = (np.asarray(ids)[:, 1:] != BOS_ID)[..., None]
    return np.concatenate([e[:, :1], e[:, 1:] + keep * g * e[:, :-1]], axis=1)


def mlp(x, w, prefix, spec: ModelSpec):
    h = x @ w[prefix + "fc.weight"].T
    h = np.where(h > 0, h, spec.mlp_negative_slope * h)   # leaky ReLU (§4.6); slope 0 is the baseline's ReLU
    return np.square(h) @ w[prefix + "proj.weight"].T


def ln_scale(i, spec: ModelSpec):
    """The factor on block i's normed inputs (§4.7): 1/sqrt(i+1) with LN_SCALE, else 1."""
    return 1.0 / np.sqrt(i + 1) if spec.ln_scale else 1.0


def block(x, x0, w, i, spec: ModelSpec, docs=None):
    p = f"blocks.{i}."
    mix = w[p + "resid_mix"]
    x = mix[0] * x + mix[1] * x0
    xsa = i >= spec.num_layers - spec.xsa_last_n
    s = ln_scale(i, spec)
    x = x + w[p + "attn_scale"] * attn(rms_norm(x, spec.norm_eps) * s, w, p + "attn.", spec, xsa, docs)
    x = x + w[p + "mlp_scale"] * mlp(rms_norm(x, spec.norm_eps) * s, w, p + "mlp.", spec)
    return x


def parallel_block(lane0, lane1, x0, w, i, spec: ModelSpec, docs=None):
    """Block i of the two-lane decoder (§4.9): attention reads lane 0 (mixed with x0), the MLP reads
    lane 1, and each lane keeps lambda_resid of itself plus a learned share of both outputs."""
    p = f"blocks.{i}."
    mix = w[p + "resid_mix"]
    xsa = i >= spec.num_layers - spec.xsa_last_n
    s = ln_scale(i, spec)
    a = w[p + "attn_scale"] * attn(rms_norm(mix[0] * lane0 + mix[1] * x0, spec.norm_eps) * s, w, p + "attn.", spec,
                                   xsa, docs)
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
    x = w["tok_emb.weight"][ids]                                                       # (B, T, d)
    if spec.smear_gate_enabled:
        x = smear(x, w, ids, spec)
    x = rms_norm(x, spec.norm_eps)
    x0 = x
    docs = document_ids(ids)
    encoder, decoder = spec.layer_order(looping)
    skips = []
    for i in encoder:
        x = block(x, x0, w, i, spec, docs)
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
            lanes = parallel_block(*lanes, x0, w, i, spec, docs)
        else:
            x = block(x, x0, w, i, spec, docs)
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
