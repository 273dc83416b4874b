import numpy as np
import pytest

from core.errors import DatasetError
from data.tokenizer import BOS_ID, encode_documents, load_tokenizer, train_tokenizer

AWKWARD = (
    "# -*- coding: utf-8 -*-\n"
    "def f(a,  b):\n"
    "\tif a:  \n"  # tab indentation, trailing spaces
    "\t\treturn 'naïve café — 日本語 🙂'\n"
    "\n\n\n"  # blank lines
    "    x = [1,\n"
    "         2]   # aligned continuation\n"
    "\r\n"  # a Windows line end
    "  \n"
    "s = '\\n is not a newline'\n"  # no newline at the end of the file below
    "last_line_without_newline = 1"
)


def test_real_python_round_trips_exactly(tiny_sp, real_sources):
    for rel, text in real_sources.items():
        assert tiny_sp.decode(tiny_sp.encode(text)) == text, rel
    for text in (AWKWARD, " leading space", "\n\nstarts with newlines", "\t"):
        assert tiny_sp.decode(tiny_sp.encode(text)) == text


def test_newlines_are_single_byte_fallback_tokens(tiny_sp):
    newline = tiny_sp.piece_to_id("<0x0A>")
    assert tiny_sp.is_byte(newline)
    assert tiny_sp.encode("a\nb").count(newline) == 1
    assert tiny_sp.encode("\n\n\n") == [newline] * 3


def test_trainer_settings_are_the_exporters(tiny_sp):
    assert [tiny_sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tiny_sp.bos_id() == BOS_ID == 1
    assert tiny_sp.encode("12345", out_type=str) == ["1", "2", "3", "4", "5"]  # split_digits
    assert tiny_sp.encode("x")[0] != tiny_sp.encode(" x")[0]  # no dummy prefix


def test_training_is_deterministic(tmp_path, real_sources, tiny_tokenizer):
    files = []
    for i, text in enumerate(real_sources.values()):  # Path items are read as files
        files.append(tmp_path / f"doc{i}.py")
        files[-1].write_text(text, encoding="utf-8")
    again = train_tokenizer(files, tmp_path / "sub" / "again", 400)
    assert again.read_bytes() == tiny_tokenizer.read_bytes()
    assert again.with_suffix(".vocab").read_text(encoding="utf-8").count("\n") == 400


def test_too_small_a_corpus_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="tokenizer .*small.model: (training failed|the corpus only supports)"):
        train_tokenizer(["a b c"], tmp_path / "small", 400)
    assert not (tmp_path / "small.model").exists()


def test_encode_documents_puts_bos_before_each(tiny_sp):
    docs = ["import os\n", "", "x = 1\n\ty = 2\n"]
    tokens = encode_documents(tiny_sp, docs, batch_docs=2)
    assert tokens.dtype == np.uint16
    starts = np.flatnonzero(tokens == BOS_ID)
    assert len(starts) == 3 and starts[0] == 0
    pieces = np.split(tokens, starts[1:])
    assert [tiny_sp.decode(p[1:].tolist()) for p in pieces] == docs
    assert encode_documents(tiny_sp, []).size == 0


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_tokenizer(tmp_path / "none.model")
