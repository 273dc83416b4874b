"""fp32 means fp32 on CUDA: TF32 off for matrix products and cuDNN, so the fp32 parity rows hold on GPUs.

torch >= 2.9 sets this through `fp32_precision` ("ieee" or "tf32"); once that API is used, reading
the legacy `torch.backends.cudnn.allow_tf32` raises (conv and RNN may then differ). So everything
here reads and writes one API: fp32_precision where torch has it, allow_tf32 only where it does not.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def tf32_state() -> tuple:
    """The current settings, as set_tf32_state takes them back."""
    if NEW_API:
        return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
                torch.backends.cudnn.rnn.fp32_precision)
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32_state(state: tuple) -> None:
    if NEW_API:
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cudnn.rnn.fp32_precision) = state
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


def tf32_off() -> None:
    """Matrix products and cuDNN (convolutions and RNNs) in true fp32."""
    set_tf32_state(("ieee", "ieee", "ieee") if NEW_API else (False, False))


def tf32_allowed() -> bool:
    """Whether any of them may use TF32."""
    if NEW_API:
        return "tf32" in tf32_state()
    return any(tf32_state())


@contextmanager
def exact_fp32():
    """TF32 off inside, the settings as they were after."""
    before = tf32_state()
    tf32_off()
    try:
        yield
    finally:
        set_tf32_state(before)
