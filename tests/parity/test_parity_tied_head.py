"""The tied head (docs/spec.md §2, §4): in both backends the output head of a tied model is the embedding
matrix itself, one array, and the model holds exactly core.params.count_params(spec).unique numbers;
on every device pair (moving a torch model to a device must keep the tie)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten

import backend_mlx.model as mlx_model
import backend_torch.model as torch_model
from core.params import count_params, param_shapes
from parity_lib import CASE_BY_NAME, CASES, on_device, to_numpy


@pytest.mark.parametrize("case_name", [c.name for c in CASES])
def test_head_is_the_embedding_and_parameter_counts_match(case_name, pair, parity):
    case = CASE_BY_NAME[case_name]
    spec, w = case.spec, case.weights()
    expected = count_params(spec).unique
    tied = spec.tie_embeddings
    on, dev = pair.label, pair.torch.torch_device

    tm = torch_model.GPT(spec).to(dev).load_weights(w)
    names = [n for n, _ in tm.named_parameters(remove_duplicate=False)]
    assert sorted(names) == sorted(param_shapes(spec))   # no lm_head.weight when tied, not even an alias
    n_torch = sum(p.numel() for p in tm.parameters())
    with on_device(pair.mlx):
        mm = mlx_model.GPT(spec).load_weights(w)
        flat = dict(tree_flatten(mm.parameters()))
    assert sorted(flat) == sorted(param_shapes(spec))
    n_mlx = sum(a.size for a in flat.values())
    parity.check("tied_head", abs(n_torch - expected), f"{case.name} torch parameter count", devices=on)
    parity.check("tied_head", abs(n_mlx - expected), f"{case.name} mlx parameter count", devices=on)
    if tied:
        assert count_params(spec).total == expected + spec.vocab_size * spec.model_dim

    # Behaviour: zero the embedding row of a token r that is not in the input, in place, in the one
    # array each backend holds. The embedding lookup cannot see it; a head that IS that array gives
    # token r the logit c*tanh(0) = 0 exactly; a separate head matrix leaves it as it was.
    rng = np.random.default_rng(case.seed)
    r = spec.vocab_size - 1
    ids = rng.integers(0, spec.vocab_size - 1, (2, 9))
    with torch.no_grad(), on_device(pair.torch):
        before_t = to_numpy(tm.logits(torch.from_numpy(ids).to(dev)))[..., r]
        tm.tok_emb.weight[r] = 0.0
        after_t = to_numpy(tm.logits(torch.from_numpy(ids).to(dev)))[..., r]
    with on_device(pair.mlx):
        before_m = np.array(mm.logits(mx.array(ids)))[..., r]
        emb = np.array(mm.tok_emb.weight)
        emb[r] = 0.0
        mm.update(tree_unflatten([("tok_emb.weight", mx.array(emb))]))
        after_m = np.array(mm.logits(mx.array(ids)))[..., r]
    assert np.abs(before_t).max() > 1e-6 and np.abs(before_m).max() > 1e-6
    if tied:
        parity.check("tied_head", float(np.abs(after_t).max()), f"{case.name} torch logit of the zeroed row",
                     devices=on)
        parity.check("tied_head", float(np.abs(after_m).max()), f"{case.name} mlx logit of the zeroed row",
                     devices=on)
    else:
        np.testing.assert_array_equal(after_t, before_t)
        np.testing.assert_array_equal(after_m, before_m)
