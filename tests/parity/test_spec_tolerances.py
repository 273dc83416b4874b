"""The tolerances `make doctor` and the parity suite hold the backends to are docs/spec.md §10's
table, read from the spec itself: loosening one in the code (or the spec alone) fails here."""

import re

from commands import doctor
from parity_lib import ROWS
from trainer_helpers import REPO


def spec_table() -> dict[str, tuple[str, str]]:
    """§10's table: the first cell of every row -> (fp32 cell, bf16 cell), "≤ " dropped."""
    text = (REPO / "docs" / "spec.md").read_text()
    start = text.index("| compared | fp32 | bf16 |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("≤ ", "") for c in line.strip("|").split("|")]
        rows[cells[0]] = (cells[1], cells[2])
    return rows


def fp32(row_start: str) -> float:
    found = [v for k, v in spec_table().items() if k.startswith(row_start)]
    assert len(found) == 1, row_start
    return float(found[0][0])


# The doctor's check -> the start of its §10 row.
DOCTOR_ROWS = {"logits": "logits and loss: torch vs MLX", "grads": "gradients of every parameter",
               "optim_step": "weights and optimizer state after one full Muon + Adam step"}


def test_the_spec_table_is_read():
    table = spec_table()
    assert len(table) >= 15
    assert re.fullmatch(r"\d(\.\d+)?e-\d+", table[next(k for k in table if k.startswith("logits and loss"))][1])


def test_the_doctor_holds_the_backends_to_the_spec_tolerances():
    assert set(doctor.TOLERANCES) == set(DOCTOR_ROWS)
    for name, row in DOCTOR_ROWS.items():
        assert doctor.TOLERANCES[name] == fp32(row), name


def test_the_parity_rows_hold_the_backends_to_the_spec_tolerances():
    tolerance = {row.key: row.tolerance for row in ROWS}
    logits_row = next(v for k, v in spec_table().items() if k.startswith("logits and loss: torch vs MLX"))
    assert tolerance["logits_fp32"] == float(logits_row[0]) and tolerance["logits_bf16"] == float(logits_row[1])
    assert tolerance["grads"] == fp32("gradients of every parameter")
    assert tolerance["optim_step"] == fp32("weights and optimizer state after one full Muon + Adam step")
    assert tolerance["train_losses"] == fp32("per-step training loss over 20 steps")
    assert tolerance["val"] == fp32("val_loss and val_bpb from the same weights and data")
    assert tolerance["grads_fd"] == fp32("† gradients vs central differences")
    assert tolerance["sliding_val"] == fp32("† sliding-window val_loss")
    assert tolerance["sliding_ref"] == fp32("† the same, each backend vs the float64 reference")
    assert tolerance["sliding_standard"] == fp32("† sliding val with stride = window")
