"""The numpy reference forward against cases computable by hand (docs/spec.md §4)."""

import dataclasses

import numpy as np
import pytest

from core import reference
from core.config import ModelSpec
from core.init import init_weights, random_weights

SMALL = ModelSpec(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2)


def ids_for(spec, B=2, T=7, seed=0):
    return np.random.default_rng(seed).integers(0, spec.vocab_size, size=(B, T))


def test_one_layer_with_zero_projections_is_normed_embedding_times_embedding():
    spec = dataclasses.replace(SMALL, num_layers=1)
    w = init_weights(spec, seed=3)  # projections are zero, resid_mix = (1, 0): the block is the identity
    ids = ids_for(spec)
    emb = w["tok_emb.weight"].astype(np.float64)
    eps = spec.norm_eps
    h = reference.rms_norm(reference.rms_norm(emb[ids], eps), eps)  # input norm, then final norm
    c = spec.logit_softcap
    expected = c * np.tanh((h @ emb.T) / c)
    np.testing.assert_allclose(reference.logits(spec, w, ids), expected, rtol=1e-12, atol=0)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = SMALL  # 4 heads reading 2 KV heads
    mha = dataclasses.replace(SMALL, num_kv_heads=4)
    w = random_weights(gqa, seed=1)
    w_mha = dict(w)
    hd, rep = gqa.head_dim, gqa.num_heads // gqa.num_kv_heads
    for i in range(gqa.num_layers):
        for name in ("c_k", "c_v"):
            key = f"blocks.{i}.attn.{name}.weight"
            heads = w[key].reshape(gqa.num_kv_heads, hd, gqa.model_dim)
            w_mha[key] = np.repeat(heads, rep, axis=0).reshape(mha.kv_dim, mha.model_dim)
    ids = ids_for(gqa)
    np.testing.assert_allclose(reference.logits(gqa, w, ids), reference.logits(mha, w_mha, ids), rtol=1e-12)


def test_later_tokens_never_change_earlier_logits():
    w = random_weights(SMALL, seed=2)
    ids = ids_for(SMALL, B=1, T=9)
    changed = ids.copy()
    changed[0, 5:] = (changed[0, 5:] + 1) % SMALL.vocab_size
    a, b = reference.logits(SMALL, w, ids), reference.logits(SMALL, w, changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_untied_head_differs_from_tied_exactly_through_lm_head():
    untied = dataclasses.replace(SMALL, tie_embeddings=False)
    w = random_weights(SMALL, seed=4)
    ids = ids_for(SMALL)
    w_untied = dict(w, **{"lm_head.weight": w["tok_emb.weight"].copy()})
    np.testing.assert_array_equal(reference.logits(SMALL, w, ids), reference.logits(untied, w_untied, ids))
    w_untied["lm_head.weight"] = w_untied["lm_head.weight"] * 2
    assert not np.allclose(reference.logits(SMALL, w, ids), reference.logits(untied, w_untied, ids))


def test_rope_rotates_positively_and_preserves_norm():
    hd = 4
    x = np.zeros((2, hd))
    x[:, 0] = 1.0  # a = 1, b = 0 in the first frequency pair
    y = reference.rope(x, base=10000.0)
    np.testing.assert_allclose(y[0], [1, 0, 0, 0])                  # position 0: identity
    np.testing.assert_allclose(y[1], [np.cos(1), 0, np.sin(1), 0])  # position 1, theta = 1: b' = +sin
    z = np.random.default_rng(0).standard_normal((5, 8))
    np.testing.assert_allclose(np.linalg.norm(reference.rope(z, 100.0), axis=-1), np.linalg.norm(z, axis=-1))


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    seq = lambda v: np.tile(v, (6, 1))
    rq, rk = reference.rope(seq(q), 10000.0), reference.rope(seq(k), 10000.0)
    assert rq[4] @ rk[2] == pytest.approx(rq[3] @ rk[1], rel=1e-12)


def test_softcap_bounds_logits():
    spec = dataclasses.replace(SMALL, logit_softcap=2.0)
    w = random_weights(spec, seed=5)
    z = reference.logits(spec, w, ids_for(spec))
    assert np.abs(z).max() < 2.0
    assert np.abs(z).max() > 1.0  # the cap is active on these weights


def test_loss_is_mean_cross_entropy_of_logits():
    w = random_weights(SMALL, seed=6)
    ids, targets = ids_for(SMALL, seed=1), ids_for(SMALL, seed=2)
    z = reference.logits(SMALL, w, ids)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    manual = -np.mean(np.log(np.take_along_axis(p, targets[..., None], -1)))
    assert reference.loss(SMALL, w, ids, targets) == pytest.approx(manual, rel=1e-10)


def test_skip_connections_join_encoder_to_decoder_in_reverse_order():
    spec = dataclasses.replace(SMALL, num_layers=4)  # 2 encoder, 2 decoder, 2 skip weights
    w = random_weights(spec, seed=7)
    ids = ids_for(spec)
    base = reference.logits(spec, w, ids)
    w_noskip = dict(w, skip_weights=np.zeros_like(w["skip_weights"]))
    assert not np.allclose(base, reference.logits(spec, w_noskip, ids))  # the skips are used


@pytest.mark.parametrize("num_layers", [5, 6])
def test_skip_weight_j_reads_the_output_of_encoder_layer_E_minus_1_minus_j(num_layers):
    """The decoder pops the stack: skip_weights[j] pairs with the output of encoder layer E-1-j.

    Encoder blocks random (each output distinguishable), decoder blocks the identity (zero projections,
    resid_mix (1, 0)). With only skip weight j set, to c = 1e6, the final x is e_{E-1} + c*e_k with
    k = E-1-j, so the logits are those of the normed e_k, within ~1e-6; e_k is computed here with
    reference.block, the encoder run by hand."""
    spec = dataclasses.replace(SMALL, num_layers=num_layers)
    E, D = spec.num_encoder_layers, spec.num_decoder_layers
    S = min(E, D)
    w = {k: v.astype(np.float64) for k, v in random_weights(spec, seed=11).items()}
    for i in range(E, E + D):
        w[f"blocks.{i}.attn.proj.weight"] = np.zeros_like(w[f"blocks.{i}.attn.proj.weight"])
        w[f"blocks.{i}.mlp.proj.weight"] = np.zeros_like(w[f"blocks.{i}.mlp.proj.weight"])
        w[f"blocks.{i}.resid_mix"] = np.stack([np.ones(spec.model_dim), np.zeros(spec.model_dim)])
    ids = ids_for(spec)
    eps, c = spec.norm_eps, spec.logit_softcap
    x0 = reference.rms_norm(w["tok_emb.weight"][ids], eps)
    encoder_logits, x = [], x0
    for i in range(E):
        x = reference.block(x, x0, w, i, spec)
        encoder_logits.append(c * np.tanh(reference.rms_norm(x, eps) @ w["tok_emb.weight"].T / c))
    for a in range(E):   # the encoder outputs are told apart by their logits
        for b in range(a):
            assert np.abs(encoder_logits[a] - encoder_logits[b]).max() > 1e-2
    assert S == 2 if num_layers == 5 else S == 3
    for j in range(S):
        skips = np.zeros_like(w["skip_weights"])
        skips[j] = 1e6
        got = reference.logits(spec, dict(w, skip_weights=skips), ids)
        read = [k for k in range(E) if np.allclose(got, encoder_logits[k], rtol=0, atol=1e-4)]
        assert read == [E - 1 - j], f"skip_weights[{j}] reads encoder layer(s) {read}, not {E - 1 - j}"
