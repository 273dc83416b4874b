"""Reading the reference trainers' four files (interop/reference_files.py, docs/spec.md §13).

Each file is built from its format (pg_fixtures.py), imported, and run in both backends against
the float64 forward of the script it comes from: train_gpt.py's -θ RoPE and epsilon 2^-23, or
train_gpt_mlx.py's +θ and 1e-6 (parity_lib.variant_logits, written independently of core.reference).
"""

import numpy as np
import torch
import torch.nn.functional as F

import parity_lib
from core.artifact import save_artifact
from core.config import ModelSpec
from core.init import random_weights
from core.reference import rope
from interop import detect_kind, read_reference_file
from interop.conventions import MLX_SCRIPT_EPS, TORCH_SCRIPT_EPS, flip_rope_halves
from pg_fixtures import (negate_second_halves, script_weights, write_mlx_int8, write_mlx_npz, write_torch_int8,
                         write_torch_state_dict)

# 3 layers (an unpaired decoder block), grouped-query attention, head_dim 16.
SPEC = ModelSpec(vocab_size=256, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
IDS = np.random.default_rng(0).integers(0, SPEC.vocab_size, size=(2, 24))
TOL = 1e-5   # docs/spec.md §10's fp32 logits row, rel = ||a - b|| / ||b||


def torch_script_logits(weights):
    return parity_lib.variant_logits(SPEC, weights, IDS, rope_sign=-1.0, eps=TORCH_SCRIPT_EPS)


def mlx_script_logits(weights):
    return parity_lib.variant_logits(SPEC, weights, IDS, rope_sign=1.0, eps=MLX_SCRIPT_EPS)


def assert_both_backends_give(model, expected) -> None:
    errors = {b: parity_lib.rel(parity_lib.logits(b, model.spec, model.weights, IDS), expected) for b in ("torch", "mlx")}
    assert max(errors.values()) <= TOL, errors


def write_and_read(tmp_path, filename, write, kind, seed, **kwargs):
    """(the weights the file holds as its script computes with them, the imported model)."""
    w = script_weights(SPEC, seed)
    path = tmp_path / filename
    dequantized = write(path, w, **kwargs)   # the int8 writers return what their object dequantizes to
    model = read_reference_file(path)
    assert model.kind == kind == detect_kind(path)
    return (w if dequantized is None else dequantized), model


def test_train_gpt_py_epsilon_is_what_torch_uses_for_eps_none():
    """F.rms_norm(eps=None), as train_gpt.py calls it, is eps = float32's machine epsilon, in bf16 too."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((1, 8), 3e-4, dtype=dtype)   # mean(x^2) ~ 1e-7: the epsilon shows
        default = F.rms_norm(x, (8,))
        assert torch.equal(default, F.rms_norm(x, (8,), eps=TORCH_SCRIPT_EPS))
        assert not torch.equal(default, F.rms_norm(x, (8,), eps=MLX_SCRIPT_EPS))
    assert TORCH_SCRIPT_EPS == 2.0 ** -23


def test_the_rope_flip_turns_our_plus_theta_into_the_torch_scripts_minus_theta():
    """q·k after the torch script's -θ rotation equals q·k after ours of the flipped vectors (D q, D k)."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 32, 16))   # (batch, head, T, hd)
    d = np.concatenate([np.ones(8), -np.ones(8)])

    def rope_minus(x):   # the torch script's: (a cos + b sin, -a sin + b cos)
        a, b = x[..., :8], x[..., 8:]
        theta = np.arange(32)[:, None] * 1e4 ** (-np.arange(0, 16, 2) / 16)
        return np.concatenate([a * np.cos(theta) + b * np.sin(theta), -a * np.sin(theta) + b * np.cos(theta)], -1)

    theirs = rope_minus(q) @ rope_minus(k).swapaxes(-1, -2)
    ours = rope(q * d, 1e4) @ rope(k * d, 1e4).swapaxes(-1, -2)
    assert np.abs(ours - theirs).max() < 1e-12
    assert np.abs(rope(q, 1e4) @ rope(k, 1e4).swapaxes(-1, -2) - theirs).max() > 1e-2   # without the flip


def test_the_flip_negates_exactly_the_second_half_rows_and_is_its_own_inverse():
    w = script_weights(SPEC, 2)
    flipped = flip_rope_halves(SPEC, w)
    expected = negate_second_halves(SPEC, w)
    assert all(np.array_equal(flipped[n], expected[n]) for n in w)
    twice = flip_rope_halves(SPEC, flipped)
    assert all(np.asarray(twice[n]).tobytes() == w[n].tobytes() for n in w)


def test_a_torch_script_state_dict_gives_its_logits_in_both_backends(tmp_path):
    w, model = write_and_read(tmp_path, "final_model.pt", write_torch_state_dict, "torch-state-dict", 3)
    assert model.spec == ModelSpec(**{**SPEC.to_dict(), "norm_eps": TORCH_SCRIPT_EPS})
    expected = torch_script_logits(w)
    assert_both_backends_give(model, expected)
    # The fixture can tell: unconverted RoPE or the MLX script's epsilon would be far off.
    assert parity_lib.rel(parity_lib.variant_logits(model.spec, w, IDS), expected) > 100 * TOL
    wrong_eps = parity_lib.variant_logits(SPEC, w, IDS, rope_sign=-1.0, eps=MLX_SCRIPT_EPS)
    assert parity_lib.rel(wrong_eps, expected) > 100 * TOL


def test_a_torch_script_int8_artifact_dequantizes_to_the_scripts_weights(tmp_path):
    # max_keep 2048: tok_emb, c_q, c_k, ... quantized; control tensors kept in fp32, the rest in fp16
    expected, model = write_and_read(tmp_path, "final_model.int8.ptz", write_torch_int8, "torch-int8", 4, max_keep=2048)
    assert model.spec.norm_eps == TORCH_SCRIPT_EPS
    ours = negate_second_halves(SPEC, expected)
    assert sorted(model.weights) == sorted(ours)
    for name in ours:
        assert model.weights[name].dtype == np.float32 and np.array_equal(model.weights[name], ours[name]), name
    assert_both_backends_give(model, torch_script_logits(expected))


def test_an_mlx_script_npz_gives_its_logits_in_both_backends(tmp_path):
    w, model = write_and_read(tmp_path, "run_mlx_model.npz", write_mlx_npz, "mlx-npz", 5)
    assert model.spec == SPEC and model.spec.norm_eps == MLX_SCRIPT_EPS
    assert all(np.array_equal(model.weights[n], w[n]) for n in w)   # bf16 tok_emb widened exactly, no flip
    expected = mlx_script_logits(w)
    assert_both_backends_give(model, expected)
    assert parity_lib.rel(parity_lib.variant_logits(SPEC, w, IDS, eps=TORCH_SCRIPT_EPS), expected) > 100 * TOL


def test_an_mlx_script_int8_artifact_dequantizes_to_the_scripts_weights(tmp_path):
    expected, model = write_and_read(tmp_path, "run_mlx_model.int8.ptz", write_mlx_int8, "mlx-int8", 6, max_keep=2048)
    for name in expected:
        assert np.array_equal(model.weights[name], expected[name]), name
    assert_both_backends_give(model, mlx_script_logits(expected))


def test_passthrough_tensors_are_cast_back_to_their_original_dtype(tmp_path):
    # Every tensor small enough to pass through: tok_emb stored in fp16 with its original dtype
    # bfloat16, which the scripts cast it back to (values of float32 weights, so the cast rounds).
    w = random_weights(SPEC, seed=8)
    path = tmp_path / "run_mlx_model.int8.ptz"
    expected = write_mlx_int8(path, w, max_keep=1 << 20)
    stored = w["tok_emb.weight"].astype(np.float16).astype(np.float32)
    assert not np.array_equal(expected["tok_emb.weight"], stored)   # the cast back changes values here
    model = read_reference_file(path)
    for name in expected:
        assert np.array_equal(model.weights[name], expected[name]), name


def test_settings_no_tensor_holds_pass_through_and_override(tmp_path):
    path = tmp_path / "final_model.pt"
    write_torch_state_dict(path, script_weights(SPEC, 7))
    model = read_reference_file(path, logit_softcap=15.0, norm_eps=1e-5)
    assert (model.spec.logit_softcap, model.spec.norm_eps) == (15.0, 1e-5)
    assert any("set; train_gpt.py uses" in note for note in model.notes)


def test_prefixed_names_of_a_compiled_or_ddp_model_are_read(tmp_path):
    path = tmp_path / "final_model.pt"
    w = script_weights(SPEC, 8)
    torch.save({"module._orig_mod." + k: torch.tensor(v) for k, v in w.items()}, path)
    assert sorted(read_reference_file(path).weights) == sorted(w)


def test_files_that_are_not_reference_files_are_none(tmp_path):
    ours = tmp_path / "model.int8.ptz"
    save_artifact(ours, script_weights(SPEC, 9))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert detect_kind(ours) is None and detect_kind(text) is None
