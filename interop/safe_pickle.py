"""A pickle reader that runs nothing: for the reference MLX script's int8 artifact.

train_gpt_mlx.py writes `<run>_mlx_model.int8.ptz` as zlib of a plain pickle of its int8 object
(dicts of numpy arrays, strings and numbers). An ordinary `pickle.loads` of a file someone sent
you runs whatever callable the file names (os.system, eval, ...). This reader resolves only the
globals numpy's own array pickles use, to the installed numpy's functions, whichever numpy wrote
the file (numpy.core in 1.x, numpy._core in 2.x), and a latin1-only _codecs.encode for
protocol-2 pickles of array bytes; every other global is refused before anything is
called, with a one-line error naming it. Containers, strings, bytes and numbers are pickle opcodes,
not globals, so they need nothing admitted. Arrays of Python objects are refused after loading.
"""

from __future__ import annotations

import importlib
import io
import pickle

import numpy as np

from core.errors import CheckpointError

# (module, name) as written in the pickle -> (module, name) to look up in the installed numpy.
_NUMPY_GLOBALS = {}
for _core in ("numpy.core", "numpy._core"):
    _NUMPY_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = "multiarray", "_reconstruct"  # ndarray, protocol < 5
    _NUMPY_GLOBALS[(f"{_core}.multiarray", "scalar")] = "multiarray", "scalar"              # numpy scalars
    _NUMPY_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = "numeric", "_frombuffer"          # ndarray, protocol 5
_NUMPY_GLOBALS[("numpy", "ndarray")] = None, "ndarray"
_NUMPY_GLOBALS[("numpy", "dtype")] = None, "dtype"
# Protocols 2 and below carry an array's bytes as text re-encoded by _codecs.encode(text, "latin1"):
# admitted as a function that does exactly that and nothing else.
_NUMPY_GLOBALS[("_codecs", "encode")] = "latin1", "encode"


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted for latin1 text only, not {encoding!r}")
    return text.encode("latin1")


def _installed(submodule: str | None, name: str):
    if submodule == "latin1":
        return _latin1_encode
    if submodule is None:
        return getattr(np, name)
    for core in ("numpy._core", "numpy.core"):   # numpy 2 first: numpy.core is its deprecated alias
        try:
            return getattr(importlib.import_module(f"{core}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {submodule}.{name}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        target = _NUMPY_GLOBALS.get((module, name))
        if target is None:
            raise CheckpointError(f"refused pickle global {module}.{name} in {self.source}: this reader admits "
                                  "numpy arrays and plain containers only; nothing was run")
        return _installed(*target)

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: refused a pickle persistent id; nothing was run")


def _check_no_objects(value, source: str) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise CheckpointError(f"{source}: holds an array of Python objects, which no int8 artifact has")
    if isinstance(value, dict):
        for v in value.values():
            _check_no_objects(v, source)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_no_objects(v, source)


def safe_loads(data: bytes, source: str):
    """The object a pickle holds, if it is made of numpy arrays and plain values only."""
    try:
        obj = _NumpyOnlyUnpickler(data, source).load()
    except CheckpointError:
        raise
    except Exception as err:   # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        text = str(err).strip().splitlines()
        raise CheckpointError(f"{source}: not a readable pickle ({type(err).__name__}"
                              f"{': ' + text[0] if text else ''})") from None
    _check_no_objects(obj, source)
    return obj
