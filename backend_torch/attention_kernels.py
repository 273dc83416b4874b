"""Which attention kernel a torch run uses on each device, and CUDA's SDPA pinned to it.

    cpu    "blocked"    backend_torch/model.py causal_attention (faster than SDPA on the CPU)
    cuda   "flash"      sm80+ in bf16: FlashAttention-2, the reference trainer's only kernel; grouped
                        K/V heads read in place (enable_gqa, which only flash takes without a fallback)
           "efficient"  below sm80 (no flash there), in fp32 (flash has none) or with a mask
                        (DOC_ATTENTION_ENABLED; flash takes none): the memory-efficient kernel, K/V
                        expanded to the query heads; nothing T x T kept, as with flash
    mps    "math"       torch trains on mps through SDPA's math path: the B x H x T x T probabilities
                        are kept for the backward (the memory plan counts them); K/V expanded

On CUDA every other SDPA kernel is switched off, as the reference does: a call the chosen kernel
cannot take then fails loudly instead of falling back to the math kernel (B x H x T x T scores the
plan does not count) or to cuDNN attention (wrong-output reports with few KV heads).
"""

from __future__ import annotations

import torch

FLASH_MIN_CAPABILITY = (8, 0)   # Ampere: FlashAttention-2 and bf16 tensor cores

DESCRIPTIONS = {
    "blocked": "blocked causal attention (CPU)",
    "flash": "SDPA flash kernel only, grouped K/V in place",
    "efficient": "SDPA memory-efficient kernel only, K/V expanded",
    "math": "SDPA math path (keeps B x H x T x T probabilities), K/V expanded",
}


def attention_kernel(device_type: str, capability: tuple[int, int] | None, compute_dtype: str,
                     masked: bool = False) -> str:
    """The kernel of a training run on this device; capability: CUDA's (major, minor), else None;
    masked: training attention takes a mask (DOC_ATTENTION_ENABLED)."""
    if device_type == "cpu":
        return "blocked"
    if device_type == "mps":
        return "math"
    if capability >= FLASH_MIN_CAPABILITY and compute_dtype == "bfloat16" and not masked:
        return "flash"
    return "efficient"


def pin_cuda_kernel(kernel: str) -> None:
    """Allow this one SDPA kernel on CUDA (process-wide flags, as the reference sets them)."""
    torch.backends.cuda.enable_flash_sdp(kernel == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(kernel == "efficient")
    torch.backends.cuda.enable_math_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def use_kernel(model, kernel: str) -> None:
    """Tell the model's attention layers whether the kernel takes grouped K/V heads as they are."""
    for block in model.blocks:
        block.attn.gqa_in_kernel = kernel == "flash"
