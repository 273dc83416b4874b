"""torch's file format, and nothing else of torch: the one file of interop/ that imports it.

The reference torch script writes `final_model.pt` (torch.save of its state dict) and, inside
zlib, `final_model.int8.ptz` (torch.save of its int8 object). Reading them takes torch's own
reader, so torch is imported here, but only as the file format: `torch.load(weights_only=True)`,
which unpickles tensors, dicts, lists, strings and numbers and refuses any other global, and
`torch.save`. No computation runs in torch: tensors become numpy arrays by views of their bytes
(bfloat16 as interop/bfloat16.py's BF16 bits) and back.
"""

from __future__ import annotations

import io
import pickle
import re

import numpy as np
import torch

from core.errors import CheckpointError
from interop.bfloat16 import BF16


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _to_numpy(value):
    """Tensors to numpy arrays (bfloat16 as BF16 bits), through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(BF16)
        return t.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def load_torch_bytes(raw: bytes, source: str):
    """The object a torch.save file holds, its tensors as numpy arrays; read with weights_only=True."""
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:   # weights_only refused a global: nothing was run
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))   # the wording varies across torch versions
        if refused:
            raise CheckpointError(f"refused pickle global {refused.group(1)} in {source}: torch.load(weights_only=True) "
                                  "admits tensors and plain containers only; nothing was run") from None
        raise CheckpointError(f"{source}: torch.load(weights_only=True) refused it ({_one_line(err)})") from None
    except Exception as err:   # truncated or corrupt zip, bad records: torch raises many kinds
        raise CheckpointError(f"{source}: not a readable torch.save file ({_one_line(err)})") from None
    return _to_numpy(obj)


def torch_save_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """torch.save of a dict name -> tensor, each with the numpy array's dtype (BF16 -> torch.bfloat16)."""
    tensors = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype == BF16:
            tensors[name] = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(a.copy())
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()
