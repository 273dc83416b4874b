"""val_loss and val_bpb (docs/spec.md §7, §8) checked against a computation that shares nothing with
trainer.validation.evaluate(), data.stream or core.metrics' byte tables.

The parity rows compare torch with MLX through the same evaluate() and the same byte tables, so a bug
in either (the windows, the boundary rule, the byte tables) is invisible to them. Here the expected
figures come from elsewhere:

- the losses: the float64 reference's logits (core.reference.logits) over the non-overlapping windows
  of §7, cut from the raw shard bytes here, with the cross-entropy written out in this file;
- the bytes: the UTF-8 length of the text the scored targets stand for, decoded with sentencepiece
  itself, document by document (BOS splits the stream), minus the one thing §8 does not count: the
  leading space of the first piece right after a boundary token, i.e. one byte for every scored
  document whose text starts with a space.

The validation shard is written here (data.shards.write_shard) from texts encoded here: documents that
start with a space or with indentation, inner runs of spaces (pieces such as "▁▁" and "▁▁▁▁", whose
inner "▁" count one byte each), non-ASCII text stored as byte-fallback pieces, newlines (<0x0A>), and a
BOS between every two documents, with windows that cut documents in the middle.
"""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import sentencepiece as spm

import backend_mlx.eval as mlx_eval
import backend_torch.eval as torch_eval
from backend_torch.threads import single_thread
from core import artifact, reference
from core.config import ModelSpec, TrainConfig
from core.init import random_weights
from core.metrics import build_byte_tables
from data.shards import write_shard
from data.stream import load_validation_tokens
from trainer.validation import evaluate
from trainer_helpers import make_session

BOS = 1
SEQ_LEN = 32
SPEC = ModelSpec(vocab_size=512, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2)

DOCS = [
    " starts with a space: x = 1\n",                      # the stream's first document (after tokens[0] = BOS)
    "def f(a, b):\n    return a  +  b\n",                   # inner runs of spaces, indentation after a newline
    "    indented first line\n\tand a tab\n",             # starts with "▁▁▁▁": 3 of its 4 spaces count
    "héllo ünïcode ✓ 日本語 — naïve café\n",                # byte-fallback pieces, 2- to 3-byte characters
    " another leading space, then   three\n",
    "no space at the start; ends without newline",
    "  two leading spaces\n\n\nblank lines above\n",
    "import json\nprint(json.dumps({'a': [1, 2, 3]}))\n" * 3,
    "the last document is cut by the windows, in the middle of its ASCII text " * 3,
]


def read_raw_shard(path) -> np.ndarray:
    """The tokens of a shard: 256 int32 header words (docs/spec.md §7), then uint16 little-endian."""
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    assert tokens.size == header[2]
    return tokens.astype(np.int64)


def independent_validation(sp, weights, tokens, spec=SPEC):
    """(val_loss, val_bpb, bytes) from the raw stream, written from docs/spec.md §7 and §8 alone."""
    n_windows = (tokens.size - 1) // SEQ_LEN
    scored = n_windows * SEQ_LEN                        # targets are tokens[1 : scored + 1]
    x = tokens[:scored].reshape(n_windows, SEQ_LEN)
    y = tokens[1:scored + 1].reshape(n_windows, SEQ_LEN)
    z = reference.logits(spec, weights, x)              # float64 (N, T, V)
    m = z.max(axis=-1)
    logsumexp = m + np.log(np.exp(z - m[..., None]).sum(axis=-1))
    nats = float(np.sum(logsumexp - np.take_along_axis(z, y[..., None], axis=-1)[..., 0]))

    # Bytes: every target that is not BOS belongs to the document opened by the last BOS before it.
    targets = tokens[1:scored + 1]
    cuts = np.flatnonzero(targets == BOS)
    n_bytes = 0
    for ids in np.split(targets, cuts):
        ids = [int(i) for i in ids if i != BOS]         # a BOS target stands for no text
        text = sp.decode(ids)
        assert "\ufffd" not in text, "the windows cut a multi-byte character: choose other documents"
        n_bytes += len(text.encode("utf-8"))
        if text.startswith(" "):                        # §8: no space counted right after a boundary
            n_bytes -= 1
    return nats / y.size, nats / math.log(2) / n_bytes, n_bytes


@pytest.fixture(scope="module")
def validation_shard(tiny_dataset, tmp_path_factory):
    _, tokenizer = tiny_dataset
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    stream = []
    for doc in DOCS:
        ids = sp.encode(doc)
        assert sp.decode(ids) == doc                    # the tokenizer is lossless on these texts
        stream += [BOS] + ids
    path = tmp_path_factory.mktemp("indep_val") / "indep_val_000000.bin"
    write_shard(path, np.array(stream, dtype=np.uint16))
    return sp, tokenizer, path, len(stream)


def test_the_shard_exercises_the_cases_of_section_8(validation_shard):
    sp, _, path, n = validation_shard
    tokens = read_raw_shard(path)
    assert tokens.size == n
    scored = (n - 1) // SEQ_LEN * SEQ_LEN
    pieces = [sp.id_to_piece(int(i)) for i in tokens[:scored + 1]]
    starts = np.flatnonzero(tokens[:scored] == BOS)
    assert len(starts) == len(DOCS)                     # every BOS, the first included, is an x of a window
    assert sum(pieces[s + 1].startswith("\u2581") for s in starts) >= 4   # "▁" right after BOS
    assert any(p.startswith("<0x") and p != "<0x0A>" for p in pieces)     # byte fallback beyond newlines
    assert {"\u2581\u2581", "\u2581\u2581\u2581\u2581"} <= set(pieces)    # inner "▁" worth 1 byte each
    assert (n - 1) % SEQ_LEN and n - 1 - scored < len(sp.encode(DOCS[-1]))  # the last document is cut
    assert np.any(starts % SEQ_LEN != 0)                # documents begin inside windows, not on their edges


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_evaluate_matches_the_reference_losses_and_the_decoded_text(backend, validation_shard):
    sp, tokenizer, path, _ = validation_shard
    weights = random_weights(SPEC, seed=31)
    raw = read_raw_shard(path)
    expected_loss, expected_bpb, n_bytes = independent_validation(sp, weights, raw)
    assert n_bytes > 500

    # 3 windows a batch: the last batch is partial.
    cfg = TrainConfig(**SPEC.to_dict(), device="cpu", compute_dtype="float32", compile="0",
                      train_seq_len=SEQ_LEN, val_batch_size=3 * SEQ_LEN)
    val_tokens = load_validation_tokens([path], SEQ_LEN, SPEC.vocab_size)
    tables = build_byte_tables(tokenizer, SPEC.vocab_size)
    with single_thread():
        session = make_session(backend, cfg)
        try:
            session.setup(SPEC, cfg)
            session.load_weights(weights)
            val_loss, val_bpb = evaluate(session, val_tokens, tables, SEQ_LEN, batch_seqs=3)
        finally:
            session.close()
    assert abs(val_loss - expected_loss) <= 1e-6 * expected_loss, (val_loss, expected_loss)
    assert abs(val_bpb - expected_bpb) <= 1e-6 * expected_bpb, (val_bpb, expected_bpb)


# What no tensor of an artifact holds, all away from their defaults: make eval ARTIFACT= must take
# them from the run folder's config.json. Each changes val_loss far beyond the 1e-6 compared.
OTHER_SETTINGS = dict(logit_softcap=12.0, rope_base=500.0, norm_eps=1e-3, qk_gain_init=0.75)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_make_eval_of_an_artifact_from_a_run_with_other_settings_matches_the_reference(
        backend, validation_shard, tmp_path, capsys):
    """make eval ARTIFACT= (trainer.eval_file, trainer.model_files), of an artifact in a run folder
    trained with another softcap, RoPE base, RMSNorm epsilon and q-gain, against the reference over
    the raw shard: the expected figures share none of make eval's code, so agreement of the two
    backends through that code is not what is tested."""
    sp, tokenizer, path, _ = validation_shard
    spec = replace(SPEC, **OTHER_SETTINGS)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        shutil.copy(path, data / f"indep_{split}_000000.bin")
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(**spec.to_dict(), data_path=str(data), tokenizer_path=tokenizer, train_seq_len=SEQ_LEN,
                         val_batch_size=3 * SEQ_LEN)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    artifact.save_artifact(run / "model.int8.zlib", random_weights(spec, seed=37))
    weights = artifact.load_artifact(run / "model.int8.zlib")
    expected_loss, expected_bpb, _ = independent_validation(sp, weights, read_raw_shard(path), spec)
    default_loss, _, _ = independent_validation(sp, weights, read_raw_shard(path))
    assert abs(default_loss - expected_loss) > 1e-3 * expected_loss   # the settings matter here
    main = {"torch": torch_eval.main, "mlx": mlx_eval.main}[backend]
    with single_thread():
        figures = main([], {"DEVICE": "cpu", "ARTIFACT": str(run / "model.int8.zlib")})
    capsys.readouterr()
    assert abs(figures["val_loss"] - expected_loss) <= 1e-6 * expected_loss, (figures["val_loss"], expected_loss)
    assert abs(figures["val_bpb"] - expected_bpb) <= 1e-6 * expected_bpb, (figures["val_bpb"], expected_bpb)
