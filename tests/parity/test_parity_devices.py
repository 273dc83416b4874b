"""The device plumbing of the parity suite (parity_lib.devices, device_pairs, the `pair`
parametrization of conftest.py, the table's device column and header), tested with the CPU standing
in: the availability probes are monkeypatched, so a pretended CUDA, mps or Metal device is
enumerated, paired, named and reported as a real one would be, without the hardware."""

from collections import defaultdict

import mlx.core as mx
import pytest
import torch

import parity_lib
from backend_torch.precision import NEW_API, set_tf32_state, tf32_allowed, tf32_state
from core.config import ModelSpec
from parity_lib import (CPU_LABEL, DEVICES, PAIRS, Device, ParityReport, devices, devices_header, on_device,
                        pair_params, present, session_config, train_config)


def pretend(monkeypatch, cuda=False, mps=False, metal=False, mlx_cuda=False):
    """Monkeypatch the availability functions the probes call (not the probes themselves)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    if hasattr(mx, "cuda"):
        monkeypatch.setattr(mx.cuda, "is_available", lambda: mlx_cuda)
    else:   # an MLX without the cuda module: the probe says absent; pretend through the probe's helper
        monkeypatch.setattr(parity_lib, "DEVICE_PROBES", tuple(
            (b, n, (lambda: mlx_cuda) if (b, n) == ("mlx", "cuda") else p) for b, n, p in parity_lib.DEVICE_PROBES))
    return devices(parity_lib.DEVICE_PROBES)


ABSENT = " (not present)"


def test_this_machine_enumeration_is_the_probes():
    labels = {d.label: d.present for d in DEVICES}
    assert labels == {"torch:cpu": True, "torch:cuda": torch.cuda.is_available(),
                      "torch:mps": torch.backends.mps.is_available(), "mlx:cpu": True,
                      "mlx:metal": mx.metal.is_available(),
                      "mlx:cuda": hasattr(mx, "cuda") and mx.cuda.is_available()}
    assert PAIRS[0].label == CPU_LABEL == "torch:cpu vs mlx:cpu" and PAIRS[0].is_cpu
    assert all(p.torch.present and p.mlx.present for p in PAIRS)
    # Every present device is in a pair, so every present device is tested.
    assert {d for p in PAIRS for d in (p.torch, p.mlx)} == set(present(DEVICES))
    assert parity_lib.REPORT.header() == devices_header(DEVICES)


def test_cpu_only(monkeypatch):
    devs = pretend(monkeypatch)
    assert [d.label for d in present(devs)] == ["torch:cpu", "mlx:cpu"]
    pairs, ids = pair_params(devs)
    assert ids == ["torch:cpu-vs-mlx:cpu"] and [p.label for p in pairs] == ["torch:cpu vs mlx:cpu"]
    assert devices_header(devs) == ("devices: torch:cpu, mlx:cpu; absent: torch:cuda (not present), "
                                    "torch:mps (not present), mlx:metal (not present), mlx:cuda (not present)")


@pytest.mark.parametrize("found,expected_ids", [
    (dict(cuda=True), ["torch:cpu-vs-mlx:cpu", "torch:cuda-vs-mlx:cpu"]),
    (dict(mps=True, metal=True), ["torch:cpu-vs-mlx:cpu", "torch:mps-vs-mlx:metal"]),
    (dict(metal=True), ["torch:cpu-vs-mlx:cpu", "torch:cpu-vs-mlx:metal"]),
    (dict(mps=True), ["torch:cpu-vs-mlx:cpu", "torch:mps-vs-mlx:cpu"]),
    (dict(cuda=True, mlx_cuda=True), ["torch:cpu-vs-mlx:cpu", "torch:cuda-vs-mlx:cuda"]),
    (dict(cuda=True, mps=True, metal=True),
     ["torch:cpu-vs-mlx:cpu", "torch:cuda-vs-mlx:metal", "torch:mps-vs-mlx:metal"]),
], ids=lambda v: "+".join(v) if isinstance(v, dict) else None)
def test_pretended_gpus_are_enumerated_paired_and_named(found, expected_ids, monkeypatch):
    devs = pretend(monkeypatch, **found)
    names = {"cuda": "torch:cuda", "mps": "torch:mps", "metal": "mlx:metal", "mlx_cuda": "mlx:cuda"}
    present_labels = {d.label for d in present(devs)}
    assert present_labels == {"torch:cpu", "mlx:cpu"} | {names[k] for k in found}
    pairs, ids = pair_params(devs)
    assert ids == expected_ids
    assert pairs[0].is_cpu and all(not p.is_cpu for p in pairs[1:])
    assert {d.label for p in pairs for d in (p.torch, p.mlx)} == present_labels   # each present device tested
    header = devices_header(devs)
    found_part, absent_part = header.split("; absent: ")
    assert found_part == "devices: " + ", ".join(d.label for d in devs if d.label in present_labels)
    assert absent_part == ", ".join(d.label + ABSENT for d in devs if d.label not in present_labels)


def test_a_probe_that_raises_makes_its_device_absent_and_says_why(monkeypatch):
    pretend(monkeypatch)

    def broken():
        raise RuntimeError("CUDA driver initialization failed")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    devs = devices()
    cuda = next(d for d in devs if d.label == "torch:cuda")
    assert not cuda.present and cuda.note == "probe failed: RuntimeError: CUDA driver initialization failed"
    assert "torch:cuda (probe failed: RuntimeError: CUDA driver initialization failed)" in devices_header(devs)
    assert [p.label for p in pair_params(devs)[0]] == [CPU_LABEL]


def test_report_has_a_line_per_device_pair_and_the_header(monkeypatch):
    devs = pretend(monkeypatch, cuda=True)
    report = ParityReport(devs)
    cpu, gpu = report.pairs
    assert gpu.label == "torch:cuda vs mlx:cpu"
    report.check("logits_fp32", 2e-7, "case A torch vs mlx logits", devices=cpu.label)
    report.check("logits_fp32", 3e-6, "case B torch logits vs reference", devices=gpu.label)
    report.check("val", 1e-8, "val_loss, random weights")   # a CPU-only row: no devices given
    with pytest.raises(AssertionError, match=r"grads \[torch:cuda vs mlx:cpu: case C\]"):
        report.check("grads", 5e-4, "case C", devices=gpu.label)

    rows = report.rows()
    fp32 = [r for r in rows if r["row"] == "logits_fp32"]
    assert [(r["devices"], r["worst"], r["case"]) for r in fp32] == [
        ("torch:cpu vs mlx:cpu", 2e-7, "case A torch vs mlx logits"),
        ("torch:cuda vs mlx:cpu", 3e-6, "case B torch logits vs reference")]
    # A row not expanded over devices has its one CPU line, marked as such; an expanded row not
    # measured on a pair still has that pair's line, with no value: a missing measurement shows.
    val = [r for r in rows if r["row"] == "val"]
    assert [(r["devices"], r["cpu_only"], r["worst"]) for r in val] == [("torch:cpu vs mlx:cpu", True, 1e-8)]
    optim = [r for r in rows if r["row"] == "optim_step"]
    assert [(r["devices"], r["worst"], r["ok"]) for r in optim] == [(cpu.label, None, None), (gpu.label, None, None)]
    grads = [r for r in rows if r["row"] == "grads"]
    assert [(r["devices"], r["ok"]) for r in grads] == [(cpu.label, None), (gpu.label, False)]
    assert len(rows) == sum(2 if row.expanded else 1 for row in parity_lib.ROWS)

    table = report.table()
    assert table[0] == ("devices: torch:cpu, torch:cuda, mlx:cpu; absent: torch:mps (not present), "
                        "mlx:metal (not present), mlx:cuda (not present)")
    assert table[1].split()[:3] == ["spec", "compared", "devices"]
    lines = [line for line in table if line.startswith("§10") and "fp32: torch vs MLX" in line]
    assert len(lines) == 2 and "torch:cpu vs mlx:cpu" in lines[0] and "torch:cuda vs mlx:cpu" in lines[1]
    assert any("torch:cpu vs mlx:cpu (cpu only)" in line and "val_loss and val_bpb from the same" in line
               for line in table)
    assert not any("torch:cuda" in line and "val_loss and val_bpb from the same" in line for line in table)
    assert any("torch:cuda vs mlx:cpu" in line and "gradients of every" in line and line.endswith("FAIL")
               for line in table)


def test_collected_device_items_are_on_present_devices_only(request):
    """The `pair` parametrization of this very session: one item per pair of PAIRS for each
    combination of the other parameters; no item names an absent device (so none is skipped)."""
    by_pair = defaultdict(lambda: defaultdict(set))
    pair_ids = {p.id for p in PAIRS}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "pair" not in callspec.params:
            continue
        pair = callspec.params["pair"]
        assert pair in PAIRS and pair.id in item.name, item.nodeid
        others = tuple(sorted((k, str(v)) for k, v in callspec.params.items() if k != "pair"))
        by_pair[item.originalname][others].add(pair.id)
    for d in DEVICES:
        if not d.present:
            assert not any(d.label in item.name for item in request.session.items), d
    for function, combos in by_pair.items():
        for others, ids in combos.items():
            assert ids <= pair_ids, (function, others)
    # The kernel-level tests are among them (when this file runs alone, they are not collected).
    if len(request.session.items) > 20:
        assert {"test_logits_and_loss_agree_across_backends_and_reference", "test_every_gradient_agrees_torch_vs_mlx",
                "test_one_optimizer_step_gives_the_same_weights"} <= set(by_pair)


def test_on_device_sets_and_restores_mlx_default_device(monkeypatch):
    before = mx.default_device()
    with on_device(Device("mlx", "cpu")):
        assert mx.default_device() == mx.cpu
    assert mx.default_device() == before
    # The GPU, with the CPU standing in: the calls on_device makes, recorded.
    calls = []
    monkeypatch.setattr(mx, "set_default_device", calls.append)
    with on_device(Device("mlx", "metal")):
        assert calls == [mx.gpu]
    assert calls == [mx.gpu, before]
    with pytest.raises(ValueError), on_device(Device("mlx", "cuda")):
        raise ValueError("a failing computation restores the default device too")
    assert calls[2:] == [mx.gpu, before]


def test_on_device_turns_tf32_off_for_cuda_and_restores_it():
    flags = tf32_state()
    try:
        set_tf32_state(("tf32", "tf32", "tf32") if NEW_API else (True, True))
        with on_device(Device("torch", "cuda")):
            assert not tf32_allowed()
        assert tf32_allowed()
    finally:
        set_tf32_state(flags)


def test_on_device_after_a_cuda_session_set_tf32_off_reads_no_legacy_flag():
    """A TorchSession on CUDA sets fp32_precision (torch >= 2.9); reading the legacy
    torch.backends.cudnn.allow_tf32 after that raises, and the parity rows read the flags."""
    flags = tf32_state()
    try:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"  # the old tf32_off
        with on_device(Device("torch", "cuda")):
            assert not tf32_allowed()
    finally:
        set_tf32_state(flags)


def test_device_records_map_to_framework_devices_and_session_configs():
    cfg = train_config(ModelSpec(vocab_size=32, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1))
    for name in ("cpu", "cuda", "mps"):
        d = Device("torch", name)
        assert d.torch_device == torch.device(name) and session_config(d, cfg).device == name
    for name, expected in (("cpu", mx.cpu), ("metal", mx.gpu), ("cuda", mx.gpu)):
        d = Device("mlx", name)
        assert d.mlx_device == expected and session_config(d, cfg) is cfg   # MLX: its default device decides
    assert parity_lib.as_device("torch") == Device("torch", "cpu") and parity_lib.as_device("mlx").is_cpu
    # The 20-step runs (conftest.trained_runs_on): the CPU ones keep their names; DEVICE is torch's.
    assert [parity_lib.run_settings(Device(b, n)) for b, n in
            (("torch", "cpu"), ("mlx", "cpu"), ("torch", "cuda"), ("torch", "mps"), ("mlx", "metal"))] == [
        {"RUN_ID": "full-torch", "DEVICE": "cpu"}, {"RUN_ID": "full-mlx", "DEVICE": "cpu"},
        {"RUN_ID": "full-torch-cuda", "DEVICE": "cuda"}, {"RUN_ID": "full-torch-mps", "DEVICE": "mps"},
        {"RUN_ID": "full-mlx-metal", "DEVICE": "cpu"}]
