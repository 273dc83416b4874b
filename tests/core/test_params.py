"""The parameter table: groups, control flags and accounting (docs/spec.md §2, §6, §9)."""

import dataclasses

import numpy as np
import pytest

from core.config import INIT_ONLY, SHAPES, UNSHAPED, ModelSpec, model_fields
from core.errors import CheckpointError
from core.init import init_weights
from core.params import (EMBED, HEAD, MATRIX, SCALAR, check_weights, count_params, infer_spec, param_groups,
                         param_shapes, param_table)


def test_default_spec_counts():
    spec = ModelSpec()
    c = count_params(spec)
    V, d, L = 1024, 512, 9
    per_block = d * d * 2 + 2 * (256 * d) + 2 * (1024 * d) + 8 + 2 * d + 2 * d
    assert c.unique == V * d + 4 * d + L * per_block
    assert c.embedding == V * d and c.saved_by_tying == V * d
    assert c.total == c.unique + V * d and c.non_embedding == c.unique - V * d


def test_untied_counts_head_once_and_saves_nothing():
    spec = dataclasses.replace(ModelSpec(), tie_embeddings=False)
    c = count_params(spec)
    assert c.saved_by_tying == 0 and c.total == c.unique and c.embedding == 2 * 1024 * 512


def test_groups():
    spec = dataclasses.replace(ModelSpec(num_layers=2), tie_embeddings=False)
    groups = param_groups(spec)
    assert groups[EMBED] == ["tok_emb.weight"] and groups[HEAD] == ["lm_head.weight"]
    assert "blocks.0.attn.c_q.weight" in groups[MATRIX] and "blocks.1.mlp.proj.weight" in groups[MATRIX]
    assert set(groups[SCALAR]) >= {"skip_weights", "blocks.0.attn.q_gain", "blocks.0.resid_mix", "blocks.1.mlp_scale"}
    assert all(not p.keep_float for p in param_table(spec) if p.group == MATRIX)
    assert all(p.keep_float for p in param_table(spec) if p.group == SCALAR)


def test_check_weights_names_missing_extra_and_misshapen():
    spec = ModelSpec(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1)
    w = init_weights(spec, 0)
    check_weights(spec, w)
    with pytest.raises(CheckpointError, match="missing parameter.*skip_weights"):
        check_weights(spec, {k: v for k, v in w.items() if k != "skip_weights"})
    with pytest.raises(CheckpointError, match="unexpected parameter.*lm_head"):
        check_weights(spec, dict(w, **{"lm_head.weight": w["tok_emb.weight"]}))
    with pytest.raises(CheckpointError, match=r"tok_emb.weight has shape \(32, 8\)"):
        check_weights(spec, dict(w, **{"tok_emb.weight": w["tok_emb.weight"][:, :8]}))


@pytest.mark.parametrize("spec", [
    ModelSpec(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3),
    ModelSpec(vocab_size=48, num_layers=2, model_dim=24, num_heads=2, num_kv_heads=2, tie_embeddings=False),
    ModelSpec(vocab_size=32, num_layers=1, model_dim=16, num_heads=4, num_kv_heads=1),
])
def test_infer_spec_reads_every_size_from_the_shapes(spec):
    weights = {name: np.zeros(shape, np.float32) for name, shape in param_shapes(spec).items()}
    assert infer_spec(weights, logit_softcap=spec.logit_softcap) == spec
    assert infer_spec(weights, norm_eps=1e-5).norm_eps == 1e-5


def test_infer_spec_refuses_weights_of_another_model():
    spec = ModelSpec(vocab_size=32, num_layers=2, model_dim=16, num_heads=4, num_kv_heads=2)
    weights = {name: np.zeros(shape, np.float32) for name, shape in param_shapes(spec).items()}
    with pytest.raises(CheckpointError, match="has no tok_emb.weight"):
        infer_spec({k: v for k, v in weights.items() if k != "tok_emb.weight"})
    with pytest.raises(CheckpointError, match="unexpected parameter"):
        infer_spec(weights | {"blocks.0.extra": np.zeros(3)})
    with pytest.raises(CheckpointError, match="fit no model spec"):
        infer_spec(weights | {"blocks.0.attn.c_k.weight": np.zeros((6, 16))})


def test_the_shapes_hold_exactly_the_model_settings_whose_role_is_shapes():
    """A setting marked SHAPES is read back from the tensors; any other comes from the caller (an
    artifact's spec takes them from the run's settings) or is the default."""
    spec = ModelSpec(vocab_size=48, num_layers=3, model_dim=24, num_heads=2, num_kv_heads=1, mlp_mult=3,
                     tie_embeddings=False, tied_embed_init_std=0.01, logit_softcap=20.0, rope_base=500.0,
                     qk_gain_init=2.0, norm_eps=1e-5)
    weights = {name: np.zeros(shape, np.float32) for name, shape in param_shapes(spec).items()}
    bare, default = infer_spec(weights), ModelSpec()
    for name in model_fields():
        want = getattr(spec if name in model_fields(SHAPES) else default, name)
        assert getattr(bare, name) == want, name
    assert infer_spec(weights, **{k: getattr(spec, k) for k in model_fields(INIT_ONLY, UNSHAPED)}) == spec

