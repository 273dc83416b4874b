import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import DatasetError, UserError
from core.files import atomic_writer
from data import shards
from data.shards import MAGIC, ShardError, check_shard, list_shards, read_header, read_shard, write_shard
from data.stream import TokenStream, load_validation_tokens

REPO = Path(__file__).resolve().parents[2]


def raw_shard(tokens, magic=MAGIC, version=1, count=None) -> bytes:
    """A shard built byte by byte with struct, independently of data.shards."""
    count = len(tokens) if count is None else count
    header = struct.pack("<256i", magic, version, count, *([0] * 253))
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


def test_write_then_read_round_trips_and_matches_the_format(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 40000, 65535], dtype=np.int64)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    assert path.read_bytes() == raw_shard(tokens.tolist())  # exactly docs/spec.md §7's bytes
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    got = read_shard(path)
    assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    assert read_header(path) == len(tokens)


def test_reads_a_shard_written_by_another_writer(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(raw_shard([1, 500, 7, 1]))
    assert read_shard(path).tolist() == [1, 500, 7, 1]


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "a.bin", [])
    assert read_shard(tmp_path / "a.bin").size == 0


@pytest.mark.parametrize("content, defect", [
    (raw_shard([1, 2], magic=12345), "bad magic 12345"),
    (raw_shard([1, 2], version=2), "unsupported version 2"),
    (raw_shard([1, 2], count=3), "does not match the header's 3 tokens"),
    (raw_shard([1, 2, 3], count=2), "does not match the header's 2 tokens"),
    (raw_shard([1, 2])[:100], "truncated header (100 of 1024 bytes)"),
    (raw_shard([1], count=-5), "negative token count"),
])
def test_malformed_shards_name_the_file_and_the_defect(tmp_path, content, defect):
    path = tmp_path / "bad_train_000000.bin"
    path.write_bytes(content)
    with pytest.raises(ShardError) as e:
        read_shard(path)
    message = str(e.value)
    assert str(path) in message and defect in message and "\n" not in message
    assert isinstance(e.value, DatasetError) and isinstance(e.value, ValueError) and isinstance(e.value, UserError)


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="cannot read"):
        read_shard(tmp_path / "nope.bin")


@pytest.mark.parametrize("tokens, defect", [
    ([5, 65536], "token 65536 at position 1 is outside the uint16 range"),
    ([-1, 3], "token -1 at position 0"),
    (np.array([1.5, 2.0]), "must be integers"),
    (np.zeros((2, 2), dtype=np.int32), "must be a 1-D sequence"),
])
def test_write_rejects_bad_tokens_and_leaves_nothing_behind(tmp_path, tokens, defect):
    path = tmp_path / "out_train_000000.bin"
    with pytest.raises(ShardError, match=defect):
        write_shard(path, tokens)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "s_train_000000.bin"
    write_shard(path, [1, 2, 3])
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as f:
            f.write(b"half a shard")
            raise RuntimeError("killed")
    assert read_shard(path).tolist() == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_list_shards_sorted_per_split(tmp_path):
    for name in ["d_train_000002.bin", "d_train_000000.bin", "d_val_000000.bin", "d_train_000001.bin", "notes.txt"]:
        write_shard(tmp_path / name, [1])
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "d_train_000000.bin", "d_train_000001.bin", "d_train_000002.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["d_val_000000.bin"]


def test_list_shards_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_shards(tmp_path / "missing", "train")
    with pytest.raises(DatasetError, match="has no val shards"):
        list_shards(tmp_path, "val")
    with pytest.raises(DatasetError, match="must be one of train, val"):
        list_shards(tmp_path, "test")


def test_core_and_data_import_no_tensor_framework():
    code = ("import sys, core.metrics, data.shards, data.stream, data.tokenizer, data.datasets, "
            "data.build_default, data.fineweb\n"
            "bad = [m for m in ('torch', 'mlx', 'sentencepiece') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # sentencepiece too is only imported when a tokenizer is used


def test_check_shard_finds_an_id_past_the_vocabulary_and_names_its_position(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHECK_BLOCK_TOKENS", 64)   # several blocks, as a real shard has
    tokens = np.arange(1000, dtype=np.uint16) % 100
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    assert check_shard(path, 100) == 1000
    tokens[777], tokens[900] = 150, 3000
    write_shard(path, tokens)
    with pytest.raises(ShardError, match=r"x_train_000000.bin: token id 150 at position 777 is outside the "
                                         r"vocabulary of VOCAB_SIZE=100; was it"):
        check_shard(path, 100)
    with pytest.raises(ShardError, match=r"token id 3000 at position 900 is outside"):
        check_shard(path, 151)
    assert check_shard(path, 3001) == 1000


def test_check_shard_refuses_a_bad_header_and_accepts_an_empty_shard(tmp_path):
    path = tmp_path / "x_val_000000.bin"
    write_shard(path, [])
    assert check_shard(path, 10) == 0
    path.write_bytes(path.read_bytes() + b"\x01")
    with pytest.raises(ShardError, match="does not match the header's 0 tokens"):
        check_shard(path, 10)


def test_readers_given_a_vocabulary_refuse_ids_past_it(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, [1, 2, 3, 9, 4])
    assert read_shard(path, 10).tolist() == [1, 2, 3, 9, 4]
    with pytest.raises(ShardError, match="token id 9 at position 3 is outside the vocabulary of VOCAB_SIZE=9"):
        read_shard(path, 9)
    with pytest.raises(ShardError, match="token id 9 at position 3 is outside"):
        TokenStream([path], vocab_size=9)
    with pytest.raises(ShardError, match="token id 9 at position 3 is outside"):
        load_validation_tokens([path], 2, vocab_size=5)
