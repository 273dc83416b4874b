"""docs/spec.md §10, first row: logits and loss of torch, MLX and the numpy float64 reference agree,
in fp32 (<= 1e-5) and with bf16 matrix products (<= 2e-2), over the whole spec matrix, on every
device pair (parity_lib.PAIRS): each backend on its device vs the reference, and vs the other."""

import numpy as np
import pytest

from core import reference
from parity_lib import BACKENDS, CASE_BY_NAME, forward_params, logits, loss, rel


@pytest.mark.parametrize("case_name,shape", forward_params(), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_and_loss_agree_across_backends_and_reference(dtype, case_name, shape, pair, parity):
    case = CASE_BY_NAME[case_name]
    spec, w = case.spec, case.weights()
    ids, targets = case.batch(shape)
    key = "logits_fp32" if dtype == "float32" else "logits_bf16"
    where = f"{case.name} {shape[0]}x{shape[1]}"
    on = pair.label

    ref_z = reference.logits(spec, w, ids)
    ref_loss = reference.loss(spec, w, ids, targets)
    assert ref_z.shape == (*shape, spec.vocab_size) and np.isfinite(ref_z).all()
    z = {b: logits(pair.of(b), spec, w, ids, dtype) for b in BACKENDS}
    losses = {b: loss(pair.of(b), spec, w, ids, targets, dtype) for b in BACKENDS}
    for b in BACKENDS:
        assert z[b].shape == ref_z.shape
        parity.check(key, rel(z[b], ref_z), f"{where} {b} logits vs reference", devices=on)
        parity.check(key, rel(losses[b], ref_loss), f"{where} {b} loss vs reference", devices=on)
    parity.check(key, rel(z["torch"], z["mlx"]), f"{where} torch vs mlx logits", devices=on)
    parity.check(key, rel(losses["torch"], losses["mlx"]), f"{where} torch vs mlx loss", devices=on)
    if dtype == "bfloat16":
        # The products really ran in bf16: far from fp32 rounding, yet within the bf16 budget.
        assert min(rel(z[b], ref_z) for b in BACKENDS) > 1e-4
