"""The memory plan: a run's peak memory, estimated from its settings before anything is allocated.

    estimate_peak(spec, backend=..., device=..., ...)  -> MemoryEstimate (bytes, with a breakdown)
    plan_micro_steps(spec, train_batch_tokens=..., budget_bytes=..., ...) -> Plan (GRAD_ACCUM_STEPS
        and MLX_EAGER_EVAL that fit a budget, or the settings that would)
    default_budget_bytes(device_kind, device_total_bytes), machine_ram_bytes()

Pure arithmetic on the model spec and the batch geometry (microseconds); imports nothing but the
standard library and core.config / core.params.

What is counted (one rank; B*T = N tokens of one micro-batch or chunk, d model_dim, V vocab, c the
compute dtype's bytes, 4 for fp32 and 2 for bf16; "D" below is N*d*4 bytes, one fp32 residual):

    weights      every parameter of core.params.param_table, fp32 master copy
    grads        one fp32 gradient per parameter (MLX without eager eval: one per chunk, since every
                 chunk's gradient is a separate lazy array until the step is evaluated)
    optimizer    Adam: exp_avg + exp_avg_sq (2 slots), Muon: momentum_buffer (1 slot); the groups of
                 core.params (matrix -> Muon, the rest -> Adam), as core.params.optimizer_slots says
    activations  the tensors autograd keeps for the backward, counted op by op from
                 backend_torch/model.py and backend_mlx/model.py (see _kept_per_layer): the residual
                 stream, each norm's input, each Linear's input in the compute dtype (a bf16 cast per
                 Linear: three for q/k/v), the rotated q, the attention probabilities, the relu² MLP's
                 hidden tensors. Per layer that is, fp32 / bf16:
                    torch  16.5 D + P        / 13 D + 1.5 P      (F.relu keeps its output only)
                    mlx    20 D + P          / 15.5 D + 1.5 P    (maximum/square keep their inputs)
                 where P is the attention probabilities the backward keeps: the blocked causal
                 attention of the CPU (blocks of ATTENTION_BLOCK = 128 queries read only the keys
                 they may see: 9/16 of the T x T square at T = 1024) in fp32, plus a bf16 copy in
                 bf16. MLX evaluates lazily: without MLX_EAGER_EVAL every chunk of every micro-batch
                 of the step is one graph, whose forward passes are all evaluated before the backward
                 passes (MLX orders its tape breadth first), so the activations of every chunk of the
                 step are alive at once; with it, those of one chunk.
    logits       what the backward keeps of the head: the softcap's tanh output and the loss's
                 log-softmax (torch) or logits (MLX), 2 x N*V fp32, plus the final norm's input/output
    transient    the largest working set on top of that: the head's backward (torch ~3, MLX ~4 N*V
                 fp32 arrays), the attention's (torch: one block's scores, probabilities and their
                 gradients at a time; MLX's CPU backend evaluates the same op of every query block of a
                 layer together, see _mlx_attention_transient), the optimizer step (new weights and
                 state beside the old in MLX, Muon's flat update in torch), and validation: one
                 forward of the VAL_BATCH_SIZE batch without gradients (torch evaluates the whole local
                 validation batch at once, MLX chunks it like a training micro-batch).

The peak is the largest of three phases: the backward (weights + grads + optimizer + activations +
logits + the backward's transient), the optimizer step and validation. `transient` is the part of
the winning phase that the first five fields do not cover.

Where the figures come from. The kept tensors are counted from the code above and were checked
against MLX's mx.get_peak_memory() on its CPU backend: the peak grows by exactly 20 D + P per layer
(fp32) and 15.5 D + 1.5 P (bf16) over d = 128..512, T = 256..2048, 2..8 heads. Two transient terms
of MLX's CPU path are fitted, not derived: the working set of the attention's backward (13 Q + 2 P
in fp32, 8 Q + 1.7 P in bf16, Q = N*H*128*4 bytes, one 128-key-wide score row per query) and of
its forward without gradients (0.5 Q + 3 P + 7 D); they were measured on isolated layers (not the
grid of bench/memory_grid.py, which validates the whole estimate: within ±25% of the measured peak
at every point, both backends -- within 8% in fact; run `python -m bench.memory_grid`).

torch on the CPU: the estimate is the peak of live tensors, which the grid measures as the resident
peak under MALLOC_MMAP_THRESHOLD_=1048576 (within 7%). With glibc's default heuristics the process's
resident peak is higher, 8% to 100% in the grid (most with gradient accumulation and bf16): after
the first large free glibc raises its mmap threshold (up to 32 MiB), later activations come from
the heap, and freed heap memory stays resident. The CPU budget's 0.6 of RAM leaves room for it;
a trainer can remove it by starting with MALLOC_MMAP_THRESHOLD_ set.

CUDA and Metal cannot be measured on the machine this was written on; they are modelled from first
principles and are less certain:
    cuda   F.scaled_dot_product_attention (flash / memory-efficient kernels): no T x T matrix at all,
           it keeps q, k, v, its output and a logsumexp of N*H fp32. torch.compile (on by default
           on CUDA) fuses the elementwise chains, so inductor saves fewer of them: the norm
           inputs and the rotary/mix/scale elementwise outputs are recomputed; modelled as keeping
           the Linear inputs, q/k/v, the attention output, the residual stream and the MLP hidden.
    metal  mx.fast.scaled_dot_product_attention: MLX runs its unfused form while training (it is
           faster on Metal, says MLX), so the backward keeps the whole B x H x T x T probabilities in
           the compute dtype, and the working set holds the scores as well; without gradients
           (validation) the fused kernel runs and nothing T x T is allocated. mx.compile fuses
           elementwise chains much as inductor does.
    mps    torch on Apple's GPU trains through SDPA's math path (backend_torch/attention_kernels.py):
           as Metal's unfused form, the B x H x T x T probabilities are kept in the compute dtype and
           the scores sit beside them while they are computed, in validation too.

Budget (default_budget_bytes): the share of a device a plan may use.
    cuda   0.80 of the free memory (torch.cuda.mem_get_info): the CUDA context, cuDNN/cuBLAS
           workspaces, NCCL buffers and the caching allocator's fragmentation take the rest, and
           the estimate does not see them.
    metal  0.75 of mx.metal's recommended working set (device_info()["max_recommended_working_set_size"]):
           past it macOS starts paging the GPU's memory, and the window server and other apps
           share the same unified memory.
    cpu    0.60 of the machine's RAM (machine_ram_bytes): the interpreter and libraries (~0.5-1 GB
           with torch), the data loader's shards, the page cache and the other processes of a
           shared machine live in the same RAM, and there is no swap to fall back on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from core.config import AUTO, ModelSpec
from core.optimizer import shape_groups
from core.params import MATRIX, param_table
from core.sizes import ATTENTION_BLOCK, GIB, MIB

MLX_DEFAULT_CHUNK_TOKENS = 8192

BACKENDS = ("torch", "mlx")
DEVICES = ("cpu", "cuda", "metal", "mps")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

# Shares of a device a plan may fill (see the module docstring).
BUDGET_FRACTION = {"cuda": 0.80, "metal": 0.75, "cpu": 0.60}


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------

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

    def __post_init__(self):
        if not self.total:
            object.__setattr__(self, "total", self.weights + self.grads + self.optimizer + self.activations
                               + self.logits + self.transient)

    def describe(self) -> str:
        """One line, e.g. "est 1.23 GiB (weights 0.01, grads 0.01, optimizer 0.02, ... GiB; peak in backward)"."""
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.2f}"
                          for name in ("weights", "grads", "optimizer", "activations", "logits", "transient"))
        return f"est {self.total / GIB:.2f} GiB ({parts} GiB; peak in {self.phase})"


def parameter_bytes(spec: ModelSpec) -> tuple[int, int]:
    """(fp32 bytes of all parameters, fp32 bytes of their optimizer state: Muon 1 slot, Adam 2)."""
    weights = state = 0
    for p in param_table(spec):
        weights += 4 * p.numel
        state += 4 * p.numel * (1 if p.group == MATRIX else 2)
    return weights, state


def blocked_attention_elements(seqs: int, heads: int, seq_len: int, block: int = ATTENTION_BLOCK) -> int:
    """Probabilities the CPU's blocked causal attention keeps per layer: each block of `block`
    queries reads the keys up to its last query (9/16 of T*T at T = 1024, block 128)."""
    total, start = 0, 0
    while start < seq_len:
        stop = min(start + block, seq_len)
        total += (stop - start) * stop
        start = stop
    return seqs * heads * total


def _kept_per_layer(backend: str, c: int, N: int, spec: ModelSpec, P32: int, fused: bool,
                    compiled: bool) -> int:
    """Bytes one block keeps for the backward, counted tensor by tensor (N tokens; P32: bytes of the
    fp32 attention probabilities the blocked path keeps; fused: SDPA / mx.fast without T x T)."""
    d, kv, F = spec.model_dim, spec.kv_dim, spec.hidden_dim
    f32 = 4
    bf16 = c == 2
    # The residual stream: the block's input (mix[0] * x keeps it), the mixed x (first norm's input),
    # x after attention (second norm's input).
    resid = 3 * N * d * f32
    # Each Linear keeps its input in the compute dtype: fp32 shares one tensor for q/k/v; bf16 casts
    # once per Linear (no CSE outside compile). attn proj keeps y (a copy: transpose + reshape).
    lin_in = (3 if bf16 else 1) * N * d * c + N * d * c + N * d * c      # q/k/v input, proj input y, fc input
    # q: the first norm's input (fp32), q*q_gain keeps the rotated q (fp32), the attention keeps the
    # per-block copies of q (compute dtype); k: its norm's input (fp32) and the rotated k (compute
    # dtype); v (compute dtype).
    qk = N * d * f32 + N * d * f32 + N * d * c + N * kv * f32 + N * kv * c + N * kv * c
    # attn_scale * out and mlp_scale * out keep the fp32 outputs.
    scaled = 2 * N * d * f32
    if backend == "mlx":
        # mx.fast.rms_norm's vjp and the rotary's products keep the norm outputs of q and k (fp32);
        # relu = maximum(h, 0) keeps h, square keeps relu(h), the proj keeps relu(h)^2.
        qk += N * d * f32 + N * kv * f32
        mlp = 3 * N * F * c
        if not bf16:
            lin_in += 0   # fp32: the fc input is the second norm's output, counted above
    else:
        # torch: the rotary's products keep only cos/sin; relu keeps its output, which pow keeps
        # too, and the proj keeps relu(h)^2.
        mlp = 2 * N * F * c
    if fused:
        # SDPA / fast attention keeps q, k, v (counted) and its output (N*d*c) plus a logsumexp.
        attn = N * d * c + N * spec.num_heads * f32
        attn -= N * d * c   # the per-block q copies do not exist on the fused path
    else:
        attn = P32 + (P32 // 2 if bf16 else 0)           # fp32 softmax output, + its bf16 cast
    total = resid + lin_in + qk + scaled + mlp + attn
    if compiled and fused:
        # torch.compile / mx.compile fuse the elementwise chains and recompute them in the backward:
        # the norm inputs (3 N d), the rotated q and q_gain output and the scaled outputs are not kept.
        total -= 3 * N * d * f32 + N * d * f32 + 2 * N * d * f32 + N * F * c
    return total


def _layout_kept_per_layer(c: int, N: int, spec: ModelSpec) -> int:
    """What the record's block and layout options (docs/spec.md §4.6-§4.10) add to a block's kept
    tensors (counted from the model files, not measured): the leaky ReLU keeps its input besides its
    output (N·F, compute dtype); LN_SCALE keeps the two scaled norm outputs (2·N·d fp32); a gated skip
    its scaled skip and gate product (2·N·d fp32, per block, an upper bound: only decoder steps have
    one); the parallel lanes the two lane inputs and the mixed outputs (4·N·d fp32)."""
    d, F, f32 = spec.model_dim, spec.hidden_dim, 4
    extra = N * F * c if spec.mlp_negative_slope else 0
    extra += 2 * N * d * f32 if spec.ln_scale else 0
    extra += 2 * N * d * f32 if spec.skip_gates_enabled else 0
    extra += 4 * N * d * f32 if spec.parallel_start_layer else 0
    return extra


def _record_attention_kept(spec: ModelSpec, N: int, seq_len: int, c: int, fused: bool) -> int:
    """Bytes the record's attention options (docs/spec.md §4.1-§4.5) add to what the blocks keep, over
    all layers and the embedding; counted from the model files, not measured. XSA keeps the fp32
    attention output and the unit values; the sparse gate its fp32 input window, the gate and the
    ungated fp32 output; the smear gate the embedding and its shifted copy; document attention on the
    fused paths its (B, 1, T, T) boolean mask per layer, and on CUDA SDPA's bias in the compute dtype."""
    d, kv, H, f32 = spec.model_dim, spec.kv_dim, spec.num_heads, 4
    per_layer = 0
    kept = spec.xsa_last_n * N * (d + kv + H) * f32
    if spec.sparse_attn_gate_enabled:
        per_layer += N * (spec.gate_window + H + d) * f32
    if spec.doc_attention_enabled and fused:
        per_layer += N * seq_len * (1 + c)
    if spec.smear_gate_enabled:
        kept += 2 * N * d * f32 + N * spec.gate_window * f32
    return kept + spec.num_layers * per_layer


def _mlx_attention_transient(c: int, N: int, spec: ModelSpec, T: int, P32: int, grad: bool) -> int:
    """The attention's working set on MLX's CPU backend, on top of what is kept (fitted, see module doc).

    MLX evaluates its tape in breadth-first order, so the same op of every query block of a layer
    (the scores, the base-2 softmax's intermediates, their gradients, the zero-padded gradient of
    each block's q/k/v slice) is computed together, and those arrays are alive together."""
    Q = N * spec.num_heads * min(ATTENTION_BLOCK, T) * 4
    if not grad:
        return int(0.5 * Q + 3 * P32 + 7 * N * spec.model_dim * 4)
    if c == 4:
        return int(13 * Q + 2 * P32)
    return int(8 * Q + 1.7 * P32)


def newton_schulz_bytes(spec: ModelSpec, backend: str, steps: int = 5) -> int:
    """Muon's Newton-Schulz working set: both backends orthogonalize the matrices of one shape together,
    stacked (core.optimizer.shape_groups), so one group's n matrices are in flight at once, fp32
    counted. Per matrix (X of rows x cols, A and B of min(rows, cols)^2): torch runs eagerly and
    frees as it goes (the stack, its normalized copy, the old and new X, A and B); MLX evaluates the
    whole iteration as one graph and keeps every step's A, B and X until it ends (measured on its
    CPU backend, tests/core/test_memory.py). Counting one matrix missed the stack (BASE, torch:
    94 MB, not 5 MB). steps: MUON_BACKEND_STEPS (5)."""
    shapes = [p.shape for p in param_table(spec) if p.group == MATRIX]

    def per_matrix(rows: int, cols: int) -> int:
        x, a = rows * cols, min(rows, cols) ** 2
        return 3 * x + steps * (x + 2 * a) if backend == "mlx" else 4 * x + 2 * a

    return max((len(idx) * per_matrix(rows, cols) * 4 for rows, cols, idx in shape_groups(shapes)), default=0)


def estimate_peak(spec: ModelSpec, *, backend: str, device: str, compute_dtype: str, micro_batch_tokens: int,
                  seq_len: int, val_batch_tokens: int = 0, mlx_chunk_tokens: int = MLX_DEFAULT_CHUNK_TOKENS,
                  mlx_eager_eval: bool = False, compiled: bool = False, grad_accum_steps: int = 1) -> MemoryEstimate:
    """Peak memory in bytes of one rank's training step (and validation, when val_batch_tokens > 0).

    backend "torch" or "mlx"; device "cpu", "cuda" (torch) or "metal" (mlx); compute_dtype "float32"
    or "bfloat16"; micro_batch_tokens: tokens of one micro-batch on this rank (a whole number of
    seq_len sequences); val_batch_tokens: this rank's validation batch (VAL_BATCH_SIZE / world size;
    0 = no validation); mlx_chunk_tokens / mlx_eager_eval: MLX_MAX_MICROBATCH_TOKENS and
    MLX_EAGER_EVAL; grad_accum_steps: micro-batches per step (matters to MLX without eager eval,
    where the whole step is one graph).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: must be one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: must be one of {', '.join(DEVICES)}")
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: must be float32 or bfloat16")
    if micro_batch_tokens <= 0 or seq_len <= 0 or micro_batch_tokens % seq_len:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens}: must be a positive multiple of seq_len={seq_len}")
    c = DTYPE_BYTES[compute_dtype]
    d, V, H = spec.model_dim, spec.vocab_size, spec.num_heads
    weights, optimizer = parameter_bytes(spec)
    mlx = backend == "mlx"
    fused = device != "cpu"

    def chunk_rows(tokens: int) -> list[int]:
        """Sequences per chunk: MLX splits a batch into chunks of whole sequences; torch does not."""
        seqs = tokens // seq_len
        if not mlx:
            return [seqs]
        per = max(1, mlx_chunk_tokens // seq_len)
        return [min(per, seqs - i) for i in range(0, seqs, per)]

    def kept_and_transient(seqs: int) -> tuple[int, int, int]:
        """(activations, logits, backward transient) of one chunk / micro-batch of `seqs` sequences."""
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

    # -- the backward phase --
    rows = chunk_rows(micro_batch_tokens)
    one_acts, one_logits, one_trans = kept_and_transient(max(rows))
    if mlx and not mlx_eager_eval:
        # One graph per step: the forward of every chunk of every micro-batch is evaluated first.
        acts = logits = 0
        for r in rows:
            a, lg, _ = kept_and_transient(r)
            acts, logits = acts + a, logits + lg
        acts, logits = acts * grad_accum_steps, logits * grad_accum_steps
        grads = weights * (len(rows) * grad_accum_steps + 1)    # each chunk's gradient + their running sum
    else:
        acts, logits = one_acts, one_logits
        grads = weights * (2 if mlx else 1)                     # MLX: the chunk's gradient + the running sum
    backward = MemoryEstimate(weights, grads, optimizer, acts, logits, one_trans, phase="backward")

    # -- the optimizer step: gradients, plus the new weights and state beside the old ones (MLX
    # builds new arrays), or Muon's flat update vector (torch) and Newton-Schulz work --
    matrices = [p for p in param_table(spec) if p.group == MATRIX]
    ns_work = newton_schulz_bytes(spec, backend)
    step_extra = (weights + optimizer if mlx else sum(4 * p.numel for p in matrices)) + ns_work
    step = MemoryEstimate(weights, weights, optimizer, 0, 0, step_extra, phase="optimizer")

    # -- validation: one forward without gradients, of the whole local batch (torch) or chunk by
    # chunk (MLX) --
    val = None
    if val_batch_tokens > 0:
        vrows = max(chunk_rows(max(val_batch_tokens // seq_len, 1) * seq_len))
        N = vrows * seq_len
        D, NV = N * d * 4, N * V * 4
        if mlx and not fused:
            P32 = 4 * blocked_attention_elements(vrows, H, seq_len)
            attn = _mlx_attention_transient(c, N, spec, seq_len, P32, grad=False)
            head = 3 * NV + 2 * D
        else:
            last = vrows * H * min(ATTENTION_BLOCK, seq_len) * seq_len * 4
            math_scores = 2 * vrows * H * seq_len * seq_len * c if device == "mps" else 0   # scores, probabilities
            attn = (2 * last if not fused else math_scores) + 6 * D
            head = 3 * NV + 2 * D
        val = MemoryEstimate(weights, 0, optimizer, 0, 0, max(attn, head, 6 * D + 3 * N * spec.hidden_dim * c),
                             phase="validation")
    phases = [backward, step] + ([val] if val else [])
    return max(phases, key=lambda e: e.total)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def mlx_chunks(micro_batch_tokens: int, seq_len: int, chunk_tokens: int) -> int:
    """How many chunks of whole sequences (at most chunk_tokens each, one sequence at least) MLX
    splits a micro-batch into (backend_mlx/session.py chunks())."""
    per_chunk = max(1, chunk_tokens // seq_len)
    return -(-(micro_batch_tokens // seq_len) // per_chunk)


def eager_eval(setting, micro_batch_tokens: int, seq_len: int, chunk_tokens: int) -> bool:
    """MLX_EAGER_EVAL resolved for one micro-batch: 1/0 as set; "auto" = on when the micro-batch is
    more than one chunk (with one chunk, evaluating after it is what the step does anyway)."""
    if setting != AUTO:
        return bool(setting)
    return mlx_chunks(micro_batch_tokens, seq_len, chunk_tokens) > 1


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


def plan_micro_steps(spec: ModelSpec, *, train_batch_tokens: int, world_size: int, seq_len: int,
                     budget_bytes: int, backend: str, device: str, compute_dtype: str,
                     val_batch_tokens: int = 0, mlx_chunk_tokens: int = MLX_DEFAULT_CHUNK_TOKENS,
                     compiled: bool = False, grad_accum_steps: int | None = None,
                     mlx_eager_eval: bool | None = None) -> Plan:
    """The fewest micro-steps (GRAD_ACCUM_STEPS) whose estimate fits the budget.

    Candidates are the A for which TRAIN_BATCH_TOKENS splits into world_size x A micro-batches of whole
    seq_len sequences. grad_accum_steps / mlx_eager_eval given: used as they are (the plan then only
    says whether they fit). mlx_eager_eval=None: on (MLX) whenever a micro-batch has more than one
    chunk, since with one chunk it changes nothing; measured on MLX's CPU backend it is both smaller
    and faster (65,536 tokens a step, 4 x 256, seq 1024: 8,235 MiB off vs 1,329 MiB on, 2:30 vs 2:00).
    `val_batch_tokens` is this rank's share of VAL_BATCH_SIZE (VAL_BATCH_SIZE / world_size); with A
    micro-steps validation runs in batches of 1/A of it, as the reference trainers do
    (trainer/validation.py), so more micro-steps also shrink validation.
    """
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
    mlx = backend == "mlx"

    def val_tokens(a: int) -> int:
        return max(val_batch_tokens // a, seq_len) if val_batch_tokens > 0 else 0

    def make(a: int, eager: bool | None) -> Plan:
        micro = per_rank // a
        chunks = mlx_chunks(micro, seq_len, mlx_chunk_tokens) if mlx else 1
        if eager is None:
            eager = mlx and eager_eval(AUTO, micro, seq_len, mlx_chunk_tokens)
        est = estimate_peak(spec, backend=backend, device=device, compute_dtype=compute_dtype,
                            micro_batch_tokens=micro, seq_len=seq_len, val_batch_tokens=val_tokens(a),
                            mlx_chunk_tokens=mlx_chunk_tokens, mlx_eager_eval=bool(eager and mlx),
                            compiled=compiled, grad_accum_steps=a)
        return Plan(a, bool(eager and mlx), chunks, micro, est, int(budget_bytes), est.total <= budget_bytes)

    candidates = [grad_accum_steps] if grad_accum_steps is not None else valid
    tried = None
    for a in candidates:
        tried = make(a, mlx_eager_eval)
        if tried.fits:
            return tried
    # Nothing fits: say what would.
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
        est = estimate_peak(spec, backend=backend, device=device, compute_dtype=compute_dtype,
                            micro_batch_tokens=s * seq_len, seq_len=seq_len, val_batch_tokens=val_tokens(a),
                            mlx_chunk_tokens=mlx_chunk_tokens, mlx_eager_eval=tried.mlx_eager_eval,
                            compiled=compiled, grad_accum_steps=a)
        if est.total > budget_bytes:
            break
        fit_seqs = s
    if fit_seqs:
        alternatives.append(f"TRAIN_BATCH_TOKENS<={fit_seqs * seq_len * world_size * a}"
                            + (f" (GRAD_ACCUM_STEPS={a})" if a > 1 else ""))
    if val_batch_tokens > 0 and tried.estimate.phase == "validation":
        alternatives.append(f"VAL_BATCH_SIZE smaller than {val_batch_tokens * world_size}")
    return Plan(tried.grad_accum_steps, tried.mlx_eager_eval, tried.chunks_per_micro_batch,
                tried.micro_batch_tokens, tried.estimate, int(budget_bytes), False, tuple(alternatives))


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------

def machine_ram_bytes() -> int | None:
    """Physical RAM of this machine (Linux and macOS), or None when the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_bytes(device_kind: str, device_total_bytes: int) -> int:
    """The bytes a plan may use on a device (fractions and reasons in the module docstring).

    device_total_bytes: CUDA's free memory (torch.cuda.mem_get_info()[0]), Metal's recommended
    working set, or the machine's RAM (machine_ram_bytes()) for the CPU."""
    if device_kind not in BUDGET_FRACTION:
        raise ValueError(f"device_kind={device_kind!r}: must be one of {', '.join(BUDGET_FRACTION)}")
    if device_total_bytes <= 0:
        raise ValueError(f"device_total_bytes={device_total_bytes}: must be positive")
    return int(math.floor(BUDGET_FRACTION[device_kind] * device_total_bytes))
