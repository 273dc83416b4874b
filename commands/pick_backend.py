"""Which backend `make train` uses here: python -m commands.pick_backend prints "torch" or "mlx".

CUDA present: torch. Apple silicon: MLX (Metal). Otherwise both are timed on a few training steps
of the `make train` model on this CPU (bench/run.py, each in its own process, MLX with OpenBLAS when
installed) and the faster one wins. The measurement is kept in runs/backend_choice.json for this
machine and Python, so later runs start at once; delete the file to measure again.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

from bench.run import ROOT, SETTINGS, row_env, spawn_row

CHOICE_FILE = ROOT / "runs" / "backend_choice.json"


def say(line: str) -> None:
    print(f"make train: {line}", file=sys.stderr, flush=True)


def cuda_available() -> bool:
    probe = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() == "True"


def measure() -> dict:
    """tok/s of each backend on the preset model, one short run each."""
    rates = {}
    mlx_setting = "mlx-fp32-openblas" if row_env(SETTINGS["mlx-fp32-openblas"]) is not None else "mlx-fp32-bundled"
    for backend, setting in (("torch", "torch-fp32"), ("mlx", mlx_setting)):
        say(f"timing {setting} on the make-train model ...")
        row = spawn_row(setting, "preset", 1, 3, timeout=300)
        if "tokens_per_s" in row:
            rates[backend] = row["tokens_per_s"]
        else:
            say(f"{backend} did not run here ({row.get('error')})")
    return rates


def machine_key() -> str:
    return f"{platform.platform()} | {platform.processor()} | Python {platform.python_version()}"


def choose() -> str:
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        say("Apple silicon: MLX on Metal")
        return "mlx"
    if cuda_available():
        say("CUDA is available: torch on the GPU")
        return "torch"
    if CHOICE_FILE.is_file():
        saved = json.loads(CHOICE_FILE.read_text())
        if saved.get("machine") == machine_key():
            say(f"{saved['backend']}, measured before on this CPU ({describe(saved['tokens_per_s'])}; "
                f"delete {CHOICE_FILE.relative_to(ROOT)} to measure again)")
            return saved["backend"]
    rates = measure()
    if not rates:
        say("neither backend ran a timing step; using torch")
        return "torch"
    backend = max(rates, key=rates.get)
    CHOICE_FILE.parent.mkdir(parents=True, exist_ok=True)
    CHOICE_FILE.write_text(json.dumps({"machine": machine_key(), "backend": backend, "tokens_per_s": rates},
                                      indent=2) + "\n")
    say(f"{backend} is faster on this CPU ({describe(rates)})")
    return backend


def describe(rates: dict) -> str:
    return ", ".join(f"{name} {rate:,.0f} tok/s" for name, rate in rates.items())


if __name__ == "__main__":
    print(choose())
