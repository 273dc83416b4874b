"""The record's (Parameter Golf 1.0611) final_model.pt layout: banked matrices, and back.

The record's train_gpt.py keeps the block matrices of all L layers in four stacked parameters:

    qo_bank        (2L, d, d)    rows 0..L-1: c_q of block i;  rows L..2L-1: attn.proj of block i
    kv_bank        (2L, kv, d)   rows 0..L-1: c_k of block i;  rows L..2L-1: c_v of block i
    mlp_up_bank    (L, F, d)     mlp.fc of block i
    mlp_down_bank  (L, d, F)     mlp.proj of block i

Every other tensor has our name already (tok_emb.weight, skip_weights, skip_gates, blocks.N.*
control parameters, parallel_post_lambdas, parallel_resid_lambdas). Its MLP is always
leaky_relu(x, 0.5)^2, and it holds the two lane tensors whether or not PARALLEL_START_LAYER uses
them: with PARALLEL_START_LAYER=0 its forward never reads them, so we drop them on import and write
their initial values (ones, 1.1) on export. Its RoPE and epsilon are train_gpt.py's (conventions.py).
"""

from __future__ import annotations

import numpy as np

from core.config import ModelSpec
from core.errors import CheckpointError, ConfigError
from core.params import PARALLEL_RESID_INIT

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
LANE_TENSORS = ("parallel_post_lambdas", "parallel_resid_lambdas")
RECORD_NEGATIVE_SLOPE = 0.5      # the record's MLP: leaky_relu(x, negative_slope=0.5).square(), no setting
# The record's block and layout settings, which its train_gpt.py reads from the environment.
RECORD_SETTINGS = ("ln_scale", "skip_gates_enabled", "parallel_start_layer", "parallel_final_lane", "num_loops",
                   "loop_start", "loop_end")


def is_banked(weights: dict) -> bool:
    return any(name in weights for name in BANKS)


def unbank(weights: dict[str, np.ndarray], source: str, parallel_start_layer: int) -> tuple[dict, list[str]]:
    """The record's tensors under our names (docs/spec.md §2). A bank missing, or banks that do not
    stack the same L layers of one width, is a one-line CheckpointError."""
    missing = [b for b in BANKS if b not in weights]
    if missing:
        raise CheckpointError(f"{source}: has {', '.join(b for b in BANKS if b in weights)} but not "
                              f"{', '.join(missing)}; not the record's banked state dict")
    qo, kv, up, down = (np.asarray(weights[b]) for b in BANKS)
    L = up.shape[0] if up.ndim == 3 else -1
    d = qo.shape[-1] if qo.ndim == 3 else -1
    F = up.shape[1] if up.ndim == 3 else -1
    fits = (qo.ndim == kv.ndim == up.ndim == down.ndim == 3 and qo.shape == (2 * L, d, d)
            and kv.shape[0] == 2 * L and kv.shape[2] == d and up.shape == (L, F, d) and down.shape == (L, d, F))
    if not fits:
        raise CheckpointError(f"{source}: banks qo {qo.shape}, kv {kv.shape}, mlp_up {up.shape}, mlp_down "
                              f"{down.shape} do not stack the same layers of one width")
    out = {name: w for name, w in weights.items() if name not in BANKS}
    for i in range(L):
        p = f"blocks.{i}."
        out[p + "attn.c_q.weight"], out[p + "attn.proj.weight"] = qo[i], qo[L + i]
        out[p + "attn.c_k.weight"], out[p + "attn.c_v.weight"] = kv[i], kv[L + i]
        out[p + "mlp.fc.weight"], out[p + "mlp.proj.weight"] = up[i], down[i]
    notes = [f"unbanked qo_bank, kv_bank, mlp_up_bank, mlp_down_bank into the matrices of {L} blocks"]
    if not parallel_start_layer and all(n in out for n in LANE_TENSORS):
        for n in LANE_TENSORS:
            del out[n]
        notes.append("dropped parallel_post_lambdas and parallel_resid_lambdas: unused with PARALLEL_START_LAYER=0")
    return out, notes


def bank(spec: ModelSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our weights (already in train_gpt.py's RoPE convention) as the record's state dict."""
    L = spec.num_layers

    def stack(names):
        return np.stack([np.asarray(weights[n], dtype=np.float32) for n in names])

    out = {
        "qo_bank": stack([f"blocks.{i}.attn.c_q.weight" for i in range(L)] + [f"blocks.{i}.attn.proj.weight" for i in range(L)]),
        "kv_bank": stack([f"blocks.{i}.attn.c_k.weight" for i in range(L)] + [f"blocks.{i}.attn.c_v.weight" for i in range(L)]),
        "mlp_up_bank": stack([f"blocks.{i}.mlp.fc.weight" for i in range(L)]),
        "mlp_down_bank": stack([f"blocks.{i}.mlp.proj.weight" for i in range(L)]),
    }
    banked = (".attn.c_q.", ".attn.c_k.", ".attn.c_v.", ".attn.proj.", ".mlp.fc.", ".mlp.proj.")
    out.update({n: w for n, w in weights.items() if not (n.startswith("blocks.") and any(b in n for b in banked))})
    if not spec.parallel_start_layer:   # the record holds them anyway
        out["parallel_post_lambdas"] = np.ones((L, 2, 2), np.float32)
        out["parallel_resid_lambdas"] = np.full((L, 2), PARALLEL_RESID_INIT, np.float32)
    return out


def check_exportable(spec: ModelSpec) -> None:
    """The record's script computes only leaky_relu(0.5)^2 MLPs: another activation cannot be written for it."""
    if spec.mlp_negative_slope != RECORD_NEGATIVE_SLOPE:
        raise ConfigError(f"LAYOUT=record: this checkpoint has MLP_NEGATIVE_SLOPE={spec.mlp_negative_slope:g}, the "
                          f"record's script computes only {RECORD_NEGATIVE_SLOPE:g}; export it with LAYOUT=baseline")


def uses_record_options(spec: ModelSpec) -> bool:
    """Whether `spec` uses any record option the naive baseline's train_gpt.py lacks (LAYOUT=auto)."""
    baseline = ModelSpec()
    return any(getattr(spec, name) != getattr(baseline, name) for name in RECORD_SETTINGS + ("mlp_negative_slope",)) \
        or not float(spec.mlp_mult).is_integer()



def record_settings_text(spec: ModelSpec) -> str:
    """The environment the record's train_gpt.py needs to build this model."""
    values = {"NUM_LAYERS": spec.num_layers, "MODEL_DIM": spec.model_dim, "NUM_HEADS": spec.num_heads,
              "NUM_KV_HEADS": spec.num_kv_heads, "VOCAB_SIZE": spec.vocab_size, "MLP_MULT": spec.mlp_mult,
              "TIE_EMBEDDINGS": int(spec.tie_embeddings), "LOGIT_SOFTCAP": spec.logit_softcap,
              "ROPE_BASE": spec.rope_base}
    values.update({name.upper(): int(v) if isinstance(v, bool) else v
                   for name in RECORD_SETTINGS for v in [getattr(spec, name)]})
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
