import json
import shutil

import pytest

import data.datasets as dsm
from core.errors import DatasetError
from data.shards import file_sha256
from data.datasets import resolve_dataset
from data.tokenizer import train_tokenizer

VOCAB = 400


@pytest.fixture
def root(tmp_path, monkeypatch, tiny_tokenizer, make_shards):
    """A fake repository root with data/datasets/stdlib_sp400 and its tokenizer, no manifest."""
    monkeypatch.setattr(dsm, "REPO_ROOT", tmp_path)
    folder = tmp_path / "data" / "datasets" / "stdlib_sp400"
    make_shards(folder, "stdlib", [10, 10], [10])
    (tmp_path / "data" / "tokenizers").mkdir(parents=True)
    shutil.copy(tiny_tokenizer, tmp_path / "data" / "tokenizers" / "stdlib_400_bpe.model")
    return tmp_path


def write_manifest(folder, **fields):
    (folder / "manifest.json").write_text(json.dumps(fields))


def test_conventional_tokenizer_without_a_manifest(root):
    ds = resolve_dataset(str(root / "data/datasets/stdlib_sp400"), "", VOCAB)
    assert ds.name == "stdlib_sp400" and ds.tokenizer_path == root / "data/tokenizers/stdlib_400_bpe.model"
    assert [p.name for p in ds.train_files] == ["stdlib_train_000000.bin", "stdlib_train_000001.bin"]
    assert [p.name for p in ds.val_files] == ["stdlib_val_000000.bin"]
    assert "shards in" in ds.source


def test_relative_paths_from_cwd_then_repo_root(root, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(root / "data")
    assert resolve_dataset("datasets/stdlib_sp400", "", VOCAB).train_files[0].is_file()  # cwd-relative
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    ds = resolve_dataset("data/datasets/stdlib_sp400", "data/tokenizers/stdlib_400_bpe.model", VOCAB)
    assert ds.data_path == root / "data/datasets/stdlib_sp400"  # repo-relative
    assert ds.tokenizer_path == root / "data/tokenizers/stdlib_400_bpe.model"


def test_defaults_prefer_fineweb_then_stdlib(root, monkeypatch, make_shards):
    monkeypatch.setattr(dsm, "STDLIB_DEFAULT", dsm.Path("data/datasets/stdlib_sp400"))
    assert resolve_dataset("", "", VOCAB).name == "stdlib_sp400"
    fineweb = root / "data/datasets/fineweb10B_sp1024"
    make_shards(fineweb, "fineweb", [], [5])  # a download cut short: val only
    assert resolve_dataset("", "", VOCAB).name == "stdlib_sp400"
    make_shards(fineweb, "fineweb", [5], [5])
    with pytest.raises(DatasetError, match="fineweb_1024_bpe.model: file does not exist"):
        resolve_dataset("", "", VOCAB)  # FineWeb is chosen, and its tokenizer is looked for


def test_missing_default_dataset_says_make_data(tmp_path, monkeypatch):
    monkeypatch.setattr(dsm, "REPO_ROOT", tmp_path)
    with pytest.raises(DatasetError, match=r"default dataset data/datasets/stdlib_sp1024 does not exist: run `make data` first"):
        resolve_dataset("", "", 1024)
    with pytest.raises(DatasetError, match="DATA_PATH=nowhere/fineweb10B_sp4096: .*`make data-fineweb`"):
        resolve_dataset("nowhere/fineweb10B_sp4096", "", 4096)


def test_missing_shards_and_tokenizers(root):
    folder = root / "data/datasets/stdlib_sp400"
    with pytest.raises(DatasetError, match="TOKENIZER_PATH=other.model: file does not exist"):
        resolve_dataset(str(folder), "other.model", VOCAB)
    (root / "data/tokenizers/stdlib_400_bpe.model").unlink()
    with pytest.raises(DatasetError, match="stdlib_400_bpe.model: file does not exist"):
        resolve_dataset(str(folder), "", VOCAB)
    for p in folder.glob("*_val_*.bin"):
        p.unlink()
    with pytest.raises(DatasetError, match="has no val shards"):
        resolve_dataset(str(folder), "", VOCAB)
    for p in folder.glob("*_train_*.bin"):
        p.unlink()
    with pytest.raises(DatasetError, match="has no train shards"):
        resolve_dataset(str(folder), "", VOCAB)


def test_an_unknown_dataset_without_manifest_needs_a_tokenizer_path(root, make_shards):
    mine = root / "data/datasets/mine"
    make_shards(mine, "a", [5], [5])
    with pytest.raises(DatasetError, match="names no tokenizer .*set TOKENIZER_PATH"):
        resolve_dataset(str(mine), "", VOCAB)
    ds = resolve_dataset(str(mine), str(root / "data/tokenizers/stdlib_400_bpe.model"), VOCAB)
    assert ds.name == "mine"


def test_vocabulary_size_mismatch_names_both_numbers(root):
    with pytest.raises(DatasetError, match="has vocabulary size 400, but VOCAB_SIZE=1024"):
        resolve_dataset(str(root / "data/datasets/stdlib_sp400"), "", 1024)


def test_manifest_names_the_tokenizer_and_guards_the_pairing(root, tmp_path_factory, real_sources):
    folder = root / "data/datasets/stdlib_sp400"
    (root / "elsewhere").mkdir()
    moved = shutil.move(root / "data/tokenizers/stdlib_400_bpe.model", root / "elsewhere" / "tok.model")
    write_manifest(folder, name="stdlib_sp400", source="a test corpus", vocab_size=VOCAB,
                   tokenizer={"path": "../../../elsewhere/tok.model", "sha256": file_sha256(moved)},
                   shards={"train": ["stdlib_train_000000.bin"], "val": ["stdlib_val_000000.bin"]})
    ds = resolve_dataset(str(folder), "", VOCAB)
    assert ds.tokenizer_path == (root / "elsewhere" / "tok.model").resolve() and ds.source == "a test corpus"

    # Same vocabulary size, different tokenizer: the shards do not belong to it.
    other = train_tokenizer(list(real_sources.values())[::-1][:4], tmp_path_factory.mktemp("o") / "other", VOCAB)
    with pytest.raises(DatasetError, match="is not the tokenizer dataset stdlib_sp400 was encoded with"):
        resolve_dataset(str(folder), str(other), VOCAB)
    with pytest.raises(DatasetError, match="was tokenized with vocabulary size 400, but VOCAB_SIZE=512"):
        resolve_dataset(str(folder), "", 512)
    (folder / "stdlib_train_000000.bin").unlink()
    with pytest.raises(DatasetError, match="lists train shard stdlib_train_000000.bin, but it is missing"):
        resolve_dataset(str(folder), "", VOCAB)
    (folder / "manifest.json").write_text("[1, 2")
    with pytest.raises(DatasetError, match="cannot read it as JSON"):
        resolve_dataset(str(folder), "", VOCAB)
