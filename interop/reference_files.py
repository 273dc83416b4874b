"""Reading the four files the Parameter Golf reference trainers write, into our weights and spec.

    kind               written by          file                        what it is
    torch-state-dict   train_gpt.py        final_model.pt              torch.save(model.state_dict())
    torch-int8         train_gpt.py        final_model.int8.ptz        zlib(torch.save(int8 object))
    mlx-npz            train_gpt_mlx.py    <run>_mlx_model.npz         mx.savez(**flat parameters)
    mlx-int8           train_gpt_mlx.py    <run>_mlx_model.int8.ptz    zlib(pickle(int8 object))
    record-state-dict  the record's         final_model.pt              torch.save(model.state_dict()), banked
                       train_gpt.py                                    matrices (interop/record_layout.py)

The kind is read from the bytes, never the file name: a zip holding a data.pkl record is a
torch.save file, a zip of .npy entries an npz; a zlib stream whose first bytes are a zip is the
torch int8 artifact, one whose first byte is pickle's PROTO opcode the MLX one (our own artifact
starts with b"twingpt-artifact" and is not a reference file).

The int8 object (both scripts; "int8_clean_per_row_v1"): a dict of
    quantized  name -> int8 codes            scales  name -> per-row fp16 scales (1-D) or one fp32 scale (0-d)
    dtypes     name -> the original dtype    passthrough  name -> small or control tensors, kept in float
    qmeta      name -> {"scheme": "per_row", "axis": 0} (optional)
    passthrough_orig_dtypes  name -> the dtype a passthrough tensor had before its fp16 storage (optional)
Dequantized as the scripts do: codes * scale in float32, then cast to the original dtype (a
bfloat16 tok_emb is rounded to bfloat16), so the weights are the ones the script evaluates.

Every float tensor then becomes float32 (exactly: bfloat16 and float16 widen without loss), names
lose any wrapper prefix, the spec is inferred from the shapes (core.params.infer_spec) with norm_eps
set to the source's epsilon, and the torch script's files get the RoPE flip of interop/conventions.py.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.artifact import MAGIC as TWINGPT_ARTIFACT_MAGIC
from core.artifact import Quantized, dequantize_tensor
from core.config import ModelSpec, model_fields
from core.errors import CheckpointError, ConfigError
from core.params import infer_spec
from interop.bfloat16 import BF16, bf16_to_float32, round_to_bf16
from interop.conventions import MLX_SCRIPT_EPS, TORCH_SCRIPT_EPS, flip_rope_halves, strip_wrapper_prefixes
from interop.record_layout import RECORD_NEGATIVE_SLOPE, is_banked, unbank
from interop.safe_pickle import safe_loads

TORCH_STATE_DICT, TORCH_INT8, MLX_NPZ, MLX_INT8 = "torch-state-dict", "torch-int8", "mlx-npz", "mlx-int8"
RECORD_STATE_DICT = "record-state-dict"   # a torch state dict with the record's banks: known once it is read
KINDS = (TORCH_STATE_DICT, TORCH_INT8, MLX_NPZ, MLX_INT8, RECORD_STATE_DICT)
TORCH_KINDS = (TORCH_STATE_DICT, TORCH_INT8, RECORD_STATE_DICT)
SOURCE_EPS = {TORCH_STATE_DICT: TORCH_SCRIPT_EPS, TORCH_INT8: TORCH_SCRIPT_EPS, RECORD_STATE_DICT: TORCH_SCRIPT_EPS,
              MLX_NPZ: MLX_SCRIPT_EPS, MLX_INT8: MLX_SCRIPT_EPS}
SCRIPT = {TORCH_STATE_DICT: "train_gpt.py", TORCH_INT8: "train_gpt.py", RECORD_STATE_DICT: "the record's train_gpt.py",
          MLX_NPZ: "train_gpt_mlx.py", MLX_INT8: "train_gpt_mlx.py"}
INT8_FORMAT = "int8_clean_per_row_v1"
MAX_DECOMPRESSED_BYTES = 4 << 30   # a zlib stream inflating past this is not a model of this challenge
FLOAT_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ImportedModel:
    kind: str                          # one of KINDS
    spec: ModelSpec
    weights: dict[str, np.ndarray]     # our names, float32, our RoPE convention
    notes: tuple[str, ...]             # what was converted, one line each


# ---------------------------------------------------------------------------------------------
# The kind of a file, from its bytes
# ---------------------------------------------------------------------------------------------

def _zip_kind(raw: bytes) -> str | None:
    try:
        names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return None


def _zlib_head(raw: bytes, n: int = 64) -> bytes | None:
    try:
        return zlib.decompressobj().decompress(raw, n)
    except zlib.error:
        return None


def kind_of_bytes(raw: bytes) -> str | None:
    if raw.startswith(b"PK\x03\x04"):
        return {"torch": TORCH_STATE_DICT, "npz": MLX_NPZ}.get(_zip_kind(raw))
    head = _zlib_head(raw)
    if not head or head.startswith(TWINGPT_ARTIFACT_MAGIC):
        return None
    if head.startswith(b"PK\x03\x04"):
        return TORCH_INT8
    if head[:1] == b"\x80":   # pickle's PROTO opcode, the first byte of every protocol >= 2 pickle
        return MLX_INT8
    return None


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})") from None


def detect_kind(path) -> str | None:
    """Which reference file `path` is (one of KINDS), or None for anything else."""
    return kind_of_bytes(_read_bytes(Path(path)))


def _inflate(raw: bytes, source: str) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, MAX_DECOMPRESSED_BYTES)
    except zlib.error as err:
        raise CheckpointError(f"{source}: corrupt zlib stream ({err})") from None
    if d.unconsumed_tail:
        raise CheckpointError(f"{source}: inflates past {MAX_DECOMPRESSED_BYTES:,} bytes; not a model of this challenge")
    if not d.eof:
        raise CheckpointError(f"{source}: truncated (the zlib stream ends early)")
    return out


# ---------------------------------------------------------------------------------------------
# Tensors: float32, the int8 object dequantized
# ---------------------------------------------------------------------------------------------

def to_float32(a, name: str, source: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise CheckpointError(f"{source}: {name} is a {type(a).__name__}, not a tensor")
    if a.dtype == BF16:
        return bf16_to_float32(a)
    if a.dtype.kind != "f":
        raise CheckpointError(f"{source}: {name} has dtype {a.dtype}, not a float parameter of this GPT")
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_dtype(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a tensor of `dtype` holds them (the scripts' cast after dequantizing)."""
    if dtype == "bfloat16":
        return round_to_bf16(w)
    if dtype == "float16":
        return w.astype(np.float16).astype(np.float32)
    return w


def _dict_entry(obj: dict, key: str, source: str, optional: bool = False) -> dict:
    value = obj.get(key, {} if optional else None)
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: int8 object has no {key!r} dict; not a reference int8 artifact")
    return value


def dequantize_int8_object(obj, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """name -> float32 weights of a reference int8 object (arrays as numpy), and a note."""
    if not isinstance(obj, dict) or obj.get("__quant_format__") != INT8_FORMAT:
        found = obj.get("__quant_format__") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{source}: not a reference int8 object (format {found!r}, expected {INT8_FORMAT!r})")
    quantized, scales = _dict_entry(obj, "quantized", source), _dict_entry(obj, "scales", source)
    dtypes, passthrough = _dict_entry(obj, "dtypes", source), _dict_entry(obj, "passthrough", source)
    qmeta = _dict_entry(obj, "qmeta", source, optional=True)
    orig_dtypes = _dict_entry(obj, "passthrough_orig_dtypes", source, optional=True)
    weights = {}
    for name, q in quantized.items():
        scale, dtype = scales.get(name), dtypes.get(name)
        if not isinstance(q, np.ndarray) or q.dtype != np.int8 or not isinstance(scale, np.ndarray):
            raise CheckpointError(f"{source}: {name} is not int8 codes with a scale")
        if dtype not in FLOAT_NAMES:
            raise CheckpointError(f"{source}: {name} has original dtype {dtype!r}, expected one of {FLOAT_NAMES}")
        per_row = (qmeta.get(name) or {}).get("scheme") == "per_row" or scale.ndim > 0
        if per_row and (q.ndim != 2 or scale.shape != (q.shape[0],)):
            raise CheckpointError(f"{source}: {name} has codes {q.shape} and per-row scales {scale.shape}, "
                                  "which do not match")
        if not per_row and scale.size != 1:
            raise CheckpointError(f"{source}: {name} has a per-tensor scale of shape {scale.shape}")
        scheme = "int8_per_row" if per_row else "int8_per_tensor"
        w = dequantize_tensor(Quantized(scheme, dtype, q.shape, {"q": q, "scale": to_float32(scale, name, source)}))
        weights[name] = _as_dtype(w, dtype)
    for name, t in passthrough.items():
        weights[name] = _as_dtype(to_float32(t, name, source), orig_dtypes.get(name, "float32"))
    note = (f"dequantized {len(quantized)} int8 tensors (codes x scale, then the original dtype) and "
            f"{len(passthrough)} passthrough tensors")
    return weights, [note]


# ---------------------------------------------------------------------------------------------
# The four readers
# ---------------------------------------------------------------------------------------------

def _tensors(obj, source: str, what: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a {what}")
    return {name: to_float32(a, name, source) for name, a in obj.items()}


def _read_npz(raw: bytes, source: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as err:   # truncated zip, bad .npy header, an object array (refused, not run)
        raise CheckpointError(f"{source}: not a readable .npz ({type(err).__name__}: "
                              f"{' '.join(str(err).split())})") from None
    return _tensors(arrays, source, "dict of arrays")


def _raw_weights(kind: str, raw: bytes, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    if kind == MLX_NPZ:
        return _read_npz(raw, source), []
    if kind == MLX_INT8:
        return dequantize_int8_object(safe_loads(_inflate(raw, source), source), source)
    from interop.torch_files import load_torch_bytes   # torch only for the torch script's files
    if kind == TORCH_STATE_DICT:
        return _tensors(load_torch_bytes(raw, source), source, "state dict"), []
    return dequantize_int8_object(load_torch_bytes(_inflate(raw, source), source), source)


def read_reference_file(path, **settings) -> ImportedModel:
    """A reference trainer's file as our weights and spec. `settings` are ModelSpec fields no shape
    holds (logit_softcap, rope_base, norm_eps, ...); norm_eps defaults to the source script's."""
    path = Path(path)
    source = str(path)
    unknown = sorted(set(settings) - set(model_fields()))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not model settings")
    raw = _read_bytes(path)
    kind = kind_of_bytes(raw)
    if kind is None:
        raise CheckpointError(f"{source}: not a Parameter Golf reference file (final_model.pt, final_model.int8.ptz, "
                              "<run>_mlx_model.npz or <run>_mlx_model.int8.ptz)")
    weights, notes = _raw_weights(kind, raw, source)
    weights = strip_wrapper_prefixes(weights)
    if kind == TORCH_STATE_DICT and is_banked(weights):
        kind = RECORD_STATE_DICT
        weights, banked_notes = unbank(weights, source, settings.get("parallel_start_layer", 0))
        notes += banked_notes
        settings = {**settings, "mlp_negative_slope": RECORD_NEGATIVE_SLOPE}
        notes.append(f"MLP: leaky_relu(x, {RECORD_NEGATIVE_SLOPE:g})^2, the record's (MLP_NEGATIVE_SLOPE)")
    eps = SOURCE_EPS[kind]
    spec = infer_spec(weights, source=source, **{"norm_eps": eps, **settings})
    notes.append(f"norm_eps={spec.norm_eps:.8g}" + (f" ({SCRIPT[kind]}'s RMSNorm epsilon)" if spec.norm_eps == eps
                                                   else f" (set; {SCRIPT[kind]} uses {eps:.8g})"))
    if kind in TORCH_KINDS:
        weights = flip_rope_halves(spec, weights)
        notes.append("RoPE: negated the second half of every head's rows of c_q and c_k "
                     "(train_gpt.py rotates by -θ, we by +θ; the attention is unchanged)")
    weights = {name: np.ascontiguousarray(w, dtype=np.float32) for name, w in weights.items()}
    return ImportedModel(kind, spec, weights, tuple(notes))
