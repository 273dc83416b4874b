"""Reading a model from a file a user has: the one place that knows every file kind twingpt reads.

    load_model_file(path, kind, settings) -> ModelFile(spec, weights, kind, config)

`kind` is what the user said the file is: "checkpoint" (CHECKPOINT=, our .safetensors) or
"artifact" (ARTIFACT=, our int8+zlib model.int8.zlib). The file's own bytes decide what it is; a
file of the other kind is a one-line error naming the right setting, and a file of no kind known
here is a one-line error too. A checkpoint holds its ModelSpec; an artifact holds only tensors, so
its spec is read from their shapes (core.params.infer_spec), with what no shape holds (softcap,
RoPE base, RMSNorm eps) from `settings`.

The Parameter Golf reference trainers' four files (interop/, docs/spec.md §13) are read too, given
as either setting: their spec comes from their shapes, their RMSNorm epsilon is their script's, and
RoPE is converted to ours, exactly as `make pg-import` does.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from core import artifact
from core.checkpoint import META_KEY, load_checkpoint
from core.config import INIT_ONLY, UNSHAPED, ModelSpec, TrainConfig, model_fields
from core.errors import CheckpointError
from core.params import infer_spec
from interop import detect_kind, read_reference_file

SETTING = {"checkpoint": "CHECKPOINT", "artifact": "ARTIFACT"}
# What no tensor shape holds: an artifact's spec takes these from the settings.
NOT_IN_SHAPES = model_fields(INIT_ONLY, UNSHAPED)


@dataclass(frozen=True)
class ModelFile:
    spec: ModelSpec
    weights: dict[str, np.ndarray]
    kind: str                                   # "checkpoint", "artifact" or a reference kind (interop.KINDS)
    config: dict = field(default_factory=dict)  # the training run's settings, when the file holds them
    looping: bool = False                       # whether the layers loop (docs/spec.md §4.10)


def file_kind(path: Path) -> str | None:
    """"checkpoint", "artifact" or None, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if len(head) >= 9:   # safetensors: u64 little-endian header length, then a JSON object
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "checkpoint"
    if artifact.compressor_of(head) != "zlib":   # lzma and brotli artifacts start with their tag
        return "artifact"
    try:
        if zlib.decompressobj().decompress(head, len(artifact.MAGIC)) == artifact.MAGIC:
            return "artifact"
    except zlib.error:
        pass
    return None


def load_model_file(path: str | Path, kind: str, settings: TrainConfig) -> ModelFile:
    """The spec and weights in `path`, which the user gave as `kind` (see the module docstring)."""
    path = Path(path)
    name = f"{SETTING[kind]}={path}"
    if not path.is_file():
        raise CheckpointError(f"{name}: no such file")
    found = file_kind(path)
    if found is None:
        reference = detect_kind(path)
        if reference is None:
            raise CheckpointError(f"{name}: not a twingpt checkpoint (.safetensors) or artifact (model.int8.zlib), "
                                  "nor a Parameter Golf reference file")
        model = read_reference_file(path, **{k: settings.spec_value(k) for k in NOT_IN_SHAPES if k != "norm_eps"})
        return ModelFile(model.spec, model.weights, model.kind, looping=model.spec.num_loops > 0)
    if found != kind:
        raise CheckpointError(f"{name}: this file is a twingpt {found}; give it as {SETTING[found]}={path}")
    if kind == "checkpoint":
        ckpt = load_checkpoint(path)
        return ModelFile(ckpt.spec, ckpt.weights, kind, dict(ckpt.config), ckpt.looping)
    weights = artifact.load_artifact(path)
    spec = infer_spec(weights, source=f"artifact {path}", **{k: settings.spec_value(k) for k in NOT_IN_SHAPES})
    # An artifact is a finished model: it loops when its spec does, as the record evaluates its own.
    return ModelFile(spec, weights, kind, looping=spec.num_loops > 0)


def run_config(path: str | Path, kind: str) -> dict:
    """The settings of the run that wrote the file, when known: a checkpoint's own (read from its
    header alone), an artifact's from the config.json of its run folder; else {}."""
    path = Path(path)
    try:
        if kind == "checkpoint" and file_kind(path) == "checkpoint":
            with safe_open(str(path), framework="np") as f:
                config = json.loads((f.metadata() or {}).get(META_KEY, "{}")).get("config", {})
        elif kind == "artifact" and (path.parent / "config.json").is_file():
            config = json.loads((path.parent / "config.json").read_text())
        else:
            return {}
    except (OSError, ValueError, AttributeError, SafetensorError):
        return {}   # load_model_file says what is wrong with the file
    return config if isinstance(config, dict) else {}
