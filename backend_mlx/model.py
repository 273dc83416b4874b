"""The GPT of docs/spec.md §4 in MLX. It mirrors backend_torch/model.py section by section.

Master weights are fp32. Matrix products run in `compute_dtype` (bf16 on Metal, fp32 on CPU by
default): each Linear casts its input and weight at the product, so there is no mixed-precision
region and the CPU tests execute exactly what a Metal run executes. RMSNorm statistics, RoPE, the
softcap and the cross-entropy run in fp32, and the residual stream stays fp32.

Shapes: B batch, T sequence, d model_dim, H heads, K kv heads, hd head_dim, V vocab.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from core.config import ModelSpec
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

    def __call__(self, x: mx.array) -> mx.array:
        return x.astype(self.compute_dtype) @ self.weight.astype(self.compute_dtype).T


class Rotary(nn.Module):
    """Half-split RoPE with positive rotation: a' = a cos - b sin, b' = a sin + b cos.

    Not mx.fast.rope: it rotates the same way (positive, verified in tests/mlx) but computes the
    angle t*inv_freq in fp32, which costs 6e-6 relative error at t ~ 1000 and 1e-5 at t ~ 2000,
    the whole fp32 parity budget. Tables from float64 angles, as the torch side builds them.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        # numpy, not mx.array: an mx.array attribute would become a parameter (torch: a buffer).
        self.inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        self._cos = self._sin = np.zeros((0, head_dim // 2), np.float32)   # tables for positions 0..n-1

    def cos_sin(self, T: int, offset: int = 0):
        n = T + offset
        if len(self._cos) < n:
            # Angles in float64 so long sequences keep their precision; the tables are fp32.
            theta = np.outer(np.arange(n, dtype=np.float64), self.inv_freq)     # (n, hd/2)
            self._cos, self._sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        return mx.array(self._cos[offset:offset + T]), mx.array(self._sin[offset:offset + T])

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # x: (B, heads, T, hd) in fp32
        cos, sin = self.cos_sin(x.shape[-2], offset)
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return mx.concatenate((a * cos - b * sin, a * sin + b * cos), axis=-1)


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


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal softmax attention for MLX's CPU backend, one block of ATTENTION_BLOCK queries at a time.

    q (B, H, T, hd); k, v (B, K, S, hd) with S >= T: query t sits at position S - T + t and reads
    keys 0..S - T + t (the cached keys come first), and query head h reads KV head h // (H/K).
    mx.fast.scaled_dot_product_attention computes the same function, and is the right call on
    Metal; on the CPU it took 270-360 ms per BASE layer forward + backward, this 115-135 ms: a block
    of queries reads only the keys it may see (9/16 of the square at T = 1024), its scores stay in
    cache, and the softmax is base 2 (softmax_base2). Softmax in fp32. The backward keeps those 9/16
    of the probabilities (BASE: 38 MB a layer), less than the whole square the fast path keeps here.
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
        mask = mx.where(mx.arange(keys)[None, :] <= position[:, None], 0.0, -mx.inf).astype(q.dtype)
        # scores * log2(e) + mask in one product: alpha scales the fp32 accumulator.
        s = mx.addmm(mx.tile(mask, (G, 1)), q[:, :, :, start:stop].reshape(B, K, G * n, hd), kt[..., :keys],
                     alpha=scale * LOG2_E)
        p = softmax_base2(s.astype(mx.float32)).astype(v.dtype)                     # (B, K, G*n, keys)
        outs.append((p @ v[:, :, :keys]).reshape(B, K, G, n, hd))
    return mx.concatenate(outs, axis=3).reshape(B, H, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype):
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
        self.rotary = Rotary(spec.head_dim, spec.rope_base)
        # None: the fused kernel on Metal, causal_attention on the CPU. The tests set True and False
        # to check both against the reference on the CPU, so Metal's path is tested here too.
        self.fused_attention: bool | None = None

    def __call__(self, x: mx.array, cache: dict | None = None) -> mx.array:
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
        if cache is not None:  # key/value cache for sampling: append, then attend to everything so far
            if "k" in cache:
                k, v = mx.concatenate((cache["k"], k), axis=2), mx.concatenate((cache["v"], v), axis=2)
            cache["k"], cache["v"] = k, v
        # Query head h reads KV head h // (H/K) (MLX takes K < H heads untiled). With a cache, T
        # queries follow the cached keys; MLX's "causal" mask aligns to the bottom-right, which is
        # exactly that, so one call serves both cases (torch needs an explicit mask). On the CPU,
        # causal_attention computes the same function 2-3x faster.
        fused = self.fused_attention if self.fused_attention is not None else mx.default_device().type != mx.cpu
        if not fused:
            y = causal_attention(q, k, v, hd ** -0.5)
        else:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, mask="causal")
        y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)                   # (B, T, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype):
        super().__init__()
        self.fc = Linear(spec.model_dim, spec.hidden_dim, compute_dtype)
        self.proj = Linear(spec.hidden_dim, spec.model_dim, compute_dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(mx.square(nn.relu(self.fc(x))))


# ---------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: mx.Dtype):
        super().__init__()
        d = spec.model_dim
        self.eps = spec.norm_eps
        self.attn = CausalSelfAttention(spec, compute_dtype)
        self.mlp = MLP(spec, compute_dtype)
        self.attn_scale = mx.zeros((d,))
        self.mlp_scale = mx.zeros((d,))
        self.resid_mix = mx.zeros((2, d))

    def __call__(self, x: mx.array, x0: mx.array, cache: dict | None = None) -> mx.array:
        mix = self.resid_mix
        x = mix[0] * x + mix[1] * x0                                        # fp32 residual stream
        x = x + self.attn_scale * self.attn(rms_norm(x, self.eps), cache).astype(mx.float32)
        x = x + self.mlp_scale * self.mlp(rms_norm(x, self.eps)).astype(mx.float32)
        return x


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
        self.blocks = [Block(spec, compute_dtype) for _ in range(spec.num_layers)]
        self.num_encoder_layers = spec.num_encoder_layers
        self.num_decoder_layers = spec.num_decoder_layers

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

    def logits(self, ids: mx.array, caches: list | None = None) -> mx.array:
        """(B, T) integer ids -> (B, T, V) fp32 logits."""
        x = rms_norm(self.tok_emb(ids), self.eps)                            # (B, T, d)
        x0 = x
        skips = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0, None if caches is None else caches[i])
            skips.append(x)
        for j in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[j] * skips.pop()
            i = self.num_encoder_layers + j
            x = self.blocks[i](x, x0, None if caches is None else caches[i])
        h = rms_norm(x, self.eps)
        if self.lm_head is None:
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
