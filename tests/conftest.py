"""Fixtures shared by the backend tests: a small real dataset built by the real builder."""

import shutil

import pytest

from data.build_default import build_default, stdlib_dir

TINY_VOCAB = 512
TINY_PACKAGES = ("email", "json", "http", "logging")  # ~0.8 MB of real Python; email/_policybase.py is val


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """(data_path, tokenizer_path) of a stdlib-subset dataset with a 512-piece tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    source = root / "corpus"
    for package in TINY_PACKAGES:
        shutil.copytree(stdlib_dir() / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build_default(source, root / "out", vocab_size=TINY_VOCAB, log=lambda line: None)
    data_path = root / "out" / "datasets" / f"stdlib_sp{TINY_VOCAB}"
    tokenizer = root / "out" / "tokenizers" / f"stdlib_{TINY_VOCAB}_bpe.model"
    assert data_path.is_dir() and tokenizer.is_file()
    return str(data_path), str(tokenizer)
