"""The one training loop, shared by both backends (SPEC §1).

It owns everything that is not tensor math: the dataset, the schedule, validation and the
bits-per-byte metric, the wall-clock cap, logging, checkpoints, resuming, and the final artifact
with its roundtrip evaluation. It drives a backend through the small interface of core/backend.py,
so `python -m backend_torch.train` and `python -m backend_mlx.train` behave identically.

Everything a run writes lands in its own folder, OUT_DIR/RUN_ID:
    log.txt            the console log, preceded by the config and the source of this run
    config.json        every setting
    metrics.jsonl      one JSON object per logged step and per validation
    checkpoints/       step_NNNNNN.safetensors (CHECKPOINT_EVERY and the last step)
    model.int8.zlib    the artifact (SPEC §9)
    summary.json       the final figures
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import artifact
from core.backend import TrainerBackend
from core.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from core.config import TrainConfig, load_config
from core.errors import ConfigError, TrainingError, exit_on_user_error
from core.flops import flops_per_token
from core.init import init_weights
from core.metrics import EvalAccumulator, build_byte_tables, token_bytes, unigram_baseline
from core.params import count_params
from core.plot import plot_losses
from core.progress import Progress, format_seconds
from core.summary import format_summary
from core.schedule import learning_rates, momentum, wallclock_cap_ms
from data.datasets import resolve_dataset
from data.shards import read_shard
from data.stream import DistributedTokenLoader, load_validation_tokens, validation_batches

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Logging: console and log file (rank 0 only), metrics as JSON lines
# ---------------------------------------------------------------------------------------------

class RunLog:
    def __init__(self, run_dir: Path | None, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.text = open(run_dir / "log.txt", "a") if enabled else None
        self.metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.progress: Progress | None = None  # while training, console lines scroll above its bar

    def __call__(self, line: str = "", console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            if self.progress is not None:
                self.progress.print(line)
            else:
                print(line, flush=True)
        self.text.write(line + "\n")
        self.text.flush()

    def metric(self, **record) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        for f in (self.text, self.metrics):
            if f is not None:
                f.close()


def source_snapshot() -> str:
    """The code of this run, for the log: git commit (and whether dirty) and a hash of the sources."""
    h = hashlib.sha256()
    for folder in ("core", "data", "backend_torch", "backend_mlx"):
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return f"git:{commit}{'+dirty' if dirty else ''} sources_sha256:{h.hexdigest()[:16]}"


def make_run_dir(cfg: TrainConfig, backend_name: str, master: bool) -> tuple[str, Path]:
    """The run's folder; only rank 0 writes, so only rank 0 checks it is free."""
    run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S") + f"-{backend_name}"
    run_dir = Path(cfg.out_dir) / run_id
    if master and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"RUN_ID={run_id!r}: the run folder {run_dir} already exists and is not empty; "
                          "choose another RUN_ID (nothing was overwritten)")
    return run_id, run_dir


class InterruptFlag:
    """Ctrl-C and SIGTERM during training set a flag instead of killing the step half-way, so the
    loop can finish the step, write a checkpoint and stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and writing a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ---------------------------------------------------------------------------------------------
# Validation (SPEC §7, §8)
# ---------------------------------------------------------------------------------------------

def evaluate(backend: TrainerBackend, val_tokens: np.ndarray, tables, cfg: TrainConfig) -> tuple[float, float]:
    """(val_loss, val_bpb) over the whole validation set, summed across ranks."""
    local_tokens = max(cfg.val_batch_size // backend.world_size, cfg.train_seq_len)
    batch_seqs = local_tokens // cfg.train_seq_len
    loss_sum = tokens = n_bytes = 0.0
    for x, y in validation_batches(val_tokens, cfg.train_seq_len, batch_seqs, backend.rank, backend.world_size):
        loss_sum += backend.eval_loss_sum(x, y)
        tokens += y.size
        n_bytes += float(token_bytes(tables, x, y).sum())
    loss_sum, tokens, n_bytes = backend.all_reduce_sum([loss_sum, tokens, n_bytes])
    acc = EvalAccumulator()
    acc.add(loss_sum, int(tokens), int(n_bytes))
    return acc.val_loss, acc.val_bpb


def train_token_counts(files, vocab_size: int, max_tokens: int = 200_000_000) -> np.ndarray:
    """How often each token id occurs in the training shards (the first `max_tokens` of them)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    seen = 0
    for path in files:
        tokens = read_shard(path)
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
        seen += tokens.size
        if seen >= max_tokens:
            break
    return counts


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path | None
    step: int
    train_losses: list[float]        # the loss of every step, in order (all ranks' mean)
    val_loss: float
    val_bpb: float
    roundtrip_val_loss: float
    roundtrip_val_bpb: float
    artifact_bytes: int
    checkpoint: Path | None
    summary: dict


def run_training(cfg: TrainConfig, backend: TrainerBackend) -> TrainResult:
    spec = cfg.model_spec()
    world, rank = backend.world_size, backend.rank
    cfg.check_batch_geometry(world)
    master = rank == 0

    # Everything that can fail on bad input fails before anything is written.
    dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, spec.vocab_size)
    tables = build_byte_tables(dataset.tokenizer_path, spec.vocab_size)
    val_tokens = load_validation_tokens(dataset.val_files, cfg.train_seq_len)
    ckpt = None
    if cfg.resume_from:
        ckpt = load_checkpoint(cfg.resume_from)
        check_compatible(ckpt, spec)
    run_id, run_dir = make_run_dir(cfg, backend.name, master)
    if master:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict() | {"run_id": run_id}, indent=2) + "\n")
    log = RunLog(run_dir, enabled=master)

    counts = count_params(spec)
    log(f"twingpt run {run_id} backend:{backend.name} {source_snapshot()}")
    log(f"python {platform.python_version()} {platform.platform()} argv:{' '.join(sys.argv)}", console=False)
    log("config " + json.dumps(cfg.to_dict(), sort_keys=True), console=False)
    backend.setup(spec, cfg)
    for note in backend.notes:
        log(note)
    log(f"dataset:{dataset.name} ({dataset.source}) train_shards:{len(dataset.train_files)} "
        f"val_tokens:{val_tokens.size - 1} tokenizer:{dataset.tokenizer_path}")
    uni_loss, uni_bpb = unigram_baseline(train_token_counts(dataset.train_files, spec.vocab_size), val_tokens, tables)
    log(f"unigram_baseline val_loss:{uni_loss:.4f} val_bpb:{uni_bpb:.4f} (each token by its training frequency; "
        "the model must beat this)")
    log(f"model_params:{counts.unique} (non-embedding {counts.non_embedding}, tying saves {counts.saved_by_tying}) "
        f"layers:{spec.num_layers} dim:{spec.model_dim} heads:{spec.num_heads} kv_heads:{spec.num_kv_heads}")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} seq_len:{cfg.train_seq_len} world_size:{world} "
        f"grad_accum_steps:{cfg.grad_accum_steps} iterations:{cfg.iterations} "
        f"max_wallclock_seconds:{cfg.max_wallclock_seconds:g}")

    loader = DistributedTokenLoader(dataset.train_files, rank, world)
    step, elapsed_ms = 0, 0.0
    if ckpt is None:
        backend.load_weights(init_weights(spec, cfg.seed))
    else:
        backend.load_weights(ckpt.weights)
        backend.load_optimizer_state(ckpt.optimizer_state)
        loader.restore(ckpt.data_state)
        step = ckpt.step
        elapsed_ms = float(ckpt.extra.get("train_time_ms", 0.0))
        log(f"resumed from {cfg.resume_from} at step:{step} (trained by {ckpt.backend or 'unknown'})")

    def next_micro_batches():
        return [loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, cfg.grad_accum_steps)
                for _ in range(cfg.grad_accum_steps)]

    # Warmup: prime compilation on real steps, then put weights, optimizer and data back.
    if cfg.warmup_steps and backend.compiled and step == 0:
        weights0, optim0, data0 = backend.export_weights(), backend.export_optimizer_state(), loader.state()
        for _ in range(cfg.warmup_steps):
            backend.train_step(next_micro_batches(), learning_rates(cfg, 0, 0.0), momentum(cfg, 0), 0)
        backend.load_weights(weights0)
        backend.load_optimizer_state(optim0)
        loader.restore(data0)
        log(f"warmup:{cfg.warmup_steps} steps primed compilation; weights, optimizer and data restored")
    elif cfg.warmup_steps and not backend.compiled:
        log("warmup: skipped (nothing is compiled, so it would only cost time)")

    tokens_per_step = cfg.train_batch_tokens
    flops_token = flops_per_token(spec, cfg.train_seq_len)
    train_losses: list[float] = []
    val_loss = val_bpb = float("nan")
    last_checkpoint: Path | None = None
    stop_after: int | None = None
    max_ms = wallclock_cap_ms(cfg)
    start_step = step
    wall_start = time.perf_counter()

    def write_checkpoint(at_step: int) -> Path | None:
        if not master:
            return None
        path = run_dir / "checkpoints" / f"step_{at_step:06d}.safetensors"
        save_checkpoint(path, spec=spec, config=cfg.to_dict(), step=at_step, weights=backend.export_weights(),
                        optimizer_state=backend.export_optimizer_state(), data_state=loader.state(),
                        backend=backend.name, extra={"train_time_ms": elapsed_ms, "run_id": run_id})
        log(f"checkpoint:{path}")
        return path

    def eta_s(train_ms: float) -> float:
        step_ms = (train_ms - resumed_ms) / max(step - start_step, 1)
        remaining = (cfg.iterations - step) * step_ms
        if max_ms is not None:
            remaining = min(remaining, max(max_ms - train_ms, 0.0))
        return remaining / 1000.0

    resumed_ms = elapsed_ms
    interrupt = InterruptFlag()
    progress = Progress(cfg.iterations, step, enabled=master)
    log.progress = progress
    plot_path = run_dir / "loss.png"
    backend.synchronize()
    t0 = time.perf_counter()
    try:
        while True:
            last_step = step >= cfg.iterations or (stop_after is not None and step >= stop_after)
            if last_step or (cfg.val_loss_every > 0 and step > start_step and step % cfg.val_loss_every == 0):
                backend.synchronize()
                elapsed_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, val_bpb = evaluate(backend, val_tokens, tables, cfg)
                log(f"step:{step}/{cfg.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / max(step, 1):.2f}ms")
                log.metric(kind="val", step=step, tokens=step * tokens_per_step, val_loss=val_loss, val_bpb=val_bpb,
                           train_time_ms=elapsed_ms)
                if master:
                    plot_losses(run_dir / "metrics.jsonl", plot_path, title=f"{run_id} ({backend.name}, {dataset.name})")
                backend.synchronize()
                t0 = time.perf_counter()
            if last_step:
                break

            ms_now = elapsed_ms + 1000.0 * (time.perf_counter() - t0)
            loss = backend.train_step(next_micro_batches(), learning_rates(cfg, step, ms_now), momentum(cfg, step), step)
            if not math.isfinite(loss):
                raise TrainingError(f"step {step + 1}: the training loss is {loss}; lower the learning rates"
                                    + (f" (last checkpoint: {last_checkpoint})" if last_checkpoint else ""))
            train_losses.append(loss)
            step += 1
            train_ms = elapsed_ms + 1000.0 * (time.perf_counter() - t0)
            tok_s = tokens_per_step * (step - start_step) / max((train_ms - resumed_ms) / 1000.0, 1e-9)
            progress.update(step, loss, tok_s)
            if step <= 10 or step % cfg.train_log_every == 0 or step == cfg.iterations:
                step_avg = train_ms / step
                log(f"step:{step}/{cfg.iterations} train_loss:{loss:.4f} train_time:{train_ms:.0f}ms "
                    f"step_avg:{step_avg:.2f}ms tok/s:{tok_s:.0f} eta:{format_seconds(eta_s(train_ms))}")
                log.metric(kind="train", step=step, tokens=step * tokens_per_step, train_loss=loss,
                           train_time_ms=train_ms, tokens_per_s=tok_s)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
                backend.synchronize()
                elapsed_ms += 1000.0 * (time.perf_counter() - t0)
                last_checkpoint = write_checkpoint(step)
                t0 = time.perf_counter()
            # The wall-clock cap: every rank stops after the same step.
            # Ctrl-C (or SIGTERM) and the wall-clock cap: every rank stops after the same step.
            reached = max_ms is not None and stop_after is None and \
                elapsed_ms + 1000.0 * (time.perf_counter() - t0) >= max_ms
            if world > 1 or reached or interrupt.requested:
                reached_any, interrupted_any = backend.all_reduce_sum([float(reached), float(interrupt.requested)])
                if interrupted_any > 0:
                    progress.close()
                    log.progress = None
                    elapsed_ms += 1000.0 * (time.perf_counter() - t0)
                    path = write_checkpoint(step)
                    log(f"interrupted at step:{step}/{cfg.iterations}; continue with RESUME_FROM={path}")
                    log.close()
                    raise TrainingError(f"interrupted at step {step}; continue with RESUME_FROM={path}")
                if reached_any > 0:
                    stop_after = step
                    log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{cfg.iterations}")

    finally:
        interrupt.restore()
    progress.close()
    log.progress = None
    last_checkpoint = write_checkpoint(step) or last_checkpoint

    # The artifact, and the model evaluated again after its int8 roundtrip.
    weights = backend.export_weights()
    blob = artifact.pack(weights)
    artifact_path = run_dir / "model.int8.zlib"
    if master:
        artifact.write_artifact(artifact_path, blob)
        log(f"serialized_model_int8_zlib:{len(blob)} bytes {artifact.size_report(len(blob))}")
    t_eval = time.perf_counter()
    backend.load_weights(artifact.unpack(blob))
    rt_loss, rt_bpb = evaluate(backend, val_tokens, tables, cfg)
    backend.load_weights(weights)
    log(f"final_int8_zlib_roundtrip val_loss:{rt_loss:.4f} val_bpb:{rt_bpb:.4f} "
        f"eval_time:{1000.0 * (time.perf_counter() - t_eval):.0f}ms")
    log(f"final_int8_zlib_roundtrip_exact val_loss:{rt_loss:.8f} val_bpb:{rt_bpb:.8f}")

    trained_steps = max(step - start_step, 1)
    run_ms = elapsed_ms - resumed_ms  # this run's training time, without a resumed run's earlier time
    tok_s = tokens_per_step * (step - start_step) / max(run_ms / 1000.0, 1e-9) if step > start_step else 0.0
    # MFU: model FLOPs per second per process over the fp32 matrix-product ceiling measured here now.
    ceiling_gflops = backend.matmul_gflops("float32", n=1024, seconds=0.25) if step > start_step else None
    mfu = tok_s * flops_token / world / (ceiling_gflops * 1e9) if ceiling_gflops else None
    peak = backend.peak_memory_bytes()
    if peak is None:  # the process's peak resident memory (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    summary = {
        "run_id": run_id, "backend": backend.name, "device": backend.device, "compute_dtype": backend.compute_dtype,
        "dataset": dataset.name, "run_dir": str(run_dir), "steps": step, "tokens_seen": step * tokens_per_step,
        "val_loss": val_loss, "val_bpb": val_bpb, "roundtrip_val_loss": rt_loss, "roundtrip_val_bpb": rt_bpb,
        "artifact_bytes": len(blob), "artifact_budget_bytes": artifact.ARTIFACT_BUDGET_BYTES,
        "params_total": counts.total, "params_unique": counts.unique, "params_non_embedding": counts.non_embedding,
        "params_saved_by_tying": counts.saved_by_tying,
        "unigram_val_loss": uni_loss, "unigram_val_bpb": uni_bpb,
        "train_time_s": elapsed_ms / 1000.0, "step_avg_ms": run_ms / trained_steps, "tokens_per_s": tok_s,
        "flops_per_token": flops_token, "achieved_tflops": tok_s * flops_token / 1e12,
        "matmul_gflops_fp32": ceiling_gflops, "mfu": mfu,
        "peak_memory_bytes": int(peak), "wall_time_s": time.perf_counter() - wall_start,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None, "artifact": str(artifact_path),
    }
    if master:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for line in format_summary(summary):
            log(line)
    log.close()
    return TrainResult(run_dir if master else None, step, train_losses, val_loss, val_bpb, rt_loss, rt_bpb,
                       len(blob), last_checkpoint, summary)


@exit_on_user_error
def main(prog: str, make_session, argv=None) -> TrainResult:
    """The command line of both trainers: settings, then the backend's session, then the loop.

    `make_session(cfg)` is called after the settings are read, so --help and a bad setting answer
    before torch or MLX is imported.
    """
    cfg = load_config(sys.argv[1:] if argv is None else argv, prog=prog)
    session = make_session(cfg)
    try:
        return run_training(cfg, session)
    finally:
        session.close()
