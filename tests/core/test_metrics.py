import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from core.errors import DatasetError
from core.metrics import ByteTables, EvalAccumulator, build_byte_tables, token_bytes, unigram_baseline

REPO = Path(__file__).resolve().parents[2]
VOCAB = 320  # byte fallback alone takes 256 ids, so a tokenizer with it cannot be smaller than ~300
LINES = [
    "the cat sat on the mat and the dog sat on the log",
    "def walk(the_path):",
    "    for name in the_path:",
    "        print(name, 'café')  ",
    "\treturn the_end",
    "",
    "the end of the story is near the start",
] * 30


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A tiny BPE model with byte fallback, trained here; "é" and "日本" are forced pieces."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in LINES if line]), model_writer=proto, model_type="bpe",
        vocab_size=VOCAB, byte_fallback=True, character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["é", "日本"], hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(proto.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert processor.vocab_size() == VOCAB
    processor.path = path
    return processor


def test_tables_follow_the_rules_on_hand_checked_pieces(sp):
    t = build_byte_tables(sp, VOCAB)
    assert len(t.base_bytes) == len(t.has_leading_space) == len(t.is_boundary) == VOCAB == t.vocab_size
    assert t.has_leading_space.dtype == bool and t.is_boundary.dtype == bool
    # <pad> <s> </s> <unk>: boundaries worth nothing
    for i in range(4):
        assert t.is_boundary[i] and t.base_bytes[i] == 0 and not t.has_leading_space[i]
    # byte fallback: one byte each, whatever the piece's text "<0xC3>" looks like
    byte_id = sp.piece_to_id("<0xC3>")
    assert sp.is_byte(byte_id)
    assert (t.base_bytes[byte_id], t.has_leading_space[byte_id], t.is_boundary[byte_id]) == (1, False, False)
    assert sum(sp.is_byte(i) for i in range(VOCAB)) == 256
    expected = {"▁the": (3, True), "the": (3, False), "é": (2, False), "日本": (6, False),
                "▁▁▁▁": (3, True), "▁▁": (1, True), "\t": (1, False)}  # a "▁" is one byte: the space it stands for
    for piece, (nbytes, space) in expected.items():
        i = sp.piece_to_id(piece)
        assert sp.id_to_piece(i) == piece, f"{piece!r} is not in the tiny vocabulary"
        assert (t.base_bytes[i], t.has_leading_space[i], t.is_boundary[i]) == (nbytes, space, False), piece


def test_a_leading_space_counts_except_after_a_boundary(sp):
    t = build_byte_tables(sp, VOCAB)
    the, word = sp.piece_to_id("▁the"), sp.piece_to_id("path")
    assert token_bytes(t, np.array([1, word]), np.array([the, the])).tolist() == [3, 4]
    assert token_bytes(t, np.array([[word]]), np.array([[1]])).tolist() == [[0]]  # BOS as target: nothing


@pytest.mark.parametrize("text", [
    "the cat sat on the mat",
    "def walk(the_path):\n    for name in the_path:\n        print(name, 'café')  \n\n\treturn ß € 日本 🙂\n",
    "x  =  1\n\n\n    y\t=\t2   \n",
])
def test_token_bytes_sum_to_the_utf8_length_of_the_text(sp, text):
    t = build_byte_tables(sp, VOCAB)
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    x = np.array([1] + ids[:-1])  # the document starts with BOS
    y = np.array(ids)
    assert int(token_bytes(t, x, y).sum()) == len(text.encode("utf-8"))


def test_path_and_processor_give_the_same_tables(sp):
    a, b = build_byte_tables(sp, VOCAB), build_byte_tables(sp.path, VOCAB)
    for field in ("base_bytes", "has_leading_space", "is_boundary"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_bad_tokenizers_are_one_line_dataset_errors(sp, tmp_path):
    with pytest.raises(DatasetError, match=f"vocabulary size {VOCAB} but VOCAB_SIZE=1024"):
        build_byte_tables(sp.path, 1024)
    with pytest.raises(DatasetError, match="does not exist"):
        build_byte_tables(tmp_path / "missing.model", VOCAB)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(DatasetError, match="not a SentencePiece model") as e:
        build_byte_tables(junk, VOCAB)
    assert "\n" not in str(e.value)


def test_val_bpb_arithmetic():
    acc = EvalAccumulator()
    acc.add(loss_sum=math.log(2) * 300.0, tokens=100, bytes=200)
    acc.add(loss_sum=np.float32(math.log(2) * 100.0), tokens=50, bytes=50)
    assert acc.val_loss == pytest.approx(math.log(2) * 400.0 / 150, rel=1e-7)
    assert acc.val_bpb == pytest.approx(400.0 / 250, rel=1e-7)  # bits / bytes
    assert acc.totals().dtype == np.float64
    # bits per token times tokens per byte, as the reference trainers compute it, is the same number
    assert acc.val_bpb == pytest.approx(acc.val_loss / math.log(2) * 150 / 250, rel=1e-12)


def test_accumulates_in_float64():
    acc = EvalAccumulator()
    for _ in range(1000):
        acc.add(np.float32(0.1), 1, 1)  # each input rounded to float32 once, the sum is not
    assert acc.loss_sum == pytest.approx(1000 * float(np.float32(0.1)), rel=1e-13)


def test_empty_accumulator_refuses_to_divide():
    with pytest.raises(ValueError, match="no validation"):
        EvalAccumulator().val_bpb


def test_core_metrics_imports_sentencepiece_lazily():
    code = "import sys, core.metrics; print('sentencepiece' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unigram_baseline_gives_an_unseen_token_one_smoothing_count():
    # Training saw token 0 three times and token 1 never: add-one gives p = (4/5, 1/5), so the
    # validation target 1 costs log 5 nats, not infinity. Every token is one byte.
    tables = ByteTables(np.array([1, 1], np.int16), np.array([False, False]), np.array([False, False]))
    loss, bpb = unigram_baseline(np.array([3, 0]), np.array([0, 1, 0]), tables)
    expected = (math.log(5) + math.log(5 / 4)) / 2
    assert math.isclose(loss, expected) and math.isclose(bpb, expected / math.log(2))
