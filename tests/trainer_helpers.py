"""Running either trainer in-process on the tiny dataset of conftest.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.config import load_config
from trainer.loop import run_training

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "VOCAB_SIZE": "512", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "8", "WARMUP_STEPS": "0",
    "WARMDOWN_ITERS": "4", "VAL_BATCH_SIZE": "4096", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
    "MAX_WALLCLOCK_SECONDS": "0", "DEVICE": "cpu", "SEED": "7",
}


def tiny_env(tiny_dataset, tmp_path, **overrides) -> dict[str, str]:
    """Environment variables of a tiny run writing under tmp_path/runs."""
    data_path, tokenizer = tiny_dataset
    env = dict(TINY, DATA_PATH=data_path, TOKENIZER_PATH=tokenizer, OUT_DIR=str(tmp_path / "runs"))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def make_session(backend: str, cfg):
    if backend == "torch":
        from backend_torch.session import TorchSession
        return TorchSession(cfg, environ={})
    from backend_mlx.session import MLXSession
    return MLXSession()


def train(backend: str, env: dict[str, str]):
    cfg = load_config([], environ=env)
    session = make_session(backend, cfg)
    try:
        return run_training(cfg, session)
    finally:
        session.close()


# ---------------------------------------------------------------------------------------------
# Several processes: torchrun (gloo) and mlx.launch (MLX's ring backend), on this machine
# ---------------------------------------------------------------------------------------------

TORCHRUN = Path(sys.executable).with_name("torchrun")
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")


def free_port_pair() -> int:
    """A port p with p and p + 1 both free here (mlx.launch gives rank r the port p + r)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535:
            try:
                with socket.socket() as a, socket.socket() as b:
                    a.bind(("127.0.0.1", port))
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def run_mlx_ranks(env: dict[str, str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """python -m backend_mlx.train under `mlx.launch -n nproc` (ring backend, 127.0.0.1), as make train-mlx NPROC=2."""
    cmd = [str(MLX_LAUNCH), "--backend", "ring", "-n", str(nproc), "--starting-port", str(free_port_pair()),
           "--", sys.executable, "-m", "backend_mlx.train"]
    return subprocess.run(cmd, cwd=REPO, env=os.environ | env, capture_output=True, text=True, timeout=timeout)


def run_torch_ranks(env: dict[str, str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """python -m backend_torch.train under torchrun with gloo on the CPU."""
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "backend_torch.train"]
    return subprocess.run(cmd, cwd=REPO, env=os.environ | env, capture_output=True, text=True, timeout=timeout)


def logged_train_losses(run_dir: Path) -> list[float]:
    """The train_loss of every logged step of a run, from its metrics.jsonl (TRAIN_LOG_EVERY=1: every step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------
# A fault in one rank: the trainer started through a script that patches its session's train_step
# ---------------------------------------------------------------------------------------------

FAULT_SCRIPT = '''import os, signal, sys, time
sys.path.insert(0, {repo!r})
from backend_{backend} import session, train
cls = session.{cls}
original = cls.train_step

def train_step(self, micro_batches, lrs, muon_momentum, step):
    if self.rank == {rank} and step == {step} - 1:
        if {fault!r} == "raise":
            raise RuntimeError("injected fault at step {step}")
        if {fault!r} == "hang":     # a peer that stops answering with its sockets open
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, micro_batches, lrs, muon_momentum, step)

cls.train_step = train_step
sys.argv[0] = "backend_{backend}.train"
train.main()
'''


def fault_script(tmp_path: Path, backend: str, *, rank: int, step: int, fault: str) -> Path:
    """A script that trains with `backend` as `python -m backend_<backend>.train` does, except that rank
    `rank` at step `step` (counted from 1) raises a RuntimeError ("raise"), sleeps an hour ("hang") or
    is killed ("kill")."""
    cls = "TorchSession" if backend == "torch" else "MLXSession"
    path = tmp_path / f"fault_{backend}_{fault}.py"
    path.write_text(FAULT_SCRIPT.format(repo=str(REPO), backend=backend, cls=cls, rank=rank, step=step, fault=fault))
    return path


def run_until(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` in its own process group; kill the whole group if it outlives `timeout` seconds.
    Returns the finished process (returncode None when it was killed) and the seconds it took."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ | env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # whatever of the group is still running
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, code, out, err), time.perf_counter() - t0
