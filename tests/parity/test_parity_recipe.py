"""docs/spec.md §10, the record's recipe (§6.1): every optimizer and schedule option, alone and all
together, through the sessions' train_step of both backends and the float64 reference step
(tests/numpy_optim.py's train_step).

- One step (mid-schedule, a non-empty state): the new weights and state, torch vs MLX (<= 1e-5) and
  each backend vs the float64 reference step given that backend's gradient (<= 1e-5); and the option
  moves the result away from the step without it, so a backend that ignored it would fail.
- A 20-step curve from the same weights and batches: per-step losses torch vs MLX (<= 1e-4), and at
  every step each backend's new weights vs the float64 reference step from its previous weights
  (<= 1e-5); with EMA_DECAY the moving average too, against its float64 formula over those weights.
"""

import numpy as np
import pytest

import numpy_optim as ref
from core.init import random_optimizer_state
from core.schedule import learning_rates, momentum
from parity_lib import BACKENDS, CASE_BY_NAME, loss_and_grads, open_session, rel, train_config

RECORD = dict(muon_ns_coeffs="polar-express", muon_row_normalize=True, muon_wd=0.095, adam_wd=0.02,
              embed_wd=0.085, warmdown_frac=0.85, min_lr=0.1, ema_decay=0.9965, beta2=0.99,
              muon_momentum=0.97, muon_momentum_warmup_start=0.92, grad_clip_norm=0.3)
OPTIONS = {
    "polar-express": dict(muon_ns_coeffs="polar-express"),
    "row-normalize": dict(muon_row_normalize=True),
    "muon-wd": dict(muon_wd=0.095),
    "adam-wd": dict(adam_wd=0.02),
    "embed-wd": dict(embed_wd=0.085),
    "warmdown-frac-min-lr": dict(warmdown_frac=0.85, min_lr=0.1),
    "ema": dict(ema_decay=0.9),
    "record": RECORD,
}
# What each option changes in one step: these parameters must move away from the plain step.
MOVES = {"polar-express": "matrix", "row-normalize": "matrix", "muon-wd": "matrix", "adam-wd": "scalar",
         "embed-wd": "embed", "warmdown-frac-min-lr": "all", "record": "all"}
T = 16
STEP = 300   # mid-schedule of a 400-step run: WARMDOWN_FRAC=0.85 has begun, MIN_LR's floor not yet


def batches(spec, seed, n):
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, spec.vocab_size, (4, T)) for _ in range(2)) for _ in range(n)]


def reference_step(backend, cfg, weights, state, batch, step):
    """The float64 step from `weights` and `state`, on the gradient `backend` computes there."""
    x, y = batch
    _, grads = loss_and_grads(backend, cfg.model_spec(), weights, x, y)
    return ref.train_step(cfg, weights, grads, state, learning_rates(cfg, step, 0.0), momentum(cfg, step), step)


def groups_of(spec):
    from core.params import param_table
    return {p.name: p.group for p in param_table(spec)}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_one_step_with_each_option(option, pair, parity):
    case = CASE_BY_NAME["untied-mha-L4-cap5"]   # untied: the embed, head, matrix and scalar groups
    spec = case.spec
    base = dict(iterations=400, warmdown_iters=100, train_seq_len=T, mlx_max_microbatch_tokens=2 * T)
    cfg = train_config(spec, **base, **OPTIONS[option])
    plain = train_config(spec, **base)
    w0, state0 = case.weights(), random_optimizer_state(spec, case.seed)
    (batch,) = batches(spec, case.seed, 1)
    lrs, mu = learning_rates(cfg, STEP, 0.0), momentum(cfg, STEP)
    got = {}
    for b in BACKENDS:
        for name, c in (("with", cfg), ("without", plain)):
            with open_session(pair.of(b), c) as session:
                session.load_weights(w0)
                session.load_optimizer_state(state0)
                if c.ema_decay:
                    session.load_ema(w0)
                session.train_step([batch], learning_rates(c, STEP, 0.0), momentum(c, STEP), STEP)
                got[b, name] = (session.export_weights(), session.export_optimizer_state(), session.export_ema())
    where, on = f"{option} one step", pair.label
    group = groups_of(spec)
    for b in BACKENDS:
        want_w, want_state = ref.train_step(cfg, w0, loss_and_grads(b, spec, w0, *batch)[1], state0, lrs, mu, STEP)
        w, state, ema = got[b, "with"]
        for name in w0:
            parity.check("recipe_ref", rel(w[name], want_w[name]), f"{where}: {b} vs float64, {name}", devices=on)
            moved = MOVES.get(option)
            if moved in ("all", group[name]):
                off = rel(w[name], got[b, "without"][0][name])
                assert off > 1e-5, f"{option}: {name} is where the plain step puts it ({off:.1e})"
        for key in state0:
            parity.check("recipe_ref", rel(state[key], want_state[key]), f"{where}: {b} vs float64, {key}", devices=on)
        if cfg.ema_decay:
            for name in w0:
                want = ref.ema(w0[name].astype(np.float64), w[name], cfg.ema_decay)
                parity.check("recipe_ref", rel(ema[name], want), f"{where}: {b} EMA vs float64, {name}", devices=on)
    (wt, st, et), (wm, sm, em) = got["torch", "with"], got["mlx", "with"]
    for name in w0:
        parity.check("optim_step", rel(wt[name], wm[name]), f"{where}: {name}", devices=on)
    for key in state0:
        parity.check("optim_step", rel(st[key], sm[key]), f"{where}: state {key}", devices=on)
    if cfg.ema_decay:
        for name in w0:
            parity.check("optim_step", rel(et[name], em[name]), f"{where}: EMA {name}", devices=on)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_twenty_steps_with_each_option(option, pair, parity):
    case = CASE_BY_NAME["tied-gqa-L3"]   # tied, as the record
    spec = case.spec
    cfg = train_config(spec, iterations=20, warmdown_iters=8, muon_momentum_warmup_steps=10, train_seq_len=T,
                       mlx_max_microbatch_tokens=2 * T, **OPTIONS[option])
    w0 = case.weights()
    steps = batches(spec, case.seed + 100, 20)
    losses = {}
    where, on = f"{option} 20 steps", pair.label
    for b in BACKENDS:
        losses[b] = []
        with open_session(pair.of(b), cfg) as session:
            session.load_weights(w0)
            if cfg.ema_decay:
                session.load_ema(w0)
            w, state = w0, session.export_optimizer_state()
            avg = {k: v.astype(np.float64) for k, v in w0.items()}
            for step, batch in enumerate(steps):
                want_w, want_state = reference_step(b, cfg, w, state, batch, step)
                losses[b].append(float(session.train_step([batch], learning_rates(cfg, step, 0.0),
                                                          momentum(cfg, step), step)))
                w, state = session.export_weights(), session.export_optimizer_state()
                worst = max(rel(w[n], want_w[n]) for n in w if w[n].size)
                parity.check("recipe_ref", worst, f"{where}: {b} vs float64 step {step}", devices=on)
                if cfg.ema_decay:
                    avg = {n: ref.ema(avg[n], w[n], cfg.ema_decay) for n in avg}
            if cfg.ema_decay:
                ema = session.export_ema()
                worst = max(rel(ema[n], avg[n]) for n in avg if avg[n].size)
                parity.check("recipe_ref", worst, f"{where}: {b} EMA vs float64 after 20 steps", devices=on)
    assert np.mean(losses["torch"][-3:]) < losses["torch"][0] - 0.3   # it learns
    for step, (a, b) in enumerate(zip(losses["torch"], losses["mlx"]), start=1):
        parity.check("train_losses", rel(a, b), f"{where}: loss step {step}", devices=on)
