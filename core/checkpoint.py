"""Checkpoints: one .safetensors file holds everything needed to continue a run.

Tensors (no pickle):
    <parameter name>   the model weights under their docs/spec.md §2 names; the tied matrix once (tok_emb.weight,
                       and no lm_head.weight at all when embeddings are tied)
    optim/<key>        every array of the optimizer state (Adam moments, Muon buffers, ...)
    rng/<key>          every array of the RNG state, if any
    ema/<name>         the moving average of the weights (EMA_DECAY), when the run keeps one

Header metadata, key "twingpt": a JSON object with sorted keys:
    format             FORMAT_VERSION
    spec               ModelSpec.to_dict()
    config             TrainConfig.to_dict()
    step               optimizer steps done
    data_state         where the training stream stands (opaque to this module)
    optimizer_scalars  the non-array values of the optimizer state (step counts, momentum, ...)
    rng_state          the non-array values of the RNG state, or null when none was saved
    backend            "torch", "mlx", ...
    looping            whether the layers loop (NUM_LOOPS > 0, switched on at ENABLE_LOOPING_AT; docs/spec.md
                       §4.10); absent in older files, which never loop
    extra              free-form

Saving writes a temporary file next to the target, fsyncs it and renames it over the target
(os.replace is atomic), so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from core.config import SHAPES, UNSHAPED, ModelSpec, model_fields
from core.errors import CheckpointError, ConfigError
from core.files import write_bytes_atomic
from core.params import check_weights

FORMAT_VERSION = 1
META_KEY = "twingpt"
OPTIM_PREFIX = "optim/"
RNG_PREFIX = "rng/"
EMA_PREFIX = "ema/"
PREFIXES = (OPTIM_PREFIX, RNG_PREFIX, EMA_PREFIX)


@dataclass
class Checkpoint:
    path: str
    spec: ModelSpec
    config: dict
    step: int
    weights: dict[str, np.ndarray]
    optimizer_state: dict[str, Any]   # arrays and scalars, as given to save_checkpoint
    data_state: dict
    rng_state: dict | None
    backend: str = ""
    extra: dict = field(default_factory=dict)
    looping: bool = False
    ema: dict[str, np.ndarray] | None = None   # the weights' moving average, when the run kept one


def _split(state: dict, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays become tensors under `prefix`; everything else goes to the JSON metadata."""
    arrays, values = {}, {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[prefix + key] = np.ascontiguousarray(value)
        else:
            values[key] = value
    return arrays, values


def _json_default(value):
    if isinstance(value, np.generic):  # numpy scalars: stored as the Python number they equal
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def save_checkpoint(path, *, spec: ModelSpec, config, step: int, weights: dict[str, np.ndarray],
                    optimizer_state: dict[str, Any], data_state: dict, rng_state: dict | None = None,
                    backend: str = "", extra: dict | None = None, looping: bool = False,
                    ema: dict[str, np.ndarray] | None = None) -> None:
    """Write a checkpoint atomically. `config` is a TrainConfig (or its dict)."""
    path = Path(path)
    label = f"checkpoint {path}"
    check_weights(spec, weights, source=label)  # never write what load_checkpoint would refuse
    if looping and not spec.num_loops:
        raise ValueError(f"{label}: looping without NUM_LOOPS")
    if ema is not None:
        check_weights(spec, ema, source=f"{label} (moving average)")
    optim_arrays, optim_scalars = _split(optimizer_state, OPTIM_PREFIX)
    rng_arrays, rng_scalars = _split(rng_state, RNG_PREFIX) if rng_state is not None else ({}, None)
    meta = {
        "format": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "step": int(step),
        "data_state": data_state,
        "optimizer_scalars": optim_scalars,
        "rng_state": rng_scalars,
        "backend": backend,
        "extra": extra or {},
        "looping": bool(looping),
    }
    try:
        text = json.dumps(meta, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{label}: metadata cannot be saved as JSON ({e})") from None
    tensors = {name: np.ascontiguousarray(a) for name, a in weights.items()}
    tensors.update(optim_arrays)
    tensors.update(rng_arrays)
    tensors.update({EMA_PREFIX + name: np.ascontiguousarray(a) for name, a in (ema or {}).items()})
    try:
        write_bytes_atomic(path, safetensors.numpy.save(tensors, metadata={META_KEY: text}))
    except OSError as e:
        raise CheckpointError(f"{label}: cannot write it ({e.strerror or e})") from None


def _corrupt(label: str, why) -> CheckpointError:
    return CheckpointError(f"{label}: corrupt or not a twingpt checkpoint ({' '.join(str(why).split())})")


def _read_checkpoint_file(path: Path, label: str) -> tuple[str, dict[str, np.ndarray]]:
    """(the twingpt metadata's text, every tensor) of a safetensors file."""
    if not path.exists():
        raise CheckpointError(f"{label}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{label}: is a folder, not a checkpoint file")
    try:
        with safe_open(str(path), framework="np") as f:
            text = (f.metadata() or {}).get(META_KEY)
            if text is None:
                raise _corrupt(label, "a safetensors file without twingpt metadata")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise _corrupt(label, e) from None
    except OSError as e:
        raise CheckpointError(f"{label}: cannot read it ({e.strerror or e})") from None
    return text, tensors


def _checked_metadata(text: str, label: str) -> dict:
    """The metadata, checked to be this format's JSON object with every key of the right type."""
    try:
        meta = json.loads(text)
    except ValueError:
        raise _corrupt(label, "metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise _corrupt(label, "metadata is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{label}: format {meta.get('format')!r}, this twingpt reads format {FORMAT_VERSION}")
    keys = ("spec", "config", "step", "data_state", "optimizer_scalars", "rng_state", "backend", "extra")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise _corrupt(label, f"metadata lacks {', '.join(missing)}")
    types_ok = (isinstance(meta["step"], int) and isinstance(meta["config"], dict)
                and isinstance(meta["optimizer_scalars"], dict)
                and (meta["rng_state"] is None or isinstance(meta["rng_state"], dict)))
    types_ok = types_ok and isinstance(meta.get("looping", False), bool)
    if not types_ok:
        raise _corrupt(label, "metadata values have the wrong types")
    return meta


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint; every defect is a one-line CheckpointError naming the file."""
    path = Path(path)
    label = f"checkpoint {path}"
    text, tensors = _read_checkpoint_file(path, label)
    meta = _checked_metadata(text, label)
    try:
        spec = ModelSpec.from_dict(meta["spec"])
    except (ConfigError, TypeError) as e:
        raise _corrupt(label, f"bad spec: {e}") from None

    def strip(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    weights = {k: v for k, v in tensors.items() if not k.startswith(PREFIXES)}
    check_weights(spec, weights, source=label)
    ema = strip(EMA_PREFIX) or None
    if ema is not None:
        check_weights(spec, ema, source=f"{label} (moving average)")
    rng_state = None
    if meta["rng_state"] is not None:
        rng_state = {**meta["rng_state"], **strip(RNG_PREFIX)}
    return Checkpoint(
        path=str(path), spec=spec, config=meta["config"], step=meta["step"], weights=weights,
        optimizer_state={**meta["optimizer_scalars"], **strip(OPTIM_PREFIX)},
        data_state=meta["data_state"], rng_state=rng_state, backend=meta["backend"], extra=meta["extra"],
        looping=meta.get("looping", False) and spec.num_loops > 0, ema=ema,
    )


def check_compatible(ckpt: Checkpoint, spec: ModelSpec) -> None:
    """The checkpoint's model is this run's model (init-only settings aside), or a CheckpointError."""
    for name in model_fields(SHAPES, UNSHAPED):   # the INIT_ONLY ones may differ
        theirs, ours = getattr(ckpt.spec, name), getattr(spec, name)
        if theirs != ours:
            raise CheckpointError(f"checkpoint {ckpt.path} was trained with {name}={theirs}, "
                                  f"this run has {name}={ours} (set {name.upper()}={theirs} to continue it)")
