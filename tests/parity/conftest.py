"""The parity suite's fixtures and its final report (docs/spec.md §10).

Every check of the suite records its error into parity_lib.REPORT; at the end of the session the
table of the worst error per row of docs/spec.md §10 is printed (by `make parity`, and by plain pytest
whenever a parity test ran) and written to runs/parity/parity_report.json (git-ignored).
"""

import json
import platform
import time

import mlx.core as mx
import pytest
import torch

from core.config import load_config
from core.metrics import build_byte_tables
from data.datasets import resolve_dataset
from data.stream import load_validation_tokens

import parity_lib
from parity_lib import TRAIN_SETTINGS
from trainer_helpers import tiny_env, train


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    """Every parity test runs torch on one thread (see parity_lib.torch_single_thread)."""
    with parity_lib.torch_single_thread():
        yield


@pytest.fixture(scope="session")
def parity():
    """The session's collector of worst errors (parity_lib.REPORT)."""
    return parity_lib.REPORT


@pytest.fixture(scope="session")
def parity_runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity_runs")


@pytest.fixture(scope="session")
def trained_runs(tiny_dataset, parity_runs_dir):
    """backend -> TrainResult of the same 20-step fp32 run by each real trainer."""
    with parity_lib.torch_single_thread():   # session-scoped: set up before the module's autouse fixture
        return {backend: train(backend, tiny_env(tiny_dataset, parity_runs_dir, RUN_ID=f"full-{backend}",
                                                 **TRAIN_SETTINGS))
                for backend in parity_lib.BACKENDS}


@pytest.fixture(scope="session")
def train_env(tiny_dataset, parity_runs_dir):
    """env(**overrides) of a run with the shared training settings."""
    def env(**overrides):
        return tiny_env(tiny_dataset, parity_runs_dir, **{**TRAIN_SETTINGS, **overrides})
    return env


@pytest.fixture(scope="session")
def validation(train_env):
    """(TrainConfig of the training runs, validation tokens, byte tables) of the tiny dataset."""
    cfg = load_config([], environ=train_env())
    dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size)
    tables = build_byte_tables(dataset.tokenizer_path, cfg.vocab_size)
    return cfg, load_validation_tokens(dataset.val_files, cfg.train_seq_len), tables


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = parity_lib.REPORT
    if not report.worst:
        return
    tr = terminalreporter
    tr.write_sep("=", "twingpt parity report: worst error over the spec matrix (docs/spec.md §10)")
    tr.write_line("rel(a, b) = ||a - b||_2 / ||b||_2;  §10 = a row of docs/spec.md §10, + = an extra check of this suite;"
                  "  n = measurements")
    for line in report.table():
        tr.write_line(line)
    path = parity_lib.REPORT_PATH
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "exitstatus": int(exitstatus),
                   "torch": torch.__version__, "mlx": mx.__version__, "platform": platform.platform(),
                   "rows": report.rows()}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        tr.write_line(f"written: {path.relative_to(parity_lib.REPO)}")
    except OSError as err:
        tr.write_line(f"could not write {path}: {err}")
