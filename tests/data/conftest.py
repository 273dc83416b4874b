"""Shared fixtures of the data tests: a small real-Python corpus and a tokenizer trained on it."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data.shards import write_shard
from data.tokenizer import load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["bisect.py", "colorsys.py", "keyword.py", "textwrap.py", "json/encoder.py", "glob.py"]
TINY_VOCAB = 400


@pytest.fixture(scope="session")
def real_sources() -> dict[str, str]:
    """A few real standard-library files, relative path -> text."""
    return {rel: (STDLIB / rel).read_text(encoding="utf-8") for rel in CORPUS_FILES}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, real_sources) -> Path:
    """A 400-token BPE model trained (once per session) on the real sources."""
    prefix = tmp_path_factory.mktemp("tok") / f"fineweb_{TINY_VOCAB}_bpe"
    return train_tokenizer(list(real_sources.values()), prefix, TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_sp(tiny_tokenizer):
    return load_tokenizer(tiny_tokenizer)


def _make_shards(folder: Path, prefix: str, train_sizes, val_sizes, start: int = 0) -> list[np.ndarray]:
    """Shards of consecutive token values (easy to follow through a stream); returns their arrays."""
    arrays = []
    value = start
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        for i, n in enumerate(sizes):
            tokens = (np.arange(value, value + n) % 65536).astype(np.uint16)
            write_shard(folder / f"{prefix}_{split}_{i:06d}.bin", tokens)
            arrays.append(tokens)
            value += n
    return arrays


@pytest.fixture
def make_shards():
    """make_shards(folder, prefix, train_sizes, val_sizes) writes shards of consecutive values."""
    return _make_shards
