"""The interop tests use the parity suite's helpers: both backends' logits and its independent
float64 forward with a RoPE sign and an epsilon (parity_lib.variant_logits), which with
rope_sign=-1 is the reference torch script's model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
