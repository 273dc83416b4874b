"""Our weights as the state dict train_gpt.py saves and loads, and what its epsilon changes.

The state dict has train_gpt.py's names (ours, docs/spec.md §2) and its dtypes (tok_emb.weight
bfloat16, everything else float32), with the RoPE flip of interop/conventions.py applied, so
`model.load_state_dict(torch.load(path), strict=True)` in train_gpt.py loads it and its -θ model
computes our +θ one. Its RMSNorm epsilon is fixed (float32's machine epsilon): a checkpoint trained
with another norm_eps gives other logits there, by an amount `eps_difference` measures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from core import reference
from core.config import ModelSpec
from core.params import param_table
from interop.bfloat16 import float32_to_bf16, round_to_bf16
from interop.conventions import BF16_PARAMS, TORCH_SCRIPT_EPS, flip_rope_halves


def reference_state_dict(spec: ModelSpec, weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """name -> array (BF16 bits for tok_emb.weight, float32 otherwise) in train_gpt.py's
    convention, and notes (the bfloat16 rounding of tok_emb.weight, when it rounds anything)."""
    flipped = flip_rope_halves(spec, {n: np.asarray(w, dtype=np.float32) for n, w in weights.items()})
    out, notes = {}, []
    for p in param_table(spec):
        w = flipped[p.name]
        if p.name in BF16_PARAMS:
            rounded = np.abs(round_to_bf16(w) - w).max(initial=0.0)
            if rounded > 0:
                notes.append(f"{p.name} rounded to bfloat16, as train_gpt.py holds it (max |change| {rounded:.3g})")
            out[p.name] = float32_to_bf16(w)
        else:
            out[p.name] = np.ascontiguousarray(w, dtype=np.float32)
    return out, notes


@dataclass(frozen=True)
class EpsDifference:
    delta_loss: float        # mean cross-entropy with train_gpt.py's epsilon minus with the checkpoint's (nats)
    max_delta_logit: float   # the largest |logit difference| over every position and vocabulary entry
    tokens: int              # target tokens scored


def eps_difference(spec: ModelSpec, weights: dict[str, np.ndarray], tokens: np.ndarray, seq_len: int,
                   max_seqs: int) -> EpsDifference:
    """The float64 forward (core/reference.py) of the first `max_seqs` windows of `tokens` with the
    checkpoint's norm_eps and with train_gpt.py's, compared."""
    n = min(max_seqs, (tokens.size - 1) // seq_len)
    if n <= 0:
        raise ValueError(f"need more than {seq_len} tokens, got {tokens.size}")
    ids = tokens[: n * seq_len].astype(np.int64).reshape(n, seq_len)
    targets = tokens[1: n * seq_len + 1].astype(np.int64).reshape(n, seq_len)
    ours = reference.logits(spec, weights, ids)
    theirs = reference.logits(replace(spec, norm_eps=TORCH_SCRIPT_EPS), weights, ids)
    delta = float(reference.cross_entropy(theirs, targets).mean() - reference.cross_entropy(ours, targets).mean())
    return EpsDifference(delta, float(np.abs(theirs - ours).max()), n * seq_len)
