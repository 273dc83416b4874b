"""The memory estimate: one rank's peak memory as the largest of three phases (the backward, the
optimizer step, validation), from the spec and the batch geometry. The kept tensors are counted in
core/memory_kept.py; what is counted and why: docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from core.config import ModelSpec
from core.memory_kept import (_kept_per_layer, _layout_kept_per_layer, _mlx_attention_transient,
                              _record_attention_kept, blocked_attention_elements, ema_bytes, newton_schulz_bytes,
                              parameter_bytes)
from core.params import MATRIX, param_table
from core.sizes import ATTENTION_BLOCK, GIB

MLX_DEFAULT_CHUNK_TOKENS = 8192

BACKENDS = ("torch", "mlx")
DEVICES = ("cpu", "cuda", "metal", "mps")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's estimated peak memory in bytes, by what holds it (see the module docstring)."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    transient: int
    total: int = field(default=0)
    phase: str = "backward"      # which phase peaks: "backward", "optimizer" or "validation"
    ema: int = 0                 # the moving average of the weights (EMA_DECAY > 0)

    def __post_init__(self):
        if not self.total:
            object.__setattr__(self, "total", self.weights + self.grads + self.optimizer + self.ema
                               + self.activations + self.logits + self.transient)

    def describe(self) -> str:
        """One line, e.g. "est 1.23 GiB (weights 0.01, grads 0.01, optimizer 0.02, ... GiB; peak in backward)"."""
        names = ("weights", "grads", "optimizer") + (("ema",) if self.ema else ()) + ("activations", "logits",
                                                                                      "transient")
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}" for name in names)
        return f"est {self.total / GIB:.2f} GiB ({parts} GiB; peak in {self.phase})"


def _check_geometry(backend: str, device: str, compute_dtype: str, micro_batch_tokens: int, seq_len: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: must be one of {', '.join(DEVICES)}")
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: must be float32 or bfloat16")
    if micro_batch_tokens <= 0 or seq_len <= 0 or micro_batch_tokens % seq_len:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens}: must be a positive multiple of seq_len={seq_len}")


def _chunk_rows(tokens: int, seq_len: int, mlx: bool, mlx_chunk_tokens: int) -> list[int]:
    """Sequences per chunk: MLX splits a batch into chunks of whole sequences; torch does not."""
    seqs = tokens // seq_len
    if not mlx:
        return [seqs]
    per = max(1, mlx_chunk_tokens // seq_len)
    return [min(per, seqs - i) for i in range(0, seqs, per)]


def _kept_and_transient(spec: ModelSpec, seqs: int, *, backend: str, device: str, c: int, seq_len: int,
                        compiled: bool) -> tuple[int, int, int]:
    """(activations, logits, backward transient) of one chunk / micro-batch of `seqs` sequences."""
    d, V, H = spec.model_dim, spec.vocab_size, spec.num_heads
    mlx, fused = backend == "mlx", device != "cpu"
    N = seqs * seq_len
    D = N * d * 4
    NV = N * V * 4
    if fused:
        P32 = 0
        # Metal's unfused training SDPA, and torch's math path on mps
        probs = seqs * H * seq_len * seq_len * c if mlx or device == "mps" else 0
    else:
        P32 = 4 * blocked_attention_elements(seqs, H, seq_len)
        probs = 0
    # A looped block keeps its tensors once per pass: the looped graph's block calls (docs/spec.md §4.10).
    calls = spec.block_calls(looping=True)
    acts = calls * (_kept_per_layer(backend, c, N, spec, P32, fused, compiled) + probs
                    + _layout_kept_per_layer(c, N, spec))
    acts += N * d * 4                                   # the embedding (the first norm's input)
    acts += _record_attention_kept(spec, N, seq_len, c, fused)
    # The head: the final norm's input and output (the head's input, in the compute dtype), the
    # tanh output and the log-softmax / logits, fp32.
    logits = N * d * 4 + N * d * c + 2 * NV
    if mlx and not fused:
        attn_t = _mlx_attention_transient(c, N, spec, seq_len, P32, grad=True)
        head_t = 4 * NV
    else:
        # torch (and the fused paths): autograd runs one node at a time. The head's backward
        # holds ~3 N*V arrays; the CPU attention one block's scores, probabilities and their
        # gradients (4 arrays of the last, widest block); the MLP's backward ~3 N*F.
        last = seqs * H * min(ATTENTION_BLOCK, seq_len) * seq_len * 4
        attn_t = 4 * last if not fused else 2 * probs
        head_t = 3 * NV
    if mlx and not fused:
        transient = max(attn_t, head_t)       # fitted on whole chunks: includes the gradients' work
    else:
        transient = max(attn_t, head_t, 3 * N * spec.hidden_dim * 4) + 2 * D   # + the residual's gradient
    return acts, logits, transient


def _backward_phase(kept, rows: list[int], weights: int, optimizer: int, *, mlx: bool, mlx_eager_eval: bool,
                    grad_accum_steps: int) -> MemoryEstimate:
    """The backward: weights, gradients, optimizer state, the kept tensors and the backward's working
    set. kept(seqs) -> (activations, logits, transient) of one chunk of `seqs` sequences."""
    one_acts, one_logits, one_trans = kept(max(rows))
    if mlx and not mlx_eager_eval:
        # One graph per step: the forward of every chunk of every micro-batch is evaluated first.
        acts = logits = 0
        for r in rows:
            a, lg, _ = kept(r)
            acts, logits = acts + a, logits + lg
        acts, logits = acts * grad_accum_steps, logits * grad_accum_steps
        grads = weights * (len(rows) * grad_accum_steps + 1)    # each chunk's gradient + their running sum
    else:
        acts, logits = one_acts, one_logits
        grads = weights * (2 if mlx else 1)                     # MLX: the chunk's gradient + the running sum
    return MemoryEstimate(weights, grads, optimizer, acts, logits, one_trans, phase="backward")


def _optimizer_phase(spec: ModelSpec, backend: str, weights: int, optimizer: int) -> MemoryEstimate:
    """The optimizer step: gradients, plus the new weights and state beside the old ones (MLX builds
    new arrays), or Muon's flat update vector (torch) and Newton-Schulz work."""
    matrices = [p for p in param_table(spec) if p.group == MATRIX]
    ns_work = newton_schulz_bytes(spec, backend)
    step_extra = (weights + optimizer if backend == "mlx" else sum(4 * p.numel for p in matrices)) + ns_work
    return MemoryEstimate(weights, weights, optimizer, 0, 0, step_extra, phase="optimizer")


def _validation_phase(spec: ModelSpec, vrows: int, weights: int, optimizer: int, *, backend: str, device: str,
                      c: int, seq_len: int) -> MemoryEstimate:
    """Validation: one forward without gradients, of the whole local batch (torch) or chunk by chunk
    (MLX); vrows: sequences of that batch or chunk."""
    H = spec.num_heads
    N = vrows * seq_len
    D, NV = N * spec.model_dim * 4, N * spec.vocab_size * 4
    if backend == "mlx" and device == "cpu":
        P32 = 4 * blocked_attention_elements(vrows, H, seq_len)
        attn = _mlx_attention_transient(c, N, spec, seq_len, P32, grad=False)
        head = 3 * NV + 2 * D
    else:
        last = vrows * H * min(ATTENTION_BLOCK, seq_len) * seq_len * 4
        math_scores = 2 * vrows * H * seq_len * seq_len * c if device == "mps" else 0   # scores, probabilities
        attn = (2 * last if device == "cpu" else math_scores) + 6 * D
        head = 3 * NV + 2 * D
    return MemoryEstimate(weights, 0, optimizer, 0, 0, max(attn, head, 6 * D + 3 * N * spec.hidden_dim * c),
                          phase="validation")


def estimate_peak(spec: ModelSpec, *, backend: str, device: str, compute_dtype: str, micro_batch_tokens: int,
                  seq_len: int, val_batch_tokens: int = 0, mlx_chunk_tokens: int = MLX_DEFAULT_CHUNK_TOKENS,
                  mlx_eager_eval: bool = False, compiled: bool = False, grad_accum_steps: int = 1,
                  ema: bool = False) -> MemoryEstimate:
    """Peak memory in bytes of one rank's training step (and validation, when val_batch_tokens > 0).

    backend "torch" or "mlx"; device "cpu", "cuda" (torch) or "metal" (mlx); compute_dtype "float32"
    or "bfloat16"; micro_batch_tokens: tokens of one micro-batch on this rank (a whole number of
    seq_len sequences); val_batch_tokens: this rank's validation batch (VAL_BATCH_SIZE / world size;
    0 = no validation); mlx_chunk_tokens / mlx_eager_eval: MLX_MAX_MICROBATCH_TOKENS and
    MLX_EAGER_EVAL; grad_accum_steps: micro-batches per step (matters to MLX without eager eval,
    where the whole step is one graph); ema: EMA_DECAY > 0, a moving average of the weights beside them.
    """
    _check_geometry(backend, device, compute_dtype, micro_batch_tokens, seq_len)
    c = DTYPE_BYTES[compute_dtype]
    weights, optimizer = parameter_bytes(spec)
    mlx = backend == "mlx"

    def kept(seqs: int) -> tuple[int, int, int]:
        return _kept_and_transient(spec, seqs, backend=backend, device=device, c=c, seq_len=seq_len,
                                   compiled=compiled)

    rows = _chunk_rows(micro_batch_tokens, seq_len, mlx, mlx_chunk_tokens)
    phases = [_backward_phase(kept, rows, weights, optimizer, mlx=mlx, mlx_eager_eval=mlx_eager_eval,
                              grad_accum_steps=grad_accum_steps),
              _optimizer_phase(spec, backend, weights, optimizer)]
    if val_batch_tokens > 0:
        vrows = max(_chunk_rows(max(val_batch_tokens // seq_len, 1) * seq_len, seq_len, mlx, mlx_chunk_tokens))
        phases.append(_validation_phase(spec, vrows, weights, optimizer, backend=backend, device=device, c=c,
                                        seq_len=seq_len))
    if ema:   # kept through every phase (total=0: summed again)
        phases = [replace(p, ema=ema_bytes(spec, backend, in_step=p.phase == "optimizer"), total=0) for p in phases]
    return max(phases, key=lambda e: e.total)
