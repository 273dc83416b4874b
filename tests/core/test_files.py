"""core/files.py: a file written atomically is the old one or the new one, never half of one, is
an ordinary readable data file, and its bytes reach the disk before its name points at them."""

import hashlib
import os
import stat

import pytest

from core import files
from core.files import atomic_writer, file_sha256, write_bytes_atomic


def test_a_new_file_in_a_new_folder_is_written_whole_and_readable_by_others(tmp_path):
    path = tmp_path / "a" / "b" / "model.bin"
    write_bytes_atomic(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644      # not mkstemp's private 0o600
    assert [p.name for p in path.parent.iterdir()] == ["model.bin"]   # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_the_bytes_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", os.path.dirname(a))),
                                                           real_replace(a, b)))
    write_bytes_atomic(tmp_path / "x.bin", b"12345")
    # the file's 5 bytes synced, then renamed from a temporary in the same folder, then the folder synced
    assert events[:2] == [("fsync", 5), ("replace", str(tmp_path))]
    assert len(events) == 3 and events[2][0] == "fsync"


def test_file_sha256_reads_every_piece(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5
    path.write_bytes(data)
    assert file_sha256(path, chunk_bytes=100) == hashlib.sha256(data).hexdigest() == file_sha256(path)
