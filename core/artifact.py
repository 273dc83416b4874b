"""The int8+zlib artifact (docs/spec.md §9): the trained model as the Parameter Golf challenge measures it.

Each tensor gets one storage scheme:

    int8_per_row     float, 2-D, more than 65,536 elements: int8 q, one fp16 scale per row
    int8_per_tensor  float, other shapes, more than 65,536 elements: int8 q, one fp32 scale
    fp32             float control tensors (core.params.is_control) of at most 65,536 elements
    fp16             other float tensors of at most 65,536 elements
    raw              anything not float (ints, bools), kept as is

The arithmetic is the reference trainers' (train_gpt.py `quantize_float_tensor`), in float32:
clip = the 99.99984th percentile of |w| (per row, or over the whole tensor), computed as
torch.quantile does (q rounded to float32, rank = q*(n-1) in float64, then a float32 lerp between
the two neighbours; checked bit-identical to torch 2.x);
per row: scale = max(clip/127, 1/127); per tensor: scale = clip/127, or 1 when clip is 0;
q = round-half-even(clip(w, -clip, clip) / scale) in [-127, 127], with the float32 scale; the
per-row scale is then stored as fp16, and dequantization is q * stored_scale in float32.

Bytes (no pickle): zlib level 9 of

    b"twingpt-artifact" | u64 little-endian header length | header | data

where the header is compact JSON with sorted keys, {"format": 1, "tensors": {name: {"scheme",
"dtype" (original), "shape", "offset", "nbytes"}}}, and the data holds each tensor's parts
back to back in name order, little-endian: q then scale for int8 schemes, else the values.
Identical weights give identical payload bytes on every machine; the compressed bytes are
identical wherever Python's zlib is the same deflate implementation (stock zlib, not zlib-ng).
"""

from __future__ import annotations

import json
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ArtifactError, ConfigError
from core.files import write_bytes_atomic
from core.params import is_control

ARTIFACT_BUDGET_BYTES = 16_000_000
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = np.float32(99.99984 / 100.0)   # float32, as torch.quantile converts q to the input's dtype
MAGIC = b"twingpt-artifact"
FORMAT_VERSION = 1          # what an int8 artifact's header says (its bytes are unchanged since format 1)
GPTQ_FORMAT_VERSION = 2     # a header with any "int_per_row" tensor (QUANT=gptq, docs/spec.md §9.2)
READ_FORMATS = (FORMAT_VERSION, GPTQ_FORMAT_VERSION)
# COMPRESSOR: zlib artifacts are a bare zlib stream (as in format 1); the others start with a tag.
# pergroup (core/pergroup.py) compresses the integer codes by role with the lrzip program.
COMPRESSORS = ("zlib", "lzma", "brotli", "pergroup")
TAGS = {"lzma": b"twingpt-lzma\n", "brotli": b"twingpt-brotli\n", "pergroup": b"twingpt-pergroup\n"}

_I8, _F16, _F32 = np.dtype("<i1"), np.dtype("<f2"), np.dtype("<f4")


@dataclass(frozen=True)
class Quantized:
    """One tensor as stored: its scheme, original dtype and shape, and its stored arrays."""

    scheme: str
    dtype: str                    # the original dtype, e.g. "float32"
    shape: tuple[int, ...]
    parts: dict[str, np.ndarray]  # "q" and "scale", or "data" (int_per_row: and the lqer_* parts)
    info: dict = field(default_factory=dict)   # int_per_row: "bits", and "lqer", "lqer_rank", "lqer_group"


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------

def clip_abs(w: np.ndarray) -> np.ndarray:
    """The CLIP_Q quantile of |w| along the last axis (linear interpolation), in float32."""
    s = np.sort(np.abs(w), axis=-1)
    n = s.shape[-1]
    rank = float(CLIP_Q) * (n - 1)   # float32 q, rank in float64: bit-identical to torch.quantile
    lo = int(rank)
    hi = min(lo + 1, n - 1)
    t = np.float32(rank - lo)
    below, above = s[..., lo], s[..., hi]
    # torch's lerp: from the nearer end, so t = 1 gives `above` exactly
    if t < 0.5:
        return below + t * (above - below)
    return above - (above - below) * (np.float32(1.0) - t)


def _quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = clip_abs(w)[:, None]
    scale = np.maximum(clip / np.float32(127.0), np.float32(1.0 / 127.0))
    q = np.clip(np.rint(np.clip(w, -clip, clip) / scale), -127, 127).astype(_I8)
    return q, scale[:, 0].astype(_F16)


def _quantize_tensor(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clip = float(clip_abs(w.reshape(-1)))
    scale = np.float32(clip / 127.0 if clip > 0 else 1.0)
    q = np.clip(np.rint(np.clip(w, -clip, clip) / scale), -127, 127).astype(_I8)
    return q, np.asarray(scale, dtype=_F32)


def quantize_tensor(name: str, w: np.ndarray) -> Quantized:
    w = np.asarray(w)
    shape = tuple(int(s) for s in w.shape)
    if w.dtype.kind in "biu":
        return Quantized("raw", w.dtype.name, shape, {"data": w.astype(w.dtype.newbyteorder("<"))})
    if w.dtype.kind != "f":
        raise ArtifactError(f"artifact: tensor {name} has dtype {w.dtype}, which an artifact cannot hold")
    w32 = w.astype(np.float32)
    if not np.isfinite(w32).all():
        raise ArtifactError(f"artifact: tensor {name} holds NaN or inf (did training diverge?)")
    with np.errstate(over="ignore"):  # an fp16 overflow becomes inf, refused just below
        if w.size > KEEP_FLOAT_MAX_NUMEL:
            scheme = "int8_per_row" if w.ndim == 2 else "int8_per_tensor"
            q, scale = _quantize_rows(w32) if w.ndim == 2 else _quantize_tensor(w32)
            parts = {"q": q, "scale": scale}
        else:
            scheme = "fp32" if is_control(name) else "fp16"
            parts = {"data": w32.astype(_F32 if scheme == "fp32" else _F16)}
    if not all(np.isfinite(p).all() for p in parts.values()):
        raise ArtifactError(f"artifact: tensor {name} is too large in magnitude for its {scheme} storage")
    return Quantized(scheme, w.dtype.name, shape, parts)


def quantize(weights: dict[str, np.ndarray]) -> dict[str, Quantized]:
    return {name: quantize_tensor(name, weights[name]) for name in sorted(weights)}


def dequantize_tensor(t: Quantized) -> np.ndarray:
    """float32 for every float tensor (q * scale for the int8 schemes); raw tensors as stored."""
    if t.scheme == "int8_per_row":
        return t.parts["q"].astype(np.float32) * t.parts["scale"].astype(np.float32)[:, None]
    if t.scheme == "int8_per_tensor":
        return t.parts["q"].astype(np.float32) * np.float32(t.parts["scale"])
    if t.scheme == "int_per_row":
        return _dequantize_int_per_row(t)
    if t.scheme in ("fp16", "fp32"):
        return t.parts["data"].astype(np.float32)
    return t.parts["data"].astype(t.parts["data"].dtype.newbyteorder("="))


def _dequantize_int_per_row(t: Quantized) -> np.ndarray:
    """q * scale per row, plus the LQER term A @ B when there is one; float32 throughout."""
    w = t.parts["q"].astype(np.float32) * t.parts["scale"].astype(np.float32)[:, None]
    if "lqer" not in t.info:
        return w
    a_q, a_s = t.parts["lqer_a_q"].astype(np.float32), t.parts["lqer_a_scale"].astype(np.float32)
    b_q, b_s = t.parts["lqer_b_q"].astype(np.float32), t.parts["lqer_b_scale"].astype(np.float32)
    if t.info["lqer"] == "asym":
        a = a_q * a_s
        b = (b_q.reshape(-1, t.info["lqer_group"]) * b_s[:, None]).reshape(b_q.shape)
    else:
        a, b = a_q * a_s[:, None], b_q * b_s[:, None]
    return w + a @ b


def dequantize(tensors: dict[str, Quantized]) -> dict[str, np.ndarray]:
    return {name: dequantize_tensor(t) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------

def _layout(scheme: str, dtype: str, shape: tuple[int, ...],
            info: dict | None = None) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """The stored parts of a tensor, in order: (part name, little-endian dtype, shape)."""
    if scheme == "int_per_row" and len(shape) == 2:
        return _int_per_row_layout(shape, info or {})
    if scheme == "int8_per_row" and len(shape) == 2:
        return [("q", _I8, shape), ("scale", _F16, shape[:1])]
    if scheme == "int8_per_tensor":
        return [("q", _I8, shape), ("scale", _F32, ())]
    if scheme in ("fp16", "fp32"):
        return [("data", _F16 if scheme == "fp16" else _F32, shape)]
    if scheme == "raw" and np.dtype(dtype).kind in "biu":
        return [("data", np.dtype(dtype).newbyteorder("<"), shape)]
    raise ValueError(f"tensor scheme {scheme!r} with dtype {dtype!r} and shape {list(shape)}")


def _int_per_row_layout(shape: tuple[int, ...], info: dict) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    rows, cols = shape
    if info.get("bits") not in range(2, 9) or not set(info) <= {"bits", "lqer", "lqer_rank", "lqer_group"}:
        raise ValueError(f"int_per_row with {info}")
    parts = [("q", _I8, shape), ("scale", _F16, (rows,))]
    if "lqer" not in info:
        return parts
    r, g = info.get("lqer_rank"), info.get("lqer_group")
    if not isinstance(r, int) or not 1 <= r <= min(rows, cols):
        raise ValueError(f"lqer_rank {r!r}")
    if info["lqer"] == "sym":
        return parts + [("lqer_a_q", _I8, (rows, r)), ("lqer_a_scale", _F16, (rows,)),
                        ("lqer_b_q", _I8, (r, cols)), ("lqer_b_scale", _F16, (r,))]
    if info["lqer"] == "asym" and isinstance(g, int) and g > 0 and (r * cols) % g == 0:
        return parts + [("lqer_a_q", _I8, (rows, r)), ("lqer_a_scale", _F16, ()),
                        ("lqer_b_q", _I8, (r, cols)), ("lqer_b_scale", _F16, (r * cols // g,))]
    raise ValueError(f"lqer {info.get('lqer')!r} with group {g!r}")


def _nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return dtype.itemsize * int(np.prod(shape, dtype=np.int64))


def serialize(tensors: dict[str, Quantized]) -> bytes:
    """The uncompressed payload; deterministic: sorted names, sorted JSON keys, no timestamps."""
    entries, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        start = offset
        for part, dtype, shape in _layout(t.scheme, t.dtype, t.shape, t.info):
            arr = np.ascontiguousarray(t.parts[part], dtype=dtype).reshape(shape)
            chunks.append(arr.tobytes())
            offset += arr.nbytes
        entries[name] = {"scheme": t.scheme, "dtype": t.dtype, "shape": list(t.shape),
                         "offset": start, "nbytes": offset - start} | t.info
    version = GPTQ_FORMAT_VERSION if any(t.scheme == "int_per_row" for t in tensors.values()) else FORMAT_VERSION
    header = json.dumps({"format": version, "tensors": entries},
                        sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + len(header).to_bytes(8, "little") + header + b"".join(chunks)


def corrupt(source: str, why: str) -> ArtifactError:
    """The one-line error of bytes that are not (or no longer) a twingpt artifact."""
    return ArtifactError(f"{source}: corrupt or not a twingpt artifact ({why})")


def read_header(payload: bytes, source: str = "artifact") -> tuple[dict, int]:
    """(the payload's header, where its data starts); an ArtifactError when it is not one of ours."""
    if payload[:len(MAGIC)] != MAGIC:
        raise corrupt(source, "bad magic bytes")
    n = int.from_bytes(payload[len(MAGIC):len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    if len(payload) < start + n:
        raise corrupt(source, "truncated header")
    try:
        header = json.loads(payload[start:start + n])
    except ValueError:
        raise corrupt(source, "header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
        raise corrupt(source, "header has no tensor table")
    if header.get("format") not in READ_FORMATS:
        raise ArtifactError(f"{source}: artifact format {header.get('format')!r}, "
                            f"this twingpt reads formats {', '.join(map(str, READ_FORMATS))}")
    return header, start + n


def deserialize(payload: bytes, source: str = "artifact") -> dict[str, Quantized]:
    header, start = read_header(payload, source)
    data = memoryview(payload)[start:]
    out, used = {}, 0
    for name, e in header["tensors"].items():
        try:
            shape = tuple(e["shape"])
            if not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"shape {list(shape)}")
            info = {k: v for k, v in e.items() if k not in ("scheme", "dtype", "shape", "offset", "nbytes")}
            layout = _layout(e["scheme"], e["dtype"], shape, info)
            offset, parts = e["offset"], {}
            if not isinstance(offset, int) or offset < 0:
                raise ValueError(f"offset {offset!r}")
            for part, dtype, part_shape in layout:
                size = _nbytes(dtype, part_shape)
                if offset + size > len(data):
                    raise ValueError("data runs past the end")
                parts[part] = np.frombuffer(data[offset:offset + size], dtype=dtype).reshape(part_shape)
                offset += size
            if offset - e["offset"] != e["nbytes"]:
                raise ValueError("size does not match its shape")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise corrupt(source, f"tensor {name}: {' '.join(str(err).split())}") from None
        used += e["nbytes"]
        out[name] = Quantized(e["scheme"], e["dtype"], shape, parts, info)
    if used != len(data):
        raise corrupt(source, f"{len(data) - used} bytes of data belong to no tensor")
    return out


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------

def check_compressor(name: str) -> None:
    """A ConfigError naming COMPRESSOR when `name` is unknown or its module is not installed."""
    if name not in COMPRESSORS:
        raise ConfigError(f"COMPRESSOR={name!r}: must be one of {', '.join(COMPRESSORS)}")
    if name == "brotli":
        try:
            import brotli  # noqa: F401
        except ImportError:
            raise ConfigError("COMPRESSOR=brotli: the brotli module is not installed (pip install brotli)") from None
    if name == "pergroup":
        from core import pergroup   # it builds on this module
        pergroup.check_lrzip()
        check_compressor("brotli")  # the rest of the payload goes through brotli


def compress(payload: bytes, compressor: str = "zlib") -> bytes:
    """zlib level 9 (bare, as format 1), lzma preset 9 (.xz), brotli quality 11 or pergroup, the last three
    starting with their tag."""
    check_compressor(compressor)
    if compressor == "zlib":
        return zlib.compress(payload, 9)
    if compressor == "lzma":
        return TAGS["lzma"] + lzma.compress(payload, preset=9)
    if compressor == "pergroup":
        from core import pergroup
        return pergroup.compress(payload)
    import brotli
    return TAGS["brotli"] + brotli.compress(payload, quality=11)


def compressor_of(blob: bytes) -> str:
    """The compressor an artifact's bytes say they were written with (zlib when no tag)."""
    for name, tag in TAGS.items():
        if blob[:len(tag)] == tag:
            return name
    return "zlib"


def decompress(blob: bytes, source: str = "artifact") -> bytes:
    compressor = compressor_of(blob)
    body = blob[len(TAGS.get(compressor, b"")):]
    try:
        if compressor == "zlib":
            return zlib.decompress(body)
        if compressor == "lzma":
            return lzma.decompress(body, format=lzma.FORMAT_XZ)
        if compressor == "pergroup":
            from core import pergroup
            return pergroup.decompress(blob, source)
        try:
            import brotli
        except ImportError:
            raise ArtifactError(f"{source}: compressed with brotli, which is not installed (pip install brotli)") from None
        return brotli.decompress(body)
    except ArtifactError:
        raise
    except Exception as err:   # zlib.error, lzma.LZMAError, brotli.error, pergroup's: truncated or corrupt
        raise corrupt(source, f"{compressor}: {err}") from None


def pack(weights: dict[str, np.ndarray]) -> bytes:
    """Weights (name -> numpy array) -> artifact bytes: quantized, serialized, zlib level 9."""
    return zlib.compress(serialize(quantize(weights)), 9)


def pack_tensors(tensors: dict[str, Quantized], compressor: str = "zlib") -> bytes:
    """Quantized tensors (e.g. core.quantize.quantize_model's) -> artifact bytes."""
    return compress(serialize(tensors), compressor)


def unpack(blob: bytes, source: str = "artifact") -> dict[str, np.ndarray]:
    """Artifact bytes (any compressor) -> name -> dequantized array (float32 for every float tensor)."""
    return dequantize(deserialize(decompress(blob, source), source))


def write_artifact(path: str | Path, blob: bytes) -> int:
    """Write packed bytes to `path` atomically (temp file + rename); returns the size in bytes."""
    try:
        write_bytes_atomic(path, blob)
    except OSError as err:
        raise ArtifactError(f"artifact {path}: cannot write it ({err.strerror or err})") from None
    return len(blob)


def save_artifact(path: str | Path, weights: dict[str, np.ndarray]) -> int:
    """Write the artifact of `weights` to `path`; returns its size in bytes."""
    return write_artifact(path, pack(weights))


def load_artifact(path: str | Path) -> dict[str, np.ndarray]:
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"artifact {path}: no such file") from None
    except OSError as err:
        raise ArtifactError(f"artifact {path}: cannot read it ({err.strerror or err})") from None
    return unpack(blob, source=f"artifact {path}")


def size_report(n_bytes: int) -> str:
    """'artifact: 12,345,678 bytes (77.2% of the 16,000,000-byte budget)'."""
    line = f"artifact: {n_bytes:,} bytes ({100.0 * n_bytes / ARTIFACT_BUDGET_BYTES:.1f}% of the " \
           f"{ARTIFACT_BUDGET_BYTES:,}-byte budget)"
    if n_bytes > ARTIFACT_BUDGET_BYTES:
        line += f", {n_bytes - ARTIFACT_BUDGET_BYTES:,} bytes over"
    return line
