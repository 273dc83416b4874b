import json
import shutil

import pytest

import data.fineweb as fw
from core.errors import DatasetError
from data.datasets import resolve_dataset
from data.shards import ShardError, read_shard, write_shard

VOCAB = 400  # the tiny tokenizer's; the variant is sp400


def hub_manifest(**overrides):
    """The exporter's manifest schema (paths relative to the export root)."""
    dataset = {"name": "fineweb10B_sp400", "tokenizer_name": "sp_bpe_400", "path": "datasets/fineweb10B_sp400",
               "vocab_size": VOCAB, "stats": {"files_train": 2, "files_val": 1, "tokens_val": 30}}
    tokenizer = {"name": "sp_bpe_400", "kind": "sentencepiece_bpe", "vocab_size": VOCAB,
                 "model_path": "tokenizers/fineweb_400_bpe.model", "vocab_path": "tokenizers/fineweb_400_bpe.vocab"}
    dataset.update(overrides)
    return {"version": "10B", "datasets": [dataset], "tokenizers": [tokenizer]}


@pytest.fixture
def remote(tmp_path, tiny_tokenizer):
    """A local stand-in of the hub repo's datasets/ folder: manifest, 1 val + 2 train shards, tokenizer."""
    root = tmp_path / "remote"
    shards = root / "datasets" / "fineweb10B_sp400"
    write_shard(shards / "fineweb_val_000000.bin", [1] + list(range(10, 39)))
    write_shard(shards / "fineweb_train_000000.bin", [1] + list(range(100, 199)))
    write_shard(shards / "fineweb_train_000001.bin", [1] + list(range(200, 249)))
    (root / "tokenizers").mkdir()
    shutil.copy(tiny_tokenizer, root / "tokenizers" / "fineweb_400_bpe.model")
    shutil.copy(tiny_tokenizer.with_suffix(".vocab"), root / "tokenizers" / "fineweb_400_bpe.vocab")
    (root / "manifest.json").write_text(json.dumps(hub_manifest()))
    return root


def test_downloads_val_the_first_train_shards_and_the_tokenizer(tmp_path, remote, tiny_tokenizer):
    out = tmp_path / "data"
    folder = fw.download_fineweb("sp400", 1, out, source=str(remote), log=lambda s: None)
    assert folder == out / "datasets" / "fineweb10B_sp400"
    assert sorted(p.name for p in folder.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "manifest.json", "source_manifest.json"]
    assert read_shard(folder / "fineweb_train_000000.bin").tolist() == [1] + list(range(100, 199))
    assert (out / "tokenizers" / "fineweb_400_bpe.model").read_bytes() == tiny_tokenizer.read_bytes()
    assert (out / "tokenizers" / "fineweb_400_bpe.vocab").is_file()
    ours = json.loads((folder / "manifest.json").read_text())
    assert ours["tokens"] == {"val": 30, "train": 100} and ours["vocab_size"] == VOCAB
    assert ours["shards"] == {"val": ["fineweb_val_000000.bin"], "train": ["fineweb_train_000000.bin"]}

    ds = resolve_dataset(str(folder), "", VOCAB)  # the trainer finds everything from the folder alone
    assert ds.tokenizer_path == (out / "tokenizers" / "fineweb_400_bpe.model").resolve()
    assert [p.name for p in ds.train_files] == ["fineweb_train_000000.bin"]


def test_more_shards_later_keeps_what_is_there(tmp_path, remote):
    out = tmp_path / "data"
    fw.download_fineweb("sp400", 1, out, source=str(remote), log=lambda s: None)
    lines = []
    folder = fw.download_fineweb("sp400", 2, out, source=str(remote), log=lines.append)
    assert any(line.startswith("have") and "fineweb_train_000000.bin" in line for line in lines)
    assert any(line.startswith("fetch") and "fineweb_train_000001.bin" in line for line in lines)
    assert len(resolve_dataset(str(folder), "", VOCAB).train_files) == 2
    fw.download_fineweb("sp400", 1, out, source=str(remote), log=lambda s: None)  # asks for fewer: keeps both
    assert json.loads((folder / "manifest.json").read_text())["tokens"] == {"val": 30, "train": 150}


def test_asking_for_more_train_shards_than_exist(tmp_path, remote):
    with pytest.raises(DatasetError, match="--train-shards 3: fineweb10B_sp400 only has 2 train shards"):
        fw.download_fineweb("sp400", 3, tmp_path / "data", source=str(remote), log=lambda s: None)


def test_a_corrupt_shard_is_named(tmp_path, remote):
    bad = remote / "datasets" / "fineweb10B_sp400" / "fineweb_val_000000.bin"
    bad.write_bytes(b"\0" * 1030)
    with pytest.raises(ShardError, match="fineweb_val_000000.bin: bad magic 0"):
        fw.download_fineweb("sp400", 1, tmp_path / "data", source=str(remote), log=lambda s: None)


def test_tokenizer_of_the_wrong_size(tmp_path, remote):
    shutil.copytree(remote / "datasets" / "fineweb10B_sp400", remote / "datasets" / "fineweb10B_sp512")
    (remote / "manifest.json").write_text(json.dumps(hub_manifest(name="fineweb10B_sp512", vocab_size=512,
                                                                  path="datasets/fineweb10B_sp512")))
    with pytest.raises(DatasetError, match="has vocabulary size 400, variant sp512 needs 512"):
        fw.download_fineweb("sp512", 1, tmp_path / "data", source=str(remote), log=lambda s: None)


def test_manifest_problems(tmp_path, remote):
    with pytest.raises(DatasetError, match="hub manifest has no dataset fineweb10B_sp1024"):
        fw.download_fineweb("sp1024", 1, tmp_path / "a", source=str(remote), log=lambda s: None)
    (remote / "manifest.json").write_text(json.dumps(hub_manifest(vocab_size=1024)))
    with pytest.raises(DatasetError, match="fineweb10B_sp400 has vocab_size 1024, the variant says 400"):
        fw.download_fineweb("sp400", 1, tmp_path / "b", source=str(remote), log=lambda s: None)
    (remote / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read it as JSON"):
        fw.download_fineweb("sp400", 1, tmp_path / "c", source=str(remote), log=lambda s: None)
    with pytest.raises(DatasetError, match="expected sp<vocab size>"):
        fw.plan({}, "byte260")


def test_a_minimal_manifest_falls_back_to_the_conventional_layout(tmp_path, remote):
    (remote / "manifest.json").write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp400"}]}))
    folder = fw.download_fineweb("sp400", 2, tmp_path / "data", source=str(remote), log=lambda s: None)
    ds = resolve_dataset(str(folder), "", VOCAB)
    assert [p.name for p in ds.val_files] == ["fineweb_val_000000.bin"] and len(ds.train_files) == 2


def test_cli_runs_and_fails_in_one_line(tmp_path, remote, capsys):
    fw.main(["--variant", "sp400", "--train-shards", "1", "--source", str(remote), "--out-root", str(tmp_path / "d")])
    assert "fineweb10B_sp400: 1 train shards (100 tokens)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        fw.main(["--variant", "sp400", "--source", str(tmp_path / "no_such_folder")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --source") and "no such folder" in err and err.count("\n") == 1


def test_hub_source_is_described_without_network():
    assert fw.Source(None).describe() == "hub dataset willdepueoai/parameter-golf/datasets"
    assert fw.Source("someone/other-export").local is None


def test_a_file_missing_from_the_source(tmp_path, remote):
    (remote / "datasets" / "fineweb10B_sp400" / "fineweb_train_000000.bin").unlink()
    with pytest.raises(DatasetError, match="fineweb10B_sp400/fineweb_train_000000.bin: not found in local folder"):
        fw.download_fineweb("sp400", 1, tmp_path / "data", source=str(remote), log=lambda s: None)
