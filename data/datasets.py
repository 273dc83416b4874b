"""Which dataset and tokenizer a run uses: DATA_PATH and TOKENIZER_PATH, resolved and checked.

An empty DATA_PATH means the FineWeb sp1024 export (data/datasets/fineweb10B_sp1024) when it has
train and val shards, else the default stdlib dataset (data/datasets/stdlib_sp1024, built by
`make data`). A relative path is looked up from the current folder, then from the repository root.

An empty TOKENIZER_PATH means the tokenizer named by the dataset folder's manifest.json (written by
data.build_default and data.fineweb), else the conventional name next to the dataset:
<data root>/tokenizers/fineweb_<V>_bpe.model for fineweb10B_sp<V>, stdlib_<V>_bpe.model for
stdlib_sp<V>. Every problem is found here, before training starts, as a one-line DatasetError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import DatasetError
from core.metrics import load_sentencepiece
from data.shards import check_shard, file_sha256, list_shards, read_json_object

REPO_ROOT = Path(__file__).resolve().parent.parent
FINEWEB_DEFAULT = Path("data/datasets/fineweb10B_sp1024")
STDLIB_DEFAULT = Path("data/datasets/stdlib_sp1024")


@dataclass(frozen=True)
class Dataset:
    data_path: Path
    train_files: list[Path]
    val_files: list[Path]
    tokenizer_path: Path
    name: str
    source: str  # a human description of where the shards came from


def _user_path(value: str) -> Path:
    """A user's path: absolute, or relative to the current folder, else to the repository root."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


def _read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    return read_json_object(path, "dataset manifest")


def _conventional_tokenizer(folder: Path) -> Path | None:
    for pattern, name in ((r"fineweb10B_sp(\d+)", "fineweb_{}_bpe.model"), (r"stdlib_sp(\d+)", "stdlib_{}_bpe.model")):
        m = re.fullmatch(pattern, folder.name)
        if m:
            return folder.parent.parent / "tokenizers" / name.format(m.group(1))
    return None


def _dataset_folder(data_path: str) -> Path:
    """DATA_PATH's folder, or the default: FineWeb once it has shards of both splits (a half-finished
    download has no val or train yet), else the stdlib dataset."""
    if data_path:
        folder = _user_path(data_path)
    else:
        fineweb = REPO_ROOT / FINEWEB_DEFAULT
        complete = any(fineweb.glob("*_train_*.bin")) and any(fineweb.glob("*_val_*.bin"))
        folder = fineweb if complete else REPO_ROOT / STDLIB_DEFAULT
    if not folder.is_dir():
        if not data_path:
            raise DatasetError(f"default dataset {STDLIB_DEFAULT} does not exist: run `make data` first")
        hint = ""
        if folder.name.startswith("stdlib_sp"):
            hint = ": run `make data` first"
        elif folder.name.startswith("fineweb10B_"):
            hint = ": download it with `make data-fineweb`"
        raise DatasetError(f"DATA_PATH={data_path}: folder {folder} does not exist{hint}")
    return folder


def _check_manifest(folder: Path, manifest: dict, vocab_size: int) -> None:
    """The shards the manifest lists exist, and its vocabulary size is VOCAB_SIZE."""
    where = folder / "manifest.json"
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), dict) else {}
    for split in ("train", "val"):
        for name in shards.get(split) or []:
            if not (folder / str(name)).is_file():
                raise DatasetError(f"dataset manifest {where} lists {split} shard {name}, but it is missing")
    declared = manifest.get("vocab_size")
    if declared is not None and declared != vocab_size:
        raise DatasetError(f"dataset {folder} was tokenized with vocabulary size {declared}, but VOCAB_SIZE={vocab_size}")


def _dataset_tokenizer(folder: Path, manifest: dict, tokenizer_path: str, vocab_size: int) -> Path:
    """TOKENIZER_PATH, else the manifest's tokenizer, else the conventional one; checked to be the
    tokenizer the shards were encoded with (the manifest's sha256) and of VOCAB_SIZE pieces."""
    where = folder / "manifest.json"
    entry = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    if tokenizer_path:
        tokenizer = _user_path(tokenizer_path)
        label = f"TOKENIZER_PATH={tokenizer_path}"
    elif entry.get("path"):
        tokenizer = (folder / str(entry["path"])).resolve()
        label = f"tokenizer {tokenizer} (named by {where})"
    else:
        tokenizer = _conventional_tokenizer(folder)
        if tokenizer is None:
            raise DatasetError(f"dataset {folder} names no tokenizer (no manifest.json): set TOKENIZER_PATH")
        label = f"tokenizer {tokenizer}"
    if not tokenizer.is_file():
        raise DatasetError(f"{label}: file does not exist")
    if entry.get("sha256") and file_sha256(tokenizer) != entry["sha256"]:
        raise DatasetError(
            f"{label} is not the tokenizer dataset {folder.name} was encoded with "
            f"({entry.get('path', '?')}, sha256 {str(entry['sha256'])[:12]}…, per {where})"
        )
    sp_size = load_sentencepiece(tokenizer).vocab_size()
    if sp_size != vocab_size:
        raise DatasetError(f"{label} has vocabulary size {sp_size}, but VOCAB_SIZE={vocab_size}")
    return tokenizer


def resolve_dataset(data_path: str = "", tokenizer_path: str = "", vocab_size: int = 1024,
                    check_tokens: bool = True) -> Dataset:
    """The shards and tokenizer of a run, checked to exist and to belong together.

    With `check_tokens` (a run, an evaluation) every train and val shard is read once, through a
    memory map: its header, its size, and its largest token id, which must be < vocab_size. A
    reader that only needs the tokenizer (the sampler) passes False."""
    folder = _dataset_folder(data_path)
    train_files = list_shards(folder, "train")
    val_files = list_shards(folder, "val")
    manifest = _read_manifest(folder) or {}
    _check_manifest(folder, manifest, vocab_size)
    tokenizer = _dataset_tokenizer(folder, manifest, tokenizer_path, vocab_size)
    if check_tokens:
        for path in train_files + val_files:
            check_shard(path, vocab_size)

    return Dataset(
        data_path=folder,
        train_files=train_files,
        val_files=val_files,
        tokenizer_path=tokenizer,
        name=str(manifest.get("name") or folder.name),
        source=str(manifest.get("source") or f"shards in {folder}"),
    )
