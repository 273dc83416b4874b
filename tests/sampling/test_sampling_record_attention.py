"""Cached decoding with the record's attention options (docs/spec.md §4.1-§4.5) computes the float64
reference's logits of the whole sequence at every step, in both backends: the smear gate's previous
token and the documents carry across calls, and under ROPE_YARN the decoder recomputes past
ROPE_TRAIN_SEQ_LEN (where every position's rotation changes)."""

import numpy as np
import pytest

import backend_mlx.sample as mlx_sample
import backend_torch.sample as torch_sample
from core import reference
from core.config import BOS_ID, ModelSpec
from core.init import random_weights
from trainer.sampling import kv_decoder

MAKERS = {"torch": torch_sample.make_last_logits, "mlx": mlx_sample.make_last_logits}
SPEC = ModelSpec(vocab_size=40, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, xsa_last_n=2, rope_dims=4,
                 rope_yarn=True, rope_train_seq_len=12, sparse_attn_gate_enabled=True, smear_gate_enabled=True,
                 gate_window=5, doc_attention_enabled=True)


@pytest.mark.parametrize("backend", sorted(MAKERS))
def test_cached_decoding_equals_the_reference_on_the_whole_sequence(backend):
    w = random_weights(SPEC, 4)
    prompt = [BOS_ID, 7, 8, 9, 10, 11, 12]
    steps = [13, 14, BOS_ID, 15, 16, 17, 18, 19, 20]   # a new document mid-way; past 12 positions at the end
    decoder = kv_decoder(SPEC, MAKERS[backend](SPEC, w))
    ids = list(prompt)
    got = decoder.prefill(prompt)
    for token in [None, *steps]:
        if token is not None:
            ids.append(token)
            got = decoder.step(token)
        want = reference.logits(SPEC, w, np.array([ids]))[0, -1]
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (backend, len(ids))
    assert len(ids) > SPEC.rope_train_seq_len
