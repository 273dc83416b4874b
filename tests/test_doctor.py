"""`make doctor` (commands/doctor.py): the whole run passes here and says so, and a failing check fails it."""

import json
import os
import subprocess
import sys

import numpy as np

from commands import doctor
from trainer_helpers import REPO

SECTIONS = ("versions", "devices", "blas", "memory", "check_model", "checks", "timing")


def test_the_doctor_passes_on_this_machine_and_writes_its_report(tmp_path):
    """The real command (re-executed with OpenBLAS as `make doctor` is), one timed step per backend."""
    env = {k: v for k, v in os.environ.items() if k not in ("TWINGPT_NO_BLAS_PRELOAD", "TWINGPT_BLAS_REEXEC")}
    proc = subprocess.run([sys.executable, "-m", "commands.doctor", "--out", str(tmp_path), "--warmup", "0", "--steps", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert lines[-1].startswith("doctor: OK — "), lines[-1]
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert set(SECTIONS) | {"ok", "verdict", "problems", "warnings", "seconds", "printed"} <= set(report)
    assert report["ok"] is True and report["problems"] == [] and report["verdict"] == lines[-1]
    for name in ("python", "numpy", "torch", "mlx", "sentencepiece", "git", "platform"):
        assert report["versions"][name], name
    assert report["versions"]["platform"]["cpus"] >= 1
    listed = {d["device"]: d["present"] for d in report["devices"]}
    assert listed["torch cpu"] and listed["mlx cpu"]
    assert {"torch mps", "mlx metal"} <= set(listed) and any(name.startswith("torch cuda") for name in listed)
    assert report["blas"]["torch"]["summary"]
    if sys.platform.startswith("linux"):   # OpenBLAS, when installed, is what MLX's CPU backend runs on
        assert report["blas"]["mlx"]["in_use"] == report["blas"]["mlx"]["openblas_installed"]
    # Every §10 check ran on the CPU of both backends, within its tolerance; both backends were timed.
    checks = report["checks"]
    for name, what in [("logits", "torch cpu vs float64 reference"), ("logits", "mlx cpu vs float64 reference"),
                       ("grads", "torch cpu vs mlx cpu"), ("optim_step", "torch cpu vs mlx cpu")]:
        [c] = [c for c in checks if c["name"] == name and c["what"].startswith(what)]
        assert c["ok"] and 0 <= c["error"] <= c["tolerance"] == doctor.TOLERANCES[name], c
    assert {r["device"] for r in report["memory"]} == {"torch cpu", "mlx cpu"}
    for r in report["memory"]:
        assert 0 < r["estimated_peak_bytes"] and 0 < r["auto_budget_bytes"] < r["offered_bytes"] and r["fits"]
        assert r["budget_per_rank_of_2_local"] == r["auto_budget_bytes"] // 2   # two local ranks share the CPU
        assert r["attention"] in {"blocked: blocked causal attention (CPU)", "blocked causal attention (CPU)"}
        assert f"attention: {r['attention']}" in "\n".join(report["printed"])
    rows = report["timing"]["rows"]
    assert [r["backend"] for r in rows] == ["torch", "mlx"] and all(r["tokens_per_s"] > 0 for r in rows)
    assert all(c["ok"] for c in checks)


def test_a_check_out_of_tolerance_gives_problems_and_exit_1(tmp_path, capsys):
    """The same run in this process with the logits tolerance below any fp32 error: PROBLEMS, exit 1."""
    code = doctor.main(["--out", str(tmp_path), "--no-timing", "--tol", "logits=1e-12"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith("doctor: PROBLEMS — logits torch cpu vs float64 reference (rel "), lines[-1]
    assert "logits mlx cpu vs float64 reference" in lines[-1] and "grads" not in lines[-1]
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["ok"] is False and report["verdict"] == lines[-1] and len(report["problems"]) == 2
    assert "timing" not in report and any("skipped" in line for line in report["printed"])


def test_a_perturbed_result_fails_its_check():
    doc = doctor.Doctor()
    b = np.random.default_rng(0).standard_normal(100)
    assert doc.compare("grads", "a vs b", {"w": doctor.rel(b * (1 + 1e-6), b)}).ok
    assert doc.verdict() == "doctor: OK — 1 check passed"
    bad = doc.compare("grads", "a vs perturbed b", {"w": doctor.rel(b, b), "v": doctor.rel(b * 1.001, b)})
    nan = doc.compare("optim_step", "nan", {"w": float("nan")})
    assert not bad.ok and bad.error > doctor.TOLERANCES["grads"] and "worst of 2: v" in bad.detail
    assert not nan.ok
    assert doc.verdict().startswith("doctor: PROBLEMS — grads a vs perturbed b (rel 1.00e-03 > 0.0001); optim_step nan")
