"""Parity rows of the record's attention options (docs/spec.md §4.1-§4.5): XSA_LAST_N, ROPE_DIMS,
ROPE_YARN, the sparse attention gate, the smear gate with its BOS fix, DOC_ATTENTION_ENABLED.

For each option alone and for all of them together: logits and loss of torch, MLX and the float64
reference, through both attention paths of each backend (the CPU's blocked kernel and the fused one
a GPU runs); the gradient of every parameter, torch vs MLX and the new parameters' against central
differences of the reference; one full Muon + Adam step; and a 4-step curve. On every device pair
(parity_lib.PAIRS), at the tolerances of docs/spec.md §10. The batches hold BOS (id 1) at the start
of a row, in the middle and twice in a row, so the document boundaries are exercised.
"""

import functools

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import backend_mlx.model as mlx_model
from core import reference
from core.config import BOS_ID, ModelSpec
from core.init import random_optimizer_state
from core.params import param_shapes
from core.schedule import learning_rates, momentum
from parity_lib import (BACKENDS, Case, _torch_ids, _torch_model, on_device, open_session, rel, to_numpy,
                        train_config)

SMALL = dict(vocab_size=64, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
CASES = [
    Case("xsa-last2-gqa", ModelSpec(**SMALL, xsa_last_n=2), ((2, 33),), seed=31),
    Case("xsa-all-mqa-untied", ModelSpec(vocab_size=48, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=1,
                                         tie_embeddings=False, xsa_last_n=2), ((2, 17),), seed=32),
    Case("rope-dims8-of16", ModelSpec(**SMALL, rope_dims=8), ((2, 40),), seed=33),
    # T = 40 > ROPE_TRAIN_SEQ_LEN = 16: the grown base is in use.
    Case("rope-yarn-dims4-len16", ModelSpec(**SMALL, rope_dims=4, rope_yarn=True, rope_train_seq_len=16),
         ((2, 40),), seed=34),
    Case("sparse-gate-w12-scale0.5", ModelSpec(**SMALL, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                                               sparse_attn_gate_init_std=0.02), ((2, 33),), seed=35),
    Case("smear-w5", ModelSpec(**SMALL, smear_gate_enabled=True, gate_window=5), ((2, 33),), seed=36),
    Case("doc-attention", ModelSpec(**SMALL, doc_attention_enabled=True), ((2, 40),), seed=37),
    Case("record-all-untied", ModelSpec(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2,
                                        tie_embeddings=False, xsa_last_n=4, rope_dims=8, sparse_attn_gate_enabled=True,
                                        sparse_attn_gate_scale=0.5, smear_gate_enabled=True, gate_window=7,
                                        doc_attention_enabled=True), ((2, 40),), seed=38),
]
CASE_BY_NAME = {c.name: c for c in CASES}
NAMES = [c.name for c in CASES]


def batch(case: Case, shape, salt: int = 0):
    """ids with BOS at the start of row 0, mid-row, twice in a row; targets random."""
    ids, targets = case.batch(shape, salt)
    ids = np.where(ids == BOS_ID, 0, ids)
    T = shape[1]
    ids[0, [0, T // 4, T // 4 + 1, (3 * T) // 4]] = BOS_ID
    ids[-1, [T // 3, T - 2]] = BOS_ID
    return ids, targets


def backend_logits(device, spec, w, ids, fused: bool, dtype: str = "float32") -> np.ndarray:
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, dtype, device)
            for block in model.blocks:
                block.attn.fused_attention = fused
            with torch.no_grad():
                return to_numpy(model.logits(_torch_ids(ids, device)))
        model = mlx_model.GPT(spec, compute_dtype=getattr(mx, dtype)).load_weights(w)
        for block in model.blocks:
            block.attn.fused_attention = fused
        return np.array(model.logits(mx.array(np.asarray(ids, np.int32))), dtype=np.float64)


def backend_grads(device, spec, w, ids, targets):
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, "float32", device)
            model.loss(_torch_ids(ids, device), _torch_ids(targets, device)).backward()
            return {name: to_numpy(p.grad) for name, p in model.named_parameters()}
        model = mlx_model.GPT(spec).load_weights(w)
        _, grads = mlx_nn.value_and_grad(model, model.loss)(mx.array(np.asarray(ids, np.int32)),
                                                           mx.array(np.asarray(targets, np.int32)))
        return {name: np.array(g, dtype=np.float64) for name, g in tree_flatten(grads)}


def test_every_option_changes_the_function():
    """Each case computes something the plain model does not (so its rows test the option)."""
    for case in CASES:
        w = case.weights()
        ids, _ = batch(case, case.shapes[0])
        plain = ModelSpec(**{k: v for k, v in case.spec.to_dict().items()
                             if k in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads",
                                      "tie_embeddings")})
        w_plain = {k: v for k, v in w.items() if k in param_shapes(plain)}
        assert rel(reference.logits(case.spec, w, ids), reference.logits(plain, w_plain, ids)) > 1e-3, case.name


@pytest.mark.parametrize("name", NAMES)
def test_logits_agree_on_both_attention_paths(name, pair, parity):
    case = CASE_BY_NAME[name]
    spec, w = case.spec, case.weights()
    ids, _ = batch(case, case.shapes[0])
    ref = reference.logits(spec, w, ids)
    z = {}
    for b in BACKENDS:
        for fused in (False, True):
            z[b, fused] = backend_logits(pair.of(b), spec, w, ids, fused)
            path = "fused" if fused else "cpu-kernel"
            parity.check("record_attn_logits", rel(z[b, fused], ref), f"{name} {b} {path} vs reference",
                         devices=pair.label)
    for fused in (False, True):
        parity.check("record_attn_logits", rel(z["torch", fused], z["mlx", fused]),
                     f"{name} torch vs mlx ({'fused' if fused else 'cpu-kernel'})", devices=pair.label)


def test_bf16_logits_of_all_options_within_budget(pair, parity):
    case = CASE_BY_NAME["record-all-untied"]
    w = case.weights()
    ids, _ = batch(case, case.shapes[0])
    ref = reference.logits(case.spec, w, ids)
    for b in BACKENDS:
        err = rel(backend_logits(pair.of(b), case.spec, w, ids, False, "bfloat16"), ref)
        parity.check("logits_bf16", err, f"{case.name} {b} bf16 vs reference", devices=pair.label)
        assert err > 1e-4   # the products really ran in bf16


@pytest.mark.parametrize("name", NAMES)
def test_every_gradient_agrees_torch_vs_mlx(name, pair, parity):
    case = CASE_BY_NAME[name]
    w = case.weights()
    ids, targets = batch(case, case.shapes[0], salt=1)
    g = {b: backend_grads(pair.of(b), case.spec, w, ids, targets) for b in BACKENDS}
    assert set(g["torch"]) == set(g["mlx"]) == set(param_shapes(case.spec))
    for pname, value in g["mlx"].items():
        assert np.linalg.norm(value) > 0, f"{pname}: zero gradient, the path is not exercised"
        parity.check("record_attn_grads", rel(g["torch"][pname], value), f"{name} {pname}", devices=pair.label)


FD_SPEC = ModelSpec(vocab_size=24, num_layers=2, model_dim=16, num_heads=4, num_kv_heads=2, xsa_last_n=1,
                    rope_dims=2, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.7, smear_gate_enabled=True,
                    gate_window=5, doc_attention_enabled=True)
FD_CASE = Case("fd-record-attention", FD_SPEC, ((2, 10),), seed=39)
# The new parameters, and those whose gradient every option touches.
FD_PARAMS = ("smear_gate.weight", "smear_lambda", "tok_emb.weight", "blocks.0.attn.attn_gate_w",
             "blocks.1.attn.attn_gate_w", "blocks.1.attn.c_q.weight", "blocks.1.attn.c_v.weight",
             "blocks.0.attn.q_gain")


@functools.lru_cache(maxsize=None)
def _central_differences():
    ids, targets = batch(FD_CASE, FD_CASE.shapes[0])
    w64 = {k: v.astype(np.float64) for k, v in FD_CASE.weights().items()}
    g = backend_grads(_cpu("torch"), FD_SPEC, FD_CASE.weights(), ids, targets)
    rng, h, out = np.random.default_rng(3), 1e-5, {}
    for pname in FD_PARAMS:
        value = w64[pname]
        coords = sorted({int(np.argmax(np.abs(g[pname])))} |
                        set(rng.choice(value.size, size=min(3, value.size), replace=False).tolist()))
        fd = []
        for c in coords:
            moved = []
            for step in (h, -h):
                w = dict(w64)
                w[pname] = value.copy().reshape(-1)
                w[pname][c] += step
                w[pname] = w[pname].reshape(value.shape)
                moved.append(reference.loss(FD_SPEC, w, ids, targets))
            fd.append((moved[0] - moved[1]) / (2 * h))
        out[pname] = (coords, np.array(fd))
    return ids, targets, out


def _cpu(backend):
    from parity_lib import Device
    return Device(backend, "cpu")


def test_gradients_match_central_differences_of_the_reference(pair, parity):
    ids, targets, fd = _central_differences()
    for b in BACKENDS:
        g = backend_grads(pair.of(b), FD_SPEC, FD_CASE.weights(), ids, targets)
        for pname, (coords, values) in fd.items():
            assert np.linalg.norm(values) > 0, pname
            parity.check("record_attn_grads", rel(g[pname].reshape(-1)[coords], values),
                         f"{FD_CASE.name} {b} {pname} vs central differences", devices=pair.label)


def _steps(case, device, steps: int, w0, state0):
    """Losses of `steps` full optimizer steps (two micro-batches of 3 rows, T = 16) from w0 and state0,
    and the weights and state after them."""
    spec, T = case.spec, 16
    cfg = train_config(spec, iterations=400, warmdown_iters=100, grad_clip_norm=0.3, train_seq_len=T,
                       mlx_max_microbatch_tokens=2 * T)
    rng = np.random.default_rng(case.seed)
    losses = []
    with open_session(device, cfg) as session:
        session.load_weights(w0)
        session.load_optimizer_state(state0)
        for step in range(350, 350 + steps):
            micro = []
            for _ in range(2):
                ids, targets = rng.integers(0, spec.vocab_size, (3, T)), rng.integers(0, spec.vocab_size, (3, T))
                ids[:, [0, 5, 6]] = BOS_ID
                micro.append((ids, targets))
            losses.append(session.train_step(micro, learning_rates(cfg, step, 0.0), momentum(cfg, step), step))
        return losses, session.export_weights(), session.export_optimizer_state()


@pytest.mark.parametrize("name", ["xsa-last2-gqa", "sparse-gate-w12-scale0.5", "smear-w5", "record-all-untied"])
def test_one_optimizer_step_gives_the_same_weights(name, pair, parity):
    case = CASE_BY_NAME[name]
    w0, state0 = case.weights(), random_optimizer_state(case.spec, case.seed)
    out = {b: _steps(case, pair.of(b), 1, w0, state0) for b in BACKENDS}
    (_, w_t, s_t), (_, w_m, s_m) = out["torch"], out["mlx"]
    assert set(w_t) == set(w_m) == set(w0) and set(s_t) == set(s_m) == set(state0)
    for pname in w0:
        assert rel(w_m[pname], w0[pname]) > 1e-4, f"{pname}: the step barely moved the weight"
        parity.check("record_attn_step", rel(w_t[pname], w_m[pname]), f"{name} {pname}", devices=pair.label)
    for key in state0:
        parity.check("record_attn_step", rel(s_t[key], s_m[key]), f"{name} state {key}", devices=pair.label)


def test_four_step_curve_of_all_options(pair, parity):
    case = CASE_BY_NAME["record-all-untied"]
    w0, state0 = case.weights(), random_optimizer_state(case.spec, case.seed)
    losses = {b: _steps(case, pair.of(b), 4, w0, state0)[0] for b in BACKENDS}
    assert losses["torch"][-1] < losses["torch"][0]
    for i, (a, b) in enumerate(zip(losses["torch"], losses["mlx"])):
        parity.check("train_losses", rel(a, b), f"{case.name} step {i} (4-step curve, sessions)", devices=pair.label)
