"""The parity suite's fixtures and its final report (docs/spec.md §10).

Every check of the suite records its error into parity_lib.REPORT; at the end of the session the
table of the worst error per row of docs/spec.md §10 and per device pair is printed (by `make parity`,
and by plain pytest whenever a parity test ran) and written to runs/parity/parity_report.json
(git-ignored). Its header lists the devices found and those absent.

A test with a `pair` argument runs once per device pair of parity_lib.PAIRS (present devices only:
an absent device makes no test item, so nothing is ever skipped for want of hardware).
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


def pytest_generate_tests(metafunc):
    if "pair" in metafunc.fixturenames:
        pairs, ids = parity_lib.pair_params(parity_lib.DEVICES)
        metafunc.parametrize("pair", pairs, ids=ids)


@pytest.fixture(scope="session", autouse=True)
def _mlx_on_the_cpu_by_default():
    """MLX's default device is the GPU where it has one (Apple silicon): every computation of the suite
    that names no device, the real trainers' runs included, is on the CPU, as its table says; the
    device rows switch to the GPU with parity_lib.on_device. Session-scoped autouse, so it is set
    before the session's trained_runs fixture."""
    with parity_lib.on_device(parity_lib.Device("mlx", "cpu")):
        yield


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
def trained_runs_on(tiny_dataset, parity_runs_dir):
    """pair -> {backend: TrainResult} of the same 20-step fp32 run by each real trainer, each on its
    device of the pair (torch: DEVICE=cpu/cuda/mps; MLX: its default device); made once per pair."""
    runs = {}

    def on(pair):
        if pair not in runs:
            out = {}
            for backend in parity_lib.BACKENDS:
                device = pair.of(backend)
                env = tiny_env(tiny_dataset, parity_runs_dir, **TRAIN_SETTINGS, **parity_lib.run_settings(device))
                # session-scoped: set up before the module's autouse fixture, hence the thread count here
                with parity_lib.torch_single_thread(), parity_lib.on_device(device):
                    out[backend] = train(backend, env)
            runs[pair] = out
        return runs[pair]
    return on


@pytest.fixture(scope="session")
def trained_runs(trained_runs_on):
    """backend -> TrainResult of the 20-step runs on the CPU (the checkpoint, validation and roundtrip
    tests start from them)."""
    return trained_runs_on(parity_lib.CPU_PAIR)


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
    tr.write_line("devices column: torch:X vs mlx:Y = each backend on its device, vs the float64 reference and vs the other;"
                  "  (cpu only) = a row not run on other devices")
    for line in report.table():
        tr.write_line(line)
    path = parity_lib.REPORT_PATH
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "exitstatus": int(exitstatus),
                   "torch": torch.__version__, "mlx": mx.__version__, "platform": platform.platform(),
                   "devices": [d.label for d in report.devices if d.present],
                   "absent": {d.label: d.note for d in report.devices if not d.present},
                   "pairs": [p.label for p in report.pairs],
                   "rows": report.rows()}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        tr.write_line(f"written: {path.relative_to(parity_lib.REPO)}")
    except OSError as err:
        tr.write_line(f"could not write {path}: {err}")
