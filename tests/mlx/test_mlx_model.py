"""The MLX GPT computes the reference function (docs/spec.md §4, §10), ties its head, and decodes with a cache."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from backend_mlx.model import GPT, Rotary, rms_norm
from core import reference
from core.config import ModelSpec
from core.errors import CheckpointError
from core.init import init_weights, random_weights
from core.params import count_params, param_table

BASE = ModelSpec(vocab_size=96, num_layers=3, model_dim=48, num_heads=4, num_kv_heads=2)
SPECS = {
    "tied-gqa-odd": BASE,
    "untied-mha-even": dataclasses.replace(BASE, num_layers=4, num_kv_heads=4, tie_embeddings=False),
    "mqa-one-layer": dataclasses.replace(BASE, num_layers=1, num_kv_heads=1, logit_softcap=5.0),
    "rope-gain": dataclasses.replace(BASE, num_layers=2, rope_base=500.0, qk_gain_init=0.7),
    "untied-mqa-eps": dataclasses.replace(BASE, num_layers=5, num_heads=6, num_kv_heads=1, model_dim=36,
                                          tie_embeddings=False, norm_eps=1e-3),
}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def batch(spec, shape, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.vocab_size, shape), rng.integers(0, spec.vocab_size, shape)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_logits_and_loss_match_reference_fp32(name):
    spec = SPECS[name]
    w = random_weights(spec, seed=11)
    ids, targets = batch(spec, (2, 13), 0)
    model = GPT(spec).load_weights(w)
    z = model.logits(mx.array(ids))
    assert z.dtype == mx.float32 and z.shape == (2, 13, spec.vocab_size)
    assert rel(z, reference.logits(spec, w, ids)) <= 1e-5
    token_losses = reference.token_losses(spec, w, ids, targets)
    assert rel(model.loss(mx.array(ids), mx.array(targets)).item(), token_losses.mean()) <= 1e-5
    assert rel(model.loss(mx.array(ids), mx.array(targets), reduction="sum").item(), token_losses.sum()) <= 1e-5


def test_bf16_logits_are_close_to_reference():
    spec = SPECS["tied-gqa-odd"]
    w = random_weights(spec, seed=3)
    ids, _ = batch(spec, (2, 16), 1)
    model = GPT(spec, compute_dtype=mx.bfloat16).load_weights(w)
    z = model.logits(mx.array(ids))
    assert z.dtype == mx.float32
    err = rel(z, reference.logits(spec, w, ids))
    assert 0 < err <= 2e-2   # > 0: the products really ran in bf16


def test_rms_norm_is_fp32_with_spec_epsilon():
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32) * 1e-3
    for eps in (1e-6, 1e-3):  # at this scale eps moves the result, so a wrong eps fails
        y = rms_norm(mx.array(x).astype(mx.bfloat16), eps)
        assert y.dtype == mx.float32
        assert rel(y, reference.rms_norm(x.astype(np.float64), eps)) <= 1e-2   # input rounded to bf16
        assert rel(rms_norm(mx.array(x), eps), reference.rms_norm(x.astype(np.float64), eps)) <= 1e-6


def test_rotary_is_positive_half_split_and_precise_at_long_positions():
    x = np.random.default_rng(0).standard_normal((1, 2, 2048, 16)).astype(np.float32)
    for base in (10000.0, 500.0):
        ref = reference.rope(x.astype(np.float64), base)
        assert rel(Rotary(ModelSpec(model_dim=16, num_heads=1, num_kv_heads=1, rope_base=base))(mx.array(x)), ref) <= 1e-6
        # mx.fast.rope(traditional=False) rotates the same way (why docs/spec.md §4 names it); checked on
        # short sequences, where its fp32 angles are still accurate.
        fast = mx.fast.rope(mx.array(x[:, :, :64]), 16, traditional=False, base=base, scale=1.0, offset=0)
        assert rel(fast, ref[:, :, :64]) <= 1e-6
    # An offset continues the positions.
    assert rel(Rotary(ModelSpec(model_dim=16, num_heads=1, num_kv_heads=1))(mx.array(x[:, :, 100:103]), offset=100),
               reference.rope(x.astype(np.float64), 10000.0)[:, :, 100:103]) <= 1e-6


def test_parameter_names_are_the_spec_names():
    for spec in SPECS.values():
        names = [name for name, _ in tree_flatten(GPT(spec).parameters())]
        assert sorted(names) == sorted(p.name for p in param_table(spec))


def test_tied_head_is_the_embedding_array_itself():
    spec = SPECS["tied-gqa-odd"]
    model = GPT(spec).load_weights(init_weights(spec, 0))
    params = tree_flatten(model.parameters())
    assert model.lm_head is None
    assert not any(name.startswith("lm_head") for name, _ in params)
    assert sum(p.size for _, p in params) == count_params(spec).unique
    # A change to the embedding is a change to the head: move one row, its logit column moves.
    ids = mx.zeros((1, 3), dtype=mx.int32)
    before = model.logits(ids)[0, -1, 5].item()
    model.tok_emb.weight[5] += 1.0
    after = model.logits(ids)[0, -1, 5].item()
    assert before != after


def test_untied_parameter_count_and_export_roundtrip():
    spec = SPECS["untied-mha-even"]
    w = random_weights(spec, seed=2)
    model = GPT(spec).load_weights(w)
    assert sum(p.size for _, p in tree_flatten(model.parameters())) == count_params(spec).unique
    out = model.export_weights()
    assert list(out) == [p.name for p in param_table(spec)]
    assert all(out[k].dtype == np.float32 and np.array_equal(out[k], w[k]) for k in w)
    # Loading copies: changing the caller's array afterwards does not reach the model.
    w["skip_weights"][:] = 7.0
    assert not np.array_equal(model.export_weights()["skip_weights"], w["skip_weights"])


def test_load_weights_checks_names_and_shapes():
    spec = SPECS["tied-gqa-odd"]
    w = init_weights(spec, 0)
    model = GPT(spec)
    with pytest.raises(CheckpointError, match="blocks.1.attn.c_k.weight has shape"):
        model.load_weights({**w, "blocks.1.attn.c_k.weight": np.zeros((48, 48), np.float32)})
    with pytest.raises(CheckpointError, match="missing parameter"):
        model.load_weights({k: v for k, v in w.items() if k != "skip_weights"})
    with pytest.raises(CheckpointError, match="unexpected parameter.*lm_head.weight"):
        model.load_weights({**w, "lm_head.weight": w["tok_emb.weight"]})


@pytest.mark.parametrize("name", ["tied-gqa-odd", "untied-mqa-eps"])
def test_kv_cache_decoding_matches_full_forward(name):
    spec = SPECS[name]
    model = GPT(spec).load_weights(random_weights(spec, seed=5))
    ids, _ = batch(spec, (2, 9), 2)
    full = np.array(model.logits(mx.array(ids)))
    caches = [{"offset": 0} for _ in range(spec.num_layers)]
    pieces = [model.logits(mx.array(ids[:, :6]), caches)]    # a prompt, then one token at a time
    for t in range(6, 9):
        for c in caches:
            c["offset"] = t
        pieces.append(model.logits(mx.array(ids[:, t:t + 1]), caches))
    assert caches[0]["k"].shape == (2, spec.num_kv_heads, 9, spec.head_dim)
    decoded = np.concatenate([np.array(p) for p in pieces], axis=1)
    np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)


def test_norm_eps_is_the_specs_at_the_real_embedding_scale():
    # Mirrors tests/torch: at the init's embedding scale (std 0.005) RMSNorm's eps moves the logits by ~1e-2.
    spec = dataclasses.replace(BASE, num_layers=2, logit_softcap=15.0)
    w = random_weights(spec, seed=5, scale=0.005)
    ids = np.random.default_rng(2).integers(0, spec.vocab_size, (2, 16))
    z = np.array(GPT(spec).load_weights(w).logits(mx.array(ids)))
    assert rel(z, reference.logits(spec, w, ids)) <= 1e-5
