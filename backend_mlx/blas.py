"""On Linux, run MLX's CPU backend on an optimized BLAS when one is installed.

MLX's Linux wheel ships a reference BLAS that is about 30x slower than OpenBLAS for matrix
products (measured here: 7 vs 217 GFLOP/s for a 1024x1024 fp32 product). MLX calls the standard
BLAS symbols, so preloading Debian's OpenBLAS (`apt-get install libopenblas0-pthread`) makes it use
that instead. The library must be preloaded before the process starts, so the trainer re-executes
itself once with LD_PRELOAD set.
"""

from __future__ import annotations

import glob
import os
import sys

# Debian/Ubuntu install paths of libopenblas0-pthread (any architecture), then the generic alternative.
OPENBLAS_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/*-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
REEXEC_MARK = "TWINGPT_BLAS_REEXEC"


def find_openblas() -> str | None:
    for pattern in OPENBLAS_CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def preloaded_blas() -> str | None:
    """The OpenBLAS library preloaded into this process, if any."""
    for lib in os.environ.get("LD_PRELOAD", "").split():
        if "blas" in os.path.basename(lib) or "openblas" in lib:
            return lib
    return None


def ensure_fast_blas(module: str, argv: list[str]) -> None:
    """Re-execute `python -m module argv...` with OpenBLAS preloaded, when on Linux and it is installed.

    Does nothing on macOS (MLX runs on Metal and Accelerate there), when a BLAS is already preloaded,
    when TWINGPT_NO_BLAS_PRELOAD=1, or after one re-execution.
    """
    if not sys.platform.startswith("linux") or os.environ.get("TWINGPT_NO_BLAS_PRELOAD") == "1":
        return
    if preloaded_blas() or os.environ.get(REEXEC_MARK):
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def blas_in_use() -> str | None:
    """The OpenBLAS MLX's CPU backend calls, or None for its bundled reference BLAS. A BLAS takes
    MLX's symbols only when preloaded (LD_PRELOAD) and mapped into this process. Looking for any
    "openblas" in the process is wrong: numpy's wheel maps an OpenBLAS of its own
    (numpy.libs/libscipy_openblas64_, other symbol names), which MLX never calls."""
    lib = preloaded_blas()
    if lib is None:
        return None
    try:
        with open("/proc/self/maps") as f:
            mapped = {os.path.realpath(line.split()[-1]) for line in f if "/" in line}
    except OSError:
        return None
    return lib if os.path.realpath(lib) in mapped else None


def blas_note() -> str | None:
    """One log line: which BLAS this process's MLX CPU backend really calls (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    lib = blas_in_use()
    if lib:
        return f"blas: OpenBLAS (preloaded from {lib})"
    return ("blas: MLX's bundled reference BLAS (slow on the CPU; sudo apt-get install libopenblas0-pthread "
            "and the trainer preloads it, ~30x faster)")
