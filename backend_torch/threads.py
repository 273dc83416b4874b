"""torch on one intra-op thread, for tiny models on a shared machine."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """torch on one intra-op thread, restored after. On this machine's 2 shared cores the parity
    suite's tiny models ran ~18x slower with 2 threads (OpenMP threads spinning against the other
    processes): 20 s instead of 1.1 s for a 20-step run. Results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
