"""FLOPs per token, to report throughput as model FLOPs utilization.

Counted: the matrix products, 2 FLOPs per multiply-add. Not counted: norms, RoPE, softmax,
relu², softcap, the embedding lookup (a gather) -- each is O(d) per token, not O(d²) or O(T·d).

Forward, per token, with N = matmul_params(spec) and T = seq_len:

    2·N                      every weight matrix multiplies the token's activations once; the
                             output head counts V·d whether tied (tok_emb.weight) or not
  + 2·L·d·(T+1)              attention: at position t a query reads t+1 keys, for q·kᵀ (2·d·(t+1),
                             over all heads: H·hd = d) and for the weighted sum of values (the same);
                             4·d·(t+1) averaged over t = 0..T-1 is 2·d·(T+1). PaLM's accounting
                             (4·L·d·T forward, 12·L·d·T trained) counts the whole T×T square;
                             a causal mask leaves only the (T+1)/2 keys at or before each query.

The record's attention options (docs/spec.md §4.1-§4.5): the sparse attention gate is a product of
GATE_WINDOW inputs to H outputs per layer, and the smear gate one of GATE_WINDOW inputs to 1, so both
are in N. XSA (~4·d per layer and token), the sigmoids and partial RoPE are O(d): not counted.
Document-aware attention keeps the causal count: an upper bound, and what the CPU kernels and SDPA
with a mask run (they compute the masked scores too); a varlen kernel would skip the other
documents' keys.

Training (forward + backward, the backward costing twice the forward): 3x the forward,

    flops_per_token = 6·N + 6·L·d·(T+1)

The record's block and layout options (docs/spec.md §4.6-§4.10): F = int(MLP_MULT·d) is in N; the
leaky ReLU², LN_SCALE, the gated skips and the lane mixing are O(d) per token (not counted). With
looping on, each looped block runs once per pass: L above becomes the number of block calls,
L + NUM_LOOPS·(LOOP_END − LOOP_START + 1) (`looping=True`; the run's figure takes the looped count
when NUM_LOOPS > 0, the part of training it describes best once looping is on).
"""

from __future__ import annotations

import statistics
import time

from core.config import ModelSpec


def matmul_params(spec: ModelSpec, looping: bool = False) -> int:
    """Weights used in a matrix product per token: the blocks' matrices (once per block call) plus the output head."""
    d, kv, F = spec.model_dim, spec.kv_dim, spec.hidden_dim
    per_layer = d * d + 2 * kv * d + d * d + 2 * F * d   # c_q, c_k + c_v, attn.proj, mlp.fc + mlp.proj
    gates = spec.num_heads * spec.gate_window if spec.sparse_attn_gate_enabled else 0   # per block call
    head = spec.gate_window if spec.smear_gate_enabled else 0
    return spec.block_calls(looping) * (per_layer + gates) + head + spec.vocab_size * d


def attention_flops_per_token(spec: ModelSpec, seq_len: int, looping: bool = False) -> int:
    """Forward q·kᵀ and attention·v, averaged over the positions of a causal window of seq_len."""
    return 2 * spec.block_calls(looping) * spec.model_dim * (seq_len + 1)


def forward_flops_per_token(spec: ModelSpec, seq_len: int, looping: bool = False) -> int:
    return 2 * matmul_params(spec, looping) + attention_flops_per_token(spec, seq_len, looping)


def flops_per_token(spec: ModelSpec, seq_len: int, looping: bool = False) -> int:
    """Training FLOPs per token (forward + backward): 3 x the forward."""
    return 3 * forward_flops_per_token(spec, seq_len, looping)


def measure_gflops(run_once, flops: float, seconds: float = 1.0, synchronize=lambda: None) -> float:
    """Median GFLOP/s of `run_once()` doing `flops`.

    The backends time an n x n matrix product with it: the ceiling MFU is measured against. Each
    timing covers a loop of calls (about 20 ms) closed by one `synchronize()`, which waits for the
    device: a GPU's queue stays full, as in training, and a sync's latency is spread over the loop.
    """
    run_once()  # the first call starts thread pools and allocates
    synchronize()
    t0 = time.perf_counter()
    run_once()
    synchronize()
    calls = max(1, min(100, int(0.02 / max(time.perf_counter() - t0, 1e-9))))
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 50):
        t0 = time.perf_counter()
        for _ in range(calls):
            run_once()
        synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return flops / statistics.median(times) / 1e9


def matmul_ceiling_gflops(measure, device_kind: str, sizes=(1024, 2048, 4096, 8192)) -> float:
    """The ceiling MFU is measured against: the best GFLOP/s of `measure(n)` (an n x n product).

    On the CPU one size (1024) reaches the peak. A big GPU needs big products: timed from Python,
    a 1024^2 product leaves an H100 mostly idle, and MFU against it can pass 100%. There n doubles
    while the throughput still grows by more than 10%, up to 8192 (a few seconds at most).
    """
    best = measure(sizes[0])
    if device_kind == "cpu":
        return best
    for n in sizes[1:]:
        gflops = measure(n)
        if gflops < 1.1 * best:
            return max(best, gflops)
        best = gflops
    return best
