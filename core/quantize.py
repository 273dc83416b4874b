"""GPTQ, round-to-nearest and LQER on numpy arrays: the arithmetic of QUANT=gptq (docs/spec.md §9.2).

A weight matrix W (rows = outputs, columns = inputs) becomes integer codes q in [-m, m],
m = 2^(bits-1) - 1, and one fp16 scale per row, W ~ q * scale. Two ways to choose the codes:

    round_to_nearest  q = round(W / scale): every weight on its own (GPTQ=0, the control)
    gptq              the same scales, columns quantized one at a time, and each column's rounding
                      error pushed onto the columns not yet quantized, weighted by the inverse of
                      the layer's input second moment H = E[x x^T] (Frantar et al., 2022): what
                      minimizes ||W X - Q X|| for inputs X like the calibration data

LQER then adds, to the matrices with the largest errors, a low-rank correction A @ B of the error
W - q * scale (its top singular directions), itself stored in a few bits.

Everything here is float64 numpy, with no tensor framework: both backends give this code the same
weights and statistics, so they get the same codes. Rounding is round-half-to-even (np.rint).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from core.artifact import Quantized, quantize_tensor
from core.errors import ArtifactError
from core.params import EMBED, HEAD, MATRIX, ParamInfo, is_control

BLOCK_SIZE = 128        # columns per GPTQ block: errors reach later blocks in one product per block
DAMPING = 0.01          # H + DAMPING * mean(diag H) * I: keeps H invertible and the updates tame
SUPPORTED_BITS = tuple(range(2, 9))   # codes are stored in int8


def code_max(bits: int) -> int:
    """The largest code of a signed `bits`-bit integer kept symmetric: 2^(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def fp16_scales(values: np.ndarray) -> np.ndarray:
    """float64 scales rounded to fp16; a zero (a constant row, or one below fp16's range) becomes 1."""
    s = np.asarray(values, dtype=np.float64).astype(np.float16)
    s[s == 0] = 1.0
    return s


def row_scales(w: np.ndarray, clip_sigmas: float, bits: int) -> np.ndarray:
    """One fp16 scale per row: clip_sigmas standard deviations of the row map to the largest code.

    std is the sample standard deviation (divisor n - 1; n when the row has one element) of the
    row in float64. Codes past +-m are clamped, so the row is clipped at clip_sigmas * std.
    """
    w = np.asarray(w, dtype=np.float64)
    std = w.std(axis=1, ddof=1 if w.shape[1] > 1 else 0)
    return fp16_scales(clip_sigmas * std / code_max(bits))


def round_to_nearest(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes clamp(round(w / scale), -m, m), the scale read back from fp16."""
    m = code_max(bits)
    s = np.asarray(scale, dtype=np.float64)[:, None]
    return np.clip(np.rint(np.asarray(w, dtype=np.float64) / s), -m, m).astype(np.int8)


def prepare_hessian(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(damped H, dead columns): a zero diagonal entry (an input that is always 0) is set to 1,
    then DAMPING * mean(diag H) is added to the whole diagonal."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += DAMPING * np.mean(np.diag(h))
    return h, dead


def with_lookup_term(h: np.ndarray, weight: float) -> np.ndarray:
    """A tied embedding's statistics: the head's H plus weight * mean(diag H) * I (EMBED_LOOKUP_WEIGHT).

    Its rows are also looked up as the model's input, where a row's error counts whole, in every
    direction; the head's H sees only the directions its inputs use, and GPTQ moves the error into
    the others. The isotropic term makes GPTQ weigh the lookup too (weight 0: the head's H alone)."""
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices_from(h)] += weight * np.mean(np.diag(h))
    return h


def column_order(h: np.ndarray) -> np.ndarray:
    """Columns by descending diag(H) (the inputs with the most energy first); ties by index."""
    return np.argsort(-np.diag(h), kind="stable")


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U, upper triangular with U^T U = H^-1. H^-1 = L^-T L^-1 from H's lower Cholesky factor L."""
    l_inv = np.linalg.inv(np.linalg.cholesky(h))
    return np.linalg.cholesky(l_inv.T @ l_inv).T


def gptq(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, bits: int,
         block_size: int = BLOCK_SIZE) -> np.ndarray:
    """int8 codes of `w` (rows, cols) by GPTQ with the given fp16 row scales (see the module doc).

    In the column order of `column_order`: code column j by rounding, err = (w_j - q_j * s) / U[j, j],
    and subtract err * U[j, k] from every later column k; within a block at once, and from the
    later blocks once per block (the same arithmetic, grouped). Dead columns are zeroed first.
    """
    m = code_max(bits)
    h, dead = prepare_hessian(hessian)
    order = column_order(h)
    u = inverse_cholesky_upper(h[np.ix_(order, order)])
    work = np.array(w, dtype=np.float64)
    work[:, dead] = 0.0
    work = work[:, order]
    s = np.asarray(scale, dtype=np.float64)
    rows, cols = work.shape
    codes = np.zeros((rows, cols), dtype=np.int8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = work[:, i1:i2].copy()
        errors = np.zeros((rows, i2 - i1))
        for j in range(i2 - i1):
            c = i1 + j
            q = np.clip(np.rint(block[:, j] / s), -m, m)
            codes[:, c] = q
            err = (block[:, j] - q * s) / u[c, c]
            errors[:, j] = err
            block[:, j + 1:] -= np.outer(err, u[c, c + 1:i2])
        work[:, i2:] -= errors @ u[i1:i2, i2:]
    return codes[:, np.argsort(order)]


# ---------------------------------------------------------------------------------------------
# LQER: a low-rank correction of the quantization error
# ---------------------------------------------------------------------------------------------

def lqer_factors(error: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A @ B the best rank-r approximation of `error` (r = min(rank, min(shape))):
    A = U_r * S_r (rows x r), B = V_r^T (r x cols). Each pair's sign is fixed so that the entry of
    largest magnitude of B's row is positive (the first such entry on a tie)."""
    u, sv, vt = np.linalg.svd(np.asarray(error, dtype=np.float64), full_matrices=False)
    r = min(rank, sv.size)
    a, b = u[:, :r] * sv[:r], vt[:r].copy()
    peak = b[np.arange(r), np.argmax(np.abs(b), axis=1)]
    sign = np.where(peak < 0, -1.0, 1.0)
    return a * sign, b * sign[:, None]


def quantize_rows_absmax(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row codes: scale = fp16(max |row| / m), q = clamp(round(x / scale), -m, m)."""
    m = code_max(bits)
    x = np.asarray(x, dtype=np.float64)
    scale = fp16_scales(np.abs(x).max(axis=1) / m)
    return np.clip(np.rint(x / scale.astype(np.float64)[:, None]), -m, m).astype(np.int8), scale


def quantize_lqer_asym(a: np.ndarray, b: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The asymmetric packing: A in 2 bits with one scale, fp16(max|A| / 1.5), codes in [-2, 1];
    B in 4 bits by groups of `group` consecutive elements of B flattened row by row, each group's
    scale fp16(max|group| / 7.5), codes in [-8, 7]. Needs B.size % group == 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a_scale = fp16_scales(np.abs(a).max() / 1.5)
    a_q = np.clip(np.rint(a / np.float64(a_scale)), -2, 1).astype(np.int8)
    groups = b.reshape(-1, group)
    b_scale = fp16_scales(np.abs(groups).max(axis=1) / 7.5)
    b_q = np.clip(np.rint(groups / b_scale.astype(np.float64)[:, None]), -8, 7).astype(np.int8).reshape(b.shape)
    return a_q, np.asarray(a_scale, dtype=np.float16), b_q, b_scale


def layer_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """||W X - W_hat X||_F from the second moment H = X^T X / n: sqrt(trace(D H D^T)), D = W - W_hat
    (the error per calibration token, rms over tokens)."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.sqrt(max(np.einsum("ij,jk,ik->", d, np.asarray(hessian, dtype=np.float64), d), 0.0)))


# ---------------------------------------------------------------------------------------------
# The whole model: which tensor gets what (docs/spec.md §9.2)
# ---------------------------------------------------------------------------------------------

def is_quantized_matrix(info: ParamInfo | None, w: np.ndarray) -> bool:
    """The tensors QUANT=gptq codes: float 2-D parameters of the table's embed, head or matrix
    groups that are not control tensors, whatever their size. Every other tensor is stored as in
    the int8 artifact (§9.1)."""
    return (info is not None and info.group in (EMBED, HEAD, MATRIX) and np.asarray(w).ndim == 2
            and np.asarray(w).dtype.kind == "f" and not is_control(info.name))


def bits_and_sigmas(info: ParamInfo, cfg) -> tuple[int, float]:
    """(bits, clip sigmas) of a quantized matrix: the embedding and head take EMBED_*; a block matrix
    MATRIX_BITS with MLP_CLIP_SIGMAS when named .mlp., ATTN_CLIP_SIGMAS when .attn., else MATRIX_CLIP_SIGMAS."""
    if info.group in (EMBED, HEAD):
        return cfg.embed_bits, cfg.embed_clip_sigmas
    if ".mlp." in info.name:
        return cfg.matrix_bits, cfg.mlp_clip_sigmas
    if ".attn." in info.name:
        return cfg.matrix_bits, cfg.attn_clip_sigmas
    return cfg.matrix_bits, cfg.matrix_clip_sigmas


def quantize_matrix(name: str, w: np.ndarray, hessian: np.ndarray | None, bits: int, sigmas: float,
                    use_gptq: bool) -> Quantized:
    """One matrix as an int_per_row tensor: GPTQ when asked and a hessian is given, else round-to-nearest
    (which is what GPTQ computes with H = I)."""
    w = np.asarray(w)
    w64 = w.astype(np.float64)
    if not np.isfinite(w64).all():
        raise ArtifactError(f"artifact: tensor {name} holds NaN or inf (did training diverge?)")
    with np.errstate(over="ignore"):
        scale = row_scales(w64, sigmas, bits)
    if not np.isfinite(scale).all():
        raise ArtifactError(f"artifact: tensor {name} is too large in magnitude for fp16 row scales")
    if use_gptq and hessian is not None:
        try:
            codes = gptq(w64, hessian, scale, bits)
        except np.linalg.LinAlgError:
            raise ArtifactError(f"artifact: the calibration statistics of {name} are not positive "
                                "semi-definite (NaN or inf in the activations?)") from None
    else:
        codes = round_to_nearest(w64, scale, bits)
    return Quantized("int_per_row", w.dtype.name, tuple(int(n) for n in w.shape),
                     {"q": codes, "scale": scale}, {"bits": bits})


def add_lqer(t: Quantized, w: np.ndarray, cfg) -> Quantized:
    """`t` with the LQER correction of its error w - q * scale: symmetric LQER_FACTOR_BITS codes per
    row, or (LQER_ASYM_ENABLED, when B's size is a multiple of the group) the asymmetric packing."""
    a, b = lqer_factors(reconstruction_error(t, w), cfg.lqer_rank)
    r, group = a.shape[1], cfg.lqer_asym_group
    if cfg.lqer_asym_enabled and b.size % group == 0:
        a_q, a_s, b_q, b_s = quantize_lqer_asym(a, b, group)
        info = {"lqer": "asym", "lqer_rank": r, "lqer_group": group}
    else:
        (a_q, a_s), (b_q, b_s) = quantize_rows_absmax(a, cfg.lqer_factor_bits), quantize_rows_absmax(b, cfg.lqer_factor_bits)
        info = {"lqer": "sym", "lqer_rank": r}
    parts = t.parts | {"lqer_a_q": a_q, "lqer_a_scale": a_s, "lqer_b_q": b_q, "lqer_b_scale": b_s}
    return Quantized(t.scheme, t.dtype, t.shape, parts, t.info | info)


def reconstruction_error(t: Quantized, w: np.ndarray) -> np.ndarray:
    """w - q * scale in float64 (the codes' error, before any LQER term)."""
    return np.asarray(w, dtype=np.float64) - t.parts["q"].astype(np.float64) * t.parts["scale"].astype(np.float64)[:, None]


def quantize_model(weights: dict[str, np.ndarray], table: list[ParamInfo], hessians: dict[str, np.ndarray],
                   cfg, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Quantized]:
    """Every tensor of `weights` as the QUANT=gptq artifact stores it (core.artifact.pack_tensors writes it).

    `hessians`: name -> X^T X of the inputs that matrix multiplies (any positive multiple: GPTQ is
    unchanged by scaling H); a quantized matrix without one is rounded to nearest. `cfg` holds the
    settings (a TrainConfig). `progress(i, n, name)` is called before each quantized matrix.
    """
    infos = {p.name: p for p in table}
    targets = [name for name in sorted(weights) if is_quantized_matrix(infos.get(name), weights[name])]
    out = {}
    for name in sorted(weights):
        if name not in targets:
            out[name] = quantize_tensor(name, weights[name])
    for i, name in enumerate(targets):
        if progress is not None:
            progress(i, len(targets), name)
        bits, sigmas = bits_and_sigmas(infos[name], cfg)
        hessian = hessians.get(name)
        if hessian is not None and infos[name].group == EMBED and cfg.embed_lookup_weight > 0:
            hessian = with_lookup_term(hessian, cfg.embed_lookup_weight)   # only a tied embedding has statistics
        out[name] = quantize_matrix(name, weights[name], hessian, bits, sigmas, cfg.gptq)
    if cfg.lqer_enabled and cfg.lqer_top_k > 0:
        # The LQER_TOP_K matrices of largest ||w - q * scale||_F (ties: by name) get the correction.
        norms = {name: float(np.linalg.norm(reconstruction_error(out[name], weights[name]))) for name in targets}
        for name in sorted(targets, key=lambda n: (-norms[n], n))[:cfg.lqer_top_k]:
            out[name] = add_lqer(out[name], weights[name], cfg)
    return dict(sorted(out.items()))
