"""`make doctor` (python -m commands.doctor): what this machine is, and whether twingpt works on it.

One command for a new machine or a bug report, under a minute on a 2-core CPU. It prints, and
writes to runs/doctor.json (--out elsewhere):

    1. versions and platform: Python, twingpt's git commit, numpy, torch, mlx, sentencepiece, OS,
       architecture, CPU count
    2. devices, present and absent: torch cpu, cuda, mps; MLX cpu and Metal
    3. BLAS: which one MLX's CPU backend has loaded (Linux), and torch's build (MKL, OpenBLAS, ...)
    4. memory: what each present device offers a run, the auto budget (core/memory.py) and the
       `make train` preset's estimated peak against it
    5. on every present device, docs/spec.md §10 on a small random-weights model in fp32: logits vs
       the float64 reference (<= 1e-5), gradients torch vs MLX (<= 1e-4), one full Muon + Adam step
       through the sessions' train_step, torch vs MLX (weights and optimizer state, <= 1e-5)
    6. a few timed training steps of the `make train` model per backend (bench/run.py's rows, each
       in its own process): tokens/s
    7. the verdict: "doctor: OK — ..." and exit 0, or "doctor: PROBLEMS — <what failed>" and exit 1

Speed never fails the doctor (a shared machine is slow, not broken); a row that crashes does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from backend_mlx.blas import blas_in_use, blas_note, ensure_fast_blas, find_openblas, preloaded_blas
from core.sizes import GIB

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "runs"

# docs/spec.md §10, fp32 rows.
TOLERANCES = {"logits": 1e-5, "grads": 1e-4, "optim_step": 1e-5}
# The checks' model: tied, grouped-query attention, an odd depth (so a skip weight), every parameter
# random (core.init.random_weights: no projection zero); two micro-batches of 3 sequences, which
# MLX splits into chunks of 2 sequences; mid-schedule (Adam's bias correction and Muon's momentum
# warmup under way, the learning rate warming down), with clipping on and a non-empty state.
CHECK_MODEL = dict(vocab_size=128, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
CHECK_SEED = 7
CHECK_SHAPE = (2, 32)          # (B, T) of the forward and gradient checks
STEP_SEQ_LEN = 16
STEP = 350


def rel(a, b) -> float:
    """docs/spec.md §10: ||a - b||_2 / ||b||_2, in float64 (0 when both are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num, den = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


@dataclass
class Check:
    name: str             # "logits", "grads", "optim_step", or a section's own ("timing", "memory", ...)
    what: str             # e.g. "torch cpu vs float64 reference"
    ok: bool
    error: float | None = None
    tolerance: float | None = None
    detail: str = ""

    def line(self) -> str:
        flag = "ok  " if self.ok else "FAIL"
        if self.error is not None:
            cmp = "<=" if self.ok else "> "
            return f"  {flag} {self.name:<10} {self.what:<44} rel {self.error:.2e} {cmp} {self.tolerance:g}  {self.detail}"
        return f"  {flag} {self.name:<10} {self.what}  {self.detail}"


@dataclass
class Doctor:
    tolerances: dict = field(default_factory=lambda: dict(TOLERANCES))
    checks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    summary: list = field(default_factory=list)   # short phrases for the OK verdict

    def say(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def section(self, title: str) -> None:
        self.say()
        self.say(f"== {title}")

    def row(self, label: str, text: str) -> None:
        self.say(f"  {label:<14} {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.say(f"  warning: {text}")

    def record(self, check: Check) -> Check:
        self.checks.append(check)
        self.say(check.line())
        return check

    def compare(self, name: str, what: str, errors: dict[str, float], detail: str = "") -> Check:
        """One check from per-tensor errors: the worst must be within the tolerance of `name`."""
        tol = self.tolerances[name]
        if not errors:
            return self.fail(name, what, "nothing to compare")
        worst_key = max(errors, key=lambda k: (np.isnan(errors[k]), errors[k]))
        worst = errors[worst_key]
        ok = bool(worst <= tol)     # NaN fails
        where = f"worst of {len(errors)}: {worst_key}" if len(errors) > 1 else ""
        return self.record(Check(name, what, ok, worst, tol, "; ".join(filter(None, [where, detail]))))

    def fail(self, name: str, what: str, exc: BaseException | str) -> Check:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}".splitlines()[0]
        return self.record(Check(name, what, False, detail=text))

    @property
    def problems(self) -> list[str]:
        return [f"{c.name} {c.what}" + (f" ({c.detail})" if c.error is None and c.detail else
                                        f" (rel {c.error:.2e} > {c.tolerance:g})" if c.error is not None else "")
                for c in self.checks if not c.ok]

    def verdict(self) -> str:
        if self.problems:
            return "doctor: PROBLEMS — " + "; ".join(self.problems)
        n, w = len(self.checks), len(self.warnings)
        parts = [f"{n} check{'s' if n != 1 else ''} passed"] + self.summary
        if w:
            parts.append(f"{w} warning{'s' if w != 1 else ''} above")
        return "doctor: OK — " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# 1. versions and platform
# ---------------------------------------------------------------------------------------------

def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        if commit is None:
            return dict(commit=None, text="unknown (not a git checkout)")
        subject = git("log", "-1", "--format=%cs %s") or ""
        changed = [line for line in (git("status", "--porcelain", "--untracked-files=no") or "").splitlines() if line]
        subject = subject if len(subject) <= 72 else subject[:71] + "…"
        text = f"{commit[:10]} {subject}" + (f" (+ {len(changed)} modified tracked files)" if changed else "")
        return dict(commit=commit, subject=subject, modified_files=len(changed), text=text)
    except (OSError, subprocess.SubprocessError) as e:
        return dict(commit=None, text=f"unknown ({type(e).__name__})")


def versions(doc: Doctor) -> None:
    doc.section("versions and platform")
    info = dict(python=platform.python_version(), python_executable=sys.executable,
                twingpt=package_version("twingpt"), git=git_commit())
    doc.row("python", f"{info['python']} ({sys.executable})")
    doc.row("twingpt", f"{info['twingpt'] or '?'}, commit {info['git']['text']}")
    for name in ("numpy", "torch", "mlx", "sentencepiece"):
        info[name] = package_version(name)
    extra = {}
    try:
        import torch
        extra["torch"] = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    except Exception as e:   # reported by the device section as a failure
        extra["torch"] = f"import fails: {type(e).__name__}: {e}"
    doc.row("packages", "  ".join(f"{n} {info[n] or 'MISSING'}" + (f" ({extra[n]})" if n in extra else "")
                                  for n in ("numpy", "torch", "mlx", "sentencepiece")))
    for name in ("numpy", "torch", "mlx", "sentencepiece"):
        if info[name] is None:
            doc.fail("install", f"{name} is not installed", "make venv installs it")
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    info["platform"] = dict(system=platform.system(), release=platform.release(), platform=platform.platform(),
                            machine=platform.machine(), processor=platform.processor() or cpu_model(),
                            cpus=cpus, usable_cpus=usable)
    p = info["platform"]
    doc.row("os", f"{p['platform']} ({p['machine']})")
    doc.row("cpu", f"{p['processor'] or '?'}: {cpus} CPUs" + (f", {usable} usable by this process" if usable != cpus else ""))
    doc.report["versions"] = info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# ---------------------------------------------------------------------------------------------
# 2. devices
# ---------------------------------------------------------------------------------------------

@dataclass
class Device:
    backend: str          # "torch" or "mlx"
    kind: str             # "cpu", "cuda", "mps" or "metal" (docs: device_kind)
    label: str            # "torch cpu", "torch cuda:0", "mlx metal", ...
    handle: object = None  # torch.device or mx.Device


def devices(doc: Doctor) -> list[Device]:
    doc.section("devices")
    present, listing = [], []
    try:
        import torch
        present.append(Device("torch", "cpu", "torch cpu", torch.device("cpu")))
        doc.row("torch cpu", "present")
        listing.append(dict(device="torch cpu", present=True))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                name = torch.cuda.get_device_name(i)
                if i == 0:   # the sessions run on cuda:0 (LOCAL_RANK 0); the others are listed
                    present.append(Device("torch", "cuda", "torch cuda:0", torch.device("cuda", 0)))
                doc.row(f"torch cuda:{i}", f"present: {name}, {total / GIB:.1f} GiB ({free / GIB:.1f} GiB free)")
                listing.append(dict(device=f"torch cuda:{i}", present=True, name=name, total_bytes=total,
                                    free_bytes=free, capability=".".join(map(str, torch.cuda.get_device_capability(i)))))
        else:
            why = f"torch.cuda.is_available() is False ({'no CUDA device or driver; torch built for CUDA ' + torch.version.cuda if torch.version.cuda else 'torch built without CUDA'})"
            doc.row("torch cuda", f"absent: {why}")
            listing.append(dict(device="torch cuda", present=False, reason=why))
        if torch.backends.mps.is_available():
            present.append(Device("torch", "mps", "torch mps", torch.device("mps")))
            mem = torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else None
            doc.row("torch mps", "present" + (f": recommended max memory {mem / GIB:.1f} GiB" if mem else ""))
            listing.append(dict(device="torch mps", present=True, recommended_max_memory_bytes=mem))
        else:
            why = "torch.backends.mps.is_available() is False" + ("" if torch.backends.mps.is_built() else " (not built)")
            doc.row("torch mps", f"absent: {why}")
            listing.append(dict(device="torch mps", present=False, reason=why))
    except Exception as e:
        doc.fail("device", "torch", e)
    try:
        import mlx.core as mx
        present.append(Device("mlx", "cpu", "mlx cpu", mx.cpu))
        doc.row("mlx cpu", "present")
        listing.append(dict(device="mlx cpu", present=True, info=_mlx_info(mx, mx.cpu)))
        if mx.metal.is_available():
            info = _mlx_info(mx, mx.gpu)
            present.append(Device("mlx", "metal", "mlx metal", mx.gpu))
            wset = info.get("max_recommended_working_set_size")
            doc.row("mlx metal", f"present: {info.get('device_name', '?')} ({info.get('architecture', '?')}), "
                                 f"memory {info.get('memory_size', 0) / GIB:.1f} GiB"
                                 + (f", recommended working set {wset / GIB:.1f} GiB" if wset else ""))
            listing.append(dict(device="mlx metal", present=True, info=info))
        else:
            doc.row("mlx metal", "absent: mx.metal.is_available() is False")
            listing.append(dict(device="mlx metal", present=False, reason="mx.metal.is_available() is False"))
    except Exception as e:
        doc.fail("device", "mlx", e)
    doc.report["devices"] = listing
    return present


def _mlx_info(mx, device) -> dict:
    """mx.device_info() of `device` (mx.metal.device_info() on older MLX), JSON-ready."""
    try:
        with mlx_device(device):
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dict(info).items()}
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def mlx_device(device):
    import mlx.core as mx
    before = mx.default_device()
    mx.set_default_device(device)
    try:
        yield
    finally:
        mx.set_default_device(before)


def torch_single_thread():
    """Tiny models on one intra-op thread (backend_torch/threads.py); imports torch only when called."""
    from backend_torch.threads import single_thread
    return single_thread()


# ---------------------------------------------------------------------------------------------
# 3. BLAS
# ---------------------------------------------------------------------------------------------

def torch_blas_summary(config: str) -> str:
    """One line from torch.__config__.show()."""
    def find(pattern):
        m = re.search(pattern, config)
        return m.group(1) if m else None
    blas, lapack = find(r"BLAS_INFO=([\w.-]+)"), find(r"LAPACK_INFO=([\w.-]+)")
    parts = [f"BLAS {blas or '?'}" + (f", LAPACK {lapack}" if lapack else "")]
    if mkl := find(r"Math Kernel Library Version ([\d.]+)"):
        parts.append(f"MKL {mkl}")
    if "openblas" in config.lower() and (blas or "").lower() != "open":
        parts.append("OpenBLAS")
    if dnn := find(r"MKL-DNN v([\w.]+)"):
        parts.append(f"oneDNN {dnn}")
    if "OpenMP" in config:
        parts.append("OpenMP")
    if cap := find(r"CPU capability usage: (\w+)"):
        parts.append(f"CPU capability {cap}")
    return ", ".join(parts)


def blas(doc: Doctor) -> None:
    doc.section("BLAS")
    info = {}
    if sys.platform.startswith("linux"):
        installed, preloaded = find_openblas(), preloaded_blas()
        note = blas_note()
        info["mlx"] = dict(openblas_installed=installed, ld_preload=preloaded, note=note,
                           no_preload=os.environ.get("TWINGPT_NO_BLAS_PRELOAD") == "1")
        in_use = blas_in_use()
        info["mlx"]["in_use"] = in_use
        if in_use:
            text = f"OpenBLAS, preloaded from {in_use}"
        else:
            text = ("MLX's bundled reference BLAS (slow); OpenBLAS "
                    + (f"installed at {installed}, not preloaded" if installed else "not installed"))
        doc.row("mlx", text)
        if not installed:
            doc.warn("MLX's CPU backend runs on its bundled reference BLAS, ~30x slower: "
                     "sudo apt-get install libopenblas0-pthread")
        elif not preloaded:
            doc.warn("OpenBLAS is installed but not preloaded"
                     + (" (TWINGPT_NO_BLAS_PRELOAD=1)" if info["mlx"]["no_preload"] else ""))
    else:
        text = "Accelerate (macOS) on the CPU; Metal on the GPU" if sys.platform == "darwin" else "the wheel's own"
        info["mlx"] = dict(note=text)
        doc.row("mlx", text)
    try:
        import torch
        summary = torch_blas_summary(torch.__config__.show())
        info["torch"] = dict(summary=summary, threads=torch.get_num_threads())
        doc.row("torch", f"{summary}; {torch.get_num_threads()} threads")
    except Exception as e:
        doc.fail("blas", "torch", e)
    doc.report["blas"] = info


# ---------------------------------------------------------------------------------------------
# 5. the on-device checks (docs/spec.md §10)
# ---------------------------------------------------------------------------------------------

def check_spec():
    from core.config import ModelSpec
    return ModelSpec(**CHECK_MODEL)


def device_logits(dev: Device, spec, weights, ids) -> np.ndarray:
    if dev.backend == "torch":
        import torch
        import backend_torch.model as torch_model
        model = torch_model.GPT(spec).load_weights(weights).to(dev.handle)
        with torch.no_grad():
            out = model.logits(torch.from_numpy(np.asarray(ids, np.int64)).to(dev.handle))
        return out.cpu().double().numpy()   # float64 on the host: mps has none
    import mlx.core as mx
    import backend_mlx.model as mlx_model
    with mlx_device(dev.handle):
        model = mlx_model.GPT(spec).load_weights(weights)
        return np.array(model.logits(mx.array(np.asarray(ids, np.int32))), dtype=np.float64)


def device_grads(dev: Device, spec, weights, ids, targets) -> dict[str, np.ndarray]:
    """The gradient of the fp32 mean loss for every parameter, as float64 numpy."""
    if dev.backend == "torch":
        import torch
        import backend_torch.model as torch_model
        model = torch_model.GPT(spec).load_weights(weights).to(dev.handle)
        to = lambda a: torch.from_numpy(np.asarray(a, np.int64)).to(dev.handle)   # noqa: E731
        model.loss(to(ids), to(targets)).backward()
        return {name: (np.zeros(p.shape) if p.grad is None else p.grad.cpu().double().numpy())
                for name, p in model.named_parameters()}
    import mlx.core as mx
    import mlx.nn as mlx_nn
    from mlx.utils import tree_flatten
    import backend_mlx.model as mlx_model
    with mlx_device(dev.handle):
        model = mlx_model.GPT(spec).load_weights(weights)
        _, grads = mlx_nn.value_and_grad(model, model.loss)(mx.array(np.asarray(ids, np.int32)),
                                                           mx.array(np.asarray(targets, np.int32)))
        return {name: np.array(g, dtype=np.float64) for name, g in tree_flatten(grads)}


def step_config(spec, dev: Device):
    # MLX: chunks of 2 sequences evaluated one by one, as a planned run with several chunks does.
    from core.config import TrainConfig
    return TrainConfig(**spec.to_dict(), device=dev.kind if dev.backend == "torch" else "cpu",
                       compute_dtype="float32", compile="0", iterations=400, warmdown_iters=100,
                       grad_clip_norm=0.3, train_seq_len=STEP_SEQ_LEN, mlx_max_microbatch_tokens=2 * STEP_SEQ_LEN,
                       mlx_eager_eval=True)


def make_bare_session(dev: Device, cfg):
    """The backend's session for `dev`, not set up (MLX's follows the default device)."""
    if dev.backend == "torch":
        from backend_torch.session import TorchSession
        return TorchSession(cfg, environ={})
    from backend_mlx.session import MLXSession
    return MLXSession()


def make_session(dev: Device, cfg):
    session = make_bare_session(dev, cfg)
    session.setup(cfg.model_spec(), cfg)
    return session


def device_step(dev: Device, spec, weights, state, batches) -> tuple[float, dict, dict]:
    """One train_step of the session on `dev`: (loss, weights after, optimizer state after)."""
    from core.schedule import learning_rates, momentum
    cfg = step_config(spec, dev)
    lrs, mu = learning_rates(cfg, STEP, 0.0), momentum(cfg, STEP)
    with (mlx_device(dev.handle) if dev.backend == "mlx" else contextlib.nullcontext()):
        session = make_session(dev, cfg)
        try:
            session.load_weights(weights)
            session.load_optimizer_state(state)
            loss = session.train_step(batches, lrs, mu, STEP)
            return float(loss), session.export_weights(), session.export_optimizer_state()
        finally:
            session.close()


def on_each(doc: Doctor, present: list[Device], check: str, what: str, compute) -> dict:
    """compute(dev) on every present device, by label; a device that fails is reported, not raised."""
    results = {}
    for dev in present:
        try:
            results[dev.label] = compute(dev)
        except Exception as e:
            doc.fail(check, f"{dev.label}{what}", e)
    return results


def on_device_checks(doc: Doctor, present: list[Device]) -> None:
    from core.init import random_optimizer_state, random_weights
    from core.reference import logits as reference_logits
    spec = check_spec()
    doc.section(f"on-device checks (docs/spec.md §10, fp32): random weights, vocab {spec.vocab_size}, "
                f"{spec.num_layers} layers, width {spec.model_dim}, heads {spec.num_heads}/{spec.num_kv_heads}")
    weights = random_weights(spec, CHECK_SEED)
    rng = np.random.default_rng(CHECK_SEED)
    ids, targets = (rng.integers(0, spec.vocab_size, CHECK_SHAPE) for _ in range(2))
    torch_devs = [d for d in present if d.backend == "torch"]
    mlx_devs = [d for d in present if d.backend == "mlx"]
    context = torch_single_thread() if torch_devs else contextlib.nullcontext()
    with context:
        # Forward: every device against the float64 reference.
        ref = reference_logits(spec, weights, ids)
        for dev in present:
            try:
                doc.compare("logits", f"{dev.label} vs float64 reference", {"logits": rel(device_logits(dev, spec, weights, ids), ref)},
                            f"B x T = {CHECK_SHAPE[0]} x {CHECK_SHAPE[1]}")
            except Exception as e:
                doc.fail("logits", f"{dev.label} vs float64 reference", e)
        # Gradients: every torch device against every MLX device.
        grads = on_each(doc, present, "grads", "", lambda dev: device_grads(dev, spec, weights, ids, targets))
        for t in torch_devs:
            for m in mlx_devs:
                if t.label in grads and m.label in grads:
                    gt, gm = grads[t.label], grads[m.label]
                    if set(gt) != set(gm):
                        doc.fail("grads", f"{t.label} vs {m.label}", f"parameter names differ: {sorted(set(gt) ^ set(gm))[:4]}")
                        continue
                    doc.compare("grads", f"{t.label} vs {m.label}",
                                {n: rel(gt[n], gm[n]) for n in gt if gt[n].size})
        # One optimizer step through the sessions: every torch device against every MLX device.
        state0 = random_optimizer_state(spec, CHECK_SEED)
        T = STEP_SEQ_LEN
        batches = [tuple(rng.integers(0, spec.vocab_size, (3, T)) for _ in range(2)) for _ in range(2)]
        steps = on_each(doc, present, "optim_step", " train_step",
                        lambda dev: device_step(dev, spec, weights, state0, batches))
        for t in torch_devs:
            for m in mlx_devs:
                if t.label not in steps or m.label not in steps:
                    continue
                (lt, wt, st), (lm, wm, sm) = steps[t.label], steps[m.label]
                if set(wt) != set(wm) or set(st) != set(sm):
                    doc.fail("optim_step", f"{t.label} vs {m.label}", "weight or state names differ")
                    continue
                still = [n for n in weights if weights[n].size and rel(wm[n], weights[n]) <= 1e-4]
                if still:
                    doc.fail("optim_step", f"{t.label} vs {m.label}", f"the step barely moved {', '.join(still[:3])}")
                    continue
                errors = {n: rel(wt[n], wm[n]) for n in wt if wt[n].size}
                errors.update({f"state {k}": rel(st[k], sm[k]) for k in st if st[k].size})
                errors["train_step loss"] = rel(lt, lm)
                doc.compare("optim_step", f"{t.label} vs {m.label} (Muon + Adam, step {STEP})", errors,
                            "weights, optimizer state and loss")
    ran = [d.label for d in present if any(c.name == "logits" and c.ok and c.what.startswith(d.label) for c in doc.checks)]
    if ran:
        doc.summary.append(f"§10 logits, grads and one optimizer step agree on {', '.join(ran)}")
    doc.report["check_model"] = dict(spec=spec.to_dict(), seed=CHECK_SEED, shape=CHECK_SHAPE, step=STEP,
                                     step_batches="2 micro-batches of 3 x 16, MLX chunks of 2 sequences, clip 0.3")


# ---------------------------------------------------------------------------------------------
# 6. timed steps of the `make train` model
# ---------------------------------------------------------------------------------------------

def timed_steps(doc: Doctor, present: list[Device], warmup: int, steps: int, timeout: float) -> None:
    from bench.run import CONFIGS, SETTINGS, TOKENS_PER_STEP, row_env, spawn_row
    model = CONFIGS["preset"]
    doc.section(f"timed steps of the make-train model ({model['num_layers']} layers, width {model['model_dim']}, "
                f"heads {model['num_heads']}/{model['num_kv_heads']}, seq {model['train_seq_len']}; bench/run.py rows "
                f"of {TOKENS_PER_STEP:,} tokens a step, {warmup} warmup + {steps} timed, each in its own process)")
    backends = sorted({d.backend for d in present}, key=["torch", "mlx"].index)
    rows, rates, busy = [], {}, 0.0
    for backend in backends:
        if backend == "torch":
            name = "torch-fp32"
        else:
            name = "mlx-fp32-openblas" if row_env(SETTINGS["mlx-fp32-openblas"]) is not None else "mlx-fp32-bundled"
        t0 = time.perf_counter()
        row = spawn_row(name, "preset", warmup, steps, timeout)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if "tokens_per_s" not in row:
            doc.fail("timing", name, row.get("error", "no result"))
            continue
        rates[backend] = row["tokens_per_s"]
        busy = max(busy, row["other_cores_busy"])
        doc.record(Check("timing", f"{name} ({row['device']})", True,
                         detail=f"{row['tokens_per_s']:,.0f} tok/s (best step {row['best_tokens_per_s']:,.0f}), "
                                f"{1000 * row['step_s']:.0f} ms a step, first step {row['first_step_s']:.1f} s, "
                                f"peak {row['peak_memory_bytes'] / 2**20:,.0f} MB, "
                                f"other processes kept {row['other_cores_busy']:.2f} cores busy"))
    if rates:
        doc.summary.append(", ".join(f"{b} {r:,.0f} tok/s" for b, r in rates.items()))
    if busy > 0.1:
        doc.warn(f"other processes kept up to {busy:.2f} cores busy during the timed steps: their figures are low")
    if len(rates) > 1:
        best = max(rates, key=rates.get)
        doc.say(f"  faster here: {best} ({', '.join(f'{b} {r:,.0f}' for b, r in rates.items())} tok/s); "
                "make train chooses by the same measurement (commands/pick_backend.py)")
    doc.report["timing"] = dict(model=model, tokens_per_step=TOKENS_PER_STEP, warmup=warmup, steps=steps, rows=rows)


# ---------------------------------------------------------------------------------------------
# 4. memory and the budget
# ---------------------------------------------------------------------------------------------

def make_train_settings() -> dict[str, str]:
    """The `make train` preset: the defaults of the Makefile's TRAIN_PRESET (NAME=${NAME:-value} ...)."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^TRAIN_PRESET\s*:?=(.*?)(?<!\\)\n(?!\s)", text, re.S | re.M)
    return dict(re.findall(r"(\w+)=\$\$\{\w+:-([^}]*)\}", m.group(1))) if m else {}


def memory(doc: Doctor, present: list[Device]) -> None:
    """Per present device: what it offers a run (the session's device_memory_bytes), the auto budget
    and the `make train` preset's plan against it, as the trainer makes it (trainer/plan.py)."""
    from core import memory as core_memory
    from core.config import load_config
    from trainer.plan import BUDGET_DEVICE, make_plan
    preset = make_train_settings()
    doc.section(f"memory and attention: what each device offers a run, MEMORY_BUDGET_GB=auto's share of it "
                f"({', '.join(f'{k} {v:g}' for k, v in core_memory.BUDGET_FRACTION.items())}), and the make-train "
                f"preset's estimated peak")
    if not preset:
        doc.fail("memory", "the make-train preset", "no TRAIN_PRESET in the Makefile")
    rows = []
    for dev in present:
        env = dict(preset, DEVICE=dev.kind) if dev.backend == "torch" else dict(preset)
        try:
            cfg = load_config([], env)
            with (mlx_device(dev.handle) if dev.backend == "mlx" else contextlib.nullcontext()):
                session = make_bare_session(dev, cfg)
                offered = session.device_memory_bytes()
                kind = BUDGET_DEVICE[session.device_kind]
                budget = core_memory.default_budget_bytes(kind, offered)
                plan = make_plan(cfg, session)
        except Exception as e:
            doc.fail("memory", dev.label, e)
            continue
        m = plan.memory
        # Local ranks (NPROC=2) on one CPU or Mac split its memory; CUDA ranks have a GPU each.
        two_local = budget if session.device_kind == "cuda" else budget // 2
        rows.append(dict(device=dev.label, device_kind=session.device_kind, offered_bytes=offered,
                         auto_budget_bytes=budget, budget_per_rank_of_2_local=two_local,
                         attention=session.attention, budget_source=plan.budget_source, preset=preset,
                         grad_accum_steps=m.grad_accum_steps, mlx_eager_eval=m.mlx_eager_eval,
                         estimated_peak_bytes=m.estimate.total, estimate=m.estimate.describe(), fits=m.fits,
                         compute_dtype=plan.compute_dtype, compiled=plan.compiled))
        doc.row(dev.label, f"{offered / GIB:.1f} GiB, auto budget {budget / GIB:.1f} GiB ({plan.budget_source}), "
                           f"{two_local / GIB:.1f} GiB a rank with 2 local ranks; attention: {session.attention}")
        doc.record(Check("memory", f"make train on {dev.label}", m.fits,
                         detail=f"{m.estimate.total / GIB:.2f} GiB estimated peak, in {m.estimate.phase} "
                                f"({'fits' if m.fits else 'does NOT fit'} the budget; {plan.compute_dtype}, "
                                f"GRAD_ACCUM_STEPS={m.grad_accum_steps}"
                                + (f", MLX_EAGER_EVAL={int(m.mlx_eager_eval)}" if dev.backend == "mlx" else "")
                                + ")" + ("" if m.fits else "; " + m.suggestion())))
    if rows and all(r["fits"] for r in rows):
        doc.summary.append("make train fits the auto memory budget")
    doc.report["memory"] = rows


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def parse_tolerances(items: list[str]) -> dict[str, float]:
    out = dict(TOLERANCES)
    for item in items:
        name, _, value = item.partition("=")
        if name not in TOLERANCES or not value:
            raise argparse.ArgumentTypeError(f"--tol {item!r}: expected NAME=VALUE, NAME one of {', '.join(TOLERANCES)}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:   # the command line: MLX's CPU backend on OpenBLAS, as its trainer (may re-execute)
        argv = sys.argv[1:]
        ensure_fast_blas("commands.doctor", argv)
    p = argparse.ArgumentParser(prog="python -m commands.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of doctor.json (default: runs/)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per backend (default 1)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per backend (default 2)")
    p.add_argument("--no-timing", action="store_true", help="skip the timed steps")
    p.add_argument("--timeout", type=float, default=120, help="seconds allowed per timed backend")
    p.add_argument("--tol", action="append", default=[], metavar="NAME=VALUE",
                   help="override a tolerance (logits, grads, optim_step), to see the doctor fail")
    args = p.parse_args(argv)
    try:
        tolerances = parse_tolerances(args.tol)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))

    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
    doc = Doctor(tolerances=tolerances)
    doc.say(f"twingpt doctor, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    present: list[Device] = []
    sections = [("versions", lambda: versions(doc)),
                ("devices", lambda: present.extend(devices(doc))),
                ("blas", lambda: blas(doc)),
                ("memory", lambda: memory(doc, present)),
                ("checks", lambda: on_device_checks(doc, present))]
    if not args.no_timing:
        sections.append(("timing", lambda: timed_steps(doc, present, args.warmup, args.steps, args.timeout)))
    for name, run in sections:
        try:
            run()
        except Exception as e:   # a section that crashes is a problem, and the others still run
            doc.fail(name, "section crashed", e)
            doc.report.setdefault("tracebacks", {})[name] = traceback.format_exc()
    if args.no_timing:
        doc.section("timed steps: skipped (--no-timing)")

    seconds = time.perf_counter() - started
    doc.say()
    doc.say(f"doctor ran in {seconds:.0f} s")
    out = Path(args.out) / "doctor.json"
    doc.report.update(checks=[asdict(c) for c in doc.checks], warnings=doc.warnings, problems=doc.problems,
                      ok=not doc.problems, verdict=doc.verdict(), seconds=seconds, tolerances=tolerances,
                      argv=argv, started=started_at, printed=doc.lines + [f"wrote {out}", doc.verdict()])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc.report, indent=1, default=str) + "\n")
        doc.say(f"wrote {out}")
    except OSError as e:
        doc.fail("report", f"write {out}", e)
    doc.say(doc.verdict())
    return 0 if not doc.problems else 1


if __name__ == "__main__":
    sys.exit(main())
