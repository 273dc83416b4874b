"""The run's plan, made before anything is written: micro-steps, MLX's chunks and eager eval, and
the memory estimate against the budget (core/memory.py does the arithmetic).

    MEMORY_BUDGET_GB   a number (GiB, 2**30 bytes, as RAM is sold), or auto: a fraction of what the
                       device offers (core.memory.default_budget_bytes: 0.8 of CUDA's free memory,
                       0.75 of Metal's recommended working set, 0.6 of the machine's RAM)
    GRAD_ACCUM_STEPS   a number, honoured; or auto: the fewest micro-steps whose estimate fits
    MLX_EAGER_EVAL     1 or 0, honoured; or auto: on whenever a micro-batch has more than one chunk

A plan that does not fit stops the run with one line naming the estimate, the budget and settings
that would fit. `--plan` (PLAN=1) prints the plan and exits without writing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import memory
from core.config import AUTO, TrainConfig
from core.errors import ConfigError
from core.sizes import GIB
from trainer.backend import TrainerBackend

# torch on Apple's GPU: SDPA's math path (T x T probabilities kept), and a budget like Metal's (unified memory).
ESTIMATE_DEVICE = {"cpu": "cpu", "cuda": "cuda", "metal": "metal", "mps": "mps"}
BUDGET_DEVICE = {"cpu": "cpu", "cuda": "cuda", "metal": "metal", "mps": "metal"}
DEVICE_MEMORY = {"cpu": "RAM", "cuda": "free CUDA memory", "metal": "Metal's recommended working set",
                 "mps": "Metal's recommended working set"}


@dataclass(frozen=True)
class RunGeometry:
    """How a run's tokens are cut, resolved once by the plan: plain numbers, no "auto" past here."""
    world_size: int
    micro_steps: int           # micro-batches per optimizer step on each rank (GRAD_ACCUM_STEPS)
    micro_batch_tokens: int    # tokens of one micro-batch on one rank (whole sequences)
    seq_len: int               # TRAIN_SEQ_LEN
    val_batch_seqs: int        # sequences of one validation batch on each rank
    sliding_batch_seqs: int    # windows of one sliding-evaluation batch on each rank
    chunk_tokens: int          # MLX: at most this many tokens a chunk (MLX_MAX_MICROBATCH_TOKENS)
    eager_eval: bool           # MLX: evaluate after each chunk (MLX_EAGER_EVAL)


def micro_batch_tokens(cfg: TrainConfig, world_size: int, micro_steps: int) -> int:
    """Tokens of one micro-batch on one rank: docs/spec.md §7's one geometry check, and its one error."""
    per_micro, rem = divmod(cfg.train_batch_tokens, world_size * micro_steps)
    if rem or per_micro % cfg.train_seq_len or per_micro == 0:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens}: must split into WORLD_SIZE={world_size} x "
            f"GRAD_ACCUM_STEPS={micro_steps} micro-batches of whole TRAIN_SEQ_LEN={cfg.train_seq_len} sequences")
    return per_micro


def run_geometry(cfg: TrainConfig, world_size: int, micro_steps: int, eager_eval: bool,
                 training: bool = True) -> RunGeometry:
    """The geometry of `cfg` on `world_size` ranks with `micro_steps` micro-steps. Validation runs in
    batches of VAL_BATCH_SIZE / (WORLD_SIZE x GRAD_ACCUM_STEPS) tokens a rank, as the reference
    trainers do: the micro-steps that fit training's memory keep validation's small too; a sliding
    batch holds EVAL_BATCH_SEQS windows, else as many as that batch holds tokens. training=False
    (make eval): no training batch to check."""
    local_val = cfg.val_batch_size // (world_size * micro_steps)
    return RunGeometry(
        world_size=world_size, micro_steps=micro_steps,
        micro_batch_tokens=micro_batch_tokens(cfg, world_size, micro_steps) if training else 0,
        seq_len=cfg.train_seq_len,
        val_batch_seqs=max(local_val, cfg.train_seq_len) // cfg.train_seq_len,
        sliding_batch_seqs=cfg.eval_batch_seqs or max(local_val // cfg.eval_window, 1),
        chunk_tokens=cfg.mlx_max_microbatch_tokens, eager_eval=eager_eval)


def eval_geometry(cfg: TrainConfig, world_size: int) -> RunGeometry:
    """The geometry of an evaluation without training (make eval): GRAD_ACCUM_STEPS as set, auto = 1."""
    micro_steps = 1 if cfg.grad_accum_steps == AUTO else cfg.grad_accum_steps
    return run_geometry(cfg, world_size, micro_steps, eager_eval=cfg.mlx_eager_eval is True, training=False)


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig              # resolved: GRAD_ACCUM_STEPS and MLX_EAGER_EVAL as numbers, the budget in GiB
    geometry: RunGeometry
    memory: memory.Plan
    budget_source: str            # where the budget came from, for the log
    backend_name: str
    compute_dtype: str
    compiled: bool

    def log_line(self) -> str:
        cfg, m = self.cfg, self.memory
        eager = f" eager_eval:{int(m.mlx_eager_eval)}" if self.backend_name == "mlx" else ""
        return (f"memory_plan: grad_accum_steps:{cfg.grad_accum_steps} micro_batch_tokens:{m.micro_batch_tokens}"
                f" chunks:{m.chunks_per_micro_batch}{eager} estimated_peak:{m.estimate.total / GIB:.2f}GiB"
                f" budget:{m.budget / GIB:.2f}GiB ({self.budget_source})")

    def describe(self, backend: TrainerBackend) -> list[str]:
        """What --plan prints: the resolved run, one fact a line."""
        cfg, m = self.cfg, self.memory
        steps = f"{cfg.iterations} steps" + (f", at most {cfg.max_wallclock_seconds:g} s of training"
                                              if cfg.max_wallclock_seconds > 0 else "")
        lines = [
            f"plan for {backend.name} on {backend.device} (world size {backend.world_size}):",
            f"  compute dtype {self.compute_dtype}, compile {'on' if self.compiled else 'off'}",
            f"  {cfg.train_batch_tokens:,} tokens a step = {backend.world_size} rank(s) x {cfg.grad_accum_steps} "
            f"micro-step(s) x {m.micro_batch_tokens:,} tokens ({m.micro_batch_tokens // cfg.train_seq_len} sequences "
            f"of {cfg.train_seq_len}); {steps}",
        ]
        if backend.name == "mlx":
            lines.append(f"  MLX: {m.chunks_per_micro_batch} chunk(s) of at most {cfg.mlx_max_microbatch_tokens:,} "
                         f"tokens a micro-batch, eager eval {'on' if m.mlx_eager_eval else 'off'}")
        lines += [
            f"  memory: {m.estimate.describe()}",
            f"  budget: {m.budget / GIB:.2f} GiB ({self.budget_source}): "
            + ("fits" if m.fits else "does NOT fit; " + m.suggestion()),
        ]
        return lines


def budget_bytes(cfg: TrainConfig, backend: TrainerBackend) -> tuple[int, str]:
    """The budget in bytes and where it came from."""
    if cfg.memory_budget_gb != AUTO:
        return int(cfg.memory_budget_gb * GIB), f"MEMORY_BUDGET_GB={cfg.memory_budget_gb:g}"
    offered = backend.device_memory_bytes()
    if not offered:
        raise ConfigError("MEMORY_BUDGET_GB=auto: this machine does not say how much memory it has; "
                          "set MEMORY_BUDGET_GB to a number of GiB")
    kind = BUDGET_DEVICE[backend.device_kind]
    fraction = memory.BUDGET_FRACTION[kind]
    # Local ranks on one CPU or Mac share its memory: each plans for its share (each budgeting the whole
    # would fill it several times over, and wire that much on Metal).
    share = max(backend.local_ranks, 1)
    return (memory.default_budget_bytes(kind, offered) // share,
            f"auto: {fraction:g} of {offered / GIB:.1f} GiB {DEVICE_MEMORY[backend.device_kind]}"
            + (f", split between {share} local ranks" if share > 1 else ""))


def make_plan(cfg: TrainConfig, backend: TrainerBackend) -> RunPlan:
    """The resolved run for this backend, fitting or not (check_fits refuses one that does not); a
    one-line ConfigError when the batch geometry or the budget cannot be resolved."""
    spec = cfg.model_spec()
    world = backend.world_size
    # GRAD_ACCUM_STEPS=auto: each rank's share must be whole sequences; the memory plan picks the split.
    micro_batch_tokens(cfg, world, 1 if cfg.grad_accum_steps == AUTO else cfg.grad_accum_steps)
    compute_dtype, compiled = backend.runtime_choices(cfg)
    budget, source = budget_bytes(cfg, backend)
    try:
        plan = memory.plan_micro_steps(
            spec, train_batch_tokens=cfg.train_batch_tokens, world_size=world, seq_len=cfg.train_seq_len,
            budget_bytes=budget, backend=backend.name, device=ESTIMATE_DEVICE[backend.device_kind],
            compute_dtype=compute_dtype, val_batch_tokens=max(cfg.val_batch_size // world, cfg.train_seq_len),
            mlx_chunk_tokens=cfg.mlx_max_microbatch_tokens, compiled=compiled,
            grad_accum_steps=None if cfg.grad_accum_steps == AUTO else cfg.grad_accum_steps,
            mlx_eager_eval=None if cfg.mlx_eager_eval == AUTO else cfg.mlx_eager_eval)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resolved = cfg.replace(grad_accum_steps=plan.grad_accum_steps, mlx_eager_eval=plan.mlx_eager_eval,
                           memory_budget_gb=budget / GIB)
    geometry = run_geometry(resolved, world, plan.grad_accum_steps, plan.mlx_eager_eval)
    return RunPlan(resolved, geometry, plan, source, backend.name, compute_dtype, compiled)


def check_fits(run_plan: RunPlan) -> None:
    m = run_plan.memory
    if not m.fits:
        raise ConfigError(f"memory plan: estimated peak {m.estimate.total / GIB:.2f} GiB per device exceeds the "
                          f"{m.budget / GIB:.2f} GiB budget ({run_plan.budget_source}) with GRAD_ACCUM_STEPS="
                          f"{m.grad_accum_steps}; {m.suggestion()}, or raise MEMORY_BUDGET_GB (nothing was written)")
