"""The one training loop, shared by both backends (docs/spec.md §1).

It owns everything that is not tensor math: the dataset, the schedule, validation and the
bits-per-byte metric, the wall-clock cap, logging, checkpoints, resuming, and the final artifact
with its roundtrip evaluation. It drives a backend through the small interface of
trainer/backend.py, so `python -m backend_torch.train` and `python -m backend_mlx.train` behave
identically. A run goes through six phases, one function (or class) each, in this order:

    prepare          plan the run's memory, check every input (settings, dataset, every shard,
                     checkpoint), then make the run folder
    start            build the model, log what this run is (config, source, dataset, baseline)
    build_or_resume  initial weights, or a checkpoint's weights, optimizer state and data position
    warm_up          prime compilation on real steps, then put everything back
    Training.run_steps  train, validating and checkpointing on schedule, until the last step, the
                     wall-clock cap or Ctrl-C
    finish           artifact, roundtrip evaluation, summary

What a run writes is described in trainer/run_folder.py. What it reports as it goes (the progress
bar, the loss plot, the trackers, a user's own) goes through the hooks of trainer/reporters.py.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import artifact
from core.checkpoint import Checkpoint, check_compatible, load_checkpoint, save_checkpoint
from core.config import ModelSpec, TrainConfig, load_config, preset_of
from core.errors import RankError, TrainingError, UserError, exit_on_user_error
from core.flops import flops_per_token, matmul_ceiling_gflops
from core.init import init_weights
from core.metrics import build_byte_tables, unigram_baseline
from core.params import ParamCount, count_params
from core.schedule import learning_rates, looping_due, momentum, wallclock_cap_ms
from data.datasets import Dataset, resolve_dataset
from data.stream import DistributedTokenLoader, load_validation_tokens
from trainer.backend import TrainerBackend
from trainer.interrupt import InterruptFlag
from trainer.plan import RunGeometry, RunPlan, check_fits, make_plan
from trainer.progress import EvalProgress, format_seconds
from trainer.quantize_file import artifact_label, artifact_name, build_artifact
from trainer.reporters import Reporter, Reporters, check_reporters, default_reporters
from trainer.run_folder import RunLog, create_run_dir, make_run_dir, source_snapshot
from trainer.summary import format_summary, val_subset_note
from trainer.ttt import BudgetExceeded, check_ttt_runnable, legality_line, run_ttt, ttt_summary
from trainer.validation import evaluate, evaluate_sliding, train_token_counts


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


@dataclass
class Run:
    """What every phase of one run reads: its settings, inputs and folder."""
    cfg: TrainConfig
    spec: ModelSpec
    backend: TrainerBackend
    dataset: Dataset
    tables: object                    # the byte tables of docs/spec.md §8
    val_tokens: np.ndarray
    checkpoint: Checkpoint | None     # the one to resume from
    run_id: str
    run_dir: Path
    master: bool                      # rank 0: the only process that prints and writes
    plan: RunPlan
    rss_at_start: int             # resident memory before anything of the run was built (libraries loaded)
    log: RunLog | None = None
    reporters: Reporters = field(default_factory=lambda: Reporters(()))   # rank 0's; none on the other ranks

    def metric(self, **record) -> None:
        """One record: metrics.jsonl, then every reporter."""
        self.log.metric(**record)
        self.reporters.on_metric(record)

    def close(self) -> None:
        self.log.close()
        self.reporters.close()


# ---------------------------------------------------------------------------------------------
# Phase 1: every input checked before anything is written, then the run folder
# ---------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def prepare(cfg: TrainConfig, backend: TrainerBackend, reporters: list[Reporter] = ()) -> Run:
    rss_at_start = peak_rss_bytes()   # the interpreter and the framework, which the plan does not estimate
    spec = cfg.model_spec()
    plan = make_plan(cfg, backend)
    check_fits(plan)
    check_ttt_runnable(cfg, backend.world_size)
    artifact.check_compressor(cfg.compressor)   # the artifact is written after training: refuse now, not then
    cfg = plan.cfg   # GRAD_ACCUM_STEPS, MLX_EAGER_EVAL and the budget resolved
    master = backend.rank == 0
    # resolve_dataset reads the header and token range of every shard (data/datasets.py).
    dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, spec.vocab_size)
    tables = build_byte_tables(dataset.tokenizer_path, spec.vocab_size)
    val_tokens = load_validation_tokens(dataset.val_files, cfg.train_seq_len, spec.vocab_size, cfg.val_max_tokens)
    ckpt = None
    if cfg.resume_from:
        ckpt = load_checkpoint(cfg.resume_from)
        check_compatible(ckpt, spec)
    check_reporters(cfg.report_to)
    run_id, run_dir = make_run_dir(cfg, backend.name, master)
    config = cfg.to_dict() | {"run_id": run_id}
    if master:
        create_run_dir(run_dir, config)
    run = Run(cfg, spec, backend, dataset, tables, val_tokens, ckpt, run_id, run_dir, master, plan, rss_at_start)
    run.log = RunLog(run_dir, enabled=master)
    if master:
        title = f"{run_id} ({backend.name}, {dataset.name})"
        run.reporters = Reporters(default_reporters(run.log, run_dir, config, title) + list(reporters))
    return run


# ---------------------------------------------------------------------------------------------
# Phase 2: the model built, and the run described at the top of its log
# ---------------------------------------------------------------------------------------------

def start(run: Run) -> tuple[ParamCount, float, float]:
    """Returns the parameter counts and the unigram baseline (val_loss, val_bpb)."""
    cfg, spec, backend, dataset, log = run.cfg, run.spec, run.backend, run.dataset, run.log
    counts = count_params(spec)
    log(f"twingpt run {run.run_id} backend:{backend.name} {source_snapshot()}")
    log(f"python {platform.python_version()} {platform.platform()} argv:{' '.join(sys.argv)}", console=False)
    log("config " + json.dumps(cfg.to_dict(), sort_keys=True), console=False)
    for line in preset_lines(cfg):
        log(line)
    backend.setup(spec, cfg)
    for note in backend.notes:
        log(note)
    log(f"dataset:{dataset.name} ({dataset.source}) train_shards:{len(dataset.train_files)} "
        f"val_tokens:{run.val_tokens.size - 1} tokenizer:{dataset.tokenizer_path}" + val_subset_note(cfg))
    uni_loss, uni_bpb = unigram_baseline(train_token_counts(dataset.train_files, spec.vocab_size),
                                         run.val_tokens, run.tables)
    log(f"unigram_baseline val_loss:{uni_loss:.4f} val_bpb:{uni_bpb:.4f} (each token by its training frequency; "
        "the model must beat this)")
    log(f"model_params:{counts.unique} (non-embedding {counts.non_embedding}, tying saves {counts.saved_by_tying}) "
        f"layers:{spec.num_layers} dim:{spec.model_dim} heads:{spec.num_heads} kv_heads:{spec.num_kv_heads}")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} seq_len:{cfg.train_seq_len} world_size:{backend.world_size} "
        f"grad_accum_steps:{cfg.grad_accum_steps} iterations:{cfg.iterations} "
        f"max_wallclock_seconds:{cfg.max_wallclock_seconds:g}")
    log(run.plan.log_line())
    return counts, uni_loss, uni_bpb


# ---------------------------------------------------------------------------------------------
# Phase 3: initial weights, or everything a checkpoint holds
# ---------------------------------------------------------------------------------------------

def build_or_resume(run: Run, loader: DistributedTokenLoader) -> tuple[int, float]:
    """Returns the step to start from and the training time already spent (ms)."""
    ckpt, backend = run.checkpoint, run.backend
    if ckpt is None:
        backend.load_weights(init_weights(run.spec, run.cfg.seed))
        return 0, 0.0
    backend.load_weights(ckpt.weights)
    backend.set_looping(ckpt.looping)
    backend.load_optimizer_state(ckpt.optimizer_state)
    if ckpt.data_state:   # a weights-only checkpoint (make pg-import) starts at the data's beginning
        loader.restore(ckpt.data_state)
    run.log(f"resumed from {run.cfg.resume_from} at step:{ckpt.step} (trained by {ckpt.backend or 'unknown'})")
    return ckpt.step, float(ckpt.extra.get("train_time_ms", 0.0))


def start_ema(run: Run, step: int) -> None:
    """EMA_DECAY > 0: the moving average starts from the weights training starts from, or continues
    from the checkpoint's (a checkpoint without one starts it from its weights)."""
    if run.cfg.ema_decay <= 0:
        return
    backend, ckpt = run.backend, run.checkpoint
    if ckpt is not None and ckpt.ema is not None:
        backend.load_ema(ckpt.ema)
        run.log(f"ema: decay {run.cfg.ema_decay:g}, continued from the checkpoint's moving average")
    else:
        backend.load_ema(backend.export_weights())
        run.log(f"ema: decay {run.cfg.ema_decay:g}, started from the weights of step {step}; the final "
                "validation, the artifact and its roundtrip use the moving average")


def next_micro_batches(geometry: RunGeometry, loader: DistributedTokenLoader) -> list:
    return [loader.next_batch(geometry.micro_batch_tokens, geometry.seq_len) for _ in range(geometry.micro_steps)]


# ---------------------------------------------------------------------------------------------
# Phase 4: warmup primes compilation on real steps, then weights, optimizer and data go back
# ---------------------------------------------------------------------------------------------

def warm_up(run: Run, loader: DistributedTokenLoader, step: int) -> None:
    cfg, backend = run.cfg, run.backend
    # A resumed run compiles too: it is primed the same way, from the checkpoint's state, so that its
    # clock (and the wall-clock cap, the time-based warmdown) does not count the compilation.
    if cfg.warmup_steps and backend.compiled:
        weights0, optim0, data0 = backend.export_weights(), backend.export_optimizer_state(), loader.state()
        # With NUM_LOOPS the looped forward is a second graph: primed too, then looping is off again.
        for looping in (False, True) if cfg.num_loops else (False,):
            backend.set_looping(looping)
            for _ in range(cfg.warmup_steps):
                backend.train_step(next_micro_batches(run.plan.geometry, loader), learning_rates(cfg, step, 0.0),
                                   momentum(cfg, step), step)
        backend.set_looping(run.checkpoint is not None and run.checkpoint.looping)   # as the run starts
        backend.load_weights(weights0)
        backend.load_optimizer_state(optim0)
        loader.restore(data0)
        run.log(f"warmup:{cfg.warmup_steps} steps primed compilation; weights, optimizer and data restored")
    elif cfg.warmup_steps and not backend.compiled:
        run.log("warmup: skipped (nothing is compiled, so it would only cost time)")


# ---------------------------------------------------------------------------------------------
# Phase 5: training, with validation and checkpoints on schedule
# ---------------------------------------------------------------------------------------------

class Training:
    """The training steps of one run. Training time counts only steps: the clock is paused while
    validating and writing checkpoints."""

    def __init__(self, run: Run, loader: DistributedTokenLoader, step: int, elapsed_ms: float):
        self.run, self.cfg, self.backend, self.log, self.reporters = run, run.cfg, run.backend, run.log, run.reporters
        self.loader = loader
        self.step = self.start_step = step
        self.elapsed_ms = self.resumed_ms = elapsed_ms   # training time before this run's clock started
        self.tokens_per_step = run.cfg.train_batch_tokens
        self.max_ms = wallclock_cap_ms(run.cfg)
        self.stop_after: int | None = None               # set when the wall-clock cap is reached
        self.train_losses: list[float] = []
        # The losses of the steps since the last read, as the backend returned them (device
        # scalars): reading one waits for the device, so they are read on log steps only.
        self.unread_losses: list = []
        self.val_loss = self.val_bpb = float("nan")
        self.last_checkpoint: Path | None = None
        # With several ranks the learning rate reads one clock all ranks share: the most advanced
        # rank's, agreed after every step (check_stop). Each rank's own clock drifts (only rank 0
        # plots and writes), and replicas given different learning rates would train apart.
        self.shared_clock_ms = elapsed_ms
        self.looping = run.checkpoint.looping if run.checkpoint is not None else False
        self.t0 = time.perf_counter()

    # -- the clock --

    def now_ms(self) -> float:
        return self.elapsed_ms + 1000.0 * (time.perf_counter() - self.t0)

    def pause_clock(self, synchronize: bool = True) -> None:
        if synchronize:
            self.backend.synchronize()
        self.elapsed_ms += 1000.0 * (time.perf_counter() - self.t0)

    def resume_clock(self) -> None:
        self.t0 = time.perf_counter()

    # -- the loop --

    def run_steps(self) -> None:
        cfg = self.cfg
        self.interrupt = InterruptFlag()
        self.reporters.on_train_begin(self.step)
        self.backend.synchronize()
        self.resume_clock()
        try:
            while True:
                last_step = self.step >= cfg.iterations or (self.stop_after is not None and self.step >= self.stop_after)
                if last_step or (cfg.val_loss_every > 0 and self.step > self.start_step
                                 and self.step % cfg.val_loss_every == 0):
                    self.validate(final=last_step)
                if last_step:
                    break
                self.train_one_step()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.iterations:
                    self.pause_clock()
                    self.last_checkpoint = self.write_checkpoint()
                    self.resume_clock()
                self.check_stop()
        finally:
            self.interrupt.restore()
        self.reporters.on_train_end(self.step)
        self.last_checkpoint = self.write_checkpoint() or self.last_checkpoint

    def train_one_step(self) -> None:
        cfg, step = self.cfg, self.step
        clock_ms = self.now_ms() if self.backend.world_size == 1 else self.shared_clock_ms
        if not self.looping and looping_due(cfg, step, clock_ms):
            self.looping = True
            self.backend.set_looping(True)
            encoder, decoder = self.run.spec.layer_order(True)
            self.log(f"layer_loop:enabled step:{step} encoder:{list(encoder)} decoder:{list(decoder)}")
        self.unread_losses.append(self.backend.train_step(next_micro_batches(self.run.plan.geometry, self.loader),
                                                          learning_rates(cfg, step, clock_ms), momentum(cfg, step), step))
        self.step = step = step + 1
        log_step = step <= 10 or step % cfg.train_log_every == 0 or step == cfg.iterations
        if log_step:
            self.read_losses()
        loss = self.train_losses[-1] if self.train_losses else float("nan")   # the last loss read
        train_ms = self.now_ms()
        tok_s = self.tokens_per_step * (step - self.start_step) / max((train_ms - self.resumed_ms) / 1000.0, 1e-9)
        eta_s = self.eta_s(train_ms)
        self.reporters.on_train_step(step, loss, tok_s, eta_s)
        if log_step:
            self.log(f"step:{step}/{cfg.iterations} train_loss:{loss:.4f} train_time:{train_ms:.0f}ms "
                     f"step_avg:{train_ms / step:.2f}ms tok/s:{tok_s:.0f} eta:{format_seconds(eta_s)}")
            self.run.metric(kind="train", step=step, tokens=step * self.tokens_per_step, train_loss=loss,
                            train_time_ms=train_ms, tokens_per_s=tok_s)

    def read_losses(self) -> None:
        """The unread steps' losses as floats (this waits for the device); a non-finite one stops the
        run, so it is found at the next log step, validation or checkpoint after it happened."""
        first = self.step - len(self.unread_losses) + 1
        values, self.unread_losses = [float(v) for v in self.unread_losses], []
        for i, loss in enumerate(values):
            if not math.isfinite(loss):
                raise TrainingError(f"step {first + i}: the training loss is {loss}; {self.divergence_advice()}")
        self.train_losses.extend(values)

    def divergence_advice(self) -> str:
        return "lower the learning rates" + (f" (last checkpoint: {self.last_checkpoint})" if self.last_checkpoint else "")

    def eta_s(self, train_ms: float) -> float:
        step_ms = (train_ms - self.resumed_ms) / max(self.step - self.start_step, 1)
        remaining = (self.cfg.iterations - self.step) * step_ms
        if self.max_ms is not None:
            remaining = min(remaining, max(self.max_ms - train_ms, 0.0))
        return remaining / 1000.0

    def validate(self, final: bool = False) -> None:
        """The training weights; the final validation, with EMA_DECAY > 0, the moving average (the
        weights are put back after, so the final checkpoint keeps both)."""
        run, cfg, step = self.run, self.cfg, self.step
        self.pause_clock()
        self.read_losses()
        ema = self.backend.export_ema() if final else None
        if ema is not None:
            live = self.backend.export_weights()
            self.backend.load_weights(ema)
        self.val_loss, self.val_bpb = evaluate(self.backend, run.val_tokens, run.tables, cfg.train_seq_len,
                                               run.plan.geometry.val_batch_seqs, EvalProgress(f"val step {step}", run.master))
        if ema is not None:
            self.backend.load_weights(live)
        which = {"weights": "ema"} if ema is not None else {}
        self.log(f"step:{step}/{cfg.iterations} val_loss:{self.val_loss:.4f} val_bpb:{self.val_bpb:.4f} "
                 f"train_time:{self.elapsed_ms:.0f}ms step_avg:{self.elapsed_ms / max(step, 1):.2f}ms"
                 + (" (moving average)" if ema is not None else ""))
        run.metric(kind="val", step=step, tokens=step * self.tokens_per_step, val_loss=self.val_loss,
                   val_bpb=self.val_bpb, train_time_ms=self.elapsed_ms, **which)
        self.reporters.on_validation(step, self.val_loss, self.val_bpb)
        self.backend.synchronize()
        self.resume_clock()

    def check_stop(self) -> None:
        """The wall-clock cap and Ctrl-C (or SIGTERM): every rank stops after the same step, when any
        rank asks; and the ranks agree on the clock the next step's learning rate reads."""
        now = self.now_ms()
        reached = self.max_ms is not None and self.stop_after is None and now >= self.max_ms
        if self.backend.world_size > 1 or reached or self.interrupt.requested:
            reached_any, interrupted_any, self.shared_clock_ms = self.backend.all_reduce_max(
                [float(reached), float(self.interrupt.requested), now])
            if interrupted_any > 0:
                self.reporters.on_train_end(self.step)
                self.pause_clock(synchronize=False)
                path = self.write_checkpoint()
                self.log(f"interrupted at step:{self.step}/{self.cfg.iterations}; continue with RESUME_FROM={path}")
                self.run.close()
                raise TrainingError(f"interrupted at step {self.step}" + (f"; continue with RESUME_FROM={path}" if path
                                                                          else " (rank 0 wrote the checkpoint)"))
            if reached_any > 0:
                self.stop_after = self.step
                self.log(f"stopping_early: wallclock_cap train_time:{self.now_ms():.0f}ms "
                         f"step:{self.step}/{self.cfg.iterations}")

    def write_checkpoint(self) -> Path | None:
        run = self.run
        self.read_losses()   # a non-finite loss stops the run before its weights are written
        # The last update can make the weights non-finite after a finite loss (the loss was computed
        # before it): checked on every rank, as the replicas hold the same weights and stop together.
        weights = self.backend.export_weights()
        for name, w in weights.items():
            if not np.isfinite(w).all():
                raise TrainingError(f"step {self.step}: the weights are not finite ({name}); {self.divergence_advice()}")
        if not run.master:
            return None
        path = run.run_dir / "checkpoints" / f"step_{self.step:06d}.safetensors"
        save_checkpoint(path, spec=run.spec, config=self.cfg.to_dict(), step=self.step,
                        weights=weights, optimizer_state=self.backend.export_optimizer_state(),
                        data_state=self.loader.state(), backend=self.backend.name, looping=self.looping,
                        extra={"train_time_ms": self.elapsed_ms, "run_id": run.run_id}, ema=self.backend.export_ema())
        self.log(f"checkpoint:{path}")
        return path


# ---------------------------------------------------------------------------------------------
# Phase 6: the artifact, the model evaluated again after its int8 roundtrip, and the summary
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shipped:
    """The artifact a run ships, and its roundtrip score."""
    weights: dict        # the weights it was built from: the EMA when EMA_DECAY > 0, else the trained ones
    exported: str        # "ema" or "trained"
    blob: bytes
    label: str           # int8_zlib by default (QUANT, COMPRESSOR: docs/spec.md §9)
    path: Path
    val_loss: float     # the roundtrip weights' standard validation
    val_bpb: float


def roundtrip_artifact(run: Run) -> Shipped:
    """Build the artifact, write it (master), load it back and score it; the backend is left holding
    the roundtrip weights."""
    cfg, backend, log = run.cfg, run.backend, run.log
    ema = backend.export_ema()
    if ema is not None:   # EMA_DECAY > 0: the moving average ships, and GPTQ calibrates on it
        backend.load_weights(ema)
    weights = backend.export_weights()
    label = artifact_label(cfg)   # int8_zlib by default (QUANT, COMPRESSOR: docs/spec.md §9)
    blob = build_artifact(cfg, run.spec, weights, backend, run.dataset.train_files, say=log)
    artifact_path = run.run_dir / artifact_name(cfg)
    if run.master:
        artifact.write_artifact(artifact_path, blob)
        log(f"serialized_model_{label}:{len(blob)} bytes {artifact.size_report(len(blob))}")
    t_eval = time.perf_counter()
    backend.load_weights(artifact.unpack(blob))
    rt_loss, rt_bpb = evaluate(backend, run.val_tokens, run.tables, cfg.train_seq_len, run.plan.geometry.val_batch_seqs,
                              EvalProgress("roundtrip val", run.master))
    log(f"final_{label}_roundtrip val_loss:{rt_loss:.4f} val_bpb:{rt_bpb:.4f} "
        f"eval_time:{1000.0 * (time.perf_counter() - t_eval):.0f}ms")
    log(f"final_{label}_roundtrip_exact val_loss:{rt_loss:.8f} val_bpb:{rt_bpb:.8f}")
    return Shipped(weights, "ema" if ema is not None else "trained", blob, label, artifact_path, rt_loss, rt_bpb)


def sliding_eval(run: Run, training: Training, shipped: Shipped) -> dict:
    """EVAL_STRIDE > 0: the roundtrip weights scored in sliding windows (docs/spec.md §7); the
    summary's sliding keys ({} when off)."""
    cfg, log, label = run.cfg, run.log, shipped.label
    if cfg.eval_stride <= 0:
        return {}
    t_eval = time.perf_counter()
    sl_loss, sl_bpb = evaluate_sliding(run.backend, run.val_tokens, run.tables, cfg.eval_window, cfg.eval_stride,
                                       run.plan.geometry.sliding_batch_seqs, EvalProgress(f"sliding val stride {cfg.eval_stride}", run.master))
    sliding = {"eval_stride": cfg.eval_stride, "eval_seq_len": cfg.eval_window,
               "roundtrip_sliding_val_loss": sl_loss, "roundtrip_sliding_val_bpb": sl_bpb,
               "sliding_eval_time_s": time.perf_counter() - t_eval}
    log(f"final_{label}_roundtrip_sliding val_loss:{sl_loss:.8f} val_bpb:{sl_bpb:.8f} "
        f"stride:{cfg.eval_stride} seq_len:{cfg.eval_window} (standard val_bpb:{shipped.val_bpb:.8f}) "
        f"eval_time:{1000.0 * sliding['sliding_eval_time_s']:.0f}ms")
    run.metric(kind="sliding_val", step=training.step, tokens=training.step * training.tokens_per_step,
               val_loss=sl_loss, val_bpb=sl_bpb, eval_stride=cfg.eval_stride, eval_seq_len=cfg.eval_window,
               weights=f"{label}_roundtrip")
    return sliding


def ttt_eval(run: Run, training: Training, shipped: Shipped) -> dict:
    """TTT_ENABLED: the roundtrip weights with score-first test-time training (docs/spec.md §14); the
    summary's TTT keys ({} when off). Global TTT phases change the backend's weights."""
    cfg, log, label = run.cfg, run.log, shipped.label
    if not cfg.ttt_enabled:
        return {}
    try:
        result = run_ttt(run.backend, run.val_tokens, run.tables, cfg, EvalProgress("ttt", run.master, unit="target"))
    except BudgetExceeded as e:   # the run is kept; make check-submission reports the eval as over its cap
        log(f"final_{label}_roundtrip_ttt error: {e}")
        return {"ttt_error": str(e)}
    log(f"final_{label}_roundtrip_ttt val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
        f"documents:{result.documents} phases:{result.phases_run} (standard val_bpb:{shipped.val_bpb:.8f}) "
        f"eval_time:{1000.0 * result.seconds:.0f}ms")
    log(legality_line(result.record))
    run.metric(kind="ttt_val", step=training.step, tokens=training.step * training.tokens_per_step,
               val_loss=result.val_loss, val_bpb=result.val_bpb, weights=f"{label}_roundtrip")
    return ttt_summary(result)


def run_summary(run: Run, training: Training, counts: ParamCount, unigram: tuple[float, float],
                wall_start: float, shipped: Shipped) -> dict:
    """The summary's keys but the final evaluations': identity, losses, the artifact, parameters,
    speed and MFU, memory."""
    cfg, spec, backend = run.cfg, run.spec, run.backend
    step, start_step = training.step, training.start_step
    tokens_per_step, world = training.tokens_per_step, backend.world_size
    flops_token = flops_per_token(spec, cfg.train_seq_len, looping=spec.num_loops > 0)
    trained_steps = max(step - start_step, 1)
    run_ms = training.elapsed_ms - training.resumed_ms  # this run's time, without a resumed run's earlier time
    tok_s = tokens_per_step * (step - start_step) / max(run_ms / 1000.0, 1e-9) if step > start_step else 0.0
    # MFU: model FLOPs per second per process over the matrix-product ceiling in the compute dtype,
    # measured here now (an fp32 ceiling would put a bf16 GPU run far above 100%).
    ceiling_gflops = (matmul_ceiling_gflops(lambda n: backend.matmul_gflops(backend.compute_dtype, n=n, seconds=0.25),
                                            backend.device_kind) if step > start_step else None)
    mfu = tok_s * flops_token / world / (ceiling_gflops * 1e9) if ceiling_gflops else None
    peak, baseline = backend.peak_memory_bytes(), None
    if peak is None:  # the process's resident peak, and how much of it the process held before the run
        peak, baseline = peak_rss_bytes(), run.rss_at_start
    uni_loss, uni_bpb = unigram
    return {
        "run_id": run.run_id, "backend": backend.name, "device": backend.device,
        "compute_dtype": backend.compute_dtype, "dataset": run.dataset.name, "run_dir": str(run.run_dir),
        "steps": step, "tokens_seen": step * tokens_per_step,
        "val_tokens": run.val_tokens.size - 1, "val_max_tokens": cfg.val_max_tokens,
        "val_loss": training.val_loss, "val_bpb": training.val_bpb,
        "roundtrip_val_loss": shipped.val_loss, "roundtrip_val_bpb": shipped.val_bpb,
        "artifact_bytes": len(shipped.blob), "artifact_label": shipped.label,
        "artifact_budget_bytes": artifact.ARTIFACT_BUDGET_BYTES,
        "params_total": counts.total, "params_unique": counts.unique, "params_non_embedding": counts.non_embedding,
        "params_saved_by_tying": counts.saved_by_tying,
        "unigram_val_loss": uni_loss, "unigram_val_bpb": uni_bpb,
        "train_time_s": training.elapsed_ms / 1000.0, "step_avg_ms": run_ms / trained_steps, "tokens_per_s": tok_s,
        "flops_per_token": flops_token, "achieved_tflops": tok_s * flops_token / 1e12,
        "matmul_gflops": ceiling_gflops, "mfu": mfu,
        "peak_memory_bytes": int(peak), "peak_memory_baseline_bytes": baseline, "peak_memory_estimate_bytes": run.plan.memory.estimate.total,
        "memory_budget_bytes": run.plan.memory.budget, "wall_time_s": time.perf_counter() - wall_start,
        "checkpoint": str(training.last_checkpoint) if training.last_checkpoint else None,
        "artifact": str(shipped.path), "exported_weights": shipped.exported,
    }


def finish(run: Run, training: Training, counts: ParamCount, unigram: tuple[float, float],
           wall_start: float) -> TrainResult:
    """The artifact and its roundtrip score, the optional sliding and TTT evaluations of it, the summary."""
    shipped = roundtrip_artifact(run)
    evaluations = sliding_eval(run, training, shipped)
    evaluations |= ttt_eval(run, training, shipped)
    run.backend.load_weights(shipped.weights)   # global TTT phases change the weights; the checkpoint's are these
    summary = run_summary(run, training, counts, unigram, wall_start, shipped) | evaluations
    if run.master:
        run.log.summary(summary)
        run.reporters.on_end(summary)
        for line in format_summary(summary):
            run.log(line)
    run.close()
    return TrainResult(run.run_dir if run.master else None, training.step, training.train_losses, training.val_loss,
                       training.val_bpb, shipped.val_loss, shipped.val_bpb, len(shipped.blob),
                       training.last_checkpoint, summary)


# ---------------------------------------------------------------------------------------------
# The phases in order, and the command line of both trainers
# ---------------------------------------------------------------------------------------------

def run_training(cfg: TrainConfig, backend: TrainerBackend, reporters: list[Reporter] = ()) -> TrainResult:
    """One run; `reporters` (trainer/reporters.py) are called on rank 0 after the default ones."""
    run = prepare(cfg, backend, reporters)
    wall_start = time.perf_counter()
    counts, uni_loss, uni_bpb = start(run)
    loader = DistributedTokenLoader(run.dataset.train_files, backend.rank, backend.world_size, run.spec.vocab_size)
    step, elapsed_ms = build_or_resume(run, loader)
    warm_up(run, loader, step)
    start_ema(run, step)
    training = Training(run, loader, step, elapsed_ms)
    training.run_steps()
    return finish(run, training, counts, (uni_loss, uni_bpb), wall_start)


@exit_on_user_error
def main(prog: str, make_session, argv=None) -> TrainResult | None:
    """The command line of both trainers: settings, then the backend (its session class), then the
    loop; None after --plan, which trains nothing.

    `make_session(cfg)` is called after the settings are read, so --help and a bad setting answer
    before torch or MLX is imported.
    """
    cfg = load_config(sys.argv[1:] if argv is None else argv, prog=prog)
    backend = make_session(cfg)
    try:
        if cfg.plan:
            return print_plan(cfg, backend)
        return run_training(cfg, backend)
    except Exception as err:
        if backend.world_size == 1 or isinstance(err, UserError):
            raise
        # One rank failed alone (out of memory, a bug): its traceback, then one line naming the rank,
        # the last a launcher relays. Its peers' collectives then fail or time out.
        traceback.print_exc()
        raise RankError(f"rank {backend.rank} of {backend.world_size}: {type(err).__name__}: {err}") from None
    finally:
        backend.close()


def print_plan(cfg: TrainConfig, backend: TrainerBackend) -> None:
    """--plan: the resolved run on stdout, nothing written; a plan that cannot fit is still an error."""
    plan = make_plan(cfg, backend)
    if backend.rank == 0:
        for line in preset_lines(cfg) + plan.describe(backend):
            print(line, flush=True)
    check_fits(plan)


def preset_lines(cfg: TrainConfig) -> list[str]:
    """PRESET=...: its name, then every setting of it this build does not apply."""
    preset = preset_of(cfg)
    if preset is None:
        return []
    return [f"preset {preset.name}: {preset.description}"] + preset.unsupported_lines()
