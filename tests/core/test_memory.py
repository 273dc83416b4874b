"""core/memory.py: the estimate behaves as memory does, and the planner picks what the issue asks.

No measured figures here: bench/memory_grid.py compares the estimate with real peaks.
"""

import re
from pathlib import Path

import pytest

from core import memory
from core.config import ModelSpec
from core.memory import (GIB, MIB, MemoryEstimate, default_budget_bytes, estimate_peak, machine_ram_bytes,
                         parameter_bytes, plan_micro_steps)
from core.params import count_params

REPO = Path(__file__).resolve().parents[2]
SPEC = ModelSpec(num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2)
COMBOS = [("torch", "cpu"), ("torch", "cuda"), ("mlx", "cpu"), ("mlx", "metal")]


def est(backend="mlx", device="cpu", dtype="float32", tokens=16384, seq=1024, spec=SPEC, **kw):
    return estimate_peak(spec, backend=backend, device=device, compute_dtype=dtype, micro_batch_tokens=tokens,
                         seq_len=seq, **kw)


def test_fields_add_up_and_describe_is_one_line():
    e = est()
    assert e.total == e.weights + e.grads + e.optimizer + e.activations + e.logits + e.transient
    line = e.describe()
    assert "\n" not in line and line.startswith("est ") and "GiB" in line and "weights" in line


def test_weights_and_optimizer_follow_the_parameter_table():
    weights, state = parameter_bytes(SPEC)
    assert weights == 4 * count_params(SPEC).unique
    # Adam (2 slots) for embed/scalars, Muon (1 slot) for matrices: between 1x and 2x the weights.
    assert weights < state < 2 * weights
    untied = ModelSpec(num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, tie_embeddings=False)
    assert parameter_bytes(untied)[0] - weights == 4 * 1024 * 256


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_monotonic_in_micro_batch_tokens(backend, device, dtype):
    totals = [est(backend, device, dtype, tokens=t, mlx_eager_eval=False).total for t in (1024, 2048, 8192, 32768)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    acts = [est(backend, device, dtype, tokens=t).activations for t in (1024, 2048, 4096)]
    assert acts[1] == 2 * acts[0] and acts[2] == 2 * acts[1]   # kept tensors scale with the tokens


@pytest.mark.parametrize("backend,device", COMBOS)
def test_monotonic_in_layers_width_and_seq_len(backend, device):
    by_layers = [est(backend, device, spec=ModelSpec(num_layers=L, model_dim=256, num_heads=4, num_kv_heads=2)).total
                 for L in (1, 2, 4, 8)]
    assert by_layers == sorted(by_layers) and by_layers[0] < by_layers[-1]
    by_width = [est(backend, device, spec=ModelSpec(num_layers=4, model_dim=d, num_heads=4, num_kv_heads=2)).total
                for d in (128, 256, 512)]
    assert by_width == sorted(by_width) and by_width[0] < by_width[-1]
    # Same tokens, longer sequences: the attention grows (quadratically on the unfused paths).
    by_seq = [est(backend, device, tokens=8192, seq=T).total for T in (256, 1024, 4096)]
    assert by_seq == sorted(by_seq)


def test_blocked_attention_keeps_nine_sixteenths_at_1024():
    assert memory.blocked_attention_elements(1, 1, 1024) * 16 == 9 * 1024 * 1024
    assert memory.blocked_attention_elements(2, 3, 128) == 2 * 3 * 128 * 128


def test_fused_attention_has_no_square_on_cuda():
    cpu, cuda = est("torch", "cpu", seq=4096, tokens=16384), est("torch", "cuda", seq=4096, tokens=16384)
    assert cuda.activations < cpu.activations
    # Doubling T at fixed tokens: CUDA's kept activations do not change, the CPU's grow.
    assert est("torch", "cuda", seq=2048, tokens=16384).activations == est("torch", "cuda", seq=4096, tokens=16384).activations
    assert est("torch", "cpu", seq=2048, tokens=16384).activations < cpu.activations


def test_bf16_keeps_less_than_fp32_unless_the_probabilities_dominate():
    for backend, device in COMBOS:
        assert (est(backend, device, "bfloat16", tokens=65536, seq=256).activations
                < est(backend, device, "float32", tokens=65536, seq=256).activations)
    # The CPU's blocked attention keeps the fp32 probabilities and their bf16 copy: at long
    # sequences bf16 keeps more than fp32 (measured so on both backends).
    for backend in ("torch", "mlx"):
        assert (est(backend, "cpu", "bfloat16", tokens=65536, seq=4096).activations
                > est(backend, "cpu", "float32", tokens=65536, seq=4096).activations)


def test_eager_eval_bounds_the_mlx_estimate():
    # Eager on: one chunk's activations, whatever the micro-batch; off: every chunk's at once.
    on = [est(tokens=t, mlx_eager_eval=True, mlx_chunk_tokens=8192).total for t in (8192, 16384, 65536, 262144)]
    assert max(on) - min(on) < 0.05 * min(on)
    off = [est(tokens=t, mlx_eager_eval=False, mlx_chunk_tokens=8192).total for t in (8192, 16384, 65536)]
    assert off[0] == pytest.approx(on[0], rel=0.01)            # one chunk: eager changes nothing
    assert off[1] > on[1] and off[2] > 3 * on[2]
    # Without eager eval the whole step is one graph, so accumulation does not help either.
    step = est(tokens=16384, mlx_eager_eval=False, grad_accum_steps=4)
    assert step.activations == 4 * est(tokens=16384, mlx_eager_eval=False).activations
    # Smaller chunks bound it further.
    assert est(tokens=65536, mlx_eager_eval=True, mlx_chunk_tokens=2048).total < on[2]


def test_torch_ignores_the_mlx_settings():
    a = est("torch", tokens=65536, mlx_eager_eval=False, mlx_chunk_tokens=1024)
    b = est("torch", tokens=65536, mlx_eager_eval=True, mlx_chunk_tokens=8192)
    assert a == b


def test_validation_batch_can_set_the_peak():
    base = est("torch", tokens=1024)
    with_val = est("torch", tokens=1024, val_batch_tokens=524288)   # the default VAL_BATCH_SIZE, unchunked
    assert with_val.phase == "validation" and with_val.total > base.total
    # MLX chunks the validation batch, so its size beyond one chunk changes nothing.
    assert est(val_batch_tokens=65536).total == est(val_batch_tokens=524288).total


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        est(backend="jax")
    with pytest.raises(ValueError):
        est(device="tpu")
    with pytest.raises(ValueError):
        est(dtype="float16")
    with pytest.raises(ValueError):
        est(tokens=1000, seq=1024)


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------

def plan(budget, backend="torch", device="cpu", tokens=65536, world=1, seq=1024, **kw):
    return plan_micro_steps(SPEC, train_batch_tokens=tokens, world_size=world, seq_len=seq, budget_bytes=budget,
                            backend=backend, device=device, compute_dtype="float32", **kw)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_planner_picks_the_fewest_micro_steps_that_fit(backend):
    everything = plan(10 ** 15, backend)
    assert everything.fits and everything.grad_accum_steps == 1
    # A budget between the estimates of A=2 and A=4 (torch) or of one and more chunks (MLX): the
    # plan is the smallest valid A whose estimate fits, and every smaller valid A does not.
    budgets = sorted({plan(10 ** 15, backend, grad_accum_steps=a).estimate.total for a in (1, 2, 4, 8, 16, 32, 64)})
    for budget in budgets:
        p = plan(budget, backend)
        assert p.fits and p.estimate.total <= budget
        for a in (1, 2, 4, 8, 16, 32, 64):
            if a >= p.grad_accum_steps:
                break
            assert plan(budget, backend, grad_accum_steps=a,
                        mlx_eager_eval=p.mlx_eager_eval if backend == "mlx" else None).estimate.total > budget


def test_planner_only_uses_whole_sequences_per_rank():
    # 3 sequences per rank (3 * 1024 tokens x 2 ranks): A must divide 3.
    for budget in (10 ** 15, 1):
        p = plan(budget, tokens=6 * 1024, world=2)
        assert p.grad_accum_steps in (1, 3)
        assert p.micro_batch_tokens * p.grad_accum_steps * 2 == 6 * 1024
    with pytest.raises(ValueError):
        plan(10 ** 15, tokens=1000)
    with pytest.raises(ValueError):
        plan(10 ** 15, tokens=4 * 1024, grad_accum_steps=3)


def test_auto_eager_eval_is_on_exactly_when_a_step_has_several_chunks():
    assert plan(10 ** 15, "mlx", tokens=8192, mlx_chunk_tokens=8192).mlx_eager_eval is False
    many = plan(10 ** 15, "mlx", tokens=65536, mlx_chunk_tokens=8192)
    assert many.chunks_per_micro_batch == 8 and many.mlx_eager_eval is True
    # One chunk a micro-batch, but 8 of them a step: lazily, the step would keep all 8 chunks' activations.
    accumulated = plan(10 ** 15, "mlx", tokens=65536, mlx_chunk_tokens=8192, grad_accum_steps=8)
    assert accumulated.chunks_per_micro_batch == 1 and accumulated.mlx_eager_eval is True
    lazy = plan(10 ** 15, "mlx", tokens=65536, mlx_chunk_tokens=8192, grad_accum_steps=8, mlx_eager_eval=False)
    assert accumulated.estimate.total < lazy.estimate.total
    assert plan(10 ** 15, "mlx", tokens=65536, mlx_eager_eval=False).mlx_eager_eval is False
    assert plan(10 ** 15, "torch", tokens=65536).mlx_eager_eval is False


def test_a_plan_that_cannot_fit_says_so_and_what_would():
    # The smallest possible micro-batch (one sequence) does not fit 1 MiB: nothing at this seq_len does.
    hopeless = plan(MIB)
    assert not hopeless.fits
    assert "does not fit" in hopeless.describe() and "TRAIN_SEQ_LEN" in hopeless.suggestion()
    # A budget that one sequence per micro-step fits but the whole batch does not, with A forced to 1:
    one_seq = plan(10 ** 15, tokens=1024).estimate.total
    forced = plan(one_seq * 2, tokens=65536, grad_accum_steps=1)
    assert not forced.fits
    text = forced.suggestion()
    assert "GRAD_ACCUM_STEPS=" in text and "TRAIN_BATCH_TOKENS<=" in text
    suggested = int(re.search(r"GRAD_ACCUM_STEPS=(\d+)", text).group(1))
    assert plan(one_seq * 2, tokens=65536, grad_accum_steps=suggested).fits
    limit = int(re.search(r"TRAIN_BATCH_TOKENS<=(\d+)", text).group(1))
    assert 1024 <= limit < 65536 and plan(one_seq * 2, tokens=limit, grad_accum_steps=1).fits


def test_plan_describe_names_the_settings():
    p = plan(10 ** 15, "mlx")
    assert p.describe().startswith("GRAD_ACCUM_STEPS=1") and "eager eval on" in p.describe()


# ---------------------------------------------------------------------------------------------
# Budgets and the machine
# ---------------------------------------------------------------------------------------------

def test_default_budgets_are_the_documented_fractions():
    assert default_budget_bytes("cuda", 80 * GIB) == int(0.80 * 80 * GIB)
    assert default_budget_bytes("metal", 16 * GIB) == int(0.75 * 16 * GIB)
    assert default_budget_bytes("cpu", 24 * GIB) == int(0.60 * 24 * GIB)
    for kind in ("cuda", "metal", "cpu"):
        assert f"{memory.BUDGET_FRACTION[kind]:.2f}" in memory.__doc__
    with pytest.raises(ValueError):
        default_budget_bytes("tpu", GIB)
    with pytest.raises(ValueError):
        default_budget_bytes("cpu", 0)


def test_machine_ram_is_plausible():
    ram = machine_ram_bytes()
    assert ram is None or 256 * MIB < ram < 2 ** 50


def test_memory_imports_only_stdlib_and_core_config_params():
    for name in ("memory.py", "memory_kept.py", "memory_estimate.py", "memory_plan.py"):
        source = (REPO / "core" / name).read_text()
        imported = set(re.findall(r"^(?:from|import) ([\w.]+)", source, re.M))
        assert imported <= {"__future__", "math", "os", "dataclasses", "core.config", "core.params", "core.sizes",
                            "core.optimizer", "core.memory_kept", "core.memory_estimate", "core.memory_plan"}, name


def test_memory_estimate_is_frozen():
    e = MemoryEstimate(1, 2, 3, 4, 5, 6)
    assert e.total == 21
    with pytest.raises(Exception):
        e.total = 0


def test_optimizer_state_is_one_buffer_per_matrix_weight_and_two_per_other_weight():
    # Muon keeps a momentum buffer per block-matrix weight, Adam two moments per other weight, all fp32.
    d, kv, hidden, layers = 256, 2 * 256 // 4, 2 * 256, 4          # SPEC: head_dim 64, 2 kv heads
    matrix_params = layers * (d * d + 2 * kv * d + d * d + 2 * d * hidden)
    weights, state = parameter_bytes(SPEC)
    assert state == 4 * matrix_params + 2 * (weights - 4 * matrix_params)


def test_mlx_chunks_round_up_to_whole_chunks():
    # 3 sequences, at most 2 a chunk: 2 chunks (the last one shorter), so eager eval is on under auto.
    assert memory.mlx_chunks(3 * 1024, 1024, 2048) == 2
    assert memory.mlx_chunks(4 * 1024, 1024, 2048) == 2 and memory.mlx_chunks(1024, 1024, 8192) == 1
    assert memory.auto_eager_eval(2, 1) is True and memory.auto_eager_eval(1, 1) is False


def test_the_optimizer_phase_counts_newton_schulz_on_the_stacked_matrices_of_a_shape():
    """Both backends orthogonalize every matrix of one shape together: the working set is the largest
    stack's, measured here with MLX's peak counter (Newton-Schulz alone, after its inputs exist), and
    the optimizer phase must hold it (counting one matrix missed the stack: 5 MB for BASE, not 94)."""
    import mlx.core as mx

    from backend_mlx.optim import newton_schulz
    from core.optimizer import shape_groups
    from core.params import MATRIX, param_table

    spec = ModelSpec(model_dim=128)   # BASE's layout: stacks of 18, 18, 9 and 9 matrices
    shapes = [p.shape for p in param_table(spec) if p.group == MATRIX]
    measured = 0
    for rows, cols, idx in shape_groups(shapes):
        us = [mx.random.normal((rows, cols)) for _ in idx]
        mx.eval(us)
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(newton_schulz(us, 5, mx.float32))
        measured = max(measured, mx.get_peak_memory() - before)
        del us
    counted = memory.newton_schulz_bytes(spec, "mlx")
    assert measured <= 1.02 * counted and counted <= 1.25 * measured
    one_matrix = max((3 * min(s) ** 2 + 2 * s[0] * s[1]) * 4 for s in shapes)   # the old count
    assert measured > 10 * one_matrix
    step = est(backend="mlx", device="metal", tokens=64, seq=64, spec=spec)
    assert step.phase == "optimizer" and step.transient >= measured


def test_torch_on_mps_plans_for_the_math_attention_it_runs():
    """torch trains on mps through SDPA's math path: the plan keeps L x B x H x T x T probabilities (CUDA's
    flash and memory-efficient kernels keep none), and validation holds the scores beside them."""
    from trainer.plan import ESTIMATE_DEVICE

    L, H, T, seqs = SPEC.num_layers, SPEC.num_heads, 1024, 16
    mps = est(backend="torch", device=ESTIMATE_DEVICE["mps"], tokens=seqs * T)
    cuda = est(backend="torch", device="cuda", tokens=seqs * T)
    assert mps.total - cuda.total >= L * seqs * H * T * T * 4
    val_mps = est(backend="torch", device="mps", tokens=T, val_batch_tokens=seqs * T)
    val_cuda = est(backend="torch", device="cuda", tokens=T, val_batch_tokens=seqs * T)
    assert val_mps.phase == "validation" and val_mps.transient >= 2 * seqs * H * T * T * 4 > val_cuda.transient


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_every_block_and_layout_option_adds_memory_and_looping_counts_each_pass(backend):
    from dataclasses import replace

    base = ModelSpec(num_layers=6, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=256)
    kw = dict(backend=backend, device="cpu", compute_dtype="float32", micro_batch_tokens=2048, seq_len=256)
    plain = estimate_peak(base, **kw).activations
    for option in (dict(mlp_negative_slope=0.5), dict(ln_scale=True), dict(skip_gates_enabled=True),
                   dict(parallel_start_layer=4), dict(mlp_mult=2.5)):
        assert estimate_peak(replace(base, **option), **kw).activations > plain, option
    looped = estimate_peak(replace(base, num_loops=2, loop_start=1, loop_end=2), **kw).activations
    embedding = 2048 * 64 * 4
    assert looped - embedding == pytest.approx((6 + 4) / 6 * (plain - embedding))


@pytest.mark.parametrize("backend,device", COMBOS)
def test_the_ema_of_the_weights_adds_one_fp32_copy_and_mlx_two_in_the_optimizer_step(backend, device):
    """EMA_DECAY > 0 keeps a float32 copy of every parameter the whole run; MLX's optimizer step builds
    the new average beside the old (backend_mlx/session.py), torch's updates it in place."""
    weights = parameter_bytes(SPEC)[0]
    for tokens, seq, phase in ((16384, 1024, "backward"), (64, 64, "optimizer")):
        off = est(backend, device, tokens=tokens, seq=seq, val_batch_tokens=tokens)
        on = est(backend, device, tokens=tokens, seq=seq, val_batch_tokens=tokens, ema=True)
        assert off.phase == on.phase == phase and off.ema == 0 and "ema" not in off.describe()
        copies = 2 if backend == "mlx" and phase == "optimizer" else 1
        assert on.ema == on.total - off.total == copies * weights
        assert f"ema {copies * weights / GIB:.2f}" in on.describe()
