"""COMPRESSOR=pergroup (docs/spec.md §9.3): the artifact's integer codes compressed by role with lrzip.

The payload of core/artifact.py is unchanged; only how it is compressed differs. The code matrices
(the "q" part of every int_per_row and int8_per_row tensor) are cut out of it and gathered by role:
the embedding, the untied head, and each block matrix across layers (every layer's attn.c_q in one
stream, in layer order), so that matrices with alike statistics sit together. In the groups of
SORTED_ROLES the rows of each matrix are put in a nearest-neighbour order first (neighbouring rows
then differ little), and every matrix is written transposed. Each group goes through lrzip's ZPAQ
back end (`lrzip -z -L 9`, a context-mixing coder far stronger than brotli on such data, and slow);
what is left of the payload (header, scales, LQER factors, small tensors) and the row orders go
through brotli. Reading splices the codes back into place and returns the very same payload.

lrzip is a program, not a Python module: it runs on files in a temporary folder. Without it,
writing is a ConfigError and reading an ArtifactError, one line each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.artifact import TAGS, read_header
from core.errors import ArtifactError, ConfigError

TAG = TAGS["pergroup"]
NEEDS_LRZIP = "COMPRESSOR=pergroup needs lrzip: apt-get install lrzip or brew install lrzip"
# Stream order: whole tensors first, then the block roles in the parameter table's order.
WHOLE_ROLES = ("tok_emb.weight", "lm_head.weight")
BLOCK_ROLES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
               "mlp.fc.weight", "mlp.proj.weight")
ROLES = WHOLE_ROLES + BLOCK_ROLES
SORTED_ROLES = ("tok_emb.weight", "lm_head.weight", "attn.c_q.weight", "mlp.fc.weight")
MAX_SORTED_ROWS = 65_536          # a row order is stored as uint16
CODE_SCHEMES = ("int_per_row", "int8_per_row")   # their first stored part is the int8 codes, rows x cols
BROTLI_QUALITY, BROTLI_WINDOW = 11, 24


def lrzip_path() -> str | None:
    return shutil.which("lrzip")


def check_lrzip() -> None:
    if lrzip_path() is None:
        raise ConfigError(NEEDS_LRZIP)


# ---------------------------------------------------------------------------------------------
# Which codes go where
# ---------------------------------------------------------------------------------------------

def role_of(name: str) -> tuple[str, int] | None:
    """(role, layer) of a tensor name: ("tok_emb.weight", 0), ("attn.c_q.weight", 3) for blocks.3.attn.c_q.weight."""
    if name in WHOLE_ROLES:
        return name, 0
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in BLOCK_ROLES:
        return parts[2], int(parts[1])
    return None


def code_groups(tensors: dict) -> list[tuple[str, list[tuple[str, int, int, int]]]]:
    """[(role, [(name, offset, rows, cols), ...]), ...]: the payload header's code matrices by role, in
    ROLES order, each group in layer order; only the groups that have members."""
    groups: dict[str, list] = {role: [] for role in ROLES}
    for name, e in tensors.items():
        found = role_of(name)
        if found is None or e.get("scheme") not in CODE_SCHEMES:
            continue
        shape, offset = e.get("shape"), e.get("offset")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)
                and isinstance(offset, int) and offset >= 0):
            raise ValueError(f"tensor {name}: shape {shape!r}, offset {offset!r}")
        groups[found[0]].append((found[1], name, offset, shape[0], shape[1]))
    return [(role, [m[1:] for m in sorted(groups[role])]) for role in ROLES if groups[role]]


def is_sorted(role: str, rows: int) -> bool:
    return role in SORTED_ROLES and rows <= MAX_SORTED_ROWS


def similarity_order(codes: np.ndarray) -> np.ndarray:
    """A nearest-neighbour path through the rows: row 0 first, then repeatedly the unvisited row of
    least L1 distance (exact, in integers) to the last one, ties to the lowest row index. uint16."""
    left = codes.astype(np.int16)     # the unvisited rows, compacted: ids[k] is left[k]'s row index
    ids = np.arange(len(left))
    order = np.empty(len(left), dtype=np.int64)
    current, k = 0, len(left)
    for i in range(len(order)):
        order[i], row = ids[current], left[current].copy()
        k -= 1
        left[current], ids[current] = left[k], ids[k]    # the last unvisited row takes its place
        if k == 0:
            break
        dist = np.abs(left[:k] - row).sum(axis=1, dtype=np.int32)
        ties = np.flatnonzero(dist == dist.min())
        current = ties[np.argmin(ids[ties])]
    return order.astype("<u2")


# ---------------------------------------------------------------------------------------------
# lrzip, on files in a temporary folder
# ---------------------------------------------------------------------------------------------

def _lrzip(args: list[str], data: bytes) -> bytes:
    """Run lrzip on `data` written to a file, with `args` then -o <out> <in>; the output file's bytes.
    LRZIP=NOCONFIG: a user's lrzip.conf cannot change the settings (and so the bytes); TMP: any scratch
    file of lrzip's goes in the same temporary folder. -N: our own niceness (lrzip's default, 19,
    starves it on a busy machine)."""
    program = lrzip_path()
    if program is None:
        raise ConfigError(NEEDS_LRZIP)
    with tempfile.TemporaryDirectory(prefix="twingpt-pergroup-") as folder:
        src, dst = Path(folder) / "in", Path(folder) / "out"
        src.write_bytes(data)
        done = subprocess.run([program, "-q", "-f", "-N", str(os.nice(0)), *args, "-o", str(dst), str(src)], capture_output=True,
                              env={**os.environ, "LRZIP": "NOCONFIG", "TMP": folder})
        if done.returncode != 0 or not dst.is_file():
            why = " ".join(done.stderr.decode(errors="replace").split()[-12:]) or f"exit status {done.returncode}"
            raise OSError(f"lrzip: {why}")
        return dst.read_bytes()


def lrzip_compress(data: bytes) -> bytes:
    return _lrzip(["-z", "-L", "9"], data)


def lrzip_decompress(data: bytes) -> bytes:
    return _lrzip(["-d"], data)


def _each(function, items: list) -> list:
    """function over items, one lrzip process per core at a time; results in the items' order."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(function, items))


# ---------------------------------------------------------------------------------------------
# The container: tag | u32 stream count | u64 length of each stream | the streams
# ---------------------------------------------------------------------------------------------

def pack_streams(streams: list[bytes]) -> bytes:
    lengths = b"".join(len(s).to_bytes(8, "little") for s in streams)
    return TAG + len(streams).to_bytes(4, "little") + lengths + b"".join(streams)


def unpack_streams(blob: bytes) -> list[bytes]:
    body = memoryview(blob)[len(TAG):]
    if len(body) < 4:
        raise ValueError("no stream table")
    n = int.from_bytes(body[:4], "little")
    if len(body) < 4 + 8 * n:
        raise ValueError("truncated stream table")
    lengths = [int.from_bytes(body[4 + 8 * i:12 + 8 * i], "little") for i in range(n)]
    if 4 + 8 * n + sum(lengths) != len(body):
        raise ValueError(f"{len(body)} bytes after the tag, the stream table says {4 + 8 * n + sum(lengths)}")
    streams, at = [], 4 + 8 * n
    for length in lengths:
        streams.append(bytes(body[at:at + length]))
        at += length
    return streams


# ---------------------------------------------------------------------------------------------
# Cutting the codes out of the payload's data, and splicing them back in
# ---------------------------------------------------------------------------------------------

def cut(data: memoryview, pieces: list[tuple[int, int]]) -> bytes:
    """`data` without the (offset, size) pieces, which must not overlap."""
    kept, cursor = [], 0
    for offset, size in sorted(pieces):
        if offset < cursor or offset + size > len(data):
            raise ValueError(f"codes at {offset} overlap others or run past the data")
        kept.append(data[cursor:offset])
        cursor = offset + size
    return b"".join(kept) + bytes(data[cursor:])


def splice(rest: bytes, pieces: list[tuple[int, bytes]]) -> bytes:
    """The inverse of cut: `rest` with each (offset, bytes) piece put back at its offset."""
    out, taken, cursor = [], 0, 0     # taken: bytes of `rest` used; cursor: position in the whole data
    for offset, chunk in sorted(pieces, key=lambda p: p[0]):
        gap = offset - cursor
        if gap < 0 or taken + gap > len(rest):
            raise ValueError(f"codes at {offset} overlap others or run past the data")
        out += [rest[taken:taken + gap], chunk]
        taken, cursor = taken + gap, offset + len(chunk)
    return b"".join(out) + rest[taken:]


# ---------------------------------------------------------------------------------------------
# compress and decompress: payload bytes <-> the pergroup artifact's bytes
# ---------------------------------------------------------------------------------------------

def group_stream(role: str, members: list, data: memoryview, orders: list[bytes]) -> bytes:
    """One group's bytes: each matrix's codes, rows in similarity order when sorted, transposed.
    Appends the sorted matrices' row orders to `orders`."""
    chunks = []
    for name, offset, rows, cols in members:
        if offset + rows * cols > len(data):
            raise ValueError(f"tensor {name} runs past the data")
        codes = np.frombuffer(data[offset:offset + rows * cols], dtype=np.int8).reshape(rows, cols)
        if is_sorted(role, rows):
            order = similarity_order(codes)
            orders.append(order.tobytes())
            codes = codes[order]
        chunks.append(codes.T.tobytes())
    return b"".join(chunks)


def compress(payload: bytes) -> bytes:
    """The pergroup artifact of an uncompressed artifact payload (core.artifact.serialize's)."""
    import brotli
    check_lrzip()
    header, start = read_header(payload, "payload")
    groups = code_groups(header["tensors"])
    data = memoryview(payload)[start:]
    orders: list[bytes] = []
    raw = [group_stream(role, members, data, orders) for role, members in groups]
    rest = cut(data, [(offset, rows * cols) for _, members in groups for _, offset, rows, cols in members])
    def squeeze(b: bytes) -> bytes:
        return brotli.compress(b, quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW)
    return pack_streams([squeeze(payload[:start] + rest), squeeze(b"".join(orders)), *_each(lrzip_compress, raw)])


def restore_group(role: str, members: list, stream: bytes, orders: memoryview, at: int) -> tuple[list, int]:
    """([(offset, codes bytes), ...], position in `orders` after this group's row orders)."""
    if len(stream) != sum(rows * cols for _, _, rows, cols in members):
        raise ValueError(f"group {role}: {len(stream)} bytes of codes, its tensors need another count")
    pieces, done = [], 0
    for name, offset, rows, cols in members:
        codes = np.frombuffer(stream, dtype=np.int8, count=rows * cols, offset=done).reshape(cols, rows).T
        done += rows * cols
        if is_sorted(role, rows):
            if at + 2 * rows > len(orders):
                raise ValueError(f"tensor {name}: its row order is missing")
            order = np.frombuffer(orders[at:at + 2 * rows], dtype="<u2").astype(np.int64)
            at += 2 * rows
            if not np.array_equal(np.sort(order), np.arange(rows)):
                raise ValueError(f"tensor {name}: its row order is not a permutation")
            restored = np.empty_like(codes)
            restored[order] = codes
            codes = restored
        pieces.append((offset, np.ascontiguousarray(codes).tobytes()))
    return pieces, at


def decompress(blob: bytes, source: str) -> bytes:
    """The payload of a pergroup artifact (its tag included). Corrupt: ValueError, OSError or brotli's
    error, which the caller reports; lrzip or brotli missing: ArtifactError."""
    if lrzip_path() is None:
        raise ArtifactError(f"{source}: {NEEDS_LRZIP}")
    try:
        import brotli
    except ImportError:
        raise ArtifactError(f"{source}: compressed with brotli, which is not installed (pip install brotli)") from None
    streams = unpack_streams(blob)
    if len(streams) < 2:
        raise ValueError(f"{len(streams)} streams")
    remainder, orders = brotli.decompress(streams[0]), memoryview(brotli.decompress(streams[1]))
    header, start = read_header(remainder, source)
    groups = code_groups(header["tensors"])
    if len(streams) != 2 + len(groups):
        raise ValueError(f"{len(streams) - 2} code streams, the header has {len(groups)} groups")
    pieces, at = [], 0
    for (role, members), stream in zip(groups, _each(lrzip_decompress, streams[2:])):
        restored, at = restore_group(role, members, stream, orders, at)
        pieces += restored
    if at != len(orders):
        raise ValueError(f"{len(orders) - at} bytes of row orders belong to no tensor")
    return remainder[:start] + splice(remainder[start:], pieces)
