"""MLX on several processes (backend_mlx/distributed.py): mx.distributed's ring backend, here two local
processes on MLX's CPU backend. The per-step losses of 2 ranks against 1 rank and against torch on 2
gloo ranks are the parity suite's (tests/parity/test_parity_distributed.py); here: a stop asked by one
rank stops both after the same step with one checkpoint, that checkpoint resumes on any world size of
either backend (and a 1-rank checkpoint on 2 MLX ranks through `make train-mlx NPROC=2`, which a
Ctrl-C then stops cleanly), ranks given different settings refuse to train, and a rank whose peer
never starts fails in bounded time, in one line naming the address it waited on.

The ranks are started as mlx.launch starts them (MLX_RANK, MLX_HOSTFILE), so a test can signal one
rank alone, or start one rank without its peer."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import mlx.core as mx

from backend_mlx.distributed import DistributedError, connect_timeout, init_ring, ring_hosts
from backend_torch.threads import single_thread
from core.checkpoint import load_checkpoint
from core.errors import ConfigError
from trainer_helpers import REPO, fault_script, free_port_pair, logged_train_losses, run_torch_ranks, tiny_env, train


def rel(a, b) -> float:
    return abs(a - b) / abs(b)


def ring_file(tmp_path, port: int):
    path = tmp_path / "ring.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return path


@pytest.fixture
def start_rank():
    """start_rank(rank, hostfile, env[, script]): python -m backend_mlx.train (or `script`) as mlx.launch
    starts rank `rank`;
    whatever still runs at the end of the test is killed."""
    started = []

    def start(rank: int, hostfile, env: dict[str, str], script=None) -> subprocess.Popen:
        command = [sys.executable, "-m", "backend_mlx.train"] if script is None else [sys.executable, str(script)]
        proc = subprocess.Popen(command, cwd=REPO, text=True,
                                env=os.environ | env | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_the_checkpoint_resumes_on_any_world_size(
        tiny_dataset, tmp_path, start_rank):
    # A constant learning rate, so the losses do not depend on ITERATIONS; every step logged; the BLAS of
    # this process (no re-execution with OpenBLAS), so the 1-rank runs below run in-process.
    settings = dict(ITERATIONS=100000, WARMDOWN_ITERS=0, TRAIN_LOG_EVERY=1)
    env = tiny_env(tiny_dataset, tmp_path, RUN_ID="stopped", PYTHONUNBUFFERED=1, TWINGPT_NO_BLAS_PRELOAD=1,
                   **settings)
    hostfile = ring_file(tmp_path, free_port_pair())
    ranks = [start_rank(r, hostfile, env) for r in (0, 1)]
    for line in ranks[0].stdout:   # training is under way: a scheduler's SIGTERM reaches rank 1 alone
        if line.startswith("step:3/"):
            ranks[1].send_signal(signal.SIGTERM)
            break
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], [err[-2000:] for _, err in outs]
    last_lines = [err.strip().splitlines()[-1] for _, err in outs]
    steps = {re.match(r"error: interrupted at step (\d+)", line).group(1) for line in last_lines}
    assert len(steps) == 1, last_lines                                          # both after the same step
    assert last_lines[0].startswith(f"error: interrupted at step {steps.pop()}; continue with RESUME_FROM=")
    assert outs[1][0] == ""                          # rank 1 printed nothing: rank 0 alone logs
    ckpts = sorted((tmp_path / "runs" / "stopped" / "checkpoints").glob("*.safetensors"))
    assert len(ckpts) == 1
    stopped_at = load_checkpoint(ckpts[0]).step
    assert stopped_at >= 3
    two_ranks = logged_train_losses(tmp_path / "runs" / "stopped")
    assert len(two_ranks) == stopped_at

    # One rank with 2 accumulation steps reads the same micro-batches: the same losses, to rounding.
    end = stopped_at + 3
    one = dict(settings, ITERATIONS=end, GRAD_ACCUM_STEPS=2)
    full = train("mlx", tiny_env(tiny_dataset, tmp_path, RUN_ID="full", CHECKPOINT_EVERY=stopped_at, **one))
    assert max(map(rel, two_ranks, full.train_losses[:stopped_at])) <= 1e-5
    # The 2-rank checkpoint continues on 1 MLX rank, on torch, and on torch with 2 gloo ranks.
    continued = {
        "mlx": train("mlx", tiny_env(tiny_dataset, tmp_path, RUN_ID="on-mlx", RESUME_FROM=ckpts[0], **one)).train_losses,
    }
    with single_thread():   # torch in this process on one thread, as the parity suite runs it
        continued["torch"] = train("torch", tiny_env(tiny_dataset, tmp_path, RUN_ID="on-torch", RESUME_FROM=ckpts[0],
                                                     **one)).train_losses
    proc = run_torch_ranks(tiny_env(tiny_dataset, tmp_path, RUN_ID="on-torch-2", RESUME_FROM=ckpts[0],
                                    **dict(settings, ITERATIONS=end)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    continued["torch x2"] = logged_train_losses(tmp_path / "runs" / "on-torch-2")
    for where, losses in continued.items():
        tol = 1e-5 if where == "mlx" else 1e-4   # the cross-backend curve tolerance for torch
        assert len(losses) == 3 and max(map(rel, losses, full.train_losses[stopped_at:])) <= tol, (where, losses)

    # The other way round: the 1-rank checkpoint continues on 2 MLX ranks through make train-mlx NPROC=2,
    # stopped by a terminal's Ctrl-C, which reaches the whole process group: make, mlx.launch and both
    # ranks. mlx.launch hangs after a Ctrl-C of its own, so make starts it with Ctrl-C ignored; the ranks
    # take it back, finish the step, and rank 0 writes the checkpoint.
    one_rank_ckpt = tmp_path / "runs" / "full" / "checkpoints" / f"step_{stopped_at:06d}.safetensors"
    stamp = tmp_path / "installed"   # newer than pyproject.toml: make sees the venv as built
    stamp.touch()
    make_env = tiny_env(tiny_dataset, tmp_path, RUN_ID="on-mlx-2", RESUME_FROM=one_rank_ckpt, PYTHONUNBUFFERED=1,
                        **settings)
    make = subprocess.Popen(["make", "--no-print-directory", "train-mlx", "NPROC=2", f"MLX_PORT={free_port_pair()}",
                             f"PY={sys.executable}", f"STAMP={stamp}"], cwd=REPO, env=os.environ | make_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for line in make.stdout:
            if line.startswith(f"step:{end}/"):
                os.killpg(make.pid, signal.SIGINT)
                break
        _, err = make.communicate(timeout=90)   # a launcher hung by the Ctrl-C: TimeoutExpired
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
    run = tmp_path / "runs" / "on-mlx-2"
    (last,) = list((run / "checkpoints").glob("*.safetensors"))
    # The launcher outlived the Ctrl-C and relayed rank 0's last line.
    assert f"error: interrupted at step {load_checkpoint(last).step}; continue with RESUME_FROM={last}" in err
    log = (run / "log.txt").read_text()
    assert "world_size:2" in log and f"at step:{stopped_at} (trained by mlx)" in log
    on_two = logged_train_losses(run)[:3]
    assert max(map(rel, on_two, full.train_losses[stopped_at:])) <= 1e-5


def test_a_rank_whose_peer_never_starts_fails_in_bounded_time_naming_the_address(tiny_dataset, tmp_path, start_rank):
    # Rank 0 waits for rank 1 to connect; MLX alone would wait forever.
    port = free_port_pair()
    env = tiny_env(tiny_dataset, tmp_path, MLX_CONNECT_TIMEOUT=2, TWINGPT_NO_BLAS_PRELOAD=1)
    t0 = time.perf_counter()
    rank0 = start_rank(0, ring_file(tmp_path, port), env)
    out, err = rank0.communicate(timeout=60)   # without the bound: TimeoutExpired, a failure
    assert time.perf_counter() - t0 < 30
    assert rank0.returncode == 2
    assert err.strip() == (f"error: rank 0 of 2: rank 1 did not connect to 127.0.0.1:{port} within 2 s "
                           "(MLX_CONNECT_TIMEOUT); is it running, and can it reach this address?")
    assert out == "" and not (tmp_path / "runs").exists()


def test_ranks_given_different_settings_refuse_to_train(tiny_dataset, tmp_path, start_rank):
    # As when a remote host's rank, started over ssh, never saw the launching shell's ITERATIONS=...
    hostfile = ring_file(tmp_path, free_port_pair())
    env = tiny_env(tiny_dataset, tmp_path, TWINGPT_NO_BLAS_PRELOAD=1, MLX_CONNECT_TIMEOUT=30)
    ranks = [start_rank(r, hostfile, env | {"ITERATIONS": str(8 + r)}) for r in (0, 1)]
    outs = [p.communicate(timeout=60) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2]
    for r, (_, err) in enumerate(outs):
        assert err.strip() == (f"error: rank {r} of 2: the ranks were given different settings (or RESUME_FROM "
                               "files of different content); on several hosts "
                               "give them as flags (ARGS=...), in a CONFIG file or in the hostfile's \"envs\": "
                               "environment variables reach local ranks only")


def test_the_ring_is_read_from_mlx_launch_environment(tmp_path):
    one_host = tmp_path / "one.json"
    one_host.write_text("")   # mlx.launch -n 1 writes an empty hostfile: a world of one
    two = ring_file(tmp_path, 40000)
    assert ring_hosts({}) is None and ring_hosts({"MLX_RANK": "0", "MLX_HOSTFILE": str(one_host)}) is None
    assert ring_hosts({"MLX_RANK": "1", "MLX_HOSTFILE": str(two)}) == [["127.0.0.1:40000"], ["127.0.0.1:40001"]]
    with pytest.raises(DistributedError, match="MLX_RANK=2: must be a rank of the 2 in MLX_HOSTFILE="):
        ring_hosts({"MLX_RANK": "2", "MLX_HOSTFILE": str(two)})
    with pytest.raises(DistributedError, match="cannot read the ring's addresses"):
        ring_hosts({"MLX_RANK": "0", "MLX_HOSTFILE": str(tmp_path / "missing.json")})
    assert connect_timeout({}) == 60.0 and connect_timeout({"MLX_CONNECT_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match=f"MLX_CONNECT_TIMEOUT={bad}: must be a positive number of seconds"):
            connect_timeout({"MLX_CONNECT_TIMEOUT": bad})


def test_a_rank_that_cannot_reach_its_peer_names_the_address(tmp_path, monkeypatch):
    # The connecting side: MLX retries a refused connection for about 30 s, then raises; its message
    # names no address. (Its real run is too slow for the suite; the listening side is tested above.)
    def refused(strict, backend):
        assert (strict, backend) == (True, "ring")
        raise RuntimeError("[ring] Couldn't connect (error: 111)")

    monkeypatch.setattr(mx.distributed, "init", refused)
    ring = {"MLX_RANK": "1", "MLX_HOSTFILE": str(ring_file(tmp_path, 40000))}
    with pytest.raises(DistributedError) as err:
        init_ring(ring)
    assert str(err.value) == ("rank 1 of 2: could not reach rank 0 at 127.0.0.1:40000 (MLX: [ring] Couldn't connect "
                              "(error: 111)); is it running, and is that its IP address?")
    assert init_ring({}) is None   # not under mlx.launch: a world of one, mx.distributed untouched


@pytest.mark.parametrize("fault", ["raise", "kill", "hang"])
def test_when_one_rank_fails_is_killed_or_hangs_the_other_ends_in_bounded_time_in_one_line(
        fault, tiny_dataset, tmp_path, start_rank):
    # Rank 1 at step 3 raises, is killed (SIGKILL), or stops answering with its sockets open. Rank 0 is
    # then in an all-reduce that cannot complete: it ends within COLLECTIVE_TIMEOUT_SECONDS (or at
    # once, when the ring reports the lost peer) with one line. Before: it waited forever.
    env = tiny_env(tiny_dataset, tmp_path, ITERATIONS=1000, COLLECTIVE_TIMEOUT_SECONDS=10, TWINGPT_NO_BLAS_PRELOAD=1,
                   MLX_CONNECT_TIMEOUT=60, RUN_ID=fault)
    hostfile = ring_file(tmp_path, free_port_pair())
    script = fault_script(tmp_path, "mlx", rank=1, step=3, fault=fault)
    ranks = [start_rank(r, hostfile, env, script) for r in (0, 1)]
    for line in ranks[0].stdout:
        if line.startswith("step:2/"):
            break
    t0 = time.perf_counter()
    _, err = ranks[0].communicate(timeout=120)
    assert time.perf_counter() - t0 < 120 and ranks[0].returncode != 0, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: "), err[-2000:]
    if fault == "hang":
        assert last == ("error: rank 0 of 2: step 3's gradient all-reduce made no progress for 10 s "
                        "(COLLECTIVE_TIMEOUT_SECONDS); a peer has failed, was killed or hangs")
    if fault == "raise":
        _, err1 = ranks[1].communicate(timeout=30)
        assert ranks[1].returncode == 2
        assert err1.strip().splitlines()[-1] == "error: rank 1 of 2: RuntimeError: injected fault at step 3"


def test_the_watchdog_ends_a_wait_that_outlives_the_timeout_in_one_line():
    code = ("import time; from backend_mlx.distributed import Watchdog\n"
            "w = Watchdog(0.5, 'rank 1 of 2')\n"
            "with w.guard('a quick one'): time.sleep(0.1)\n"
            "with w.guard('a barrier'): time.sleep(60)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 30 and proc.returncode == 1
    assert proc.stderr == ("error: rank 1 of 2: a barrier made no progress for 0.5 s (COLLECTIVE_TIMEOUT_SECONDS); "
                           "a peer has failed, was killed or hangs\n")
