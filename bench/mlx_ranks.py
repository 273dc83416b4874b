"""MLX data parallelism on this machine: 2 local ranks (mlx.launch, ring backend) against 1 rank with
2 accumulation steps, the same global batch; and the bytes each rank hands to all-reduce and sends
on its ring sockets per step, against the figure computed from the parameter table.

    python -m bench.mlx_ranks [--configs preset,base] [--steps 3] [--rank-blas-threads 1]

A step is MLXSession.train_step on random tokens plus the loop's per-step all_reduce_max (the stop
check), after one untimed step. The payload per step is gradients (every unique parameter, fp32)
+ Muon's shared updates (every matrix, fp32) + the loss + the stop check; a ring all-reduce sends
2(N-1)/N of its payload from each rank (N = 2: all of it). The socket bytes are read with `ss`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from backend_mlx.blas import ensure_fast_blas
from bench.run import CONFIGS as MODELS
from core.config import TrainConfig
from core.init import init_weights
from core.params import MATRIX, param_table

REPO = Path(__file__).resolve().parents[1]
# (model settings, train_batch_tokens): the make-train preset and the reference BASE model (one
# 1024-token sequence per rank a step: the bytes do not depend on the tokens).
CONFIGS = {"preset": (MODELS["preset"], 8192), "base": (MODELS["base"], 2048)}


def payload_bytes(cfg: TrainConfig) -> int:
    """What one rank hands to all-reduce in a step, from the parameter table (docs/spec.md §2)."""
    table = param_table(cfg.model_spec())
    grads = sum(4 * p.numel for p in table)
    muon = sum(4 * p.numel for p in table if p.group == MATRIX)
    return grads + muon + 4 + 3 * 8   # + the fp32 loss + the stop check's three float64


def socket_bytes_sent() -> int:
    """Bytes this process has sent on its TCP sockets (ss -tinp)."""
    lines = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout.splitlines()
    total = 0
    for i, line in enumerate(lines):
        if f"pid={os.getpid()}," in line:
            m = re.search(r"bytes_sent:(\d+)", line + " " + (lines[i + 1] if i + 1 < len(lines) else ""))
            total += int(m.group(1)) if m else 0
    return total


def measure(config: str, steps: int) -> dict:
    """One rank's measurement (under mlx.launch: this rank's share of the batch)."""
    from backend_mlx.session import MLXSession

    session = MLXSession()
    world, accum = session.world_size, 2 if session.world_size == 1 else 1
    model, tokens = CONFIGS[config]
    cfg = TrainConfig(**model, train_batch_tokens=tokens, grad_accum_steps=accum, compute_dtype="float32",
                      compile="0", device="cpu")
    spec = cfg.model_spec()
    session.setup(spec, cfg)
    session.load_weights(init_weights(spec, 0))
    rng = np.random.default_rng(session.rank)
    seqs = tokens // (world * accum) // cfg.train_seq_len
    batch = [(rng.integers(0, spec.vocab_size, (seqs, cfg.train_seq_len)),
              rng.integers(0, spec.vocab_size, (seqs, cfg.train_seq_len))) for _ in range(accum)]
    lrs = {"embed": 0.05, "head": 0.008, "matrix": 0.04, "scalar": 0.04}
    times = []
    for step in range(steps + 1):
        if step == 1:
            reduced0 = session.ring.bytes_reduced if session.ring else 0
            sent0 = socket_bytes_sent()
        t0 = time.perf_counter()
        session.train_step(batch, lrs, 0.95, step)
        session.all_reduce_max([0.0, 0.0, 0.0])
        times.append(time.perf_counter() - t0)
    result = {"config": config, "world_size": world, "grad_accum_steps": accum,
              "step_ms": 1000 * statistics.median(times[1:]), "payload_bytes_table": payload_bytes(cfg)}
    if session.ring:
        result["payload_bytes_code"] = (session.ring.bytes_reduced - reduced0) / steps
        result["socket_bytes_sent"] = (socket_bytes_sent() - sent0) / steps
    session.close()
    return result


def launch_two(config: str, steps: int, blas_threads: int | None) -> dict:
    cmd = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", "2", "--starting-port",
           os.environ.get("MLX_PORT", "32323"), "--", sys.executable, "-m", "bench.mlx_ranks", "--worker",
           "--configs", config, "--steps", str(steps)]
    env = os.environ | ({"OPENBLAS_NUM_THREADS": str(blas_threads)} if blas_threads else {})
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: mlx.launch failed: {proc.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return min(rows, key=lambda r: r["step_ms"]) | {"step_ms_ranks": [r["step_ms"] for r in rows],
                                                  "socket_bytes_sent_ranks": [r["socket_bytes_sent"] for r in rows]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mlx_ranks", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="preset,base")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank-blas-threads", type=int, default=None,
                   help="OPENBLAS_NUM_THREADS of each of the 2 ranks (default: OpenBLAS's own, one per core)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ensure_fast_blas("bench.mlx_ranks", sys.argv[1:] if argv is None else argv)   # both sides on OpenBLAS
    if args.worker:
        print(json.dumps(measure(args.configs, args.steps)), flush=True)
        return
    for config in args.configs.split(","):
        one = measure(config, args.steps)
        two = launch_two(config, args.steps, args.rank_blas_threads)
        print(f"{config}: {CONFIGS[config][1]} tokens a step; 1 rank x 2 accumulation steps {one['step_ms']:.0f} ms; "
              f"2 ranks (OPENBLAS_NUM_THREADS={args.rank_blas_threads or 'default'}) {max(two['step_ms_ranks']):.0f} ms (ranks: {', '.join(f'{t:.0f}' for t in two['step_ms_ranks'])})")
        print(f"  all-reduce payload per rank a step: {two['payload_bytes_table']:,} B from the parameter table, "
              f"{two['payload_bytes_code']:,.0f} B handed to mx.distributed; sent on the ring's sockets: "
              f"{', '.join(f'{b:,.0f}' for b in two['socket_bytes_sent_ranks'])} B", flush=True)


if __name__ == "__main__":
    main()
