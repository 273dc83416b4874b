"""trainer/sampling.py without a tensor framework: token choice, the loop, settings, tokenizer, prompt."""

import numpy as np
import pytest

from core.checkpoint import Checkpoint
from core.config import ModelSpec
from core.errors import ConfigError, DatasetError
from trainer.sampling import (BOS_ID, EOS_ID, KVCacheDecoder, decode, encode_prompt, generate, load_tokenizer_for,
                           parse_sample_settings, select_token)
from data.tokenizer import load_tokenizer, train_tokenizer


def rng(seed=0):
    return np.random.Generator(np.random.PCG64(seed))


def test_greedy_is_the_argmax_and_ties_go_to_the_lower_id():
    logits = np.array([0.5, 3.0, -1.0, 3.0], dtype=np.float32)
    assert select_token(logits, 0.0, 0, rng()) == 1
    assert select_token(logits, 0.0, 2, rng()) == 1  # top_k is irrelevant when greedy


def test_top_k_1_is_greedy_at_any_temperature():
    z = rng(1).standard_normal((50, 300)) * 3
    for row in z:
        for temperature in (0.1, 1.0, 5.0):
            assert select_token(row, temperature, 1, rng(2)) == int(np.argmax(row))


def test_sampling_follows_the_softmax_of_the_top_k():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    g = rng(3)
    draws = np.array([select_token(logits, 1.0, 3, g) for _ in range(20000)])
    assert set(np.unique(draws)) == {1, 3, 4}  # the three largest only
    freq = np.bincount(draws, minlength=5)[[1, 3, 4]] / draws.size
    assert np.allclose(freq, np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.015)
    # Temperature 2 flattens: p ~ sqrt(p), renormalized over all five tokens.
    g = rng(4)
    draws = np.array([select_token(logits, 2.0, 0, g) for _ in range(20000)])
    expected = np.sqrt([0.05, 0.4, 0.1, 0.3, 0.15])
    assert np.allclose(np.bincount(draws, minlength=5) / draws.size, expected / expected.sum(), atol=0.015)


class ScriptedDecoder:
    """prefill/step returning fixed logits that prefer `script[i]` at step i; records its calls."""

    def __init__(self, script, vocab=8):
        self.script, self.vocab, self.calls = script, vocab, []

    def _logits(self):
        z = np.zeros(self.vocab)
        z[self.script[len(self.calls) - 1]] = 5.0
        return z

    def prefill(self, ids):
        self.calls.append(("prefill", list(ids)))
        return self._logits()

    def step(self, token):
        self.calls.append(("step", token))
        return self._logits()


def test_generate_prefills_once_steps_per_token_and_stops_at_max_or_eos_or_bos():
    d = ScriptedDecoder([5, 6, 7, 4, 3])
    assert generate(d, [1, 4], 4) == [5, 6, 7, 4]
    assert d.calls == [("prefill", [1, 4]), ("step", 5), ("step", 6), ("step", 7)]  # no step after the last
    assert generate(ScriptedDecoder([5, EOS_ID, 7]), [1], 10) == [5, EOS_ID]
    assert generate(ScriptedDecoder([5, 6, BOS_ID, 7]), [1], 10) == [5, 6, BOS_ID]
    assert generate(ScriptedDecoder([5]), [1], 0) == []


def test_seeded_generation_is_reproducible_and_the_seed_matters():
    table = rng(5).standard_normal((64, 64))

    class Markov:  # next-token logits depend on the last token
        def prefill(self, ids):
            return table[ids[-1]]

        def step(self, token):
            return table[token]

    runs = [generate(Markov(), [7], 30, temperature=1.5, top_k=20, seed=s) for s in (11, 11, 12)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_kv_cache_decoder_hands_the_model_its_caches_and_advances_the_offsets():
    seen = []

    def last_logits(ids, caches):
        seen.append((ids.tolist(), [c["offset"] for c in caches]))
        for c in caches:
            c["k"] = c.get("k", 0) + ids.shape[1]  # a model appends to its caches
        return np.zeros(4)

    d = KVCacheDecoder(last_logits, num_layers=3)
    d.prefill([1, 9, 8])
    d.step(5)
    d.step(6)
    assert seen == [([[1, 9, 8]], [0, 0, 0]), ([[5]], [3, 3, 3]), ([[6]], [4, 4, 4])]
    assert [c["offset"] for c in d.caches] == [5, 5, 5] and d.caches[0]["k"] == 5
    d.prefill([1])  # a new prompt starts from empty caches
    assert d.caches == [{"offset": 1, "k": 1}] * 3


def test_settings_come_from_flags_then_environment_then_defaults():
    s = parse_sample_settings([], environ={})
    assert (s.max_new_tokens, s.temperature, s.top_k, s.seed, s.prompt, s.checkpoint) == (200, 0.0, 0, 1337, "", "")
    env = {"CHECKPOINT": "a.safetensors", "PROMPT": "def f(", "TEMPERATURE": "0.8", "TOP_K": "40", "SEED": "3"}
    s = parse_sample_settings(["--top-k", "5", "--prompt", "x"], environ=env)
    assert (s.checkpoint, s.prompt, s.temperature, s.top_k, s.seed) == ("a.safetensors", "x", 0.8, 5, 3)


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "TEMPERATURE=-1.0: must not be negative (0 = greedy)"),
    (["--temperature", "hot"], "TEMPERATURE='hot': expected a number"),
    (["--top-k", "2.5"], "TOP_K='2.5': expected an integer"),
    (["--max-new-tokens", "-3"], "MAX_NEW_TOKENS=-3: must not be negative"),
    (["--seed", "-1"], "SEED=-1: must not be negative"),
    (["--temprature", "1"], "unrecognized arguments: --temprature 1"),
])
def test_bad_settings_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_sample_settings(argv, environ={})
    assert str(e.value) == message


def fake_checkpoint(vocab, config):
    spec = ModelSpec(vocab_size=vocab, num_layers=1, model_dim=8, num_heads=2, num_kv_heads=1)
    return Checkpoint(path="ck.safetensors", spec=spec, config=config, step=0, weights={}, optimizer_state={},
                      data_state={}, rng_state=None)


def test_the_tokenizer_is_the_checkpoints_dataset_one_unless_named(tiny_dataset):
    data_path, tokenizer = tiny_dataset
    sp = load_tokenizer_for(fake_checkpoint(512, {"data_path": data_path, "tokenizer_path": ""}))
    assert sp.serialized_model_proto() == load_tokenizer(tokenizer).serialized_model_proto()
    assert load_tokenizer_for(fake_checkpoint(512, {}), tokenizer).vocab_size() == 512
    moved = {"data_path": data_path + "-moved", "tokenizer_path": tokenizer}  # the run's own TOKENIZER_PATH
    assert load_tokenizer_for(fake_checkpoint(512, moved)).vocab_size() == 512
    with pytest.raises(DatasetError, match=r"vocabulary size 512, but checkpoint ck.safetensors has vocab_size=1024"):
        load_tokenizer_for(fake_checkpoint(1024, {}), tokenizer)
    with pytest.raises(DatasetError, match=r"finding the tokenizer of checkpoint ck.safetensors: .*set TOKENIZER_PATH"):
        load_tokenizer_for(fake_checkpoint(512, {"data_path": data_path + "-moved"}))


def test_a_tokenizer_with_a_dummy_prefix_is_refused(tmp_path):
    text = "\n".join(f"value_{i} = compute({i}, 'abc')" for i in range(300))
    path = train_tokenizer([text], tmp_path / "dummy", 300, add_dummy_prefix=True, num_threads=1)
    with pytest.raises(DatasetError, match="adds a dummy prefix"):
        load_tokenizer_for(fake_checkpoint(300, {}), str(path))


def test_the_prompt_is_bos_then_its_ids_without_a_dummy_prefix(tiny_dataset):
    sp = load_tokenizer(tiny_dataset[1])
    prompt = "import json\n\ndef load(path):\n\treturn  json.loads(path)"
    ids = encode_prompt(sp, prompt)
    assert ids == [BOS_ID] + sp.encode(prompt) and not sp.id_to_piece(ids[1]).startswith("\u2581")
    assert decode(sp, ids) == prompt
    assert decode(sp, ids + [EOS_ID]) == prompt
    assert encode_prompt(sp, "") == [BOS_ID]  # empty prompt: BOS alone, a document of the model's own
