"""MLXSession: one training step is docs/spec.md §6 applied to the mean gradient; chunking, compile and
optimizer-state roundtrips change nothing but rounding."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import numpy_optim as ref
from backend_mlx.model import GPT
from backend_mlx.session import MLXSession
from core import reference
from trainer.backend import optimizer_slots
from core.config import TrainConfig
from core.errors import CheckpointError
from core.init import random_weights
from core.params import MATRIX, param_groups

T, V = 8, 64
LRS = {"embed": 0.03, "head": 0.02, "matrix": 0.05, "scalar": 0.01}   # distinct, so miswiring shows


def make_session(**overrides) -> MLXSession:
    settings = dict(vocab_size=V, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2,
                    tie_embeddings=False, train_seq_len=T, compile="0")
    cfg = TrainConfig(**{**settings, **overrides})
    session = MLXSession()
    session.setup(cfg.model_spec(), cfg)
    session.load_weights(random_weights(cfg.model_spec(), seed=7))
    session.load_optimizer_state({})
    return session


def micro_batches(seed, count=2, rows=4):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (rows, T)), rng.integers(0, V, (rows, T))) for _ in range(count)]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def assert_weights_close(a, b, tol):
    assert set(a) == set(b)
    for name in a:
        assert rel(a[name], b[name]) <= tol, name


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_two_train_steps_are_spec_optimizers_on_the_mean_gradient(clip):
    session = make_session(grad_clip_norm=clip)
    spec = session.spec
    w = {k: v.astype(np.float64) for k, v in session.export_weights().items()}
    m = {k: np.zeros_like(a) for k, a in w.items()}   # Adam's exp_avg or Muon's momentum buffer
    v = {k: np.zeros_like(a) for k, a in w.items()}   # Adam's exp_avg_sq
    group_of = {name: group for group, names in param_groups(spec).items() for name in names}
    for step, momentum in ((0, 0.85), (1, 0.9)):
        batches = micro_batches(step)
        x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        # The expected gradient: the plain model's gradient of the mean loss over all tokens.
        model = GPT(spec).load_weights({k: a.astype(np.float32) for k, a in w.items()})
        _, grads = nn.value_and_grad(model, lambda a, b: model.loss(a, b))(mx.array(x), mx.array(y))
        grads = {k: np.array(g, dtype=np.float64) for k, g in tree_flatten(grads)}
        if clip:
            grads = ref.clip_by_global_norm(grads, clip)
        loss = session.train_step(batches, LRS, momentum, step)
        assert abs(loss - reference.loss(spec, w, x, y)) <= 1e-5 * loss
        for name, g in grads.items():
            lr = LRS[group_of[name]]
            if group_of[name] == MATRIX:
                w[name], m[name] = ref.muon(w[name], g, m[name], lr, momentum)
            else:
                w[name], m[name], v[name] = ref.adam(w[name], g, m[name], v[name], lr, step)
    assert_weights_close(session.export_weights(), w, 1e-5)


def test_chunked_micro_batches_equal_unchunked():
    batches = micro_batches(1, count=2, rows=4)
    whole = make_session(mlx_max_microbatch_tokens=10**6)
    per_sequence = make_session(mlx_max_microbatch_tokens=T)                             # 4 chunks of 1
    uneven_eager = make_session(mlx_max_microbatch_tokens=3 * T + 5, mlx_eager_eval=True)  # chunks of 3 + 1
    loss0, grads0 = whole.gradients(batches)
    for session in (per_sequence, uneven_eager):
        loss, grads = session.gradients(batches)
        assert abs(loss.item() - loss0.item()) <= 1e-6 * loss0.item()
        assert_weights_close({k: np.array(g) for k, g in grads.items()}, {k: np.array(g) for k, g in grads0.items()}, 1e-6)
    for session in (whole, per_sequence, uneven_eager):
        session.train_step(batches, LRS, 0.9, 0)
    assert_weights_close(per_sequence.export_weights(), whole.export_weights(), 1e-6)
    assert_weights_close(uneven_eager.export_weights(), whole.export_weights(), 1e-6)


def test_compiled_step_and_eval_match_eager_and_see_current_weights():
    plain, compiled = make_session(compile="0"), make_session(compile="1", mlx_max_microbatch_tokens=2 * T)
    assert compiled.use_compile and not plain.use_compile
    x, y = micro_batches(9, count=1, rows=5)[0]
    before = compiled.eval_loss_sum(x, y)
    for step in range(3):   # the lr moves every step: a compiled update must follow it
        lrs = {g: lr * (1 - 0.3 * step) for g, lr in LRS.items()}
        batches = micro_batches(10 + step)
        a, b = plain.train_step(batches, lrs, 0.9, step), compiled.train_step(batches, lrs, 0.9, step)
        assert abs(a - b) <= 1e-6 * a
    assert_weights_close(compiled.export_weights(), plain.export_weights(), 1e-6)
    after = compiled.eval_loss_sum(x, y)   # chunks of 2 + 2 + 1 sequences
    expected = reference.token_losses(compiled.spec, compiled.export_weights(), x, y).sum()
    assert after != before and abs(after - expected) <= 1e-5 * expected


def test_eval_loss_sum_in_chunks_is_the_reference_sum():
    session = make_session(mlx_max_microbatch_tokens=2 * T)
    x, y = micro_batches(4, count=1, rows=5)[0]
    expected = reference.token_losses(session.spec, session.export_weights(), x.astype(np.uint16), y).sum()
    assert abs(session.eval_loss_sum(x.astype(np.uint16), y.astype(np.uint16)) - expected) <= 1e-6 * expected


@pytest.mark.parametrize("compile", ["0", "1"])
def test_optimizer_state_roundtrip_continues_identically(compile):
    first = make_session(compile=compile)
    for step in range(2):
        first.train_step(micro_batches(20 + step), LRS, 0.9, step)
    weights, state = first.export_weights(), first.export_optimizer_state()
    spec = first.spec
    assert set(state) == {f"{name}.{slot}" for group, names in param_groups(spec).items()
                          for name in names for slot in optimizer_slots(group)}
    assert all(a.dtype == np.float32 and np.any(a != 0) for a in state.values())

    resumed, no_state = make_session(compile=compile), make_session(compile=compile)
    resumed.load_weights(weights)
    resumed.load_optimizer_state(state)
    no_state.load_weights(weights)
    batches = micro_batches(22)
    for session in (first, resumed, no_state):
        session.train_step(batches, LRS, 0.9, 2)
    out, again = first.export_weights(), resumed.export_weights()
    assert all(np.array_equal(out[k], again[k]) for k in out)
    after = resumed.export_optimizer_state()
    assert all(np.array_equal(a, after[k]) for k, a in first.export_optimizer_state().items())
    # The state matters: the same step from zero state lands elsewhere.
    assert not np.array_equal(no_state.export_weights()["blocks.0.attn.c_q.weight"], out["blocks.0.attn.c_q.weight"])


def test_load_optimizer_state_rejects_missing_and_misshapen_slots():
    session = make_session()
    state = session.export_optimizer_state()
    with pytest.raises(CheckpointError, match="missing skip_weights.exp_avg_sq, unexpected nothing"):
        session.load_optimizer_state({k: a for k, a in state.items() if k != "skip_weights.exp_avg_sq"})
    with pytest.raises(CheckpointError, match="unexpected lm_head.weight.momentum_buffer"):
        session.load_optimizer_state({**state, "lm_head.weight.momentum_buffer": state["lm_head.weight.exp_avg"]})
    with pytest.raises(CheckpointError, match="blocks.0.mlp.fc.weight.momentum_buffer has shape"):
        session.load_optimizer_state({**{k: a + 1 for k, a in state.items()},
                                      "blocks.0.mlp.fc.weight.momentum_buffer": np.zeros((2, 2), np.float32)})
    # Nothing was set by the rejected loads: the state is still the fresh zeros.
    assert all(not np.any(a) for a in session.export_optimizer_state().values())


def test_interface_basics():
    session = make_session(compute_dtype="auto", compile="auto")
    on_gpu = mx.default_device().type == mx.gpu
    assert (session.name, session.rank, session.world_size) == ("mlx", 0, 1)
    assert session.device == ("mlx gpu (Metal)" if on_gpu else "mlx cpu")
    assert session.compute_dtype == ("bfloat16" if on_gpu else "float32")
    assert session.use_compile == on_gpu
    assert "mx.compile " + ("on" if on_gpu else "off") in session.notes[0]
    assert make_session(compute_dtype="bfloat16").model.compute_dtype == mx.bfloat16
    assert session.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    session.train_step(micro_batches(0), LRS, 0.9, 0)
    session.synchronize()
    assert session.peak_memory_bytes() > 0


def test_backend_mlx_never_imports_torch():
    code = ("import sys, backend_mlx.model, backend_mlx.optim, backend_mlx.session; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'backend_torch')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_local_ranks_on_one_mac_each_wire_at_most_their_share(monkeypatch):
    """Metal stood in: two ranks on one Mac each wire half its recommended working set, not all of it
    (mlx-lm reports kernel panics from wiring too much)."""
    wired = []
    monkeypatch.setattr(mx, "set_wired_limit", wired.append, raising=False)
    monkeypatch.setattr(MLXSession, "device_memory_bytes", lambda self: 16 * 2**30)
    cfg = TrainConfig(vocab_size=V, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2, train_seq_len=T,
                      compile="0", compute_dtype="float32", memory_budget_gb=12.0)
    for local_ranks, expected in ((1, 12 * 2**30), (2, 8 * 2**30)):
        session = MLXSession()
        session.device_kind, session.local_ranks = "metal", local_ranks
        session.setup(cfg.model_spec(), cfg)
        assert wired.pop() == expected


def test_local_ranks_are_the_ring_hosts_at_this_rank_address(tmp_path):
    from backend_mlx.distributed import local_ranks

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["10.0.0.1:5000"], ["10.0.0.1:5001"], ["10.0.0.2:5000"]]')
    assert [local_ranks({"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) for r in range(3)] == [2, 2, 1]
    assert local_ranks({}) == 1


def test_mlx_on_cuda_budgets_from_the_gpu_memory_its_device_info_reports(monkeypatch):
    """MLX's CUDA build reports free_memory and total_memory, not Metal's memory_size; the budget must
    come from the GPU, not fall back to host RAM."""
    info = {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90",
            "free_memory": 70 * 2**30, "total_memory": 80 * 2**30}
    monkeypatch.setattr(mx, "device_info", lambda *args: info, raising=False)
    session = MLXSession()
    session.device_kind = "cuda"
    assert session.device_memory_bytes() == 70 * 2**30
    del info["free_memory"]
    assert session.device_memory_bytes() == 80 * 2**30
