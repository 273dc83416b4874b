"""Sampling with both backends: the same checkpoint gives the same tokens and text in torch and MLX,
the KV cache changes nothing, and the command lines print text or a one-line error."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

import backend_mlx.sample as mlx_sample
import backend_torch.sample as torch_sample
from backend_mlx.model import GPT as MLXGPT
from backend_torch.model import GPT as TorchGPT
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import ModelSpec
from core.init import random_weights
from trainer.sampling import (BOS_ID, KVCacheDecoder, SampleSettings, generate, parse_sample_settings,
                           run_sampling)
from trainer_helpers import REPO, tiny_env, train

MAKERS = {"torch": torch_sample.make_last_logits, "mlx": mlx_sample.make_last_logits}
SETTING_VARS = ("CHECKPOINT", "PROMPT", "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_K", "SEED", "TOKENIZER_PATH")
PROMPT = "import json\n\n\ndef load(path):\n    "


@pytest.fixture(autouse=True)
def no_sampling_environment(monkeypatch):
    for name in SETTING_VARS:  # the CLIs read these; a developer's shell must not change the tests
        monkeypatch.delenv(name, raising=False)


def spec_of(tied: bool) -> ModelSpec:
    # 3 layers: one skip connection and an unpaired decoder block; 4 heads over 2 KV heads.
    return ModelSpec(vocab_size=512, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, tie_embeddings=tied)


def write_checkpoint(path, spec, tiny_dataset, seed=0):
    """Random non-trivial weights, and the config a training run on the tiny dataset would record."""
    data_path, tokenizer = tiny_dataset
    save_checkpoint(path, spec=spec, config={"data_path": data_path, "tokenizer_path": tokenizer},
                    step=0, weights=random_weights(spec, seed, scale=0.3), optimizer_state={}, data_state={})
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling")
    return {tied: write_checkpoint(folder / f"tied{int(tied)}.safetensors", spec_of(tied), tiny_dataset, seed=int(tied))
            for tied in (True, False)}


def sample(backend, **settings):
    out, err = io.StringIO(), io.StringIO()
    result = run_sampling(SampleSettings(**settings), MAKERS[backend], backend, out=out, err=err)
    assert out.getvalue() == result.text + "\n"
    assert err.getvalue().startswith(f"sample backend:{backend} ")
    return result


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_greedy_text_is_the_same_in_both_backends(checkpoints, tied):
    torch_run = sample("torch", checkpoint=checkpoints[tied], prompt=PROMPT, max_new_tokens=24)
    mlx_run = sample("mlx", checkpoint=checkpoints[tied], prompt=PROMPT, max_new_tokens=24)
    assert torch_run.prompt_ids == mlx_run.prompt_ids and torch_run.prompt_ids[0] == BOS_ID
    assert torch_run.new_ids == mlx_run.new_ids
    assert len(set(torch_run.new_ids)) >= 2  # random weights soon loop, but not from the first token
    assert torch_run.text == mlx_run.text and torch_run.text.startswith(PROMPT) and len(torch_run.text) > len(PROMPT)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_seeded_top_k_sampling_is_reproducible_and_the_same_in_both_backends(checkpoints, tied):
    settings = dict(checkpoint=checkpoints[tied], prompt=PROMPT, max_new_tokens=24, temperature=1.3, top_k=40)
    runs = {(b, s): sample(b, **settings, seed=s).new_ids for b in MAKERS for s in (5, 6)}
    assert runs["torch", 5] == runs["mlx", 5] == sample("torch", **settings, seed=5).new_ids
    assert runs["torch", 6] == runs["mlx", 6] != runs["torch", 5]
    greedy = sample("mlx", checkpoint=checkpoints[tied], prompt=PROMPT, max_new_tokens=24).new_ids
    assert runs["torch", 5] != greedy
    for backend in MAKERS:  # top_k=1 is greedy, whatever the temperature and seed
        assert sample(backend, **(settings | {"top_k": 1})).new_ids == greedy


class FullRecompute:
    """The decoder without a cache: every step runs the whole sequence through the model again."""

    def __init__(self, run):
        self.run, self.ids = run, []

    def prefill(self, ids):
        self.ids = list(ids)
        return self.run(np.array([self.ids]))

    def step(self, token):
        self.ids.append(token)
        return self.run(np.array([self.ids]))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_kv_cache_generation_equals_recomputing_the_whole_sequence(backend, checkpoints):
    ckpt = load_checkpoint(checkpoints[False])
    if backend == "torch":
        import torch
        model = TorchGPT(ckpt.spec).load_weights(ckpt.weights)

        def full(ids):
            with torch.no_grad():
                return model.logits(torch.from_numpy(ids))[0, -1].numpy()
    else:
        import mlx.core as mx
        model = MLXGPT(ckpt.spec).load_weights(ckpt.weights)

        def full(ids):
            return np.array(model.logits(mx.array(ids))[0, -1])

    prompt = [BOS_ID, 40, 41, 300, 7]
    reference, cached = FullRecompute(full), KVCacheDecoder(MAKERS[backend](ckpt.spec, ckpt.weights), ckpt.spec.num_layers)
    expected = generate(reference, prompt, 12)
    assert generate(cached, prompt, 12) == expected and len(expected) == 12
    # and step by step the logits agree to fp32 precision
    a, b = reference.prefill(prompt), cached.prefill(prompt)
    for token in expected:
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
        a, b = reference.step(token), cached.step(token)


def test_a_trained_checkpoint_samples_alike_in_both_backends(tiny_dataset, tmp_path):
    # Written by the torch trainer; the tokenizer is found through the checkpoint's config.
    result = train("torch", tiny_env(tiny_dataset, tmp_path, RUN_ID="s", ITERATIONS=3, WARMDOWN_ITERS=1))
    runs = {b: sample(b, checkpoint=str(result.checkpoint), prompt="def ", max_new_tokens=16) for b in MAKERS}
    assert runs["torch"].new_ids == runs["mlx"].new_ids and runs["torch"].text == runs["mlx"].text
    # An empty prompt starts from BOS alone.
    empty = {b: sample(b, checkpoint=str(result.checkpoint), max_new_tokens=8, temperature=1.0, seed=1) for b in MAKERS}
    assert empty["torch"].prompt_ids == [BOS_ID] and empty["torch"].new_ids == empty["mlx"].new_ids


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_cli_prints_the_prompt_and_its_continuation(backend, checkpoints):
    env = os.environ | {"CHECKPOINT": checkpoints[True], "PROMPT": PROMPT, "MAX_NEW_TOKENS": "10"}
    proc = subprocess.run([sys.executable, "-m", f"backend_{backend}.sample", "--temperature", "0.9", "--top-k", "20"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = sample("torch", checkpoint=checkpoints[True], prompt=PROMPT, max_new_tokens=10,
                      temperature=0.9, top_k=20)
    assert proc.stdout == expected.text + "\n"
    assert f"sample backend:{backend} " in proc.stderr and "new_tokens:10 " in proc.stderr


def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err.strip()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_bad_input_is_one_line_and_exit_status_2(backend, checkpoints, tiny_dataset, tmp_path, capsys):
    main = {"torch": torch_sample.main, "mlx": mlx_sample.main}[backend]
    missing = tmp_path / "missing.safetensors"
    assert "no such file" in one_line_error(main, ["--checkpoint", str(missing)], capsys)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    assert "corrupt or not a twingpt checkpoint" in one_line_error(main, ["--checkpoint", str(corrupt)], capsys)
    other = write_checkpoint(tmp_path / "v1024.safetensors",
                             ModelSpec(vocab_size=1024, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1),
                             tiny_dataset)
    assert one_line_error(main, ["--checkpoint", other, "--tokenizer-path", tiny_dataset[1]], capsys) == (
        f"error: TOKENIZER_PATH={tiny_dataset[1]} has vocabulary size 512, "
        f"but checkpoint {other} has vocab_size=1024")
    assert one_line_error(main, ["--checkpoint", checkpoints[True], "--top-k", "many"], capsys) == (
        "error: TOP_K='many': expected an integer")
    assert one_line_error(main, ["--checkpoint", checkpoints[True], "--temperature", "-0.5"], capsys) == (
        "error: TEMPERATURE=-0.5: must not be negative (0 = greedy)")


def test_the_settings_parser_is_shared(monkeypatch):
    monkeypatch.setenv("TEMPERATURE", "0.7")
    assert parse_sample_settings(["--top-k", "3"]).temperature == 0.7
