"""The run's plan, made before anything is written: the device, dtype and compile choices, micro-steps,
MLX's chunks and eager eval, and the memory estimate against the budget (core/memory.py does the
arithmetic). Every "auto" is resolved here, from the settings and the facts a backend reports; past
the plan there are plain values only.

    DEVICE             torch: cuda, cpu or mps, honoured; or auto: cuda when available, else the CPU
    COMPUTE_DTYPE      float32 or bfloat16, honoured; or auto: bf16 where the device has bf16 tensor cores
    COMPILE            1 or 0, honoured; or auto: on CUDA and Metal, off elsewhere (measured: below)

    MEMORY_BUDGET_GB   a number (GiB, 2**30 bytes, as RAM is sold), or auto: a fraction of what the
                       device offers (core.memory.default_budget_bytes: 0.8 of CUDA's free memory,
                       0.75 of Metal's recommended working set, 0.6 of the machine's RAM)
    GRAD_ACCUM_STEPS   a number, honoured; or auto: the fewest micro-steps whose estimate fits
    MLX_EAGER_EVAL     1 or 0, honoured; or auto: on whenever a step has more than one chunk (several
                       chunks a micro-batch, or several micro-batches of one)

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
# COMPILE=auto compiles where it pays. torch on the CPU (2 cores, 2,048 tokens a step): 0.79 s a step
# compiled against 1.08 s eager in bf16, 2.72 s against 2.90 s in fp32, but the first step took
# 70-80 s to compile, so it pays only after ~250-400 steps, more than the CPU presets and tests run.
# MLX's CPU backend (mlx 0.32.4, d=128, 4 layers, 1024 tokens a step): 0.89-0.91 s a step either way
# (the products dominate), while the first compiled step took 4.4 s instead of 1.0 s building C++
# kernels with the system compiler, which a CPU-only machine may not have. torch on mps is an opt-in
# cross-check, left eager. `make bench` measures it again.
COMPILE_PAYS = ("cuda", "metal")


def device_choice(device: str, cuda: bool, mps: bool, world_size: int) -> str:
    """torch's DEVICE from the setting and what this machine has: "cuda", "mps" or "cpu". mps is
    opt-in (auto never picks it): on a Mac MLX is the trainer, torch on mps cross-checks the model."""
    if device == "cuda" and not cuda:
        raise ConfigError("DEVICE=cuda: CUDA is not available on this machine (use DEVICE=cpu or make train-cpu)")
    if device == "mps" and not mps:
        raise ConfigError("DEVICE=mps: torch's Apple GPU backend is not available on this machine (use DEVICE=cpu)")
    if device == "mps" and world_size > 1:
        raise ConfigError(f"DEVICE=mps: one process only (WORLD_SIZE={world_size}); torch has no collective backend for mps")
    if device == AUTO:
        return "cuda" if cuda else "cpu"
    return device


def runtime_choices(cfg: TrainConfig, device_kind: str, bf16_supported: bool) -> tuple[str, bool]:
    """(compute dtype, compiled) of a session on `device_kind` ("cpu", "cuda", "mps", "metal") whose
    device has bf16 tensor cores or not: COMPUTE_DTYPE and COMPILE as set, or auto (COMPILE_PAYS)."""
    compute_dtype = cfg.compute_dtype if cfg.compute_dtype != AUTO else ("bfloat16" if bf16_supported else "float32")
    return compute_dtype, cfg.compile == "1" or (cfg.compile == AUTO and device_kind in COMPILE_PAYS)


def wired_limit_bytes(cfg: TrainConfig, offered_bytes: int, local_ranks: int) -> int | None:
    """Metal: the bytes a rank keeps wired (resident, so macOS does not page them out, as mlx-lm
    does): the plan's budget, never more than this rank's share of the recommended working set
    (local ranks each wiring the whole can panic the kernel). None while MEMORY_BUDGET_GB is still
    auto: a session set up without a plan (a benchmark, a test) wires nothing."""
    if cfg.memory_budget_gb == AUTO:
        return None
    return min(int(cfg.memory_budget_gb * GIB), offered_bytes // max(local_ranks, 1))


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
            mlx_eager_eval=None if cfg.mlx_eager_eval == AUTO else cfg.mlx_eager_eval,
            ema=cfg.ema_decay > 0)
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
