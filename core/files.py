"""Writing a file so that a reader finds the old file or the new one, never half of one.

Checkpoints, artifacts, shards, tokenizers and manifests are all written this way: into a temporary
file in the same folder, flushed to disk, then renamed over the target (an atomic step), so an
interrupted run or a full disk never leaves a half-written file or loses the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator:
    """Open a temporary file next to `path` for binary writing; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary data files
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex), read in pieces: a checkpoint can be larger than memory allows twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(chunk_bytes):
            digest.update(piece)
    return digest.hexdigest()
