"""The GPT of docs/spec.md §4 in PyTorch. backend_mlx/model.py mirrors this file section by section.

Master weights are fp32. Matrix products run in `compute_dtype` (bf16 on CUDA, fp32 on CPU by
default): each Linear casts its input and weight at the product, so there is no autocast region
and the CPU tests execute exactly what a GPU run executes. RMSNorm statistics, RoPE, the softcap
and the cross-entropy run in fp32, and the residual stream stays fp32.

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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import BOS_ID, ModelSpec
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
        self.observer = None   # called with each input while the session collects GPTQ's statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))


class Rotary(nn.Module):
    """Half-split RoPE with positive rotation: a' = a cos - b sin, b' = a sin + b cos, on the first
    r = spec.rotary_dims dims of each head (ROPE_DIMS; the rest pass unchanged, docs/spec.md §4.2).

    The cos/sin tables are buffers (not saved with the weights, not broadcast by DDP) built before
    the forward ever runs (GPT.build_rotary at the training length): a compiled forward only slices
    them, so it never writes module state and never recompiles. A longer sequence (sampling past
    the training length) grows them, eagerly. With ROPE_YARN a sequence longer than
    ROPE_TRAIN_SEQ_LEN rotates with a larger base: its tables are made for it, eagerly, not kept.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        r = spec.rotary_dims
        self.spec = spec
        # float64, as MLX's (an fp32 inv_freq alone costs 1.8e-6 relative error in the tables at
        # T=1024), and kept on the CPU: mps has no float64. Only the fp32 tables go to the device.
        self.inv_freq = spec.rope_base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
        self.register_buffer("cos", torch.empty(0, r // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, r // 2), persistent=False)

    def tables(self, n: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float64 so long sequences keep their precision; the tables are fp32.
        theta = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)               # (n, r/2)
        return theta.cos().float().to(self.cos.device), theta.sin().float().to(self.sin.device)

    def build(self, n: int) -> None:
        """Tables for positions 0..n-1, on the buffers' device."""
        self.cos, self.sin = self.tables(n, self.inv_freq)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # x: (B, heads, T, hd) in fp32
        T, r = x.size(-2), self.spec.rotary_dims
        n = T + offset
        if self.spec.rope_yarn and n > self.spec.rope_train_seq_len:
            cos, sin = self.tables(n, self.spec.rope_base_for(n) ** (-torch.arange(0, r, 2, dtype=torch.float64) / r))
            cos, sin = cos[offset:], sin[offset:]
        else:
            if self.cos.size(0) < n:
                self.build(n)
            cos, sin = self.cos[offset:n], self.sin[offset:n]
        half = r // 2
        a, b, rest = x[..., :half], x[..., half:r], x[..., r:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos, rest), dim=-1)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------

# Queries per block of the CPU attention (core/sizes.py): BASE layer (T = 1024) forward + backward,
# 2 cores, with blocks of 64/128/256: 51/52/54 ms in fp32 and 30/29/28 ms in bf16.


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     docs: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention for the CPU, one block of ATTENTION_BLOCK queries at a time.

    q (B, H, T, hd); k, v (B, K, S, hd) with S >= T: query t sits at position S - T + t and reads
    keys 0..S - T + t (the cached keys come first), and query head h reads KV head h // (H/K).
    F.scaled_dot_product_attention computes the same function, and is the right call on CUDA; on
    the CPU it took 66 ms (fp32) and 48 ms (bf16) per BASE layer forward + backward, this 52 and 29:
    a block of queries reads only the keys it may see (9/16 of the square at T = 1024), and its
    scores stay in cache. Softmax in fp32. The cost: autograd keeps those 9/16 of the probabilities
    for the backward (BASE: 38 MB a layer in fp32), where flash attention keeps none.
    docs (B, S): the document of each key position (docs/spec.md §4.5); a query reads only keys of its own.
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
        if docs is not None:   # (B, n, keys): also hidden, a key of another document
            hidden = hidden | (docs[:, S - T + start:S - T + stop, None] != docs[:, None, :keys])
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill(hidden, float("-inf"))
        mask = mask.repeat(G, 1) if docs is None else mask[:, None].repeat(1, K, G, 1).view(B * K, G * n, keys)
        # scores * scale + mask in one product: alpha scales the accumulator.
        s = torch.baddbmm(mask, q[:, :, :, start:stop].reshape(B * K, G * n, hd),
                          kt[..., :keys].reshape(B * K, hd, keys), alpha=scale)
        p = torch.softmax(s.float(), dim=-1).to(v.dtype)                            # (B*K, G*n, keys)
        outs.append(torch.bmm(p, v[:, :, :keys].reshape(B * K, keys, hd)).view(B, K, G, n, hd))
    return torch.cat(outs, dim=3).view(B, H, T, hd)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   gqa_in_kernel: bool = True) -> torch.Tensor:
    """F.scaled_dot_product_attention, causal (top-left) or with a boolean mask, on CUDA's fast kernels.

    q (B, H, T, hd); k, v (B, K, S, hd); query head h reads KV head h // (H/K). enable_gqa keeps
    K/V unexpanded, but CUDA's flash and memory-efficient kernels take it only for bf16/fp16
    inputs without a mask; otherwise SDPA falls back to the math kernel, which materializes the
    B·H·T·S fp32 probabilities. There K and V are expanded to the query heads instead (their
    size times H/K), and the efficient kernels apply in every dtype and with a mask. gqa_in_kernel=False
    (no flash kernel: below sm80, mps; backend_torch/attention_kernels.py) expands them always.
    """
    H, K = q.size(1), k.size(1)
    if K != H and (mask is not None or q.dtype not in (torch.bfloat16, torch.float16) or not gqa_in_kernel):
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    gqa = k.size(1) != H
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (docs/spec.md §4.1), in fp32: each head's output y (B, H, T, hd) less its component along
    its own token's value v (B, K, T, hd) of the head's KV head."""
    B, H, T, hd = y.shape
    K = v.size(1)
    y = y.float().view(B, K, H // K, T, hd)
    unit = F.normalize(v.float(), dim=-1)[:, :, None]                       # v / max(|v|, 1e-12)
    return (y - (y * unit).sum(-1, keepdim=True) * unit).view(B, H, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype, xsa: bool = False):
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
        self.rotary = Rotary(spec)
        self.xsa = xsa                                   # docs/spec.md §4.1
        self.gate_window = spec.gate_window              # §4.3: the sparse head-output gate
        self.gate_scale = spec.sparse_attn_gate_scale
        self.attn_gate_w = nn.Parameter(torch.empty(spec.num_heads, spec.gate_window)) \
            if spec.sparse_attn_gate_enabled else None
        # None: the fused kernel on GPUs, causal_attention on the CPU. The tests set True and False
        # to check both against the reference on the CPU, so the GPU's path is tested here too.
        self.fused_attention: bool | None = None
        # Whether the fused kernel takes grouped K/V heads in place (flash); the session sets it.
        self.gqa_in_kernel = True

    def forward(self, x: torch.Tensor, cache: dict | None = None, docs: torch.Tensor | None = None) -> torch.Tensor:
        """docs (B, S): the document of every position, cached ones first (DOC_ATTENTION_ENABLED), else None."""
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
        v_own = v                                                          # this call's tokens' values (XSA)
        if cache is not None:  # key/value cache for sampling: append, then attend to everything so far
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        # Query head h reads KV head h // (H/K). On the CPU, causal_attention computes the same
        # function faster. With a cache, T queries follow the cached keys, so the causal mask aligns
        # to the bottom-right; is_causal aligns top-left, hence the explicit mask (also for documents).
        fused = self.fused_attention if self.fused_attention is not None else x.device.type != "cpu"
        if not fused:
            y = causal_attention(q, k, v, hd ** -0.5, docs)
        elif docs is None and (cache is None or offset == 0):
            y = sdpa_attention(q, k, v, gqa_in_kernel=self.gqa_in_kernel)
        else:
            S = k.size(2)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            if docs is not None:                                           # (B, 1, T, S)
                mask = (mask & (docs[:, S - T:, None] == docs[:, None, :]))[:, None]
            y = sdpa_attention(q, k, v, mask, self.gqa_in_kernel)
        if self.xsa:
            y = exclusive(y, v_own)
        if self.attn_gate_w is not None:   # one sigmoid gate per token and head, in fp32
            g = torch.sigmoid(self.gate_scale * F.linear(x[..., :self.gate_window].float(), self.attn_gate_w))
            y = y.float() * g.transpose(1, 2)[..., None]                   # g (B, T, H)
        y = y.transpose(1, 2).reshape(B, T, H * hd)                         # (B, T, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype):
        super().__init__()
        self.fc = Linear(spec.model_dim, spec.hidden_dim, compute_dtype)
        self.proj = Linear(spec.hidden_dim, spec.model_dim, compute_dtype)
        self.negative_slope = spec.mlp_negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = torch.relu(h) if self.negative_slope == 0 else F.leaky_relu(h, self.negative_slope)
        return self.proj(h.square())


# ---------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, spec: ModelSpec, compute_dtype: torch.dtype, layer: int, xsa: bool = False):
        super().__init__()
        d = spec.model_dim
        self.eps = spec.norm_eps
        self.ln_scale = 1.0 / (layer + 1) ** 0.5 if spec.ln_scale else 1.0   # docs/spec.md §4.7
        self.attn = CausalSelfAttention(spec, compute_dtype, xsa)
        self.mlp = MLP(spec, compute_dtype)
        self.attn_scale = nn.Parameter(torch.empty(d))
        self.mlp_scale = nn.Parameter(torch.empty(d))
        self.resid_mix = nn.Parameter(torch.empty(2, d))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.eps)
        return x if self.ln_scale == 1.0 else x * self.ln_scale

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cache: dict | None = None,
                docs: torch.Tensor | None = None) -> torch.Tensor:
        mix = self.resid_mix
        x = mix[0] * x + mix[1] * x0                                        # fp32 residual stream
        x = x + self.attn_scale * self.attn(self.norm(x), cache, docs).float()
        x = x + self.mlp_scale * self.mlp(self.norm(x)).float()
        return x

    def parallel(self, lane0: torch.Tensor, lane1: torch.Tensor, x0: torch.Tensor, resid: torch.Tensor,
                 post: torch.Tensor, cache: dict | None = None, docs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-lane form (docs/spec.md §4.9): attention reads lane 0 mixed with x0, the MLP reads
        lane 1; lane k becomes resid[k] lane_k + post[0, k] attn + post[1, k] mlp. fp32 lanes."""
        mix = self.resid_mix
        a = self.attn_scale * self.attn(self.norm(mix[0] * lane0 + mix[1] * x0), cache, docs).float()
        m = self.mlp_scale * self.mlp(self.norm(lane1)).float()
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


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
        if spec.smear_gate_enabled:   # docs/spec.md §4.4, fp32
            self.smear_gate = Linear(spec.gate_window, 1, torch.float32)
            self.smear_lambda = nn.Parameter(torch.empty(1))
        xsa_from = spec.num_layers - spec.xsa_last_n   # §4.1: XSA in the last XSA_LAST_N blocks
        self.blocks = nn.ModuleList(Block(spec, compute_dtype, i, i >= xsa_from) for i in range(spec.num_layers))
        # record options: blocks and layout (docs/spec.md §4.8-§4.10)
        if spec.skip_gates_enabled:
            self.skip_gates = nn.Parameter(torch.empty(spec.num_skip_weights, spec.model_dim))
        if spec.parallel_start_layer:
            self.parallel_post_lambdas = nn.Parameter(torch.empty(spec.num_layers, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.empty(spec.num_layers, 2))
        # Whether the layers loop (NUM_LOOPS > 0): the trainer switches it on at ENABLE_LOOPING_AT, a
        # checkpoint records it. A compiled forward guards on it: on and off are two graphs.
        self.looping = False
        self.head_observer = None   # the tied head's input, as Linear.observer (GPTQ's statistics)

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

    def smear(self, e: torch.Tensor, ids: torch.Tensor, cache: dict | None) -> torch.Tensor:
        """docs/spec.md §4.4: e_t + lambda sigmoid(W e_t[:window]) e_(t-1), except where ids[t] is BOS.
        With a cache, the previous token of the first is the last one cached."""
        before = torch.zeros_like(e[:, :1]) if cache is None or "smear_prev" not in cache else cache["smear_prev"]
        if cache is not None:
            cache["smear_prev"] = e[:, -1:]
        previous = torch.cat((before, e[:, :-1]), dim=1)
        g = self.smear_lambda * torch.sigmoid(self.smear_gate(e[..., :self.spec.gate_window]))     # (B, T, 1)
        return e + (ids != BOS_ID)[..., None] * g * previous

    def documents(self, ids: torch.Tensor, cache: dict | None) -> torch.Tensor:
        """docs/spec.md §4.5: the document of every position (the count of BOS at or before it), cached ones first."""
        docs = torch.cumsum(ids == BOS_ID, dim=1)
        if cache is not None:
            if "docs" in cache:
                docs = torch.cat((cache["docs"], docs + cache["docs"][:, -1:]), dim=1)
            cache["docs"] = docs
        return docs

    def add_skip(self, x: torch.Tensor, skip: torch.Tensor, j: int) -> torch.Tensor:
        """U-Net skip j: x + w_j skip, or with gates lerp(w_j skip, x, sigmoid(g_j)) (§4.8)."""
        scaled = self.skip_weights[j] * skip
        if not self.spec.skip_gates_enabled:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j]))

    def logits(self, ids: torch.Tensor, caches: list | None = None) -> torch.Tensor:
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
