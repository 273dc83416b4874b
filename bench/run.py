"""Training throughput of both backends on this machine: `make bench` or `python -m bench.run`.

For each config (SMALL and the reference BASE) and each backend setting, a full training step --
forward, backward, Muon and Adam, through the real session classes' train_step -- is timed on
random token batches of 2,048 tokens. Reported per row:

    tok/s      tokens per step / median step time over the timed steps (after warmup steps);
               "best" uses the fastest step instead, which other load on the machine disturbs least
    MFU        model FLOPs per token (core.flops.flops_per_token) x tok/s, over the fp32
               matrix-product ceiling measured in the same process (2048 x 2048 products); bf16
               rows exceed 100% there, so they are also given against their own bf16 ceiling
    peak MB    torch: the process's max RSS; MLX: mx.get_peak_memory() (the JSON has both for MLX)
    others     CPU cores other processes (and, in a VM, other guests: steal time) kept busy
               during the row, from /proc/stat: above ~0.1 the row shared the machine and its
               figures are low

Every row runs in its own subprocess, so peak memory is that row's alone and MLX starts with
OpenBLAS preloaded as its trainer does (backend_mlx/blas.py). Rows run one after the other: on a
small machine two at once would only measure each other. A benchmark prints figures; it never
fails on speed (it exits non-zero only when a row crashes). Results go to bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.config import TrainConfig
from core.flops import flops_per_token
from core.init import init_weights
from core.schedule import learning_rates, momentum
from trainer.loop import peak_rss_bytes

TOKENS_PER_STEP = 2048
RESULT_MARK = "BENCH_RESULT "
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results.json"

# Model shapes; both have head_dim 64 and vocab 1024. BASE is the Parameter Golf baseline.
CONFIGS = {
    "small": dict(num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, train_seq_len=256),
    "base": dict(num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4, train_seq_len=1024),
    # The model of `make train` (commands/pick_backend.py times it; not in `make bench` by default).
    "preset": dict(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, train_seq_len=256),
}
# (warmup steps, timed steps): a stable median while `make bench` stays within a few minutes.
STEPS = {"small": (3, 8), "base": (2, 5), "preset": (2, 5)}

# name -> how the row runs. configs: where it runs by default; default=False: only on request
# (--settings), because it is slow. blas (MLX): "openblas" preloads OpenBLAS as the trainer does,
# "autodetect" also drops an OPENBLAS_CORETYPE from the environment, "bundled" keeps the
# reference BLAS of MLX's Linux wheel.
SETTINGS = {
    "torch-fp32": dict(backend="torch", compute_dtype="float32", compile="0"),
    "torch-bf16": dict(backend="torch", compute_dtype="bfloat16", compile="0"),
    # The first step compiles (70-80 s at BASE): on by default at BASE only.
    "torch-bf16-compile": dict(backend="torch", compute_dtype="bfloat16", compile="1", configs=("base",)),
    "torch-fp32-compile": dict(backend="torch", compute_dtype="float32", compile="1", default=False),
    "mlx-fp32-openblas": dict(backend="mlx", compute_dtype="float32", compile="0", blas="openblas"),
    # Only when the environment sets OPENBLAS_CORETYPE (see coretype_note).
    "mlx-fp32-autodetect": dict(backend="mlx", compute_dtype="float32", compile="0", blas="autodetect"),
    # ~9 s a SMALL step: 1 warmup + 2 timed steps, on request.
    "mlx-fp32-bundled": dict(backend="mlx", compute_dtype="float32", compile="0", blas="bundled",
                             configs=("small",), default=False, steps=(1, 2)),
}

# BASE targets of issue 6 and the challenge's reference trainers measured on this machine (tok/s).
TARGETS = {"torch-fp32": 1000, "torch-bf16": 1900, "torch-bf16-compile": 1900, "mlx-fp32-openblas": 600}
REFERENCE = {"torch-fp32": 904, "torch-bf16-compile": 1756, "mlx-fp32-openblas": 312, "mlx-fp32-bundled": 22}


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------

def make_config(config: str, setting: dict) -> TrainConfig:
    return TrainConfig(**CONFIGS[config], vocab_size=1024, train_batch_tokens=TOKENS_PER_STEP, device="cpu",
                       compute_dtype=setting["compute_dtype"], compile=setting["compile"],
                       max_wallclock_seconds=0, warmup_steps=0)


def make_session(setting: dict, cfg: TrainConfig):
    if setting["backend"] == "torch":
        from backend_torch.session import TorchSession
        session = TorchSession(cfg, environ={})
    else:
        from backend_mlx.session import MLXSession
        session = MLXSession()
    spec = cfg.model_spec()
    session.setup(spec, cfg)
    session.load_weights(init_weights(spec, cfg.seed))
    return session


def run_row(name: str, config: str, warmup: int, timed: int) -> dict:
    setting = SETTINGS[name]
    cfg = make_config(config, setting)
    spec = cfg.model_spec()
    rows = TOKENS_PER_STEP // cfg.train_seq_len
    rng = np.random.default_rng(0)
    session = make_session(setting, cfg)
    times, losses = [], []
    for step in range(warmup + timed):
        x = rng.integers(0, spec.vocab_size, (rows, cfg.train_seq_len))
        y = rng.integers(0, spec.vocab_size, (rows, cfg.train_seq_len))
        t0 = time.perf_counter()
        loss = session.train_step([(x, y)], learning_rates(cfg, step, 0.0), momentum(cfg, step), step)
        session.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s, best_s = statistics.median(times[warmup:]), min(times[warmup:])
    fpt = flops_per_token(spec, cfg.train_seq_len, looping=spec.num_loops > 0)
    ceiling = {"float32": session.matmul_gflops("float32")}
    if setting["compute_dtype"] != "float32":
        ceiling[setting["compute_dtype"]] = session.matmul_gflops(setting["compute_dtype"])
    max_rss = peak_rss_bytes()
    peak = max_rss if setting["backend"] == "torch" else session.peak_memory_bytes()
    row = dict(setting=name, config=config, backend=setting["backend"], compute_dtype=setting["compute_dtype"],
               compile=setting["compile"], blas=setting.get("blas"), device=session.device, notes=session.notes,
               openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"), model=CONFIGS[config],
               tokens_per_step=TOKENS_PER_STEP, warmup_steps=warmup, timed_steps=timed, step_times_s=times,
               first_step_s=times[0], step_s=step_s, best_step_s=best_s, tokens_per_s=TOKENS_PER_STEP / step_s,
               best_tokens_per_s=TOKENS_PER_STEP / best_s, flops_per_token=fpt, matmul_gflops=ceiling,
               mfu_fp32=fpt * TOKENS_PER_STEP / step_s / (ceiling["float32"] * 1e9),
               mfu_own_dtype=fpt * TOKENS_PER_STEP / step_s / (ceiling[setting["compute_dtype"]] * 1e9),
               peak_memory_bytes=peak, max_rss_bytes=max_rss, losses=losses)
    session.close()
    return row


# ---------------------------------------------------------------------------------------------
# The driver: one subprocess per row, then the table and the JSON
# ---------------------------------------------------------------------------------------------

def row_env(setting: dict) -> dict | None:
    """The row's environment; None when it cannot run here (no OpenBLAS, or nothing to autodetect)."""
    env = dict(os.environ)
    if setting["backend"] != "mlx":
        return env
    from backend_mlx.blas import find_openblas   # stdlib only: the driver never imports MLX
    kept = [lib for lib in env.get("LD_PRELOAD", "").split() if "blas" not in os.path.basename(lib)]
    if setting["blas"] in ("openblas", "autodetect"):
        lib = find_openblas()
        if lib is None or (setting["blas"] == "autodetect" and not env.get("OPENBLAS_CORETYPE")):
            return None
        kept.insert(0, lib)
    if setting["blas"] == "autodetect":
        del env["OPENBLAS_CORETYPE"]
    env["LD_PRELOAD"] = " ".join(kept)
    return env


def busy_seconds() -> float:
    """CPU seconds used since boot by every process (user, nice, system, irq, softirq) and by other
    virtual machines on the same host (steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def spawn_row(name: str, config: str, warmup: int, timed: int, timeout: float) -> dict:
    env = row_env(SETTINGS[name])
    cmd = [sys.executable, "-m", "bench.run", "--worker", name, "--configs", config,
           "--warmup", str(warmup), "--steps", str(timed)]
    busy0, mine0, t0 = busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(setting=name, config=config, error=f"timed out after {timeout:.0f} s")
    mine1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (mine1.ru_utime - mine0.ru_utime) + (mine1.ru_stime - mine0.ru_stime)
    others = max(busy_seconds() - busy0 - mine, 0.0) / (time.perf_counter() - t0)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return dict(json.loads(line[len(RESULT_MARK):]), other_cores_busy=others)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(setting=name, config=config, error=f"exit {proc.returncode}: {tail}")


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':6} {'setting':19} {'tok/s':>6} {'best':>6} {'step ms':>7} {'MFU':>5} {'(own)':>5} "
            f"{'GFLOP/s':>7} {'peak MB':>7} {'1st s':>5} {'others':>6}  BASE target / reference")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"{r['config']:6} {r['setting']:19} {r['error']}")
            continue
        ref = []
        if r["config"] == "base" and r["setting"] in TARGETS:
            ref.append(f">= {TARGETS[r['setting']]}")
        if r["config"] == "base" and r["setting"] in REFERENCE:
            ref.append(f"ref {REFERENCE[r['setting']]}")
        own = f"{100 * r['mfu_own_dtype']:4.0f}%" if r["compute_dtype"] != "float32" else ""
        lines.append(f"{r['config']:6} {r['setting']:19} {r['tokens_per_s']:6.0f} {r['best_tokens_per_s']:6.0f} "
                     f"{1000 * r['step_s']:7.0f} {100 * r['mfu_fp32']:4.0f}% {own:>5} "
                     f"{r['matmul_gflops']['float32']:7.0f} {r['peak_memory_bytes'] / 2**20:7.0f} "
                     f"{r['first_step_s']:5.1f} {r['other_cores_busy']:6.2f}  {' / '.join(ref)}")
    lines += ["tok/s: median step; best: fastest step; MFU: over the fp32 product ceiling (GFLOP/s), (own): over",
              "the bf16 one; peak MB: torch max RSS, MLX mx.get_peak_memory(); others: cores other processes used."]
    return "\n".join(lines)


def coretype_note() -> str | None:
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    if coretype:
        return (f"note: the environment sets OPENBLAS_CORETYPE={coretype}, which the MLX trainer respects; "
                "mlx-fp32-autodetect is the same row with OpenBLAS choosing kernels for this CPU.")
    return None


def parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    """The command line, and its configs checked."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small,base", help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--settings", default=None,
                   help="comma-separated, from: " + ", ".join(SETTINGS) + " (default: all but "
                        + ", ".join(n for n, s in SETTINGS.items() if s.get("default") is False) + ")")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: per config)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: per config)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per row")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: run one row here
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}: choose from {', '.join(CONFIGS)}")
    if args.settings is not None:
        for n in args.settings.split(","):
            if n not in SETTINGS:
                p.error(f"unknown setting {n!r}: choose from {', '.join(SETTINGS)}")
    return args, configs


def run_rows(args: argparse.Namespace, configs: list[str]) -> list[dict]:
    """Every requested row, each in its own process, with a line of progress each."""
    requested = args.settings is not None
    names = args.settings.split(",") if requested else [n for n, s in SETTINGS.items() if s.get("default", True)]
    rows = []
    for config in configs:
        for name in names:
            setting = SETTINGS[name]
            if not requested and config not in setting.get("configs", CONFIGS):
                continue
            if row_env(setting) is None:
                continue   # no OpenBLAS installed, or no OPENBLAS_CORETYPE to drop
            warmup, timed = setting.get("steps", STEPS[config])
            warmup = warmup if args.warmup is None else args.warmup
            timed = timed if args.steps is None else args.steps
            print(f"bench: {config} {name}: {warmup} warmup + {timed} timed steps ...", end=" ", flush=True)
            t0 = time.time()
            row = spawn_row(name, config, warmup, timed, args.timeout)
            rows.append(row)
            print(f"{row['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in row else row["error"],
                  f"({time.time() - t0:.0f} s)", flush=True)
    return rows


def main(argv=None) -> int:
    args, configs = parse_args(argv)
    if args.worker:
        warmup, timed = SETTINGS[args.worker].get("steps", STEPS[configs[0]])
        row = run_row(args.worker, configs[0], warmup if args.warmup is None else args.warmup,
                      timed if args.steps is None else args.steps)
        print(RESULT_MARK + json.dumps(row), flush=True)
        return 0

    started = time.time()
    if note := coretype_note():
        print(note)
    rows = run_rows(args, configs)
    print()
    print(format_table(rows))
    result = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                  started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                  seconds=time.time() - started, tokens_per_step=TOKENS_PER_STEP, note=coretype_note(),
                  targets_base_tok_s=TARGETS, reference_base_tok_s=REFERENCE, rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} in {time.time() - started:.0f} s")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
