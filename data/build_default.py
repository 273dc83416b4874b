"""Build the default dataset: the .py files of this Python's standard library (`make data`).

    python -m data.build_default [--out-root data/] [--force]

Every .py file under sysconfig's stdlib folder (site-packages and dist-packages excluded) is one
document; files that are not valid UTF-8 are skipped and counted. Documents are stored in the
order of the sha256 of their relative path: a fixed shuffle that does not depend on which other
files exist. (Sorted by path, training read whole packages in a row: the 100-odd near-identical
codec tables of encodings/ took the train loss of `make train` to 0.7 and its val loss from 4.3 up
to 6.6 on the way; shuffled, the stream mixes the library.) About 2% of the files go to validation, chosen by a hash of the relative path, so a file's
split does not depend on which other files exist. The tokenizer is trained on the train split only.
Output, under the output root:

    tokenizers/stdlib_1024_bpe.model (+ .vocab)
    datasets/stdlib_sp1024/stdlib_train_000000.bin ..., stdlib_val_000000.bin ...
    datasets/stdlib_sp1024/manifest.json

The manifest is removed first and written last (each file atomically), so an interrupted build
never leaves a manifest that points to half-written files. A second run reuses the dataset when
the manifest matches this Python's corpus (its sha256) and every file it names is intact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import DatasetError, exit_on_user_error
from core.files import write_bytes_atomic
from data.shards import ShardError, file_sha256, read_header, write_shard
from data.tokenizer import encode_documents, load_tokenizer, train_tokenizer

MANIFEST_FORMAT = "twingpt-dataset-1"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
VAL_ONE_IN = 50  # ~2% of the files
SHARD_TOKENS = 100_000_000


@dataclass
class Corpus:
    train: list[tuple[str, str]]  # (relative path, text)
    val: list[tuple[str, str]]
    skipped: list[str]  # not valid UTF-8
    sha256: str  # of every document's relative path and bytes, in order


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def path_hash(relpath: str) -> bytes:
    return hashlib.sha256(relpath.encode("utf-8")).digest()


def is_val(relpath: str) -> bool:
    return int.from_bytes(path_hash(relpath)[:8], "little") % VAL_ONE_IN == 0


def collect_corpus(source: Path) -> Corpus:
    """The .py documents under `source`, in the order of their path hash, split train/val."""
    if not source.is_dir():
        raise DatasetError(f"corpus folder {source} does not exist")
    relpaths = []
    for folder, dirs, files in os.walk(source):  # does not follow symlinked folders
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        for name in files:
            if name.endswith(".py"):
                relpaths.append(Path(folder, name).relative_to(source).as_posix())
    relpaths.sort(key=path_hash)  # a fixed shuffle (see the module docstring)
    train, val, skipped = [], [], []
    sha = hashlib.sha256()
    for rel in relpaths:
        raw = (source / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        sha.update(f"{rel}\0{len(raw)}\0".encode("utf-8"))
        sha.update(raw)
        (val if is_val(rel) else train).append((rel, text))
    if not val and len(train) > 1:
        # A tiny corpus may have no file the hash picks: use the one whose hash is smallest.
        pick = min(range(len(train)), key=lambda i: path_hash(train[i][0]))
        val.append(train.pop(pick))
    if not train or not val:
        raise DatasetError(f"corpus folder {source}: need at least 2 UTF-8 .py files, found {len(train) + len(val)}")
    return Corpus(train, val, skipped, sha.hexdigest())


def dataset_name(vocab_size: int) -> str:
    return f"stdlib_sp{vocab_size}"


def tokenizer_name(vocab_size: int) -> str:
    return f"stdlib_{vocab_size}_bpe"


def reusable(manifest_path: Path, corpus: Corpus, vocab_size: int) -> str:
    """Why the existing dataset cannot be reused ("" when it can)."""
    if not manifest_path.is_file():
        return "no manifest"
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        if m.get("corpus_sha256") != corpus.sha256:
            return "the corpus changed (different Python or files)"
        if m.get("vocab_size") != vocab_size:
            return f"vocabulary size {m.get('vocab_size')} != {vocab_size}"
        folder = manifest_path.parent
        tok = (folder / m["tokenizer"]["path"]).resolve()
        if not tok.is_file() or file_sha256(tok) != m["tokenizer"]["sha256"]:
            return f"tokenizer {tok} is missing or changed"
        for split in ("train", "val"):
            count = sum(read_header(folder / name) for name in m["shards"][split])
            if count != m["tokens"][split]:
                return f"{split} shards hold {count} tokens, the manifest says {m['tokens'][split]}"
    except (ValueError, KeyError, TypeError, OSError, ShardError) as e:
        return f"manifest or shards unreadable ({type(e).__name__}: {e})"
    return ""


def write_split(folder: Path, prefix: str, split: str, tokens: np.ndarray, shard_tokens: int) -> list[str]:
    names = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        name = f"{prefix}_{split}_{i:06d}.bin"
        write_shard(folder / name, tokens[start:start + shard_tokens])
        names.append(name)
    return names


def stdlib_manifest(folder: Path, source: Path, vocab_size: int, corpus: Corpus, train_tokens: np.ndarray,
                    val_tokens: np.ndarray, model_path: Path, shards: dict) -> dict:
    """The manifest.json of a built stdlib dataset: its source, sizes, tokenizer and shards."""
    return {
        "format": MANIFEST_FORMAT,
        "name": folder.name,
        "source": f"Python {platform.python_version()} standard library ({source})",
        "python_version": platform.python_version(),
        "vocab_size": vocab_size,
        "files": {"train": len(corpus.train), "val": len(corpus.val), "skipped": len(corpus.skipped)},
        "skipped_files": corpus.skipped,
        "bytes": {split: sum(len(t.encode("utf-8")) for _, t in docs)
                  for split, docs in (("train", corpus.train), ("val", corpus.val))},
        "tokens": {"train": int(train_tokens.size), "val": int(val_tokens.size)},
        "corpus_sha256": corpus.sha256,
        "tokenizer": {
            "path": os.path.relpath(model_path, folder),  # relative to this folder
            "sha256": file_sha256(model_path),
            "vocab_size": vocab_size,
        },
        "shards": shards,
    }


def build_default(source: Path, out_root: Path, *, vocab_size: int = 1024, force: bool = False,
                  shard_tokens: int = SHARD_TOKENS, log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the stdlib dataset of `source` under `out_root`; return its manifest."""
    t0 = time.perf_counter()
    source, out_root = Path(source), Path(out_root)
    folder = out_root / "datasets" / dataset_name(vocab_size)
    manifest_path = folder / "manifest.json"
    corpus = collect_corpus(source)
    t_collect = time.perf_counter() - t0
    log(f"corpus {source}: {len(corpus.train)} train + {len(corpus.val)} val files, "
        f"{len(corpus.skipped)} skipped (not UTF-8), sha256 {corpus.sha256[:16]} ({t_collect:.1f}s)")

    if not force:
        why = reusable(manifest_path, corpus, vocab_size)
        if not why:
            m = json.loads(manifest_path.read_text(encoding="utf-8"))
            log(f"reusing {folder}: it matches this corpus ({m['tokens']['train']:,} train + "
                f"{m['tokens']['val']:,} val tokens); pass --force to rebuild")
            return m
        if manifest_path.exists():
            log(f"rebuilding {folder}: {why}")

    manifest_path.unlink(missing_ok=True)  # from here on, no manifest until everything is written
    t1 = time.perf_counter()
    tok_prefix = out_root / "tokenizers" / tokenizer_name(vocab_size)
    model_path = train_tokenizer((text for _, text in corpus.train), tok_prefix, vocab_size)
    t_tok = time.perf_counter() - t1
    log(f"tokenizer {model_path}: vocabulary {vocab_size}, trained on the train split ({t_tok:.1f}s)")

    t2 = time.perf_counter()
    sp = load_tokenizer(model_path)
    train_tokens = encode_documents(sp, (text for _, text in corpus.train))
    val_tokens = encode_documents(sp, (text for _, text in corpus.val))
    t_enc = time.perf_counter() - t2

    t3 = time.perf_counter()
    for stale in folder.glob("stdlib_*_*.bin"):  # shards of an earlier, larger build
        stale.unlink()
    shards = {split: write_split(folder, "stdlib", split, tokens, shard_tokens)
              for split, tokens in (("train", train_tokens), ("val", val_tokens))}
    manifest = stdlib_manifest(folder, source, vocab_size, corpus, train_tokens, val_tokens, model_path, shards)
    write_bytes_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    t_write = time.perf_counter() - t3
    log(f"encoded {manifest['tokens']['train']:,} train + {manifest['tokens']['val']:,} val tokens "
        f"({t_enc:.1f}s); wrote {len(shards['train'])} + {len(shards['val'])} shards and {manifest_path} "
        f"({t_write:.1f}s); total {time.perf_counter() - t0:.1f}s")
    return manifest


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.build_default", description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", default=str(Path(__file__).resolve().parent),
                        help="folder that receives datasets/ and tokenizers/ (default: the data/ folder)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching dataset exists")
    args = parser.parse_args(argv)
    build_default(stdlib_dir(), Path(args.out_root), force=args.force)


if __name__ == "__main__":
    main()
