"""Sliding-window evaluation (EVAL_STRIDE, docs/spec.md §7): torch and MLX agree (<= 1e-6) on the
same weights, each equals the float64 reference scored over the same windows (<= 1e-5), with the
fused attention kernel and with the CPU one; and a stride equal to the window is the standard
evaluation (EVAL_STRIDE=0)."""

import numpy as np
import pytest

from core import reference
from core.checkpoint import load_checkpoint
from core.init import random_weights
from core.metrics import EvalAccumulator, token_bytes
from trainer.plan import eval_geometry
from trainer.validation import evaluate, evaluate_sliding
from parity_lib import BACKENDS, TRAIN_SETTINGS, make_session, open_session, rel

# (EVAL_STRIDE, EVAL_SEQ_LEN, EVAL_BATCH_SEQS): a stride dividing N - L and one that does not, a window
# longer than training's (48 > TRAIN_SEQ_LEN = 32), a batch of one window, and the automatic batch.
SETTINGS = [(8, 0, 5), (13, 0, 0), (16, 48, 1)]


# The windows of the first TARGETS validation targets: every case of the rule (a partial last
# window for strides 13 and 16) at a cost the float64 reference can afford.
TARGETS = 1500


def reference_sliding(spec, weights, tokens, tables, L, S):
    """(val_loss, val_bpb) of the rule of docs/spec.md §7 written out here: window k reads
    tokens[s : s + L], s = min(k*S, N - L), and scores its targets that no earlier window scored."""
    n = len(tokens) - 1
    starts, firsts, scored_up_to, k = [], [], 0, 0      # targets tokens[1 .. scored_up_to] are done
    while scored_up_to < n:
        s = min(k * S, n - L)
        starts.append(s)
        firsts.append(scored_up_to - s)                 # the window's targets past scored_up_to
        scored_up_to, k = s + L, k + 1
    rows = np.stack([tokens[s:s + L + 1] for s in starts]).astype(np.int64)
    x, y = rows[:, :-1], rows[:, 1:]
    losses = reference.token_losses(spec, weights, x, y)          # float64 (K, L), one batch
    acc = EvalAccumulator()
    for i, first in enumerate(firsts):
        acc.add(losses[i, first:].sum(), L - first, token_bytes(tables, x[i, first:], y[i, first:]).sum())
    assert acc.tokens == n
    return acc.val_loss, acc.val_bpb


def set_fused(model, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attention = fused


def weights_for(weights_from, cfg, trained_runs):
    if weights_from == "random":
        return random_weights(cfg.model_spec(), seed=29)
    run = trained_runs["torch"]
    return load_checkpoint(run.run_dir / "checkpoints" / f"step_{TRAIN_SETTINGS['ITERATIONS']:06d}.safetensors").weights


@pytest.mark.parametrize("weights_from, fused", [("random", False), ("random", True), ("torch-trained", False)],
                         ids=["random-cpu-attention", "random-fused-attention", "trained-cpu-attention"])
def test_sliding_validation_agrees_across_backends_and_with_the_reference(weights_from, fused, pair, trained_runs,
                                                                         validation, parity):
    cfg, val_tokens, tables = validation
    val_tokens = val_tokens[:TARGETS + 1]
    weights = weights_for(weights_from, cfg, trained_runs)
    for stride, seq_len, batch_seqs in SETTINGS:
        c = cfg.replace(eval_stride=stride, eval_seq_len=seq_len, eval_batch_seqs=batch_seqs)
        case = f"{weights_from} weights, stride {stride}, window {c.eval_window}, {'fused' if fused else 'cpu'} attention"
        expected = reference_sliding(c.model_spec(), weights, val_tokens, tables, c.eval_window, stride)
        got = {}
        for b in BACKENDS:
            with open_session(pair.of(b), c) as session:
                session.load_weights(weights)
                set_fused(session.model, fused)
                got[b] = evaluate_sliding(session, val_tokens, tables, c.eval_window, stride,
                                          eval_geometry(c, 1).sliding_batch_seqs)
            for name, value, ref in zip(("val_loss", "val_bpb"), got[b], expected):
                parity.check("sliding_ref", rel(value, ref), f"{b} {name}, {case}", devices=pair.label)
        for name, t, m in zip(("val_loss", "val_bpb"), got["torch"], got["mlx"]):
            parity.check("sliding_val", rel(t, m), f"{name}, {case}", devices=pair.label)
        assert 0 < got["torch"][1] < 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stride_of_one_window_is_the_standard_evaluation(backend, trained_runs, validation, parity):
    """EVAL_STRIDE = window = TRAIN_SEQ_LEN scores the non-overlapping windows of evaluate(), which
    EVAL_STRIDE=0 runs (the figures of today, unchanged). The standard figures come from the other
    backend: torch's eval_loss_sum is the sum of its eval_token_losses, so within torch the row would
    compare one code path with itself."""
    cfg, val_tokens, tables = validation
    weights = weights_for("torch-trained", cfg, trained_runs)
    assert (len(val_tokens) - 1) % cfg.train_seq_len == 0       # the standard windows cover every target
    other = next(b for b in BACKENDS if b != backend)
    figures = {}
    for name, stride in ((backend, cfg.train_seq_len), (other, 0)):
        session = make_session(name, cfg)
        session.load_weights(weights)
        try:
            c = cfg.replace(eval_stride=stride)
            geometry = eval_geometry(c, 1)
            if stride:
                figures[name] = evaluate_sliding(session, val_tokens, tables, c.eval_window, stride,
                                                 geometry.sliding_batch_seqs)
            else:
                figures[name] = evaluate(session, val_tokens, tables, c.train_seq_len, geometry.val_batch_seqs)
        finally:
            session.close()
    for name, a, b in zip(("val_loss", "val_bpb"), figures[backend], figures[other]):
        parity.check("sliding_standard", rel(a, b), f"{backend} sliding {name}, stride {cfg.train_seq_len}, "
                                                    f"vs {other} standard")
