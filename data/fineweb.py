"""Download the Parameter Golf FineWeb export (`make data-fineweb VARIANT=sp1024 TRAIN_SHARDS=1`).

    python -m data.fineweb --variant sp1024 --train-shards 1 [--source REPO_OR_DIR] [--out-root data/]

The export lives in the Hugging Face dataset repo willdepueoai/parameter-golf, under `datasets/`.
The layout and manifest we assume (that of the challenge's exporter; read defensively):

    datasets/manifest.json
        {"datasets":   [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                         "path": "datasets/fineweb10B_sp1024", "vocab_size": 1024,
                         "stats": {"files_train": 195, "files_val": 1, ...}}, ...],
         "tokenizers": [{"name": "sp_bpe_1024", "vocab_size": 1024,
                         "model_path": "tokenizers/fineweb_1024_bpe.model",
                         "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}, ...]}
    datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ...   (all are downloaded)
    datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin ... (the first N)
    datasets/tokenizers/fineweb_1024_bpe.model, .vocab

Paths in the manifest are relative to `datasets/`; where something is missing we fall back to the
conventional names above (and to one val shard). `--source` may name another hub dataset repo, or
a local folder laid out like `datasets/` (a stand-in for tests, no network).

Files land in <out-root>/datasets/fineweb10B_<variant>/ and <out-root>/tokenizers/; existing files
are kept. Every shard's header and size is checked, and the tokenizer's vocabulary size must match
the variant. We then write the dataset folder's manifest.json (twingpt's schema, naming the shards
and the tokenizer with its sha256) and keep the hub manifest next to it as source_manifest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from core.errors import DatasetError, exit_on_user_error
from core.files import atomic_writer, write_bytes_atomic
from data.shards import file_sha256, read_header, read_json_object
from data.tokenizer import load_tokenizer

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
MANIFEST_FORMAT = "twingpt-dataset-1"


class Source:
    """Where the export is read from: a hub dataset repo, or a local folder laid out like it."""

    def __init__(self, source: str | None):
        self.source = source or REPO_ID
        self.local = Path(self.source) if Path(self.source).is_dir() else None
        if self.local is None and (self.source.startswith((".", "/", "~")) or self.source.count("/") != 1):
            raise DatasetError(f"--source {self.source}: no such folder, and not a hub repo id (owner/name)")

    def describe(self) -> str:
        return f"local folder {self.local}" if self.local else f"hub dataset {self.source}/{REMOTE_ROOT}"

    def fetch(self, relpath: str, dest: Path) -> None:
        """Copy `relpath` (relative to the export's root) to `dest`, atomically."""
        if self.local is not None:
            src = self.local / relpath
            if not src.is_file():
                raise DatasetError(f"{relpath}: not found in {self.describe()}")
        else:
            from huggingface_hub import hf_hub_download

            try:
                src = Path(hf_hub_download(repo_id=self.source, filename=f"{REMOTE_ROOT}/{relpath}",
                                           repo_type="dataset")).resolve()
            except Exception as e:  # network, authentication, missing file: all one line for the user
                first = (str(e).strip().splitlines() or [""])[0]
                raise DatasetError(f"cannot download {relpath} from {self.describe()}: {type(e).__name__} {first}") from None
            tmp = dest.with_name(f".{dest.name}.link.tmp")
            try:  # a hard link to the hub cache: no second copy of a 200 MB shard
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, tmp)
                os.replace(tmp, dest)
                return
            except OSError:
                tmp.unlink(missing_ok=True)
        with atomic_writer(dest) as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)


def _entry(manifest: dict, key: str, name: str) -> dict | None:
    """The entry called `name` of manifest[key], a list of {"name": ...} or a dict keyed by name."""
    items = manifest.get(key)
    if isinstance(items, dict):
        entry = items.get(name)
        return entry if isinstance(entry, dict) else None
    if isinstance(items, list):
        return next((x for x in items if isinstance(x, dict) and x.get("name") == name), None)
    return None


def _relative(value, fallback: str) -> str:
    """A manifest path relative to the export root; absolute or missing paths fall back."""
    if not isinstance(value, str) or not value:
        return fallback
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts:
        return fallback
    return p.as_posix()


def _int(value, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetError(f"hub manifest: {what} is {value!r}, not an integer") from None


def variant_vocab_size(variant: str) -> int:
    m = re.fullmatch(r"sp(\d+)", variant)
    if not m:
        raise DatasetError(f"--variant {variant!r}: expected sp<vocab size>, e.g. sp1024 (SentencePiece variants only)")
    return int(m.group(1))


def plan(manifest: dict, variant: str) -> dict:
    """What to fetch for a variant: dataset folder, shard counts, tokenizer files, vocab size."""
    vocab_size = variant_vocab_size(variant)
    name = f"fineweb10B_{variant}"
    ds = _entry(manifest, "datasets", name)
    if ds is None:
        raise DatasetError(f"hub manifest has no dataset {name}")
    stats = ds.get("stats") if isinstance(ds.get("stats"), dict) else {}
    tok_name = ds.get("tokenizer_name")
    tok = _entry(manifest, "tokenizers", tok_name) if tok_name else None
    tok = tok or {}
    declared = _int(ds.get("vocab_size", tok.get("vocab_size")), f"vocab_size of {name}")
    if declared is not None and declared != vocab_size:
        raise DatasetError(f"hub manifest: {name} has vocab_size {declared}, the variant says {vocab_size}")
    files_val = _int(stats.get("files_val"), f"stats.files_val of {name}")
    model = _relative(tok.get("model_path") or tok.get("path"), f"tokenizers/fineweb_{vocab_size}_bpe.model")
    files = [model]
    if model.endswith(".model"):
        files.append(_relative(tok.get("vocab_path"), model[:-len(".model")] + ".vocab"))
    return {
        "name": name,
        "folder": _relative(ds.get("path"), f"datasets/{name}"),
        "files_train": _int(stats.get("files_train"), f"stats.files_train of {name}"),
        "files_val": 1 if files_val is None else files_val,  # the exports have one val shard
        "tokenizer_files": files,
        "vocab_size": vocab_size,
    }


def fetch_hub_manifest(src: Source, hub_manifest: Path, log=print) -> dict:
    """The hub's manifest.json, fetched fresh when possible (it says how many shards exist), else the
    copy downloaded before."""
    try:
        src.fetch("manifest.json", hub_manifest)
    except DatasetError as e:
        if not hub_manifest.is_file():
            raise
        log(f"using the manifest downloaded before ({e})")
    return read_json_object(hub_manifest, "hub manifest")


def fetch_tokenizer(src: Source, p: dict, tok_dir: Path, variant: str, log=print) -> Path:
    """The variant's tokenizer files (fetched unless present); the model's path, checked to have the
    variant's vocabulary size."""
    for rel in p["tokenizer_files"]:
        dest = tok_dir / PurePosixPath(rel).name
        if not dest.exists():
            log(f"fetch {rel}")
            src.fetch(rel, dest)
    model = tok_dir / PurePosixPath(p["tokenizer_files"][0]).name
    sp = load_tokenizer(model)
    if sp.vocab_size() != p["vocab_size"]:
        raise DatasetError(f"tokenizer {model} has vocabulary size {sp.vocab_size()}, variant {variant} needs {p['vocab_size']}")
    return model


def download_fineweb(variant: str, train_shards: int, out_root: Path, source: str | None = None,
                     log=print) -> Path:
    """Fetch the manifest, all val shards, the first `train_shards` train shards and the tokenizer."""
    variant_vocab_size(variant)  # a bad variant fails before any download
    if train_shards < 0:
        raise DatasetError(f"--train-shards {train_shards}: must not be negative")
    src = Source(source)
    out_root = Path(out_root)
    log(f"source: {src.describe()}")

    p = plan(fetch_hub_manifest(src, out_root / "datasets" / f"fineweb10B_{variant}" / "source_manifest.json", log),
             variant)
    if p["files_train"] is not None and train_shards > p["files_train"]:
        raise DatasetError(f"--train-shards {train_shards}: {p['name']} only has {p['files_train']} train shards")

    folder = out_root / "datasets" / p["name"]
    wanted = [f"fineweb_val_{i:06d}.bin" for i in range(p["files_val"])]
    wanted += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    for name in wanted:
        dest = folder / name
        if dest.exists():
            log(f"have  {dest}")
        else:
            log(f"fetch {p['folder']}/{name}")
            src.fetch(f"{p['folder']}/{name}", dest)
    # Check every shard in the folder (also those of an earlier, larger download): header and size.
    shard_names, tokens = {}, {}
    for split in ("val", "train"):
        shard_names[split] = sorted(f.name for f in folder.glob(f"fineweb_{split}_*.bin"))
        tokens[split] = sum(read_header(folder / name) for name in shard_names[split])

    model = fetch_tokenizer(src, p, out_root / "tokenizers", variant, log)

    ours = {
        "format": MANIFEST_FORMAT,
        "name": p["name"],
        "source": f"Parameter Golf FineWeb export, {src.describe()}",
        "vocab_size": p["vocab_size"],
        "tokens": tokens,
        "tokenizer": {"path": os.path.relpath(model, folder), "sha256": file_sha256(model),
                      "vocab_size": p["vocab_size"]},
        "shards": shard_names,
    }
    write_bytes_atomic(folder / "manifest.json", (json.dumps(ours, indent=2) + "\n").encode("utf-8"))
    log(f"{p['name']}: {len(shard_names['train'])} train shards ({tokens['train']:,} tokens), "
        f"{len(shard_names['val'])} val shards ({tokens['val']:,} tokens), tokenizer {model}")
    return folder


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.fineweb", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sp1024", help="tokenizer variant: sp1024, sp4096, ...")
    parser.add_argument("--train-shards", type=int, default=1, help="how many train shards (100M tokens each)")
    parser.add_argument("--source", default=None, help=f"hub dataset repo (default {REPO_ID}) or a local folder")
    parser.add_argument("--out-root", default=str(Path(__file__).resolve().parent),
                        help="folder that receives datasets/ and tokenizers/ (default: the data/ folder)")
    args = parser.parse_args(argv)
    download_fineweb(args.variant, args.train_shards, Path(args.out_root), args.source)


if __name__ == "__main__":
    main()
