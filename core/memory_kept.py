"""What each backend keeps for the backward, tensor by tensor, and the working sets beside it:
the per-layer kept-tensor accounting of the memory estimate (core/memory_estimate.py). The counts
and where they come from: docs/memory.md.
"""

from __future__ import annotations

from core.config import ModelSpec
from core.optimizer import shape_groups
from core.params import MATRIX, param_table
from core.sizes import ATTENTION_BLOCK


def parameter_bytes(spec: ModelSpec) -> tuple[int, int]:
    """(fp32 bytes of all parameters, fp32 bytes of their optimizer state: Muon 1 slot, Adam 2)."""
    weights = state = 0
    for p in param_table(spec):
        weights += 4 * p.numel
        state += 4 * p.numel * (1 if p.group == MATRIX else 2)
    return weights, state


def ema_bytes(spec: ModelSpec, backend: str, in_step: bool) -> int:
    """The moving average of the weights (EMA_DECAY > 0): one fp32 copy of every parameter, kept the
    whole run. In the optimizer step (in_step) MLX builds the new average beside the old one, as it
    does the weights (backend_mlx/session.py _update_ema); torch updates it in place. The final
    validation's host copies (the average and the live weights, swapped in and back) are not counted."""
    weights = parameter_bytes(spec)[0]
    return 2 * weights if in_step and backend == "mlx" else weights


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
