"""The paths of the training loop that every GPU run takes, exercised on the CPU.

A CUDA or Metal run compiles (so WARMUP_STEPS primes compilation and must be undone exactly), is
usually stopped by MAX_WALLCLOCK_SECONDS (`make train`'s cap), may run several ranks, may be
stopped by SIGTERM (a scheduler) or by Ctrl-C twice, and MLX on Linux re-executes itself with
OpenBLAS preloaded. Each of those paths runs here on a tiny model.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend_mlx.blas import find_openblas
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.params import MATRIX
from trainer.loop import run_training
from trainer_helpers import REPO, make_session, tiny_env, train

BACKENDS = ["torch", "mlx"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def metrics(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# 1. Warmup with compile on: the warmup steps are undone exactly
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_with_compile_on_leaves_every_step_loss_unchanged(backend, tiny_dataset, tmp_path):
    """COMPILE=1 with WARMUP_STEPS=3 gives the very losses of COMPILE=1 without warmup: the weights,
    the optimizer state (momentum, Adam moments) and the data position are all put back.

    torch runs on one intra-op thread: with two, inductor's CPU kernels are not run-to-run
    deterministic here (a compiled run without warmup differed from itself in the last bits of a
    loss at step 5), and eager mode is. The first torch.compile of this model costs ~60 s on 2
    shared cores with a cold inductor cache, ~1 s from the cache (/tmp/torchinductor_$USER)."""
    runs = {}
    for warmup in (3, 0):
        env = tiny_env(tiny_dataset, tmp_path, RUN_ID=f"warmup{warmup}", COMPILE=1, WARMUP_STEPS=warmup, ITERATIONS=6)
        if backend == "torch":
            from backend_torch.threads import single_thread
            with single_thread():
                runs[warmup] = train(backend, env)
        else:
            runs[warmup] = train(backend, env)
    log = (tmp_path / "runs" / "warmup3" / "log.txt").read_text()
    assert "warmup:3 steps primed compilation; weights, optimizer and data restored" in log
    assert "compile:1" in log or "mx.compile on" in log
    assert len(runs[0].train_losses) == 6
    assert runs[3].train_losses == runs[0].train_losses
    assert runs[3].val_loss == runs[0].val_loss
    assert runs[0].train_losses[-1] < runs[0].train_losses[0]   # it trained: a step not undone would show


# ---------------------------------------------------------------------------------------------
# 2. The wall-clock cap: every rank stops after the same step, the learning rate warmed down by time
# ---------------------------------------------------------------------------------------------

CAP_SECONDS = 4
CAP_WARMDOWN = 20

# Run under torchrun: the torch trainer, each rank recording the learning rates the loop hands to
# its train_step. Rank 0 is held up for SKEW seconds after building the model (as it is on a real
# run whenever it alone writes a checkpoint or plots), so rank 1 starts its training clock that
# much earlier and then waits for rank 0 in the first all-reduce: rank 1's clock runs SKEW ahead,
# rank 1 alone reaches the cap, and rank 0 (which logs) must stop after the same step.
SKEW = 1.0
RANK_PROBE = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())
from backend_torch.session import TorchSession
from backend_torch import train

steps = []
original_setup, original_step, original_close = TorchSession.setup, TorchSession.train_step, TorchSession.close

def setup(self, spec, cfg):
    original_setup(self, spec, cfg)   # DDP's first broadcast: the ranks meet here
    if self.rank == 0:
        time.sleep(float(os.environ["PROBE_SKEW"]))

def train_step(self, micro_batches, lrs, muon_momentum, step):
    steps.append({"step": step, "lrs": lrs})
    return original_step(self, micro_batches, lrs, muon_momentum, step)

def close(self):
    with open(os.path.join(os.environ["PROBE_OUT"], f"rank{self.rank}.json"), "w") as f:
        json.dump({"steps": steps}, f)
    original_close(self)

TorchSession.setup, TorchSession.train_step, TorchSession.close = setup, train_step, close
train.main()
"""


def lr_multipliers(steps: list[dict]) -> list[float]:
    """The learning-rate multiplier of each step, from the matrix group's rate the loop passed."""
    base = steps[0]["lrs"][MATRIX]
    return [s["lrs"][MATRIX] / base for s in steps]


def assert_warmed_down_by_time(muls: list[float]) -> None:
    # ITERATIONS is far away, so any multiplier below 1 comes from the clock.
    assert muls[0] == 1.0
    assert muls[-1] < 0.3, muls[-CAP_WARMDOWN:]                       # ~1/CAP_WARMDOWN at the last step
    assert sum(0.0 < m < 1.0 for m in muls) >= 3, muls[-CAP_WARMDOWN:]  # a ramp, not a jump
    assert all(m > 0.0 for m in muls)


def test_the_wallclock_cap_stops_both_gloo_ranks_after_the_same_step(tiny_dataset, tmp_path):
    probe = tmp_path / "rank_probe.py"
    probe.write_text(RANK_PROBE)
    env = os.environ | tiny_env(tiny_dataset, tmp_path, RUN_ID="capped", ITERATIONS=100000,
                                WARMDOWN_ITERS=CAP_WARMDOWN, MAX_WALLCLOCK_SECONDS=CAP_SECONDS,
                                TRAIN_LOG_EVERY=1000) | {"PROBE_OUT": str(tmp_path), "PROBE_SKEW": str(SKEW)}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(probe)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "capped"
    summary = json.loads((run / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert 0 < stopped_at < 100000
    log = (run / "log.txt").read_text()
    assert "stopping_early: wallclock_cap train_time:" in log and f"ms step:{stopped_at}/100000\n" in log
    assert f"step:{stopped_at}/100000 val_loss:" in log
    # The summary is rank 0's clock, which had not reached the cap: rank 1's decision stopped it.
    assert CAP_SECONDS - SKEW - 0.5 <= summary["train_time_s"] < CAP_SECONDS
    assert load_checkpoint(run / "checkpoints" / f"step_{stopped_at:06d}.safetensors").step == stopped_at
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:   # every rank ran steps 0 .. stopped_at-1, then stopped
        assert [s["step"] for s in rank["steps"]] == list(range(stopped_at))
    # Both ranks warmed down by time, on the one clock they share (the most advanced rank's): the
    # same learning rate at every step, though rank 0's own clock ran SKEW behind. (Each rank once
    # read its own clock: rank 0 stayed near 1 while rank 1 reached 0.006, and the replicas drifted.)
    assert [s["lrs"] for s in ranks[0]["steps"]] == [s["lrs"] for s in ranks[1]["steps"]]
    assert_warmed_down_by_time(lr_multipliers(ranks[0]["steps"]))


class RecordingMLXSession:
    """An MLX session that records the learning rates the loop passes to each train_step."""

    def __new__(cls, cfg):
        session = make_session("mlx", cfg)
        session.steps = []
        original = session.train_step

        def train_step(micro_batches, lrs, muon_momentum, step):
            session.steps.append({"step": step, "lrs": lrs})
            return original(micro_batches, lrs, muon_momentum, step)

        session.train_step = train_step
        return session


def test_the_wallclock_cap_stops_an_mlx_run_warming_down_by_time(tiny_dataset, tmp_path):
    cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path, RUN_ID="capped", ITERATIONS=100000,
                                           WARMDOWN_ITERS=CAP_WARMDOWN, MAX_WALLCLOCK_SECONDS=CAP_SECONDS,
                                           TRAIN_LOG_EVERY=1000))
    session = RecordingMLXSession(cfg)
    try:
        result = run_training(cfg, session)
    finally:
        session.close()
    stopped_at = result.step
    assert 0 < stopped_at < 100000 and len(result.train_losses) == stopped_at
    log = (tmp_path / "runs" / "capped" / "log.txt").read_text()
    assert "stopping_early: wallclock_cap train_time:" in log and f"ms step:{stopped_at}/100000\n" in log
    assert CAP_SECONDS <= result.summary["train_time_s"] < CAP_SECONDS + 5
    assert load_checkpoint(result.checkpoint).step == stopped_at
    assert [s["step"] for s in session.steps] == list(range(stopped_at))
    assert_warmed_down_by_time(lr_multipliers(session.steps))


# ---------------------------------------------------------------------------------------------
# 3. SIGTERM, and a second Ctrl-C
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_finishes_the_step_and_writes_a_checkpoint_to_resume_from(backend, tiny_dataset, tmp_path):
    env = os.environ | tiny_env(tiny_dataset, tmp_path, RUN_ID="stopped", ITERATIONS=100000, WARMDOWN_ITERS=0,
                                PYTHONUNBUFFERED=1, TWINGPT_NO_BLAS_PRELOAD=1)
    proc = subprocess.Popen([sys.executable, "-m", f"backend_{backend}.train"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step:3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    ckpts = sorted((tmp_path / "runs" / "stopped" / "checkpoints").glob("step_*.safetensors"))
    assert len(ckpts) == 1
    stopped_at = load_checkpoint(ckpts[0]).step
    assert stopped_at >= 3
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert "stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)" in lines
    assert lines[-1] == f"error: interrupted at step {stopped_at}; continue with RESUME_FROM={ckpts[0]}"
    assert "Traceback" not in err
    log = (tmp_path / "runs" / "stopped" / "log.txt").read_text()
    assert f"interrupted at step:{stopped_at}/100000; continue with RESUME_FROM={ckpts[0]}" in log
    assert (tmp_path / "runs" / "stopped" / "loss.png").read_bytes()[:4] == b"\x89PNG"   # the loss so far
    resumed = train(backend, tiny_env(tiny_dataset, tmp_path, RUN_ID="resumed", ITERATIONS=stopped_at + 1,
                                      WARMDOWN_ITERS=0, RESUME_FROM=ckpts[0]))
    assert resumed.step == stopped_at + 1 and len(resumed.train_losses) == 1


# The trainer with every step from step 3 on held up for STALL seconds (in Python, as a slow step
# would be), so the second Ctrl-C lands in the middle of a step whatever the machine's load.
STALL = 20
STALL_PROBE = """
import sys, time
backend = sys.argv[1]
if backend == "torch":
    from backend_torch.session import TorchSession as Session
else:
    from backend_mlx.session import MLXSession as Session
original = Session.train_step

def train_step(self, micro_batches, lrs, muon_momentum, step):
    if step >= 3:
        time.sleep({stall})
    return original(self, micro_batches, lrs, muon_momentum, step)

Session.train_step = train_step
from trainer import loop
from backend_torch.train import make_session as torch_session
from backend_mlx.train import make_session as mlx_session
loop.main("probe", torch_session if backend == "torch" else mlx_session, [])
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(backend, tiny_dataset, tmp_path):
    env = os.environ | tiny_env(tiny_dataset, tmp_path, RUN_ID="stopped", ITERATIONS=100000, WARMDOWN_ITERS=0,
                                PYTHONUNBUFFERED=1, TWINGPT_NO_BLAS_PRELOAD=1)
    proc = subprocess.Popen([sys.executable, "-c", STALL_PROBE.format(stall=STALL), backend], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, second = [], None
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step:3/"):
            proc.send_signal(signal.SIGINT)
        if line.startswith("stopping after this step"):   # the first Ctrl-C was handled
            second = time.monotonic()
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=60)
    output = "".join(output) + rest
    assert second is not None, output   # the first Ctrl-C was answered before the run ended
    stopped_in = time.monotonic() - second
    assert stopped_in < STALL / 2, output   # it did not wait for the step to finish
    assert proc.returncode == 130, output   # what a shell reports for a Ctrl-C
    assert output.rstrip().splitlines()[-1].startswith("error: stopped at once (a second Ctrl-C)")
    assert "Traceback" not in output and "error: interrupted" not in output
    assert not list((tmp_path / "runs" / "stopped" / "checkpoints").glob("*"))


# ---------------------------------------------------------------------------------------------
# 4. MLX on Linux re-executes itself with OpenBLAS preloaded, unless TWINGPT_NO_BLAS_PRELOAD=1
# ---------------------------------------------------------------------------------------------

LINUX_WITH_OPENBLAS = (["preload", "opt-out"] if sys.platform.startswith("linux") and find_openblas() else [])


@pytest.mark.parametrize("mode", LINUX_WITH_OPENBLAS)
def test_the_mlx_trainer_preloads_openblas_unless_told_not_to(mode, tiny_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TWINGPT_BLAS_REEXEC",
                                                            "TWINGPT_NO_BLAS_PRELOAD")}
    env |= tiny_env(tiny_dataset, tmp_path, RUN_ID=mode)
    if mode == "opt-out":
        env["TWINGPT_NO_BLAS_PRELOAD"] = "1"
    # A flag as well as the environment: the re-executed process must get the same command line.
    proc = subprocess.run([sys.executable, "-m", "backend_mlx.train", "--iterations", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "runs" / mode / "log.txt").read_text()
    assert "step:1/1 val_loss:" in log and "--iterations 1" in log
    if mode == "preload":
        assert f"blas: OpenBLAS (preloaded from {find_openblas()})" in log
    else:
        assert "blas: MLX's bundled reference BLAS" in log and "OpenBLAS (preloaded" not in log
