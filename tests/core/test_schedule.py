"""LR multiplier and Muon momentum schedules (docs/spec.md §6) at hand-computed points."""

import pytest

from core.config import TrainConfig
from core.schedule import learning_rates, lr_mul, momentum, muon_momentum, wallclock_cap_ms


def steps_mul(step, iterations=100, warmdown_iters=20):
    return lr_mul(step, 123.0, iterations=iterations, warmdown_iters=warmdown_iters, max_wallclock_ms=None)


def test_step_warmdown_without_a_cap():
    assert steps_mul(0) == 1.0
    assert steps_mul(79) == 1.0
    assert steps_mul(80) == 1.0      # 20/20: the first warmdown step
    assert steps_mul(90) == 0.5      # 10/20
    assert steps_mul(99) == 0.05     # 1/20
    assert steps_mul(100) == 0.0     # past the last step: nothing left to learn
    assert steps_mul(5, iterations=10, warmdown_iters=20) == 0.25  # warmdown longer than the run: 5/20
    assert steps_mul(0, iterations=10, warmdown_iters=20) == 0.5   # ... from its very first step: 10/20
    assert steps_mul(50, warmdown_iters=0) == 1.0
    # a cap of 0 means no cap: the elapsed time is ignored
    assert lr_mul(90, 1e12, iterations=100, warmdown_iters=20, max_wallclock_ms=0) == 0.5


def test_time_warmdown_with_a_cap():
    def mul(step, elapsed_ms):
        return lr_mul(step, elapsed_ms, iterations=10**6, warmdown_iters=100, max_wallclock_ms=10_000.0)

    assert mul(0, 0.0) == 1.0              # no measured step time yet
    assert mul(20, 1000.0) == 1.0          # 50 ms/step: warmdown is 5 s, 9 s remain
    assert mul(50, 5000.0) == 0.5          # 100 ms/step: warmdown is 10 s, 5 s remain
    assert mul(10, 9500.0) == pytest.approx(500 / 95_000, rel=1e-15)   # slow steps: 0.5 s of 95 s
    assert mul(200, 12_000.0) == 0.0       # past the cap
    assert mul(99, 9900.0) == pytest.approx(0.01, rel=1e-12)   # 100 ms of a 10 s warmdown left


def test_muon_momentum_warmup():
    def mu(step, warmup_steps=500):
        return muon_momentum(step, start=0.85, end=0.95, warmup_steps=warmup_steps)

    assert mu(0) == 0.85
    assert mu(250) == pytest.approx(0.90, abs=1e-15)
    assert mu(100) == pytest.approx(0.8 * 0.85 + 0.2 * 0.95, abs=1e-15)
    assert mu(500) == 0.95
    assert mu(10_000) == 0.95
    assert mu(0, warmup_steps=0) == 0.95


def test_learning_rates_per_group():
    cfg = TrainConfig(iterations=100, warmdown_iters=20, max_wallclock_seconds=0)
    assert wallclock_cap_ms(cfg) is None
    assert learning_rates(cfg, 0, 0.0) == {"embed": 0.05, "matrix": 0.04, "scalar": 0.04}
    assert learning_rates(cfg, 90, 0.0) == {"embed": 0.025, "matrix": 0.02, "scalar": 0.02}
    untied = cfg.replace(tie_embeddings=False)
    assert learning_rates(untied, 95, 0.0) == pytest.approx(
        {"embed": 0.6 / 4, "head": 0.008 / 4, "matrix": 0.01, "scalar": 0.01}, rel=1e-15)
    capped = cfg.replace(max_wallclock_seconds=10.0, iterations=10**6, warmdown_iters=100)
    assert wallclock_cap_ms(capped) == 10_000.0
    assert learning_rates(capped, 50, 5000.0)["matrix"] == 0.02


def test_momentum_from_config():
    cfg = TrainConfig()
    assert momentum(cfg, 0) == 0.85 and momentum(cfg, 500) == 0.95
    assert momentum(cfg.replace(muon_momentum_warmup_steps=0), 0) == 0.95


def test_short_run_inside_a_cap_still_warms_down_by_steps():
    # 100 steps of 1 s inside a 600 s cap: the step warmdown applies (the reference ignored it).
    mul = lambda step: lr_mul(step, 1000.0 * step, iterations=100, warmdown_iters=20, max_wallclock_ms=600_000)
    assert mul(50) == 1.0 and mul(90) == 0.5
    # And where the cap comes first, the time-based warmdown wins: 590 s of 600 s at 1 s/step.
    assert lr_mul(590, 590_000.0, iterations=10_000, warmdown_iters=20, max_wallclock_ms=600_000) == 0.5


def test_warmdown_frac_and_the_floor_of_min_lr():
    """WARMDOWN_FRAC: 1, then linear to 0 over the last fraction of training, floored at MIN_LR."""
    cfg = TrainConfig(iterations=100, warmdown_iters=20, warmdown_frac=0.5, max_wallclock_seconds=0)

    def mul(step, elapsed_ms=0.0, c=cfg):
        return learning_rates(c, step, elapsed_ms)["matrix"] / c.matrix_lr

    assert mul(0) == 1.0 and mul(49) == 1.0          # WARMDOWN_ITERS=20 is not what decides
    assert mul(50) == 1.0                            # (1 - 0.5) / 0.5: the first warmdown step
    assert mul(75) == pytest.approx(0.5, rel=1e-15)
    assert mul(99) == pytest.approx(0.02, rel=1e-12)
    floored = cfg.replace(min_lr=0.1)
    assert mul(75, c=floored) == pytest.approx(0.5, rel=1e-15)   # above the floor: unchanged
    assert mul(99, c=floored) == 0.1 and mul(97, c=floored) == 0.1   # 0.02 and 0.06 floored
    # Under a cap, the time used counts when it is further than the steps (8 s of 10 s: 0.2 left).
    capped = cfg.replace(max_wallclock_seconds=10.0, iterations=10**6)
    assert mul(10, 8000.0, c=capped) == pytest.approx(0.4, rel=1e-12)
    assert mul(10, 2000.0, c=capped) == 1.0
    # MIN_LR also floors the WARMDOWN_ITERS warmdown; everything off is the reference's schedule.
    assert mul(99, c=cfg.replace(warmdown_frac=0.0, min_lr=0.1)) == 0.1
    assert mul(90, c=cfg.replace(warmdown_frac=0.0)) == 0.5
    assert mul(10, c=cfg.replace(warmdown_frac=1.0)) == pytest.approx(0.9, rel=1e-15)
