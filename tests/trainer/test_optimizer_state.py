"""Both sessions load optimizer state through trainer.backend.checked_optimizer_state: same checks, same errors."""

import numpy as np
import pytest

from trainer.backend import checked_optimizer_state
from core.config import TrainConfig
from core.errors import CheckpointError
from trainer_helpers import make_session

CFG = TrainConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, device="cpu")
SPEC = CFG.model_spec()


def test_empty_state_is_zeros_for_every_slot():
    state = checked_optimizer_state(SPEC, {})
    assert state["blocks.0.attn.c_q.weight.momentum_buffer"].shape == (32, 32)
    assert state["tok_emb.weight.exp_avg_sq"].shape == (64, 32)
    assert all(v.dtype == np.float32 and not v.any() for v in state.values())


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sessions_refuse_a_state_of_another_model_and_keep_theirs(backend):
    session = make_session(backend, CFG)
    session.setup(SPEC, CFG)
    good = {k: np.full_like(v, 0.5) for k, v in checked_optimizer_state(SPEC, {}).items()}
    session.load_optimizer_state(good)
    bad = dict(good, **{"tok_emb.weight.exp_avg": np.zeros((8, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"tok_emb.weight.exp_avg has shape \(8, 32\), this model spec needs \(64, 32\)"):
        session.load_optimizer_state(bad)
    partial = {k: v for k, v in good.items() if not k.startswith("skip_weights")}
    with pytest.raises(CheckpointError, match="missing skip_weights.exp_avg"):
        session.load_optimizer_state(partial)
    exported = session.export_optimizer_state()
    assert exported.keys() == good.keys() and all(np.array_equal(exported[k], good[k]) for k in good)
