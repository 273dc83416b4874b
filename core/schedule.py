"""Learning-rate and Muon-momentum schedules (docs/spec.md §6): pure functions of the step and the clock.

Two warmdowns: the reference trainers' (WARMDOWN_ITERS, a number of final steps) and the record's
(WARMDOWN_FRAC, a fraction of training); MIN_LR floors either.

The formulas are the reference trainers', operation for operation, so both backends and the
reference scripts follow the same schedule to the last bit.
"""

from __future__ import annotations

from core.params import group_lr, param_groups


def lr_mul(step: int, elapsed_ms: float, *, iterations: int, warmdown_iters: int,
           max_wallclock_ms: float | None) -> float:
    """Multiplier of every learning rate: 1, then linear to 0 over the last `warmdown_iters` steps.

    The warmdown covers the steps [iterations - warmdown_iters, iterations). With a wall-clock cap
    it also starts when the remaining time, at the mean step time so far, covers `warmdown_iters`
    steps; whichever comes first wins. (The reference trainers ignore ITERATIONS under a cap, so a
    short run inside the default 600 s cap never warmed down; taking the smaller multiplier fixes that
    and changes nothing for the runs where the cap is what ends training.)
    """
    if warmdown_iters <= 0:
        return 1.0
    by_steps = 1.0
    if max(iterations - warmdown_iters, 0) <= step:
        by_steps = max((iterations - step) / warmdown_iters, 0.0)
    if max_wallclock_ms is None or max_wallclock_ms <= 0:
        return by_steps
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    by_time = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return min(by_steps, by_time)


def lr_mul_by_frac(frac: float, *, warmdown_frac: float, min_lr: float) -> float:
    """The record's multiplier (WARMDOWN_FRAC > 0): 1, then linear to 0 over the last `warmdown_frac`
    of training, never below `min_lr` (MIN_LR, a fraction of each peak rate)."""
    if frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr, 0.0)


def muon_momentum(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Muon's momentum, linear from `start` at step 0 to `end` at `warmup_steps`, then constant."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def training_fraction(step: int, elapsed_ms: float, *, iterations: int, max_wallclock_ms: float | None) -> float:
    """How far training is, in [0, 1]: of ITERATIONS, or of the wall-clock cap, whichever is further
    (ENABLE_LOOPING_AT and WARMDOWN_FRAC read it; the record reads the time alone under a cap, and the
    two agree whenever the cap is what ends training)."""
    frac = step / max(iterations, 1)
    if max_wallclock_ms is not None and max_wallclock_ms > 0:
        frac = max(frac, elapsed_ms / max_wallclock_ms)
    return min(frac, 1.0)


def looping_due(cfg, step: int, elapsed_ms: float) -> bool:
    """Whether the layers loop from this step on (NUM_LOOPS > 0 and ENABLE_LOOPING_AT reached)."""
    return cfg.num_loops > 0 and training_fraction(step, elapsed_ms, iterations=cfg.iterations,
                                                   max_wallclock_ms=wallclock_cap_ms(cfg)) >= cfg.enable_looping_at


def wallclock_cap_ms(cfg) -> float | None:
    """MAX_WALLCLOCK_SECONDS in ms, or None when there is no cap (0)."""
    return 1000.0 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else None


def learning_rates(cfg, step: int, elapsed_ms: float) -> dict[str, float]:
    """Optimizer group -> learning rate at this step, for a TrainConfig `cfg`."""
    if cfg.warmdown_frac > 0:
        frac = training_fraction(step, elapsed_ms, iterations=cfg.iterations, max_wallclock_ms=wallclock_cap_ms(cfg))
        mul = lr_mul_by_frac(frac, warmdown_frac=cfg.warmdown_frac, min_lr=cfg.min_lr)
    else:
        mul = lr_mul(step, elapsed_ms, iterations=cfg.iterations, warmdown_iters=cfg.warmdown_iters,
                     max_wallclock_ms=wallclock_cap_ms(cfg))
        if cfg.min_lr > 0:
            mul = max(mul, cfg.min_lr)
    return {group: group_lr(group, cfg) * mul for group in param_groups(cfg.model_spec())}


def momentum(cfg, step: int) -> float:
    """Muon momentum at this step, for a TrainConfig `cfg`."""
    return muon_momentum(step, start=cfg.muon_momentum_warmup_start, end=cfg.muon_momentum,
                         warmup_steps=cfg.muon_momentum_warmup_steps)
