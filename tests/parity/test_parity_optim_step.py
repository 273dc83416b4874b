"""docs/spec.md §10, third row: one full optimizer step (Muon for the matrices, Adam for the rest) from the
same weights, the same non-empty optimizer state and the same batch gives the same new weights
(<= 1e-5) in both backends, through the sessions' train_step of the trainer.backend interface; on
every device pair (parity_lib.PAIRS): torch's session with DEVICE=cuda/mps/cpu, MLX's on its default
device (parity_lib.open_session)."""

import numpy as np
import pytest

from core.init import random_optimizer_state
from core.schedule import learning_rates, momentum
from parity_lib import BACKENDS, CASE_BY_NAME, SMALL_CASES, open_session, rel, train_config

STEP = 350   # > 0: Adam's bias correction and Muon's momentum warmup are mid-way, the lr is warming down


@pytest.mark.parametrize("clip", [0.0, 0.3])
@pytest.mark.parametrize("case_name", [c.name for c in SMALL_CASES])
def test_one_optimizer_step_gives_the_same_weights(case_name, clip, pair, parity):
    case = CASE_BY_NAME[case_name]
    spec = case.spec
    # Two micro-batches of 3 sequences; MLX additionally splits each into chunks of 2 sequences.
    T = 16
    cfg = train_config(spec, iterations=400, warmdown_iters=100, grad_clip_norm=clip, train_seq_len=T,
                       mlx_max_microbatch_tokens=2 * T)
    lrs, mu = learning_rates(cfg, STEP, 0.0), momentum(cfg, STEP)
    assert 0 < min(lrs.values()) and lrs["matrix"] < cfg.matrix_lr and 0.85 < mu < 0.95
    w0, state0 = case.weights(), random_optimizer_state(spec, case.seed)
    rng = np.random.default_rng(case.seed)
    batches = [tuple(rng.integers(0, spec.vocab_size, (3, T)) for _ in range(2)) for _ in range(2)]

    weights, states, losses = {}, {}, {}
    for b in BACKENDS:
        with open_session(pair.of(b), cfg) as session:
            session.load_weights(w0)
            session.load_optimizer_state(state0)
            losses[b] = session.train_step(batches, lrs, mu, STEP)
            weights[b], states[b] = session.export_weights(), session.export_optimizer_state()

    where, on = f"{case.name} clip={clip}", pair.label
    parity.check("logits_fp32", rel(losses["torch"], losses["mlx"]), f"{where} train_step loss", devices=on)
    assert set(weights["torch"]) == set(weights["mlx"]) == set(w0)
    assert set(states["torch"]) == set(states["mlx"]) == set(state0)
    for name in w0:
        if w0[name].size == 0:
            continue
        moved = rel(weights["mlx"][name], w0[name])
        assert moved > 1e-4, f"{name}: the step barely moved the weight ({moved:.1e})"
        parity.check("optim_step", rel(weights["torch"][name], weights["mlx"][name]), f"{where} {name}", devices=on)
    for key in state0:
        if state0[key].size:
            parity.check("optim_step", rel(states["torch"][key], states["mlx"][key]), f"{where} state {key}",
                         devices=on)
