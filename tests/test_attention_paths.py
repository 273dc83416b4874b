"""Both attention paths of each backend compute the reference function on this CPU; torch's fused
path in every dtype, with K/V expanded where CUDA's fast kernels need it.

On a GPU (CUDA, Metal) the backends call their fused attention kernel; on the CPU a blocked
causal_attention that is faster there. Forcing each path here tests, on the CPU, the very code a
GPU run executes, including the bottom-right-aligned mask of the key/value cache.
"""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
import torch

import backend_mlx.model as mlx_model
import backend_torch.model as torch_model
from core import reference
from core.config import ModelSpec
from core.init import random_weights

SPEC = ModelSpec(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def set_fused(model, fused):
    for block in model.blocks:
        block.attn.fused_attention = fused


def torch_logits(model, ids, split=None):
    with torch.no_grad():
        if split is None:
            return model.logits(torch.from_numpy(ids)).numpy()
        caches = [{"offset": 0} for _ in model.blocks]
        first = model.logits(torch.from_numpy(ids[:, :split]), caches)
        for c in caches:
            c["offset"] = split
        return torch.cat([first, model.logits(torch.from_numpy(ids[:, split:]), caches)], dim=1).numpy()


def mlx_logits(model, ids, split=None):
    if split is None:
        return np.array(model.logits(mx.array(ids)))
    caches = [{"offset": 0} for _ in model.blocks]
    first = model.logits(mx.array(ids[:, :split]), caches)
    for c in caches:
        c["offset"] = split
    return np.array(mx.concatenate([first, model.logits(mx.array(ids[:, split:]), caches)], axis=1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("T, split", [(1, None), (300, None), (300, 170)])  # 300 > one block of 128 queries
def test_attention_path_matches_reference(backend, fused, T, split):
    spec = dataclasses.replace(SPEC, num_kv_heads=1) if T == 1 else SPEC
    w = random_weights(spec, seed=3)
    ids = np.random.default_rng(T).integers(0, spec.vocab_size, (2, T))
    if backend == "torch":
        model = torch_model.GPT(spec).load_weights(w)
        set_fused(model, fused)
        z = torch_logits(model, ids, split)
    else:
        model = mlx_model.GPT(spec).load_weights(w)
        set_fused(model, fused)
        z = mlx_logits(model, ids, split)
    assert rel(z, reference.logits(spec, w, ids)) <= 1e-5


@pytest.mark.parametrize("split", [None, 170])   # no cache: enable_gqa kernel; cache: mask, K/V expanded
def test_torch_fused_attention_in_bf16_matches_reference(split):
    w = random_weights(SPEC, seed=4)
    ids = np.random.default_rng(5).integers(0, SPEC.vocab_size, (2, 300))
    model = torch_model.GPT(SPEC, torch.bfloat16).load_weights(w)
    set_fused(model, True)
    error = rel(torch_logits(model, ids, split), reference.logits(SPEC, w, ids))
    assert 1e-4 < error <= 2e-2   # > 1e-4: the products really ran in bf16


@pytest.mark.parametrize("dtype, masked, expanded", [
    (torch.float32, False, True), (torch.float32, True, True),
    (torch.bfloat16, False, False), (torch.bfloat16, True, True), (torch.float16, False, False)])
def test_sdpa_gets_kv_expanded_unless_bf16_or_fp16_without_a_mask(dtype, masked, expanded, monkeypatch):
    """CUDA's flash and memory-efficient kernels take enable_gqa only in bf16/fp16 without a mask;
    elsewhere SDPA would fall back to the math kernel (B·H·T·S fp32 probabilities), so K and V must
    reach it expanded to the query heads, and the result must not change."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.size(1), v.size(1), kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, **kwargs)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, 16, generator=g, dtype=torch.float64) for n in (4, 2, 2))
    mask = torch.ones(8, 8, dtype=torch.bool).tril() if masked else None
    expected = torch_model.sdpa_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask)
    monkeypatch.setattr(torch_model.F, "scaled_dot_product_attention", spy)
    got = torch_model.sdpa_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert seen == [(4, 4, False) if expanded else (2, 2, True)]
    assert rel(got.float().numpy(), expected.numpy()) <= (1e-6 if dtype == torch.float32 else 1e-2)
