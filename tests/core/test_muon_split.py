"""How Muon's matrices are dealt out to ranks (core.optimizer.rank_shares), and that both backends'
muon_update orthogonalize exactly their rank's share."""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
import torch

import backend_mlx.optim as mlx_optim
import backend_torch.optim as torch_optim
from core.config import ModelSpec
from core.optimizer import rank_shares, shape_groups
from core.params import MATRIX, param_table

BASE = ModelSpec()   # 9 layers, d 512: 54 matrices in 4 shapes (18, 18, 9, 9)
SHAPES = [p.shape for p in param_table(BASE) if p.group == MATRIX]
# BASE's layout (the same 4 groups of 18, 18, 9 and 9 matrices) at d = 64, for the backends' steps.
SMALL_SHAPES = [p.shape for p in param_table(ModelSpec(model_dim=64)) if p.group == MATRIX]


def counts(world_size: int) -> list[int]:
    groups = shape_groups(SHAPES)
    return [sum(len(idx[s]) for (_, _, idx), s in zip(groups, rank_shares(groups, rank, world_size)))
            for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 7, 8])
def test_every_matrix_goes_to_one_rank_and_the_counts_differ_by_at_most_one(world_size):
    groups = shape_groups(SHAPES)
    owners = Counter(i for rank in range(world_size)
                     for (_, _, idx), s in zip(groups, rank_shares(groups, rank, world_size)) for i in idx[s])
    assert sorted(owners) == list(range(len(SHAPES))) and set(owners.values()) == {1}
    assert max(counts(world_size)) - min(counts(world_size)) <= 1   # a restart per group: 10 vs 6 at 8 ranks


def test_both_backends_orthogonalize_their_rank_share_of_base_on_8_ranks(monkeypatch):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) for s in SMALL_SHAPES]
    for rank, expected in enumerate(counts(8)):
        done = []

        def torch_ns(us, steps, dtype, *options):   # options: the coefficients, row normalisation
            done.append(len(us))
            return torch.stack(us)

        monkeypatch.setattr(torch_optim.dist, "all_reduce", lambda flat, op=None: None)
        params = [torch.tensor(w) for w in weights]
        torch_optim.muon_update(params, [p.clone() for p in params], [torch.zeros_like(p) for p in params], lr=0.1,
                                momentum=0.9, steps=1, dtype=torch.float32, rank=rank, world_size=8,
                                orthogonalize=torch_ns)
        assert sum(done) == expected
        done.clear()
        real_ns = mlx_optim.newton_schulz
        monkeypatch.setattr(mlx_optim, "newton_schulz", lambda us, steps, dtype, *options: done.append(len(us)) or real_ns(us, 1, dtype))
        arrays = [mx.array(w) for w in weights]
        mlx_optim.muon_update(arrays, arrays, [mx.zeros_like(a) for a in arrays], lr=0.1, momentum=0.9, steps=1,
                              dtype=mx.float32, rank=rank, world_size=8, all_sum=lambda x: x)
        assert sum(done) == expected
        monkeypatch.undo()
