"""The memory plan: a run's peak memory, estimated from its settings before anything is allocated.

    estimate_peak(spec, backend=..., device=..., ...)  -> MemoryEstimate (bytes, with a breakdown)
    plan_micro_steps(spec, train_batch_tokens=..., budget_bytes=..., ...) -> Plan (GRAD_ACCUM_STEPS
        and MLX_EAGER_EVAL that fit a budget, or the settings that would)
    default_budget_bytes(device_kind, device_total_bytes), machine_ram_bytes()

Pure arithmetic on the model spec and the batch geometry (microseconds); imports nothing but the
standard library and core. Made of: core/memory_kept.py (what each backend keeps for the backward,
tensor by tensor), core/memory_estimate.py (the backward, optimizer and validation phases, whose
largest is the peak) and core/memory_plan.py (the planner); this file holds the budgets and the
names callers import. What is counted, where the figures come from, how CUDA, Metal and mps are
modelled: docs/memory.md.

Budget (default_budget_bytes): the share of a device a plan may use.
    cuda   0.80 of the free memory (torch.cuda.mem_get_info): the CUDA context, cuDNN/cuBLAS
           workspaces, NCCL buffers and the caching allocator's fragmentation take the rest, and
           the estimate does not see them.
    metal  0.75 of mx.metal's recommended working set (device_info()["max_recommended_working_set_size"]):
           past it macOS starts paging the GPU's memory, and the window server and other apps
           share the same unified memory.
    cpu    0.60 of the machine's RAM (machine_ram_bytes): the interpreter and libraries (~0.5-1 GB
           with torch), the data loader's shards, the page cache and the other processes of a
           shared machine live in the same RAM, and there is no swap to fall back on.
"""

from __future__ import annotations

import math
import os

from core.memory_estimate import (BACKENDS, DEVICES, DTYPE_BYTES, MLX_DEFAULT_CHUNK_TOKENS,  # noqa: F401
                                  MemoryEstimate, estimate_peak)
from core.memory_kept import blocked_attention_elements, newton_schulz_bytes, parameter_bytes  # noqa: F401
from core.memory_plan import Plan, auto_eager_eval, mlx_chunks, plan_micro_steps  # noqa: F401
from core.sizes import GIB, MIB  # noqa: F401

# Shares of a device a plan may fill (see the module docstring).
BUDGET_FRACTION = {"cuda": 0.80, "metal": 0.75, "cpu": 0.60}


def machine_ram_bytes() -> int | None:
    """Physical RAM of this machine (Linux and macOS), or None when the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_bytes(device_kind: str, device_total_bytes: int) -> int:
    """The bytes a plan may use on a device (fractions and reasons in the module docstring).

    device_total_bytes: CUDA's free memory (torch.cuda.mem_get_info()[0]), Metal's recommended
    working set, or the machine's RAM (machine_ram_bytes()) for the CPU."""
    if device_kind not in BUDGET_FRACTION:
        raise ValueError(f"device_kind={device_kind!r}: must be one of {', '.join(BUDGET_FRACTION)}")
    if device_total_bytes <= 0:
        raise ValueError(f"device_total_bytes={device_total_bytes}: must be positive")
    return int(math.floor(BUDGET_FRACTION[device_kind] * device_total_bytes))
