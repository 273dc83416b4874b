import json

import numpy as np
import pytest

import data.build_default as bd
from core.errors import DatasetError
from data.shards import read_shard
from data.tokenizer import BOS_ID, load_tokenizer

VOCAB = 400


@pytest.fixture
def corpus(tmp_path, real_sources):
    """A small stdlib-like folder: real files in subfolders, plus files the builder must skip."""
    src = tmp_path / "lib"
    for rel, text in real_sources.items():
        (src / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "pkg" / rel).write_text(text, encoding="utf-8")
    (src / "tabs.py").write_text("def f():\n\treturn 'é'  \n\n", encoding="utf-8")
    (src / "latin1.py").write_bytes("# -*- coding: latin-1 -*-\nx = 'caf\xe9'\n".encode("latin-1"))
    for skipped in ("site-packages/numpy/core.py", "dist-packages/x.py", "__pycache__/y.py"):
        (src / skipped).parent.mkdir(parents=True, exist_ok=True)
        (src / skipped).write_text("ignored = True\n")
    (src / "notes.txt").write_text("not python\n")
    return src


def documents(path, sp):
    """Decode a shard back into its documents (each begins with BOS)."""
    tokens = read_shard(path)
    starts = np.flatnonzero(tokens == BOS_ID)
    assert starts[0] == 0
    return [sp.decode(part[1:].tolist()) for part in np.split(tokens, starts[1:])]


def test_builds_shards_tokenizer_and_manifest(tmp_path, corpus, real_sources):
    out = tmp_path / "data"
    lines = []
    m = bd.build_default(corpus, out, vocab_size=VOCAB, log=lines.append)
    folder = out / "datasets" / "stdlib_sp400"
    assert json.loads((folder / "manifest.json").read_text()) == m
    assert m["files"] == {"train": 6, "val": 1, "skipped": 1} and m["skipped_files"] == ["latin1.py"]
    assert m["shards"] == {"train": ["stdlib_train_000000.bin"], "val": ["stdlib_val_000000.bin"]}
    assert (out / "tokenizers" / "stdlib_400_bpe.model").is_file()
    assert (out / "tokenizers" / "stdlib_400_bpe.vocab").is_file()
    assert (folder / m["tokenizer"]["path"]).resolve() == (out / "tokenizers" / "stdlib_400_bpe.model").resolve()

    # Every document comes back exactly, in the order of its path hash, split by the path hash.
    sp = load_tokenizer(out / "tokenizers" / "stdlib_400_bpe.model")
    texts = {f"pkg/{rel}": t for rel, t in real_sources.items()}
    texts["tabs.py"] = "def f():\n\treturn 'é'  \n\n"
    order = sorted(texts, key=lambda r: bd.hashlib.sha256(r.encode()).digest())
    val = [rel for rel in order if bd.is_val(rel)] or [order[0]]
    train = [rel for rel in order if rel not in val]
    assert documents(folder / "stdlib_train_000000.bin", sp) == [texts[r] for r in train]
    assert documents(folder / "stdlib_val_000000.bin", sp) == [texts[r] for r in val]
    assert m["tokens"]["train"] == read_shard(folder / "stdlib_train_000000.bin").size
    assert m["bytes"]["val"] == sum(len(texts[r].encode()) for r in val)
    assert any("6 train + 1 val files, 1 skipped" in line for line in lines)


def test_second_run_reuses_and_a_changed_corpus_rebuilds(tmp_path, corpus):
    out = tmp_path / "data"
    first = bd.build_default(corpus, out, vocab_size=VOCAB, log=lambda s: None)
    shard = out / "datasets" / "stdlib_sp400" / "stdlib_train_000000.bin"
    mtime = shard.stat().st_mtime_ns
    lines = []
    assert bd.build_default(corpus, out, vocab_size=VOCAB, log=lines.append) == first
    assert any(line.startswith("reusing") for line in lines) and shard.stat().st_mtime_ns == mtime

    (corpus / "tabs.py").write_text("def g():\n\treturn 2\n", encoding="utf-8")
    lines = []
    second = bd.build_default(corpus, out, vocab_size=VOCAB, log=lines.append)
    assert any("rebuilding" in line and "corpus changed" in line for line in lines)
    assert second["corpus_sha256"] != first["corpus_sha256"]


def test_forced_rebuild_is_byte_identical(tmp_path, corpus):
    out = tmp_path / "data"
    bd.build_default(corpus, out, vocab_size=VOCAB, log=lambda s: None)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    bd.build_default(corpus, out, vocab_size=VOCAB, force=True, log=lambda s: None)
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == before[p] for p in files)


def test_small_shards_split_the_stream(tmp_path, corpus):
    m = bd.build_default(corpus, tmp_path / "d", vocab_size=VOCAB, shard_tokens=1000, log=lambda s: None)
    folder = tmp_path / "d" / "datasets" / "stdlib_sp400"
    assert len(m["shards"]["train"]) == -(-m["tokens"]["train"] // 1000) > 1
    sizes = [read_shard(folder / name).size for name in m["shards"]["train"]]
    assert sum(sizes) == m["tokens"]["train"] and max(sizes) == 1000


def test_an_interrupted_rebuild_leaves_no_manifest(tmp_path, corpus, monkeypatch):
    out = tmp_path / "data"
    bd.build_default(corpus, out, vocab_size=VOCAB, log=lambda s: None)
    (corpus / "tabs.py").write_text("changed = 1\n", encoding="utf-8")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bd, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        bd.build_default(corpus, out, vocab_size=VOCAB, log=lambda s: None)
    assert not (out / "datasets" / "stdlib_sp400" / "manifest.json").exists()
    assert not [p for p in out.rglob("*.tmp")]


def test_validation_split_is_about_two_percent_and_per_file():
    names = [f"pkg{i // 40}/module_{i}.py" for i in range(5000)]
    share = sum(map(bd.is_val, names)) / len(names)
    assert 0.01 < share < 0.03
    assert [bd.is_val(n) for n in names[:100]] == [bd.is_val(n) for n in names[:100]]  # a function of the path


def test_too_small_or_missing_corpus(tmp_path):
    (tmp_path / "one.py").write_text("x = 1\n")
    with pytest.raises(DatasetError, match="need at least 2 UTF-8 .py files, found 1"):
        bd.collect_corpus(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        bd.collect_corpus(tmp_path / "nowhere")


def test_main_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bd, "stdlib_dir", lambda: tmp_path / "no_stdlib")
    with pytest.raises(SystemExit) as e:
        bd.main(["--out-root", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus folder") and err.count("\n") == 1
