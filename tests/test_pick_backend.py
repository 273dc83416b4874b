"""commands/pick_backend.py: which backend `make train` uses, and the cached measurement behind it.

The machine's probes (Apple silicon, CUDA) and the measurement are injected; the cache lives in
tmp_path. Nothing here times a backend.
"""

import json

import pytest

from commands import pick_backend


def never_measure():
    raise AssertionError("measure() was called")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A Linux machine without CUDA whose cache file is tmp_path/runs/backend_choice.json."""
    monkeypatch.setattr(pick_backend, "ROOT", tmp_path)
    monkeypatch.setattr(pick_backend, "CHOICE_FILE", tmp_path / "runs" / "backend_choice.json")
    monkeypatch.setattr(pick_backend.platform, "system", lambda: "Linux")
    monkeypatch.setattr(pick_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(pick_backend, "cuda_available", lambda: False)
    monkeypatch.setattr(pick_backend, "measure", never_measure)
    return monkeypatch


def test_apple_silicon_is_mlx_without_measuring(machine):
    machine.setattr(pick_backend.platform, "system", lambda: "Darwin")
    machine.setattr(pick_backend.platform, "machine", lambda: "arm64")
    machine.setattr(pick_backend, "cuda_available", never_measure)   # not even probed
    assert pick_backend.choose() == "mlx"
    assert not pick_backend.CHOICE_FILE.exists()


def test_cuda_is_torch_without_measuring(machine):
    machine.setattr(pick_backend, "cuda_available", lambda: True)
    assert pick_backend.choose() == "torch"
    assert not pick_backend.CHOICE_FILE.exists()


def test_an_intel_mac_is_not_apple_silicon(machine):
    machine.setattr(pick_backend.platform, "system", lambda: "Darwin")
    machine.setattr(pick_backend, "measure", lambda: {"torch": 300.0, "mlx": 100.0})
    assert pick_backend.choose() == "torch"


def write_cache(machine_key: str, backend: str) -> None:
    pick_backend.CHOICE_FILE.parent.mkdir(parents=True)
    pick_backend.CHOICE_FILE.write_text(json.dumps({"machine": machine_key, "backend": backend,
                                                    "tokens_per_s": {"torch": 1.0, "mlx": 2.0}}))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_cache_for_this_machine_is_used_without_measuring(machine, backend, capsys):
    write_cache(pick_backend.machine_key(), backend)
    before = pick_backend.CHOICE_FILE.read_text()
    assert pick_backend.choose() == backend
    assert pick_backend.CHOICE_FILE.read_text() == before
    assert "measured before on this CPU" in capsys.readouterr().err


@pytest.mark.parametrize("rates, expected", [({"torch": 100.0, "mlx": 250.0}, "mlx"),
                                             ({"torch": 250.0, "mlx": 100.0}, "torch")])
def test_a_cache_for_another_machine_is_measured_again_and_replaced(machine, rates, expected):
    write_cache("another machine | Python 3.0", "torch" if expected == "mlx" else "mlx")
    calls = []
    machine.setattr(pick_backend, "measure", lambda: calls.append(1) or dict(rates))
    assert pick_backend.choose() == expected and len(calls) == 1
    saved = json.loads(pick_backend.CHOICE_FILE.read_text())
    assert saved == {"machine": pick_backend.machine_key(), "backend": expected, "tokens_per_s": rates}
    machine.setattr(pick_backend, "measure", never_measure)   # the next run reads what was written
    assert pick_backend.choose() == expected


def test_no_cache_measures_and_writes_one(machine):
    machine.setattr(pick_backend, "measure", lambda: {"torch": 10.0, "mlx": 20.0})
    assert pick_backend.choose() == "mlx"
    assert json.loads(pick_backend.CHOICE_FILE.read_text())["backend"] == "mlx"


def test_when_neither_backend_runs_it_is_torch_and_nothing_is_cached(machine):
    machine.setattr(pick_backend, "measure", lambda: {})
    assert pick_backend.choose() == "torch"
    assert not pick_backend.CHOICE_FILE.exists()
