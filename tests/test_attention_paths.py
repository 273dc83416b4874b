"""Both attention paths of each backend compute the reference function on this CPU.

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
