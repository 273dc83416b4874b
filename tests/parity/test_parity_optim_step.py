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

MID_STEP = 350   # Muon's momentum warmup is mid-way, the lr is warming down; but 1 - 0.95^351 ~ 1:
# Adam's bias correction is invisible there, so the first steps (t = 1, 2, 4: bias corrections 0.1 and
# 0.05, 0.19 and 0.0975, 0.34 and 0.19) run too, on a tied and an untied case (every Adam group).
EARLY_STEPS = (0, 1, 3)
EARLY_CASES = ("tied-gqa-L3", "untied-mha-L4-cap5")
STEP_PARAMS = ([pytest.param(c.name, clip, MID_STEP, id=f"{c.name}-clip{clip}-step{MID_STEP}")
                for c in SMALL_CASES for clip in (0.0, 0.3)]
               + [pytest.param(name, 0.0, step, id=f"{name}-clip0.0-step{step}")
                  for name in EARLY_CASES for step in EARLY_STEPS])


@pytest.mark.parametrize("case_name, clip, step", STEP_PARAMS)
def test_one_optimizer_step_gives_the_same_weights(case_name, clip, step, pair, parity):
    case = CASE_BY_NAME[case_name]
    spec = case.spec
    # Two micro-batches of 3 sequences; MLX additionally splits each into chunks of 2 sequences.
    T = 16
    cfg = train_config(spec, iterations=400, warmdown_iters=100, grad_clip_norm=clip, train_seq_len=T,
                       mlx_max_microbatch_tokens=2 * T)
    lrs, mu = learning_rates(cfg, step, 0.0), momentum(cfg, step)
    assert 0 < min(lrs.values())
    if step == MID_STEP:
        assert lrs["matrix"] < cfg.matrix_lr and 0.85 < mu < 0.95
    w0, state0 = case.weights(), random_optimizer_state(spec, case.seed)
    rng = np.random.default_rng(case.seed)
    batches = [tuple(rng.integers(0, spec.vocab_size, (3, T)) for _ in range(2)) for _ in range(2)]

    weights, states, losses = {}, {}, {}
    for b in BACKENDS:
        with open_session(pair.of(b), cfg) as session:
            session.load_weights(w0)
            session.load_optimizer_state(state0)
            losses[b] = session.train_step(batches, lrs, mu, step)
            weights[b], states[b] = session.export_weights(), session.export_optimizer_state()

    where, on = f"{case.name} clip={clip} step={step}", pair.label
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
