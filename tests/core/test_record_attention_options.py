"""The record's attention options as settings (docs/spec.md §4.1-§4.5): off by default, their parameters
and init, and every inconsistent value a one-line ConfigError naming the setting (exit 2 from a trainer)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.config import ModelSpec, load_config
from core.errors import ConfigError
from core.init import init_weights
from core.params import SCALAR, param_table

REPO = Path(__file__).resolve().parents[2]
OPTIONS = ("xsa_last_n", "rope_dims", "rope_yarn", "rope_train_seq_len", "sparse_attn_gate_enabled",
           "sparse_attn_gate_scale", "sparse_attn_gate_init_std", "smear_gate_enabled", "gate_window",
           "doc_attention_enabled")


def test_every_option_is_off_by_default_and_adds_no_parameter():
    cfg = load_config([], environ={})
    spec = cfg.model_spec()
    assert (spec.xsa_last_n, spec.rope_dims, spec.rope_yarn, spec.sparse_attn_gate_enabled,
            spec.smear_gate_enabled, spec.doc_attention_enabled) == (0, 0, False, False, False, False)
    assert spec.rotary_dims == spec.head_dim and spec.rope_base_for(10 ** 6) == spec.rope_base
    names = [p.name for p in param_table(spec)]
    assert not [n for n in names if "gate" in n or "smear" in n]
    # The options that add no parameter leave the table and the initial weights as they were.
    on = ModelSpec(xsa_last_n=3, rope_dims=16, doc_attention_enabled=True)
    a, b = init_weights(ModelSpec(), 5), init_weights(on, 5)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_gate_parameters_names_shapes_groups_and_init():
    spec = ModelSpec(num_layers=2, sparse_attn_gate_enabled=True, smear_gate_enabled=True, gate_window=12)
    table = {p.name: p for p in param_table(spec)}
    assert table["blocks.1.attn.attn_gate_w"].shape == (8, 12)
    assert table["smear_gate.weight"].shape == (1, 12) and table["smear_lambda"].shape == (1,)
    for name in ("blocks.0.attn.attn_gate_w", "smear_gate.weight", "smear_lambda"):
        assert table[name].group == SCALAR and table[name].keep_float, name   # Adam, fp32 in the artifact
    w = init_weights(spec, 1)
    assert not w["blocks.0.attn.attn_gate_w"].any() and not w["smear_gate.weight"].any() and not w["smear_lambda"].any()
    drawn = init_weights(ModelSpec(num_layers=2, sparse_attn_gate_enabled=True, sparse_attn_gate_init_std=0.5,
                                   gate_window=300), 1)["blocks.0.attn.attn_gate_w"]
    assert 0.45 < drawn.std() < 0.55


def test_yarn_grows_the_base_past_the_training_length():
    spec = ModelSpec(rope_dims=16, rope_yarn=True, rope_train_seq_len=1024)
    assert spec.rope_base_for(1024) == spec.rope_base
    assert spec.rope_base_for(2048) == pytest.approx(spec.rope_base * 2 ** (16 / 14))
    # ROPE_TRAIN_SEQ_LEN=0 (the default) is the run's TRAIN_SEQ_LEN.
    assert load_config([], environ={"ROPE_YARN": "1", "TRAIN_SEQ_LEN": "256"}).model_spec().rope_train_seq_len == 256


@pytest.mark.parametrize("env, message", [
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7: must be even"),
    ({"ROPE_DIMS": "66"}, "ROPE_DIMS=66: must be even and at most head_dim=64"),
    ({"ROPE_DIMS": "-2"}, "ROPE_DIMS=-2: must be a non-negative integer"),
    ({"XSA_LAST_N": "10"}, "XSA_LAST_N=10: more than num_layers=9"),
    ({"XSA_LAST_N": "-1"}, "XSA_LAST_N=-1: must be a non-negative integer"),
    ({"SPARSE_ATTN_GATE_ENABLED": "1", "GATE_WINDOW": "513"}, "GATE_WINDOW=513: must be in 1..model_dim=512"),
    ({"SMEAR_GATE_ENABLED": "1", "GATE_WINDOW": "0"}, "GATE_WINDOW=0: must be in 1..model_dim=512"),
    ({"SPARSE_ATTN_GATE_INIT_STD": "-0.1"}, "SPARSE_ATTN_GATE_INIT_STD=-0.1: must not be negative"),
    ({"ROPE_YARN": "1", "ROPE_DIMS": "2"}, "ROPE_DIMS=2: ROPE_YARN needs at least 4 rotated dims"),
])
def test_inconsistent_options_are_one_line_errors_naming_the_setting(env, message):
    with pytest.raises(ConfigError) as e:
        load_config([], environ=env)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_trainer_given_a_bad_option_exits_2_with_one_line_and_writes_nothing(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "ROPE_DIMS": "7", "OUT_DIR": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-m", "backend_torch.train"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: ROPE_DIMS=7: must be even and at most head_dim=64 (0 = all)"]
    assert not (tmp_path / "runs").exists()


def test_an_artifact_and_a_checkpoint_give_back_every_option(tmp_path):
    """An artifact holds tensors only: the gates (and GATE_WINDOW) are read from them, the rest of the
    options from the settings; a checkpoint holds its whole spec."""
    from core.artifact import save_artifact
    from core.checkpoint import save_checkpoint
    from core.init import random_weights
    from trainer.model_files import load_model_file

    env = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "XSA_LAST_N": "2",
           "ROPE_DIMS": "4", "ROPE_YARN": "1", "TRAIN_SEQ_LEN": "64", "SPARSE_ATTN_GATE_ENABLED": "1",
           "SPARSE_ATTN_GATE_SCALE": "0.5", "SMEAR_GATE_ENABLED": "1", "GATE_WINDOW": "6",
           "DOC_ATTENTION_ENABLED": "1"}
    cfg = load_config([], environ=env)
    spec = cfg.model_spec()
    weights = random_weights(spec, 0)
    save_artifact(tmp_path / "model.int8.zlib", weights)
    got = load_model_file(tmp_path / "model.int8.zlib", "artifact", cfg)
    assert got.spec == spec
    # Settings without the gates: the tensors still say they are there, and how wide.
    plain = load_config([], environ={k: v for k, v in env.items()
                                             if k not in ("SPARSE_ATTN_GATE_ENABLED", "SMEAR_GATE_ENABLED", "GATE_WINDOW")})
    assert load_model_file(tmp_path / "model.int8.zlib", "artifact", plain).spec == spec
    assert np.array_equal(got.weights["smear_lambda"], weights["smear_lambda"])   # fp32 control, exact
    save_checkpoint(tmp_path / "c.safetensors", spec=spec, config=cfg, step=0, weights=weights, optimizer_state={},
                    data_state={})
    assert load_model_file(tmp_path / "c.safetensors", "checkpoint", load_config([], environ={})).spec == spec


def test_partial_rope_of_a_record_file_converts_by_negating_rows_r_half_to_r():
    """The record's partial RoPE rotates the first r dims of a head by -θ, half-split (pairs i, i + r/2).
    interop's flip negates rows r/2 .. r-1 of each head of c_q and c_k: our +θ rotation of the flipped
    weights gives the record's scores exactly."""
    from core import reference
    from interop.conventions import flip_rope_halves

    spec = ModelSpec(vocab_size=8, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=6)
    hd, r, T = spec.head_dim, spec.rotary_dims, 12
    rng = np.random.default_rng(0)
    w = {"blocks.0.attn.c_q.weight": rng.standard_normal((32, 32)),
         "blocks.0.attn.c_k.weight": rng.standard_normal((16, 32))}
    x = rng.standard_normal((T, 32))

    def record_rope(v):   # written from the record's definition: a cos + b sin, -a sin + b cos
        theta = np.arange(T)[:, None] * spec.rope_base ** (-np.arange(0, r, 2) / r)[None, :]
        a, b = v[..., :r // 2], v[..., r // 2:r]
        return np.concatenate([a * np.cos(theta) + b * np.sin(theta), -a * np.sin(theta) + b * np.cos(theta),
                               v[..., r:]], axis=-1)

    def scores(weights, rotate):
        q = (x @ weights["blocks.0.attn.c_q.weight"].T).reshape(T, 2, hd).transpose(1, 0, 2)
        k = (x @ weights["blocks.0.attn.c_k.weight"].T).reshape(T, 1, hd).transpose(1, 0, 2)
        return rotate(reference.rms_norm(q, 1e-6)) @ rotate(reference.rms_norm(k, 1e-6)).transpose(0, 2, 1)

    ours = scores(flip_rope_halves(spec, w), lambda v: reference.rope(v, spec.rope_base, r))
    np.testing.assert_allclose(ours, scores(w, record_rope), rtol=1e-5, atol=1e-5)
    unflipped = scores(w, lambda v: reference.rope(v, spec.rope_base, r))
    assert np.abs(unflipped - scores(w, record_rope)).max() > 1e-2


def test_flop_count_adds_the_gate_products_and_nothing_for_the_other_options():
    from core.flops import flops_per_token, matmul_params

    base = ModelSpec()
    assert flops_per_token(ModelSpec(xsa_last_n=9, rope_dims=16, doc_attention_enabled=True), 1024) \
        == flops_per_token(base, 1024)
    gated = ModelSpec(sparse_attn_gate_enabled=True, smear_gate_enabled=True, gate_window=12)
    gate_params = sum(p.numel for p in param_table(gated) if "gate" in p.name)   # the gates' weight matrices
    assert matmul_params(gated) - matmul_params(base) == gate_params == 9 * 8 * 12 + 12


def test_memory_plan_counts_what_the_options_keep():
    from core.memory import estimate_peak

    def acts(spec, device="cpu"):
        return estimate_peak(spec, backend="torch", device=device, compute_dtype="float32",
                             micro_batch_tokens=4096, seq_len=1024).activations

    base = ModelSpec()
    assert acts(ModelSpec(rope_dims=16, rope_yarn=True, rope_train_seq_len=1024)) == acts(base)
    N, d = 4096, base.model_dim
    # XSA in 3 layers: the fp32 output, the unit values and their dot products of each.
    assert acts(ModelSpec(xsa_last_n=3)) - acts(base) == 3 * N * (d + base.kv_dim + base.num_heads) * 4
    assert acts(ModelSpec(sparse_attn_gate_enabled=True)) > acts(base)
    assert acts(ModelSpec(smear_gate_enabled=True)) > acts(base)
    # Document masks cost memory only where a fused kernel takes them as a T x T mask.
    assert acts(ModelSpec(doc_attention_enabled=True)) == acts(base)
    assert acts(ModelSpec(doc_attention_enabled=True), "cuda") > acts(base, "cuda")
