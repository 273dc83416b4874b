"""The GPT of docs/spec.md §4 in PyTorch. backend_mlx/model.py mirrors this file section by section.

Master weights are fp32. Matrix products run in `compute_dtype` (bf16 on CUDA, fp32 on CPU by
default): each Linear casts its input and weight at the product, so there is no autocast region
and the CPU tests execute exactly what a GPU run executes. RMSNorm statistics, RoPE, the softcap
and the cross-entropy run in fp32, and the residual stream stays fp32.

Shapes: B batch, T sequence, d model_dim, H heads, K kv heads, hd head_dim, V vocab.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import ModelSpec
from core.params import check_weights, param_table
from core.sizes import ATTENTION_BLOCK


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in fp32 (returns fp32)."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps)


class Linear(nn.Module):
    """y = x W^T with W stored (out, in) in fp32 and the product run in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))


class Rotary(nn.Module):
    """Half-split RoPE with positive rotation: a' = a cos - b sin, b' = a sin + b cos.

    The cos/sin tables are buffers (not saved with the weights, not broadcast by DDP) built before
    the forward ever runs (GPT.build_rotary at the training length): a compiled forward only slices
    them, so it never writes module state and never recompiles. A longer sequence (sampling past
    the training length) grows them, eagerly.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        # float64, as MLX's (an fp32 inv_freq alone costs 1.8e-6 relative error in the tables at
        # T=1024), and kept on the CPU: mps has no float64. Only the fp32 tables go to the device.
        self.inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("cos", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2), persistent=False)

    def build(self, n: int) -> None:
        """Tables for positions 0..n-1, on the buffers' device."""
        # Angles in float64 so long sequences keep their precision; the tables are fp32.
        theta = torch.outer(torch.arange(n, dtype=torch.float64), self.inv_freq)          # (n, hd/2)
        self.cos = theta.cos().float().to(self.cos.device)
        self.sin = theta.sin().float().to(self.sin.device)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # x: (B, heads, T, hd) in fp32
        T = x.size(-2)
        if self.cos.size(0) < T + offset:
            self.build(T + offset)
        cos, sin = self.cos[offset:offset + T], self.sin[offset:offset + T]
        half = x.size(-1) // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------

# Queries per block of the CPU attention (core/sizes.py): BASE layer (T = 1024) forward + backward,
# 2 cores, with blocks of 64/128/256: 51/52/54 ms in fp32 and 30/29/28 ms in bf16.


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention for the CPU, one block of ATTENTION_BLOCK queries at a time.

    q (B, H, T, hd); k, v (B, K, S, hd) with S >= T: query t sits at position S - T + t and reads
    keys 0..S - T + t (the cached keys come first), and query head h reads KV head h // (H/K).
    F.scaled_dot_product_attention computes the same function, and is the right call on CUDA; on
    the CPU it took 66 ms (fp32) and 48 ms (bf16) per BASE layer forward + backward, this 52 and 29:
    a block of queries reads only the keys it may see (9/16 of the square at T = 1024), and its
    scores stay in cache. Softmax in fp32. The cost: autograd keeps those 9/16 of the probabilities
    for the backward (BASE: 38 MB a layer in fp32), where flash attention keeps none.
    """
    B, H, T, hd = q.shape
    K, S = k.size(1), k.size(2)
    G = H // K
    q = q.reshape(B, K, G, T, hd)                 # head h = kv head h // G, member h % G of its group
    kt = k.transpose(-1, -2)
    outs = []
    for start in range(0, T, ATTENTION_BLOCK):
        stop = min(start + ATTENTION_BLOCK, T)
        n, keys = stop - start, S - T + stop      # queries of this block; keys the last of them reads
        position = torch.arange(S - T + start, S - T + stop, device=q.device)
        hidden = torch.arange(keys, device=q.device)[None, :] > position[:, None]
        mask = torch.zeros(n, keys, dtype=q.dtype, device=q.device).masked_fill(hidden, float("-inf"))
        # scores * scale + mask in one product: alpha scales the accumulator.
        s = torch.baddbmm(mask.repeat(G, 1), q[:, :, :, start:stop].reshape(B * K, G * n, hd),
                          kt[..., :keys].reshape(B * K, hd, keys), alpha=scale)
        p = torch.softmax(s.float(), dim=-1).to(v.dtype)                            # (B*K, G*n, keys)
        outs.append(torch.bmm(p, v[:, :, :keys].reshape(B * K, keys, hd)).view(B, K, G, n, hd))
    return torch.cat(outs, dim=3).view(B, H, T, hd)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, causal (top-left) or with a boolean mask, on CUDA's fast kernels.

    q (B, H, T, hd); k, v (B, K, S, hd); query head h reads KV head h // (H/K). enable_gqa keeps
    K/V unexpanded, but CUDA's flash and memory-efficient kernels take it only for bf16/fp16
    inputs without a mask; otherwise SDPA falls back to the math kernel, which materializes the
    B·H·T·S fp32 probabilities. There K and V are expanded to the query heads instead (their
    size times H/K), and the efficient kernels apply in every dtype and with a mask.
    """
    H, K = q.size(1), k.size(1)
    if K != H and (mask is not None or q.dtype not in (torch.bfloat16, torch.float16)):
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    gqa = k.size(1) != H
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype):
        super().__init__()
        d, kv = spec.model_dim, spec.kv_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.eps = spec.norm_eps
        self.compute_dtype = compute_dtype
        self.c_q = Linear(d, d, compute_dtype)
        self.c_k = Linear(d, kv, compute_dtype)
        self.c_v = Linear(d, kv, compute_dtype)
        self.proj = Linear(d, d, compute_dtype)
        self.q_gain = nn.Parameter(torch.empty(spec.num_heads))
        self.rotary = Rotary(spec.head_dim, spec.rope_base)
        # None: the fused kernel on GPUs, causal_attention on the CPU. The tests set True and False
        # to check both against the reference on the CPU, so the GPU's path is tested here too.
        self.fused_attention: bool | None = None

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.c_q(x).view(B, T, H, hd).transpose(1, 2)                  # (B, H, T, hd)
        k = self.c_k(x).view(B, T, K, hd).transpose(1, 2)                  # (B, K, T, hd)
        v = self.c_v(x).view(B, T, K, hd).transpose(1, 2)                  # (B, K, T, hd)
        offset = 0 if cache is None else cache["offset"]
        q = self.rotary(rms_norm(q, self.eps), offset)
        k = self.rotary(rms_norm(k, self.eps), offset)
        q = q * self.q_gain[None, :, None, None]
        q, k, v = q.to(self.compute_dtype), k.to(self.compute_dtype), v.to(self.compute_dtype)
        if cache is not None:  # key/value cache for sampling: append, then attend to everything so far
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        # Query head h reads KV head h // (H/K). On the CPU, causal_attention computes the same
        # function faster. With a cache, T queries follow the cached keys, so the causal mask aligns
        # to the bottom-right; is_causal aligns top-left, hence the explicit mask.
        fused = self.fused_attention if self.fused_attention is not None else x.device.type != "cpu"
        if not fused:
            y = causal_attention(q, k, v, hd ** -0.5)
        elif cache is None or offset == 0:
            y = sdpa_attention(q, k, v)
        else:
            S = k.size(2)
            y = sdpa_attention(q, k, v, torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T))
        y = y.transpose(1, 2).reshape(B, T, H * hd)                         # (B, T, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype):
        super().__init__()
        self.fc = Linear(spec.model_dim, spec.hidden_dim, compute_dtype)
        self.proj = Linear(spec.hidden_dim, spec.model_dim, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


# ---------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype):
        super().__init__()
        d = spec.model_dim
        self.eps = spec.norm_eps
        self.attn = CausalSelfAttention(spec, compute_dtype)
        self.mlp = MLP(spec, compute_dtype)
        self.attn_scale = nn.Parameter(torch.empty(d))
        self.mlp_scale = nn.Parameter(torch.empty(d))
        self.resid_mix = nn.Parameter(torch.empty(2, d))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        mix = self.resid_mix
        x = mix[0] * x + mix[1] * x0                                        # fp32 residual stream
        x = x + self.attn_scale * self.attn(rms_norm(x, self.eps), cache).float()
        x = x + self.mlp_scale * self.mlp(rms_norm(x, self.eps)).float()
        return x


# ---------------------------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.eps = spec.norm_eps
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.model_dim)
        # Tied: the head is tok_emb.weight itself (one tensor); there is no lm_head at all.
        self.lm_head = None if spec.tie_embeddings else Linear(spec.model_dim, spec.vocab_size, compute_dtype)
        self.skip_weights = nn.Parameter(torch.empty(spec.num_skip_weights, spec.model_dim))
        self.blocks = nn.ModuleList(Block(spec, compute_dtype) for _ in range(spec.num_layers))
        self.num_encoder_layers = spec.num_encoder_layers
        self.num_decoder_layers = spec.num_decoder_layers

    # -- weights in and out, by the names of docs/spec.md §2 --

    def load_weights(self, weights: dict[str, np.ndarray]) -> "GPT":
        check_weights(self.spec, weights)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for p in param_table(self.spec):
                params[p.name].copy_(torch.from_numpy(np.asarray(weights[p.name], dtype=np.float32)))
        return self

    def export_weights(self) -> dict[str, np.ndarray]:
        params = dict(self.named_parameters())
        return {p.name: params[p.name].detach().float().cpu().numpy().copy() for p in param_table(self.spec)}

    def build_rotary(self, seq_len: int) -> "GPT":
        """The RoPE tables of every layer for seq_len positions, before any (compiled) forward reads them."""
        for block in self.blocks:
            block.attn.rotary.build(seq_len)
        return self

    # -- forward --

    def logits(self, ids: torch.Tensor, caches: list | None = None) -> torch.Tensor:
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
            raw = F.linear(h.to(self.compute_dtype), self.tok_emb.weight.to(self.compute_dtype))
        else:
            raw = self.lm_head(h)                                            # (B, T, V)
        c = self.spec.logit_softcap
        return c * torch.tanh(raw.float() / c)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.logits(ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(ids, targets)
