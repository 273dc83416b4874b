"""The torch GPT computes the reference function (docs/spec.md §4, §10) and ties its head to the embedding."""

import dataclasses

import numpy as np
import pytest
import torch

from backend_torch.model import GPT
from core import reference
from core.config import ModelSpec
from core.init import init_weights, random_weights
from core.params import count_params

BASE = ModelSpec(vocab_size=96, num_layers=3, model_dim=48, num_heads=4, num_kv_heads=2)
SPECS = {
    "tied-gqa-odd": BASE,
    "untied-mha-even": dataclasses.replace(BASE, num_layers=4, num_kv_heads=4, tie_embeddings=False),
    "mqa-one-layer": dataclasses.replace(BASE, num_layers=1, num_kv_heads=1, logit_softcap=5.0),
    "rope-gain": dataclasses.replace(BASE, num_layers=2, rope_base=500.0, qk_gain_init=0.7),
}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_logits_and_loss_match_reference_fp32(name):
    spec = SPECS[name]
    w = random_weights(spec, seed=11)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, spec.vocab_size, (2, 13)), rng.integers(0, spec.vocab_size, (2, 13))
    model = GPT(spec).load_weights(w)
    with torch.no_grad():
        z = model.logits(torch.from_numpy(ids)).numpy()
        loss = model.loss(torch.from_numpy(ids), torch.from_numpy(targets)).item()
    assert rel(z, reference.logits(spec, w, ids)) <= 1e-5
    assert abs(loss - reference.loss(spec, w, ids, targets)) / reference.loss(spec, w, ids, targets) <= 1e-5


def test_bf16_logits_are_close_to_reference():
    spec = SPECS["tied-gqa-odd"]
    w = random_weights(spec, seed=3)
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (2, 16))
    model = GPT(spec, compute_dtype=torch.bfloat16).load_weights(w)
    with torch.no_grad():
        z = model.logits(torch.from_numpy(ids)).numpy()
    assert z.dtype == np.float32
    assert rel(z, reference.logits(spec, w, ids)) <= 2e-2


def test_tied_head_is_the_embedding_tensor_itself():
    spec = SPECS["tied-gqa-odd"]
    model = GPT(spec).load_weights(init_weights(spec, 0))
    assert model.lm_head is None
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == count_params(spec).unique
    # A change to the embedding is a change to the head: perturb one row, its logit column moves.
    ids = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        before = model.logits(ids)[0, -1, 5].item()
        model.tok_emb.weight[5] += 1.0
        after = model.logits(ids)[0, -1, 5].item()
    assert before != after


def test_untied_parameter_count_and_export_roundtrip():
    spec = SPECS["untied-mha-even"]
    w = random_weights(spec, seed=2)
    model = GPT(spec).load_weights(w)
    assert sum(p.numel() for p in model.parameters()) == count_params(spec).unique
    out = model.export_weights()
    assert set(out) == set(w) and all(np.array_equal(out[k], w[k]) for k in w)


def test_kv_cache_decoding_matches_full_forward():
    spec = SPECS["tied-gqa-odd"]
    model = GPT(spec).load_weights(random_weights(spec, seed=5))
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, spec.vocab_size, (1, 9)))
    with torch.no_grad():
        full = model.logits(ids)
        caches = [{"offset": 0} for _ in range(spec.num_layers)]
        first = model.logits(ids[:, :6], caches)
        for c in caches:
            c["offset"] = 6
        rest = model.logits(ids[:, 6:], caches)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_norm_eps_is_the_specs_at_the_real_embedding_scale():
    # A tied embedding of std 0.005 (the init's) has mean(x^2) = 2.5e-5, where RMSNorm's eps shows:
    # float32's machine epsilon (1.2e-7, torch's default) instead of NORM_EPS=1e-6 moves the logits
    # by ~1e-2. (With random_weights' std 0.5 it moves them by ~1e-6, below the tolerance.)
    spec = dataclasses.replace(BASE, num_layers=2, logit_softcap=15.0)
    w = random_weights(spec, seed=5, scale=0.005)
    ids = np.random.default_rng(2).integers(0, spec.vocab_size, (2, 16))
    with torch.no_grad():
        z = GPT(spec).load_weights(w).logits(torch.from_numpy(ids)).numpy()
    assert rel(z, reference.logits(spec, w, ids)) <= 1e-5
