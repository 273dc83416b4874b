"""The memory planner: the fewest micro-steps (GRAD_ACCUM_STEPS), and MLX_EAGER_EVAL, whose estimate
(core/memory_estimate.py) fits a budget, or the settings that would. Why: docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ModelSpec
from core.memory_estimate import MLX_DEFAULT_CHUNK_TOKENS, MemoryEstimate, estimate_peak
from core.sizes import GIB


def mlx_chunks(micro_batch_tokens: int, seq_len: int, chunk_tokens: int) -> int:
    """How many chunks of whole sequences (at most chunk_tokens each, one sequence at least) MLX
    splits a micro-batch into (backend_mlx/session.py chunks())."""
    per_chunk = max(1, chunk_tokens // seq_len)
    return -(-(micro_batch_tokens // seq_len) // per_chunk)


def auto_eager_eval(chunks_per_micro_batch: int, micro_steps: int) -> bool:
    """MLX_EAGER_EVAL=auto: on whenever a step is more than one chunk, whether a micro-batch holds
    several or the step accumulates several micro-batches of one (a lazy step keeps every chunk's
    activations until its end). With one chunk, evaluating after it is what the step does anyway."""
    return chunks_per_micro_batch * micro_steps > 1


@dataclass(frozen=True)
class Plan:
    """Settings for one rank that fit `budget` bytes (or the best try, with fits=False)."""

    grad_accum_steps: int
    mlx_eager_eval: bool
    chunks_per_micro_batch: int     # MLX chunks of one micro-batch (1 on torch)
    micro_batch_tokens: int         # tokens of one micro-batch on one rank
    estimate: MemoryEstimate
    budget: int
    fits: bool
    alternatives: tuple[str, ...] = ()   # settings that would fit, when this does not

    def describe(self) -> str:
        head = (f"GRAD_ACCUM_STEPS={self.grad_accum_steps} ({self.micro_batch_tokens} tokens a micro-batch"
                + (f", {self.chunks_per_micro_batch} chunks, eager eval {'on' if self.mlx_eager_eval else 'off'}"
                   if self.chunks_per_micro_batch > 1 or self.mlx_eager_eval else "")
                + f"): {self.estimate.describe()} of a {self.budget / GIB:.2f} GiB budget")
        if self.fits:
            return head
        return head + " -- does not fit; " + self.suggestion()

    def suggestion(self) -> str:
        """What would fit, as settings to type (empty when the plan fits)."""
        if self.fits:
            return ""
        if not self.alternatives:
            return "nothing does at this model size and sequence length: a smaller model or TRAIN_SEQ_LEN"
        return "try " + " or ".join(self.alternatives)


def _micro_step_counts(train_batch_tokens: int, world_size: int, seq_len: int,
                       grad_accum_steps: int | None) -> tuple[int, int, list[int]]:
    """(tokens per rank, sequences per rank, the GRAD_ACCUM_STEPS that split them into whole sequences)."""
    if world_size <= 0 or seq_len <= 0 or train_batch_tokens <= 0:
        raise ValueError("train_batch_tokens, world_size and seq_len must be positive")
    per_rank, rem = divmod(train_batch_tokens, world_size)
    seqs = per_rank // seq_len
    if rem or per_rank % seq_len or seqs == 0:
        raise ValueError(f"TRAIN_BATCH_TOKENS={train_batch_tokens}: must split into WORLD_SIZE={world_size} "
                         f"ranks of whole TRAIN_SEQ_LEN={seq_len} sequences")
    valid = [a for a in range(1, seqs + 1) if seqs % a == 0]
    if grad_accum_steps is not None and grad_accum_steps not in valid:
        raise ValueError(f"GRAD_ACCUM_STEPS={grad_accum_steps}: TRAIN_BATCH_TOKENS={train_batch_tokens} does not "
                         f"split into WORLD_SIZE={world_size} x {grad_accum_steps} micro-batches of whole "
                         f"TRAIN_SEQ_LEN={seq_len} sequences")
    return per_rank, seqs, valid


def _what_would_fit(make, estimate, tried: Plan, valid: list[int], seqs: int, *, mlx: bool,
                    mlx_eager_eval: bool | None, seq_len: int, world_size: int, budget_bytes: int,
                    val_batch_tokens: int) -> tuple[str, ...]:
    """Settings to type that would fit when `tried` does not: the fewest micro-steps that fit, the
    largest batch that fits with tried's accumulation, a smaller validation batch."""
    alternatives = []
    for a in valid:
        for eager in ([mlx_eager_eval] if mlx_eager_eval is not None or not mlx else [None, True]):
            p = make(a, eager)
            if p.fits:
                alternatives.append(f"GRAD_ACCUM_STEPS={a}" + (" MLX_EAGER_EVAL=1" if p.mlx_eager_eval else ""))
                break
        if alternatives:
            break
    # The largest batch that fits with the chosen accumulation (one micro-batch per rank per step).
    a = tried.grad_accum_steps
    fit_seqs = 0
    for s in range(1, seqs + 1):
        if estimate(s * seq_len, a, tried.mlx_eager_eval).total > budget_bytes:
            break
        fit_seqs = s
    if fit_seqs:
        alternatives.append(f"TRAIN_BATCH_TOKENS<={fit_seqs * seq_len * world_size * a}"
                            + (f" (GRAD_ACCUM_STEPS={a})" if a > 1 else ""))
    if val_batch_tokens > 0 and tried.estimate.phase == "validation":
        alternatives.append(f"VAL_BATCH_SIZE smaller than {val_batch_tokens * world_size}")
    return tuple(alternatives)


def plan_micro_steps(spec: ModelSpec, *, train_batch_tokens: int, world_size: int, seq_len: int,
                     budget_bytes: int, backend: str, device: str, compute_dtype: str,
                     val_batch_tokens: int = 0, mlx_chunk_tokens: int = MLX_DEFAULT_CHUNK_TOKENS,
                     compiled: bool = False, grad_accum_steps: int | None = None,
                     mlx_eager_eval: bool | None = None, ema: bool = False) -> Plan:
    """The fewest micro-steps (GRAD_ACCUM_STEPS) whose estimate fits the budget.

    Candidates are the A for which TRAIN_BATCH_TOKENS splits into world_size x A micro-batches of whole
    seq_len sequences. grad_accum_steps / mlx_eager_eval given: used as they are (the plan then only
    says whether they fit). mlx_eager_eval=None: on (MLX) whenever a step has more than one chunk
    (auto_eager_eval), since with one chunk it changes nothing; measured on MLX's CPU backend it is both smaller
    and faster (65,536 tokens a step, 4 x 256, seq 1024: 8,235 MiB off vs 1,329 MiB on, 2:30 vs 2:00).
    `val_batch_tokens` is this rank's share of VAL_BATCH_SIZE (VAL_BATCH_SIZE / world_size); with A
    micro-steps validation runs in batches of 1/A of it, as the reference trainers do
    (trainer/validation.py), so more micro-steps also shrink validation. `ema`: EMA_DECAY > 0 (its copy
    of the weights is kept through every phase).
    """
    per_rank, seqs, valid = _micro_step_counts(train_batch_tokens, world_size, seq_len, grad_accum_steps)
    mlx = backend == "mlx"

    def estimate(micro: int, a: int, eager: bool) -> MemoryEstimate:
        val_tokens = max(val_batch_tokens // a, seq_len) if val_batch_tokens > 0 else 0
        return estimate_peak(spec, backend=backend, device=device, compute_dtype=compute_dtype,
                             micro_batch_tokens=micro, seq_len=seq_len, val_batch_tokens=val_tokens,
                             mlx_chunk_tokens=mlx_chunk_tokens, mlx_eager_eval=eager,
                             compiled=compiled, grad_accum_steps=a, ema=ema)

    def make(a: int, eager: bool | None) -> Plan:
        micro = per_rank // a
        chunks = mlx_chunks(micro, seq_len, mlx_chunk_tokens) if mlx else 1
        if eager is None:
            eager = mlx and auto_eager_eval(chunks, a)
        est = estimate(micro, a, bool(eager and mlx))
        return Plan(a, bool(eager and mlx), chunks, micro, est, int(budget_bytes), est.total <= budget_bytes)

    candidates = [grad_accum_steps] if grad_accum_steps is not None else valid
    tried = None
    for a in candidates:
        tried = make(a, mlx_eager_eval)
        if tried.fits:
            return tried
    # Nothing fits: say what would.
    alternatives = _what_would_fit(make, estimate, tried, valid, seqs, mlx=mlx, mlx_eager_eval=mlx_eager_eval,
                                   seq_len=seq_len, world_size=world_size, budget_bytes=budget_bytes,
                                   val_batch_tokens=val_batch_tokens)
    return Plan(tried.grad_accum_steps, tried.mlx_eager_eval, tried.chunks_per_micro_batch,
                tried.micro_batch_tokens, tried.estimate, int(budget_bytes), False, alternatives)
