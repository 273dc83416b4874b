"""The GPT of docs/spec.md §4 in MLX. It mirrors backend_torch/model.py section by section.

Master weights are fp32. Matrix products run in `compute_dtype` (bf16 on Metal, fp32 on CPU by
default): each Linear casts its input and weight at the product, so there is no mixed-precision
region and the CPU tests execute exactly what a Metal run executes. RMSNorm statistics, RoPE, the
softcap and the cross-entropy run in fp32, and the residual stream stays fp32.

Notable features (each a setting of docs/spec.md, the record's options off by default):
- token embedding tied to the output head (TIE_EMBEDDINGS), initial weights from core/init.py
- grouped-query attention, q/k RMSNorm with a learned per-head query gain, half-split RoPE
  (partial with ROPE_DIMS, YaRN-scaled with ROPE_YARN), attention within each document
  (DOC_ATTENTION_ENABLED), exclusive self-attention (XSA_LAST_N), a sparse head-output gate
- relu^2 MLP, or leaky ReLU^2 (MLP_NEGATIVE_SLOPE), MLP_MULT as a float
- residual mixing with the input embedding, a smear gate on the embedding that never crosses BOS
- U-Net skips (gated with SKIP_GATES_ENABLED), LN_SCALE, two parallel lanes in the last layers
  (PARALLEL_START_LAYER), depth recurrence over LOOP_START..LOOP_END (NUM_LOOPS)
- a tanh logit softcap

Shapes: B batch, T sequence, d model_dim, H heads, K kv heads, hd head_dim, V vocab.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from core.config import BOS_ID, ModelSpec
from core.params import check_weights, param_table
from core.sizes import ATTENTION_BLOCK


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def rms_norm(x: mx.array, eps: float) -> mx.array:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in fp32 (returns fp32)."""
    return mx.fast.rms_norm(x.astype(mx.float32), None, eps)


class Linear(nn.Module):
    """y = x W^T with W stored (out, in) in fp32 and the product run in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: mx.Dtype):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))
        self.compute_dtype = compute_dtype
        self.observer = None   # called with each input while the session collects GPTQ's statistics

    def __call__(self, x: mx.array) -> mx.array:
        if self.observer is not None:
            self.observer(x)
        return x.astype(self.compute_dtype) @ self.weight.astype(self.compute_dtype).T


class Rotary(nn.Module):
    """Half-split RoPE with positive rotation: a' = a cos - b sin, b' = a sin + b cos, on the first
    r = spec.rotary_dims dims of each head (ROPE_DIMS; the rest pass unchanged, docs/spec.md §4.2).

    Not mx.fast.rope: it rotates the same way (positive, verified in tests/mlx) but computes the
    angle t*inv_freq in fp32, which costs 6e-6 relative error at t ~ 1000 and 1e-5 at t ~ 2000,
    the whole fp32 parity budget. Tables from float64 angles, as the torch side builds them. With
    ROPE_YARN a sequence longer than ROPE_TRAIN_SEQ_LEN rotates with a larger base: its tables are
    made for it, not kept.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        r = spec.rotary_dims
        self.spec = spec
        # numpy, not mx.array: an mx.array attribute would become a parameter (torch: a buffer).
        self.inv_freq = spec.rope_base ** (-np.arange(0, r, 2, dtype=np.float64) / r)
        self._cos = self._sin = np.zeros((0, r // 2), np.float32)   # tables for positions 0..n-1

    @staticmethod
    def tables(n: int, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Angles in float64 so long sequences keep their precision; the tables are fp32.
        theta = np.outer(np.arange(n, dtype=np.float64), inv_freq)     # (n, r/2)
        return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)

    def cos_sin(self, T: int, offset: int = 0):
        n, r = T + offset, self.spec.rotary_dims
        if self.spec.rope_yarn and n > self.spec.rope_train_seq_len:
            cos, sin = self.tables(n, self.spec.rope_base_for(n) ** (-np.arange(0, r, 2, dtype=np.float64) / r))
            return mx.array(cos[offset:]), mx.array(sin[offset:])
        if len(self._cos) < n:
            self._cos, self._sin = self.tables(n, self.inv_freq)
        return mx.array(self._cos[offset:offset + T]), mx.array(self._sin[offset:offset + T])

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # x: (B, heads, T, hd) in fp32
        cos, sin = self.cos_sin(x.shape[-2], offset)
        half, r = self.spec.rotary_dims // 2, self.spec.rotary_dims
        a, b, rest = x[..., :half], x[..., half:r], x[..., r:]
        return mx.concatenate((a * cos - b * sin, a * sin + b * cos, rest), axis=-1)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------

# Queries per block of the CPU attention (core/sizes.py): BASE layer (T = 1024) forward + backward, 2 cores, with
# blocks of 64/128/256: 140/133/142 ms; the whole square at once: 262 ms.
LOG2_E = math.log2(math.e)


@mx.custom_function
def softmax_base2(s: mx.array) -> mx.array:
    """softmax(s * ln 2) over the last axis, as 2^(s - max) / sum, in fp32.

    Base 2 because MLX's CPU power(2, x) is ~3x faster than its exp (0.30 vs 0.10 Gelem/s measured)
    and exact to 6e-8 (its exp: 1.6e-6); the caller folds log2(e) into the scores. A custom vjp
    reuses the probabilities instead of differentiating through power: ds = ln2 p (g - sum(g p)).
    """
    e = mx.power(2.0, s - mx.max(s, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@softmax_base2.vjp
def _softmax_base2_vjp(primals, cotangent, output):
    p = output
    return (math.log(2.0) * p * (cotangent - mx.sum(cotangent * p, axis=-1, keepdims=True)),)


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, docs: mx.array | None = None) -> mx.array:
    """Causal softmax attention for MLX's CPU backend, one block of ATTENTION_BLOCK queries at a time.

    q (B, H, T, hd); k, v (B, K, S, hd) with S >= T: query t sits at position S - T + t and reads
    keys 0..S - T + t (the cached keys come first), and query head h reads KV head h // (H/K).
    mx.fast.scaled_dot_product_attention computes the same function, and is the right call on
    Metal; on the CPU it took 270-360 ms per BASE layer forward + backward, this 115-135 ms: a block
    of queries reads only the keys it may see (9/16 of the square at T = 1024), its scores stay in
    cache, and the softmax is base 2 (softmax_base2). Softmax in fp32. The backward keeps those 9/16
    of the probabilities (BASE: 38 MB a layer), less than the whole square the fast path keeps here.
    docs (B, S): the document of each key position (docs/spec.md §4.5); a query reads only keys of its own.
    """
    B, H, T, hd = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    q = q.reshape(B, K, G, T, hd)                 # head h = kv head h // G, member h % G of its group
    kt = k.transpose(0, 1, 3, 2)
    outs = []
    for start in range(0, T, ATTENTION_BLOCK):
        stop = min(start + ATTENTION_BLOCK, T)
        n, keys = stop - start, S - T + stop      # queries of this block; keys the last of them reads
        position = mx.arange(S - T + start, S - T + stop)
        seen = mx.arange(keys)[None, :] <= position[:, None]
        if docs is not None:   # (B, 1, n, keys): nor a key of another document
            seen = (seen & (docs[:, S - T + start:S - T + stop, None] == docs[:, None, :keys]))[:, None]
        mask = mx.tile(mx.where(seen, 0.0, -mx.inf).astype(q.dtype), (G, 1))
        # scores * log2(e) + mask in one product: alpha scales the fp32 accumulator.
        s = mx.addmm(mask, q[:, :, :, start:stop].reshape(B, K, G * n, hd), kt[..., :keys],
                     alpha=scale * LOG2_E)
        p = softmax_base2(s.astype(mx.float32)).astype(v.dtype)                     # (B, K, G*n, keys)
        outs.append((p @ v[:, :, :keys]).reshape(B, K, G, n, hd))
    return mx.concatenate(outs, axis=3).reshape(B, H, T, hd)


def exclusive(y: mx.array, v: mx.array) -> mx.array:
    """XSA (docs/spec.md §4.1), in fp32: each head's output y (B, H, T, hd) less its component along
    its own token's value v (B, K, T, hd) of the head's KV head."""
    B, H, T, hd = y.shape
    K = v.shape[1]
    y = y.astype(mx.float32).reshape(B, K, H // K, T, hd)
    v = v.astype(mx.float32)
    unit = (v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), 1e-12))[:, :, None]
    return (y - (y * unit).sum(-1, keepdims=True) * unit).reshape(B, H, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype, xsa: bool = False):
        super().__init__()
        d, kv = spec.model_dim, spec.kv_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.eps = spec.norm_eps
        self.compute_dtype = compute_dtype
        self.c_q = Linear(d, d, compute_dtype)
        self.c_k = Linear(d, kv, compute_dtype)
        self.c_v = Linear(d, kv, compute_dtype)
        self.proj = Linear(d, d, compute_dtype)
        self.q_gain = mx.zeros((spec.num_heads,))
        self.rotary = Rotary(spec)
        self.xsa = xsa                                   # docs/spec.md §4.1
        self.gate_window = spec.gate_window              # §4.3: the sparse head-output gate
        self.gate_scale = spec.sparse_attn_gate_scale
        if spec.sparse_attn_gate_enabled:
            self.attn_gate_w = mx.zeros((spec.num_heads, spec.gate_window))
        # None: the fused kernel on Metal, causal_attention on the CPU. The tests set True and False
        # to check both against the reference on the CPU, so Metal's path is tested here too.
        self.fused_attention: bool | None = None

    def __call__(self, x: mx.array, cache: dict | None = None, docs: mx.array | None = None) -> mx.array:
        """docs (B, S): the document of every position, cached ones first (DOC_ATTENTION_ENABLED), else None."""
        B, T, _ = x.shape
        H, K, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.c_q(x).reshape(B, T, H, hd).transpose(0, 2, 1, 3)          # (B, H, T, hd)
        k = self.c_k(x).reshape(B, T, K, hd).transpose(0, 2, 1, 3)          # (B, K, T, hd)
        v = self.c_v(x).reshape(B, T, K, hd).transpose(0, 2, 1, 3)          # (B, K, T, hd)
        offset = 0 if cache is None else cache["offset"]
        q = self.rotary(rms_norm(q, self.eps), offset)
        k = self.rotary(rms_norm(k, self.eps), offset)
        q = q * self.q_gain[None, :, None, None]
        q, k, v = q.astype(self.compute_dtype), k.astype(self.compute_dtype), v.astype(self.compute_dtype)
        v_own = v                                                           # this call's tokens' values (XSA)
        if cache is not None:  # key/value cache for sampling: append, then attend to everything so far
            if "k" in cache:
                k, v = mx.concatenate((cache["k"], k), axis=2), mx.concatenate((cache["v"], v), axis=2)
            cache["k"], cache["v"] = k, v
        # Query head h reads KV head h // (H/K) (MLX takes K < H heads untiled). With a cache, T
        # queries follow the cached keys; MLX's "causal" mask aligns to the bottom-right, which is
        # exactly that, so one call serves both cases (torch needs an explicit mask). With documents,
        # a boolean mask instead. On the CPU, causal_attention computes the same function 2-3x faster.
        fused = self.fused_attention if self.fused_attention is not None else mx.default_device().type != mx.cpu
        if not fused:
            y = causal_attention(q, k, v, hd ** -0.5, docs)
        elif docs is None:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, mask="causal")
        else:
            S = k.shape[2]
            seen = (mx.arange(S)[None, :] <= mx.arange(S - T, S)[:, None]) & (docs[:, S - T:, None] == docs[:, None, :])
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, mask=seen[:, None])
        if self.xsa:
            y = exclusive(y, v_own)
        if "attn_gate_w" in self:   # one sigmoid gate per token and head, in fp32
            g = mx.sigmoid(self.gate_scale * (x[..., :self.gate_window].astype(mx.float32) @ self.attn_gate_w.T))
            y = y.astype(mx.float32) * g.transpose(0, 2, 1)[..., None]     # g (B, T, H)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)                   # (B, T, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype):
        super().__init__()
        self.fc = Linear(spec.model_dim, spec.hidden_dim, compute_dtype)
        self.proj = Linear(spec.hidden_dim, spec.model_dim, compute_dtype)
        self.negative_slope = spec.mlp_negative_slope

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc(x)
        h = nn.relu(h) if self.negative_slope == 0 else nn.leaky_relu(h, self.negative_slope)
        return self.proj(mx.square(h))


# ---------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype, layer: int, xsa: bool = False):
        super().__init__()
        d = spec.model_dim
        self.eps = spec.norm_eps
        self.ln_scale = 1.0 / (layer + 1) ** 0.5 if spec.ln_scale else 1.0   # docs/spec.md §4.7
        self.attn = CausalSelfAttention(spec, compute_dtype, xsa)
        self.mlp = MLP(spec, compute_dtype)
        self.attn_scale = mx.zeros((d,))
        self.mlp_scale = mx.zeros((d,))
        self.resid_mix = mx.zeros((2, d))

    def norm(self, x: mx.array) -> mx.array:
        x = rms_norm(x, self.eps)
        return x if self.ln_scale == 1.0 else x * self.ln_scale

    def __call__(self, x: mx.array, x0: mx.array, cache: dict | None = None,
                 docs: mx.array | None = None) -> mx.array:
        mix = self.resid_mix
        x = mix[0] * x + mix[1] * x0                                        # fp32 residual stream
        x = x + self.attn_scale * self.attn(self.norm(x), cache, docs).astype(mx.float32)
        x = x + self.mlp_scale * self.mlp(self.norm(x)).astype(mx.float32)
        return x

    def parallel(self, lane0: mx.array, lane1: mx.array, x0: mx.array, resid: mx.array,
                 post: mx.array, cache: dict | None = None, docs: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """The two-lane form (docs/spec.md §4.9): attention reads lane 0 mixed with x0, the MLP reads
        lane 1; lane k becomes resid[k] lane_k + post[0, k] attn + post[1, k] mlp. fp32 lanes."""
        mix = self.resid_mix
        a = self.attn_scale * self.attn(self.norm(mix[0] * lane0 + mix[1] * x0), cache, docs).astype(mx.float32)
        m = self.mlp_scale * self.mlp(self.norm(lane1)).astype(mx.float32)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


# ---------------------------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.eps = spec.norm_eps
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.model_dim)
        # Tied: the head is tok_emb.weight itself (one array); there is no lm_head at all.
        self.lm_head = None if spec.tie_embeddings else Linear(spec.model_dim, spec.vocab_size, compute_dtype)
        self.skip_weights = mx.zeros((spec.num_skip_weights, spec.model_dim))
        if spec.smear_gate_enabled:   # docs/spec.md §4.4, fp32
            self.smear_gate = Linear(spec.gate_window, 1, mx.float32)
            self.smear_lambda = mx.zeros((1,))
        xsa_from = spec.num_layers - spec.xsa_last_n   # §4.1: XSA in the last XSA_LAST_N blocks
        self.blocks = [Block(spec, compute_dtype, i, i >= xsa_from) for i in range(spec.num_layers)]
        # record options: blocks and layout (docs/spec.md §4.8-§4.10)
        if spec.skip_gates_enabled:
            self.skip_gates = mx.zeros((spec.num_skip_weights, spec.model_dim))
        if spec.parallel_start_layer:
            self.parallel_post_lambdas = mx.zeros((spec.num_layers, 2, 2))
            self.parallel_resid_lambdas = mx.zeros((spec.num_layers, 2))
        # Whether the layers loop (NUM_LOOPS > 0): the trainer switches it on at ENABLE_LOOPING_AT, a
        # checkpoint records it. A compiled function traces one value: the session compiles one per value.
        self.looping = False
        self.head_observer = None   # the tied head's input, as Linear.observer (GPTQ's statistics)

    # -- weights in and out, by the names of docs/spec.md §2 --

    def load_weights(self, weights: dict[str, np.ndarray]) -> "GPT":
        """Deliberately replaces nn.Module.load_weights(file_or_list, strict): docs/spec.md §11 gives both
        backends the same signature, a dict of numpy arrays checked name by name and shape by shape."""
        check_weights(self.spec, weights)
        arrays = [(p.name, mx.array(np.asarray(weights[p.name], dtype=np.float32))) for p in param_table(self.spec)]
        self.update(tree_unflatten(arrays))
        mx.eval(self.parameters())
        return self

    def export_weights(self) -> dict[str, np.ndarray]:
        params = dict(tree_flatten(self.parameters()))
        return {p.name: np.array(params[p.name].astype(mx.float32)) for p in param_table(self.spec)}

    # -- forward --

    def smear(self, e: mx.array, ids: mx.array, cache: dict | None) -> mx.array:
        """docs/spec.md §4.4: e_t + lambda sigmoid(W e_t[:window]) e_(t-1), except where ids[t] is BOS.
        With a cache, the previous token of the first is the last one cached."""
        before = mx.zeros_like(e[:, :1]) if cache is None or "smear_prev" not in cache else cache["smear_prev"]
        if cache is not None:
            cache["smear_prev"] = e[:, -1:]
        previous = mx.concatenate((before, e[:, :-1]), axis=1)
        g = self.smear_lambda * mx.sigmoid(self.smear_gate(e[..., :self.spec.gate_window]))        # (B, T, 1)
        return e + (ids != BOS_ID)[..., None] * g * previous

    def documents(self, ids: mx.array, cache: dict | None) -> mx.array:
        """docs/spec.md §4.5: the document of every position (the count of BOS at or before it), cached ones first."""
        docs = mx.cumsum((ids == BOS_ID).astype(mx.int32), axis=1)
        if cache is not None:
            if "docs" in cache:
                docs = mx.concatenate((cache["docs"], docs + cache["docs"][:, -1:]), axis=1)
            cache["docs"] = docs
        return docs

    def add_skip(self, x: mx.array, skip: mx.array, j: int) -> mx.array:
        """U-Net skip j: x + w_j skip, or with gates lerp(w_j skip, x, sigmoid(g_j)) (§4.8)."""
        scaled = self.skip_weights[j] * skip
        if not self.spec.skip_gates_enabled:
            return x + scaled
        return scaled + mx.sigmoid(self.skip_gates[j]) * (x - scaled)

    def logits(self, ids: mx.array, caches: list | None = None) -> mx.array:
        """(B, T) integer ids -> (B, T, V) fp32 logits. `caches`: one per block call (a looped
        block runs, and caches, once per pass): ModelSpec.block_calls."""
        spec = self.spec
        x = self.tok_emb(ids)                                                # (B, T, d)
        if spec.smear_gate_enabled:
            x = self.smear(x, ids, None if caches is None else caches[0])
        x = rms_norm(x, self.eps)
        x0 = x
        docs = self.documents(ids, None if caches is None else caches[0]) if spec.doc_attention_enabled else None
        encoder, decoder = spec.layer_order(self.looping)
        calls = iter(caches) if caches is not None else None
        skips = []
        for i in encoder:
            x = self.blocks[i](x, x0, None if calls is None else next(calls), docs)
            skips.append(x)
        lanes = None                     # (lane0, lane1) once the parallel decoder has begun
        for j, i in enumerate(decoder):
            parallel = 0 < spec.parallel_start_layer <= i
            if parallel and lanes is None:
                lanes = (x, x)
            if skips and j < spec.num_skip_weights:
                if parallel:
                    lanes = (self.add_skip(lanes[0], skips.pop(), j), lanes[1])
                else:
                    x = self.add_skip(x, skips.pop(), j)
            cache = None if calls is None else next(calls)
            if parallel:
                lanes = self.blocks[i].parallel(*lanes, x0, self.parallel_resid_lambdas[i],
                                                self.parallel_post_lambdas[i], cache, docs)
            else:
                x = self.blocks[i](x, x0, cache, docs)
        if lanes is not None:
            lane = spec.parallel_final_lane
            x = 0.5 * (lanes[0] + lanes[1]) if lane == "mean" else lanes[0] if lane == "attn" else lanes[1]
        h = rms_norm(x, self.eps)
        if self.lm_head is None:
            if self.head_observer is not None:
                self.head_observer(h)
            raw = h.astype(self.compute_dtype) @ self.tok_emb.weight.astype(self.compute_dtype).T
        else:
            raw = self.lm_head(h)                                            # (B, T, V)
        c = self.spec.logit_softcap
        return c * mx.tanh(raw.astype(mx.float32) / c)

    def loss(self, ids: mx.array, targets: mx.array, reduction: str = "mean") -> mx.array:
        logits = self.logits(ids)
        # Token cross-entropy in fp32: log-sum-exp minus the target's logit.
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        losses = mx.logsumexp(logits, axis=-1) - picked
        if reduction == "mean":
            return losses.mean()
        if reduction == "sum":
            return losses.sum()
        if reduction == "none":
            return losses
        raise ValueError(f"reduction={reduction!r}: must be 'mean', 'sum' or 'none'")

    def __call__(self, ids: mx.array, targets: mx.array) -> mx.array:
        return self.loss(ids, targets)
