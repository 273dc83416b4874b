"""Token shards on disk (docs/spec.md §7): the binary files of the Parameter Golf FineWeb exports.

A shard is a header of 256 little-endian int32 — [0] = 20240520 (magic), [1] = 1 (version),
[2] = n (token count), the rest 0 — followed by n little-endian uint16 tokens, so the file is
exactly 1024 + 2n bytes. Names end in `_train_NNNNNN.bin` or `_val_NNNNNN.bin`.

Every file we write goes through core.files.atomic_writer: a temporary file in the same folder, renamed over
the target only once complete, so an interrupted run never leaves a half-written shard behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from core.errors import DatasetError
from core.files import atomic_writer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1  # the count is an int32
SPLITS = ("train", "val")


class ShardError(DatasetError):
    """A malformed shard: the message names the file and the defect."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from a file, or a one-line DatasetError naming `what` and the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{what} {path}: cannot read it as JSON ({e})") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{what} {path}: expected a JSON object")
    return value


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size without reading its tokens; return the token count n."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"shard {path}: cannot read it ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"shard {path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"shard {path}: bad magic {int(header[0])} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"shard {path}: unsupported version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if n < 0:
        raise ShardError(f"shard {path}: negative token count {n} in the header")
    if size != HEADER_BYTES + 2 * n:
        raise ShardError(
            f"shard {path}: size {size} bytes does not match the header's {n} tokens "
            f"(expected {HEADER_BYTES + 2 * n} bytes)"
        )
    return n


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str, offset: int = 0) -> None:
    """Refuse token ids the model has no embedding for (>= vocab_size), naming `where`, the first
    such id and its position (`offset` = position of tokens[0]). An id past the embedding table
    would crash MLX's gather (a segmentation fault) and raise an IndexError deep inside torch."""
    if tokens.size == 0 or int(tokens.max()) < vocab_size:
        return
    i = int(np.argmax(tokens >= vocab_size))
    raise ShardError(f"{where}: token id {int(tokens[i])} at position {offset + i} is outside the vocabulary "
                     f"of VOCAB_SIZE={vocab_size}; was it tokenized with another tokenizer?")


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """The tokens of a shard as a 1-D uint16 array; a malformed file, or with `vocab_size` a token
    id >= vocab_size, raises ShardError."""
    n = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens = np.fromfile(f, dtype="<u2", count=n)
    if tokens.size != n:  # the file shrank between the size check and the read
        raise ShardError(f"shard {path}: holds {tokens.size} tokens, the header says {n}")
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, f"shard {path}")
    return tokens.astype(np.uint16, copy=False)


CHECK_BLOCK_TOKENS = 1 << 24  # 32 MiB of a shard at a time: checking never holds a whole shard


def check_shard(path: str | os.PathLike, vocab_size: int) -> int:
    """Header, size and token range of one shard, read through a memory map in blocks; the token count.

    Measured here: about 0.1 s per 100M-token (200 MB) shard from the page cache (README, Data)."""
    n = read_header(path)
    if n:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
        for start in range(0, n, CHECK_BLOCK_TOKENS):
            check_token_range(np.asarray(tokens[start:start + CHECK_BLOCK_TOKENS]), vocab_size, f"shard {path}", start)
        del tokens
    return n


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write a 1-D sequence of token ids (each in 0..65535) as a shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"shard {path}: tokens must be a 1-D sequence, got shape {tokens.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ShardError(f"shard {path}: tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size > MAX_TOKENS:
        raise ShardError(f"shard {path}: {tokens.size} tokens do not fit the int32 count of the header")
    if tokens.size and tokens.dtype != np.uint16:
        bad = (tokens < 0) | (tokens > 65535)
        if bad.any():
            i = int(np.argmax(bad))
            raise ShardError(f"shard {path}: token {int(tokens[i])} at position {i} is outside the uint16 range 0..65535")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    with atomic_writer(path) as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype="<u2").data)  # no extra copy of a big shard


def list_shards(data_path: str | os.PathLike, split: str) -> list[Path]:
    """The `*_{split}_*.bin` shards of a dataset folder, sorted by name (the stream's order)."""
    if split not in SPLITS:
        raise DatasetError(f"shard split {split!r}: must be one of {', '.join(SPLITS)}")
    folder = Path(data_path)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    files = sorted(p for p in folder.glob(f"*_{split}_*.bin") if p.is_file())
    if not files:
        raise DatasetError(f"dataset folder {folder} has no {split} shards (*_{split}_*.bin)")
    return files
