"""The direct-path analysis of a checkpoint (issue 13): what tying the head to the embedding costs.

    python -m trainer.tying --checkpoint runs/<run>/checkpoints/step_NNNNNN.safetensors
    make analyze-tying CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors

Framework-free numpy, in float64, written once for checkpoints of both backends. Notation: V tokens,
d = model_dim, W_E = tok_emb.weight (V, d), W_U = the head: W_E when tied, lm_head.weight when untied,
c = logit_softcap, rmsnorm(x) = x / √(mean(x²) + norm_eps) as in docs/spec.md §4.

The direct path is the network with every block skipped: for each token i,

    x = rmsnorm(W_E[i])              (§4 step 1)
    h = rmsnorm(x)                   (the final norm, §4 step 4; ≈ x up to eps, computed literally)
    P[i, j] = c·tanh((h·W_U[j]) / c) (the head and the softcap, §4 steps 4-5)

Validation bigrams are the pairs (x_prev, x_next) = (val[t], val[t+1]) of the validation stream the
trainers score (data.stream.load_validation_tokens with the run's TRAIN_SEQ_LEN, §7): the very
targets of val_loss, so a *_bits_per_token figure below is comparable to val_loss / ln 2 and a
*_bpb figure to val_bpb (§8: the same bit sum over the bytes of those targets).

The figures (all cross-entropies are means over the validation bigrams, in bits):

  symmetry                    ‖B − Bᵀ‖_F / ‖B‖_F of the bilinear core B = W_E·W_Uᵀ (P without the
                              per-row RMSNorm scale and the softcap): 0 for a tied model up to
                              rounding; in [0, 2] (2 for an antisymmetric B).
  direct_path_bits_per_token  −mean log₂ softmax(P[x_prev])[x_next]: the real direct path, norms and
                              softcap included.
  unigram_bits_per_token      −mean log₂ p(x_next), p(j) = (n_j + 1) / (N + V), n_j the count of j in
                              the train tokens read: the trainers' unigram baseline (core.metrics),
                              the floor any direct path should beat.
  bigram_bits_per_token       −mean log₂ p(x_next | x_prev), p(j | i) = (C_ij + 1) / (C_i + V), C_ij
                              the count of the train bigram (i, j), C_i = Σ_j C_ij: the best a
                              direct path can reach (a V×V table of its own).
  data_asymmetry              ‖L − Lᵀ‖_F / ‖L‖_F of L = the double-centred log bigram table, L = J·M·J
                              with M_ij = log p(j | i) (add-one, as above) and J = I − 11ᵀ/V, the
                              centring matrix. Why centred: the softmax ignores a constant per row,
                              so the direct path only has to match log p(j | i) up to a per-row
                              constant a_i; and a per-column term u_j (the unigram bias) costs a
                              symmetric model nothing either, since u_j + a_i with a_i = u_i is the
                              symmetric u_i + u_j. Double-centring removes exactly those two
                              terms: L − Lᵀ is the smallest antisymmetric part M + a·1ᵀ can have
                              over all choices of a. So data_asymmetry is 0 exactly when a symmetric
                              direct path (any rank, no per-row scale) could represent the bigram
                              model, and measures how far the data is from that. L is also the
                              double-centred log joint table and the double-centred PMI, both of
                              which differ from M by row and column terms only.
  direct_path_asymmetry       the same measure of the model's own P (double-centred), to compare
                              with data_asymmetry: what the direct path actually expresses.

Parameters and bytes (what tying saves, or would save on an untied model):

  tying_params                V·d: the head matrix tying leaves out (core.params.count_params
                              reports it as saved_by_tying on a tied spec, 0 on an untied one).
  tying_params_share          tying_params / the unique parameters of this model.
  tying_artifact_bytes        bytes of the head matrix in this model's int8+zlib artifact
                              (core.artifact.pack), measured as a marginal cost:
                              len(pack(weights)) − len(pack(weights without the matrix)). Untied,
                              the matrix is lm_head.weight, and the figure is what tying it away
                              would save (exact, up to how zlib compresses the rest). Tied, no head
                              is stored; the figure is tok_emb.weight's marginal bytes, an estimate
                              of what an untied head of the same shape and int8 per-row scheme would
                              add (a trained head compresses about like the embedding; not exact).
  tying_artifact_share        tying_artifact_bytes / len(pack(weights)); tying_budget_share: / the
                              16,000,000-byte budget.

Train counts read whole train shards in sorted order until at least MAX_TRAIN_TOKENS tokens are read
(data.stream.leading_shards, as for the trainers' unigram baseline, so unigram_bits_per_token is the trainers'
unigram baseline val_loss / ln 2); bigrams span shard boundaries, as the training stream does.

Settings: command-line flag > environment variable > default, like the trainers'. The result is
written as JSON to runs/<id>/tying.json (the folder holding the checkpoint's checkpoints/ folder,
else the checkpoint's own folder) or to OUT.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from core.artifact import ARTIFACT_BUDGET_BYTES, pack
from core.checkpoint import load_checkpoint
from core.config import ModelSpec, parse_settings, setting
from core.errors import ConfigError, DatasetError, exit_on_user_error
from core.files import atomic_writer
from core.params import count_params

LN2 = math.log(2.0)
PAIR_CHUNK = 1 << 24  # bigram pairs counted 16M at a time: a 100M-token shard never needs 800 MB of int64


# ---------------------------------------------------------------------------------------------
# The figures, from arrays
# ---------------------------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, eps: float) -> np.ndarray:
    """docs/spec.md §4's rmsnorm over the last axis, no weight (here in float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def head_matrix(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """W_U: tok_emb.weight when tied, lm_head.weight when untied, as float64 (V, d)."""
    name = "tok_emb.weight" if spec.tie_embeddings else "lm_head.weight"
    return np.asarray(weights[name], dtype=np.float64)


def direct_path_logits(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """P (V, V): P[i, j] = logit of token j from token i's embedding alone, every block skipped."""
    emb = np.asarray(weights["tok_emb.weight"], dtype=np.float64)
    x = rmsnorm(emb, spec.norm_eps)        # §4 step 1
    h = rmsnorm(x, spec.norm_eps)          # §4 step 4, the final norm
    raw = h @ head_matrix(spec, weights).T
    c = float(spec.logit_softcap)
    return c * np.tanh(raw / c)            # §4 step 5


def relative_asymmetry(m: np.ndarray) -> float:
    """‖M − Mᵀ‖_F / ‖M‖_F (0 for a zero matrix)."""
    m = np.asarray(m, dtype=np.float64)
    norm = float(np.linalg.norm(m))
    return float(np.linalg.norm(m - m.T)) / norm if norm > 0 else 0.0


def double_centre(m: np.ndarray) -> np.ndarray:
    """J·M·J with J = I − 11ᵀ/V: M without its row means and column means (grand mean added back)."""
    m = np.asarray(m, dtype=np.float64)
    return m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + m.mean()


def log_softmax_rows(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def count_tokens(chunks: Iterable[np.ndarray], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(unigram counts (V,), bigram counts (V, V)) of the token stream the chunks form back to back
    (a pair spans the boundary between two chunks). int64."""
    V = vocab_size
    unigram = np.zeros(V, dtype=np.int64)
    bigram = np.zeros(V * V, dtype=np.int64)
    last = None
    for chunk in chunks:
        tokens = np.asarray(chunk).astype(np.int64, copy=False).ravel()
        if tokens.size == 0:
            continue
        if tokens.min() < 0 or tokens.max() >= V:
            raise DatasetError(f"train tokens hold ids outside the vocabulary of {V}")
        unigram += np.bincount(tokens, minlength=V)
        if last is not None:
            bigram[last * V + int(tokens[0])] += 1
        for start in range(0, tokens.size - 1, PAIR_CHUNK):
            stop = min(start + PAIR_CHUNK, tokens.size - 1)
            bigram += np.bincount(tokens[start:stop] * V + tokens[start + 1:stop + 1], minlength=V * V)
        last = int(tokens[-1])
    return unigram, bigram.reshape(V, V)


def bigram_log_probs(bigram_counts: np.ndarray) -> np.ndarray:
    """M_ij = log p(j | i) = log (C_ij + 1) / (C_i + V), natural log, (V, V)."""
    c = np.asarray(bigram_counts, dtype=np.float64) + 1.0
    return np.log(c) - np.log(c.sum(axis=1, keepdims=True))


def _bits(log_probs_of_targets: np.ndarray) -> float:
    """Mean cross-entropy in bits from natural-log probabilities of the targets."""
    return float(-np.sum(log_probs_of_targets, dtype=np.float64) / log_probs_of_targets.size / LN2)


def tying_costs(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> dict:
    """Parameters and artifact bytes of the head matrix that tying saves (see the module docstring)."""
    counts = count_params(spec)
    head_params = spec.vocab_size * spec.model_dim
    head_name = "tok_emb.weight" if spec.tie_embeddings else "lm_head.weight"
    weights = dict(weights)
    artifact = len(pack(weights))
    without = len(pack({k: v for k, v in weights.items() if k != head_name}))
    head_bytes = artifact - without
    return {
        "params_unique": counts.unique,
        "params_saved_by_tying": counts.saved_by_tying,
        "tying_params": head_params,
        "tying_params_share": head_params / counts.unique,
        "artifact_bytes": artifact,
        "tying_artifact_bytes": head_bytes,
        "tying_artifact_bytes_exact": not spec.tie_embeddings,
        "tying_artifact_share": head_bytes / artifact,
        "tying_budget_share": head_bytes / ARTIFACT_BUDGET_BYTES,
        "artifact_budget_bytes": ARTIFACT_BUDGET_BYTES,
    }


def direct_path_figures(spec: ModelSpec, weights: Mapping[str, np.ndarray], train_tokens, val_tokens: np.ndarray,
                        val_bytes: int | None = None, costs: bool = True) -> dict:
    """Every figure of the module docstring from arrays.

    `train_tokens`: one token array, or a sequence of them read back to back (shards);
    `val_tokens`: the validation stream (bigrams val[t] → val[t+1]); `val_bytes`: the bytes of text
    its targets stand for (§8), to add the *_bpb figures; `costs`: add the parameter and artifact
    figures (tying_costs, which packs the artifact twice)."""
    V = spec.vocab_size
    if isinstance(train_tokens, np.ndarray):
        train_tokens = [train_tokens]
    unigram, bigram = count_tokens(train_tokens, V)
    if unigram.sum() < 2:
        raise DatasetError("the train tokens hold fewer than 2 tokens: no bigram to count")
    val = np.asarray(val_tokens).astype(np.int64, copy=False).ravel()
    if val.size < 2:
        raise DatasetError("the validation tokens hold fewer than 2 tokens: no bigram to score")
    if val.min() < 0 or val.max() >= V:
        raise DatasetError(f"validation tokens hold ids outside the vocabulary of {V}")
    x, y = val[:-1], val[1:]

    emb = np.asarray(weights["tok_emb.weight"], dtype=np.float64)
    core = emb @ head_matrix(spec, weights).T           # B = W_E·W_Uᵀ
    logits = direct_path_logits(spec, weights)          # P
    log_p_direct = log_softmax_rows(logits)
    log_p_unigram = np.log((unigram + 1.0) / (unigram.sum() + V))
    log_p_bigram = bigram_log_probs(bigram)

    result = {
        "vocab_size": V,
        "model_dim": spec.model_dim,
        "tied": bool(spec.tie_embeddings),
        "train_tokens": int(unigram.sum()),
        "val_bigrams": int(y.size),
        "symmetry": relative_asymmetry(core),
        "direct_path_asymmetry": relative_asymmetry(double_centre(logits)),
        "data_asymmetry": relative_asymmetry(double_centre(log_p_bigram)),
        "direct_path_bits_per_token": _bits(log_p_direct[x, y]),
        "unigram_bits_per_token": _bits(log_p_unigram[y]),
        "bigram_bits_per_token": _bits(log_p_bigram[x, y]),
    }
    if val_bytes:
        for name in ("direct_path", "unigram", "bigram"):
            result[f"{name}_bpb"] = result[f"{name}_bits_per_token"] * y.size / val_bytes
        result["val_bytes"] = int(val_bytes)
    if costs:
        result.update(tying_costs(spec, weights))
    return result


# ---------------------------------------------------------------------------------------------
# A checkpoint and its dataset
# ---------------------------------------------------------------------------------------------

def run_folder_of(checkpoint_path) -> Path:
    """runs/<id> for runs/<id>/checkpoints/step_N.safetensors, else the checkpoint's own folder."""
    path = Path(checkpoint_path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def analyze_tying(checkpoint_path, data_path: str = "", tokenizer_path: str = "",
                  max_train_tokens: int = 200_000_000) -> dict:
    """The figures of the module docstring for a checkpoint, on its dataset (the one its config
    names, unless data_path / tokenizer_path say otherwise), plus run_id, step, backend, paths."""
    from core.metrics import build_byte_tables, token_bytes
    from data.datasets import resolve_dataset
    from data.stream import leading_shards, load_validation_tokens

    if max_train_tokens <= 0:
        raise ConfigError(f"MAX_TRAIN_TOKENS={max_train_tokens}: must be positive")
    ckpt = load_checkpoint(checkpoint_path)
    spec, cfg = ckpt.spec, ckpt.config
    data_path = data_path or str(cfg.get("data_path") or "")
    tokenizer_path = tokenizer_path or str(cfg.get("tokenizer_path") or "")
    try:
        dataset = resolve_dataset(data_path, tokenizer_path, spec.vocab_size, check_tokens=False)
    except DatasetError as e:
        raise DatasetError(f"the dataset of checkpoint {ckpt.path}: {e} (set DATA_PATH / TOKENIZER_PATH)") from None
    if not dataset.train_files:
        raise DatasetError(f"dataset {dataset.data_path} holds no train shard")
    seq_len = int(cfg.get("train_seq_len") or 1024)
    val = load_validation_tokens(dataset.val_files, seq_len, spec.vocab_size)
    tables = build_byte_tables(dataset.tokenizer_path, spec.vocab_size)
    val_bytes = int(token_bytes(tables, val[:-1], val[1:]).sum())
    train = list(leading_shards(dataset.train_files, max_train_tokens, spec.vocab_size))
    figures = direct_path_figures(spec, ckpt.weights, train, val, val_bytes=val_bytes)
    run_dir = run_folder_of(ckpt.path)
    return {
        "run_id": str(cfg.get("run_id") or run_dir.name),
        "checkpoint": str(ckpt.path),
        "step": int(ckpt.step),
        "backend": ckpt.backend,
        "dataset": dataset.name,
        "data_path": str(dataset.data_path),
        "tokenizer_path": str(dataset.tokenizer_path),
        "train_seq_len": seq_len,
        "max_train_tokens": int(max_train_tokens),
        **figures,
    }


def format_tying(result: dict) -> list[str]:
    """A short table of analyze_tying's result."""
    r = result
    tied = "tied" if r["tied"] else "untied"
    bpb = "direct_path_bpb" in r

    def row(label, key, note):
        value = f"{r[key + '_bits_per_token']:8.4f}"
        value += f"  {r[key + '_bpb']:7.4f}" if bpb else ""
        return f"  {label:<30}{value}  {note}"

    estimate = "" if r.get("tying_artifact_bytes_exact", not r["tied"]) else " (estimate: tok_emb's own bytes)"
    lines = [
        f"==== direct path of {r.get('run_id', '?')} step {r.get('step', '?')} ({tied}, V={r['vocab_size']}, "
        f"d={r['model_dim']}) ====",
        f"  {'val bigrams, cross-entropy':<30}{'bits/tok':>8}" + (f"  {'bpb':>7}" if bpb else ""),
        row("direct path softmax(P)", "direct_path", "embedding -> final norm -> head, blocks skipped"),
        row("unigram (add-one, train)", "unigram", "the floor"),
        row("bigram (add-one, train)", "bigram", "the best a direct path can do"),
        f"  symmetry ‖B−Bᵀ‖/‖B‖ of B = W_E·W_Uᵀ: {r['symmetry']:.3g}"
        + ("  (0 by construction)" if r["tied"] else ""),
        f"  asymmetry ‖L−Lᵀ‖/‖L‖ of double-centred log-tables: data {r['data_asymmetry']:.4f}, "
        f"direct path {r['direct_path_asymmetry']:.4f}",
    ]
    if "tying_params" in r:
        lines.append(
            f"  tying {'saves' if r['tied'] else 'would save'} {r['tying_params']:,} parameters "
            f"({100 * r['tying_params_share']:.1f}% of this model's {r['params_unique']:,}) and "
            f"{r['tying_artifact_bytes']:,} artifact bytes{estimate} ({100 * r['tying_artifact_share']:.1f}% of "
            f"its {r['artifact_bytes']:,}; {100 * r['tying_budget_share']:.2f}% of the budget)")
    return lines


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TyingSettings:
    """Every setting of the analysis. Field `max_train_tokens` is env MAX_TRAIN_TOKENS and flag --max-train-tokens."""

    checkpoint: str = setting("", "checkpoint (.safetensors) to analyze "
                               "(empty: the newest runs/*/checkpoints/*.safetensors)")
    data_path: str = setting("", "dataset folder (empty: the one the checkpoint was trained on)")
    tokenizer_path: str = setting("", "SentencePiece model (empty: the one of the dataset)")
    max_train_tokens: int = setting(200_000_000, "count train bigrams over whole shards until this many tokens")
    out: str = setting("", "JSON output (empty: runs/<id>/tying.json beside the checkpoints/ folder)")

    def __post_init__(self):
        if self.max_train_tokens <= 0:
            raise ConfigError(f"MAX_TRAIN_TOKENS={self.max_train_tokens}: must be positive")


def parse_tying_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                         prog: str | None = None) -> TyingSettings:
    """TyingSettings from flags > environment > defaults. `--help` prints every setting and exits."""
    return parse_settings(TyingSettings, argv, environ, prog, description="The direct-path analysis of a twingpt checkpoint: what tying the head to the embedding costs.")


def write_json(path: Path, result: dict) -> None:
    try:
        with atomic_writer(path) as f:
            f.write((json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    except OSError as e:
        raise ConfigError(f"OUT={path}: cannot write it ({e.strerror or e})") from None


@exit_on_user_error
def main(argv=None, environ=None) -> dict:
    from trainer.sampling import newest_checkpoint

    settings = parse_tying_settings(sys.argv[1:] if argv is None else argv, environ, prog="python -m trainer.tying")
    path = Path(settings.checkpoint) if settings.checkpoint else newest_checkpoint()
    result = analyze_tying(path, settings.data_path, settings.tokenizer_path, settings.max_train_tokens)
    out = Path(settings.out) if settings.out else run_folder_of(path) / "tying.json"
    write_json(out, result)
    for line in format_tying(result):
        print(line, flush=True)
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
