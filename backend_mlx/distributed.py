"""Several MLX processes as one data-parallel run: mx.distributed's ring backend, started by mlx.launch.

mlx.launch starts one process per host entry with MLX_RANK (this process's rank) and MLX_HOSTFILE
(a JSON file listing every rank's "ip:port" addresses) in its environment; a process started
without them, or with a ring of one, is a world of one and never touches mx.distributed.

Every collective runs on the CPU stream (stream=mx.cpu), as MLX recommends for the ring backend:
on a Mac the GPU's command buffers then never wait on the network, so Metal's watchdog cannot kill
a step whose all-reduce waits for a slower peer.

MLX's ring connects rank r to rank r+1 (the last rank to rank 0), retrying a refused connection a
few times (about 30 s), but a rank waits for the connection from its left neighbour forever. A
peer that never starts is therefore bounded here: SIGALRM interrupts the wait after
MLX_CONNECT_TIMEOUT seconds (default 60), and the failure is one line naming the address.

Once connected, a collective waits for its peers forever: a peer that failed, was killed or hangs
(MLX has open reports of ring all_sum deadlocks) would hold the run until someone kills it. Every
wait on a collective is therefore guarded: a watchdog thread ends the process with one line when one
makes no progress for COLLECTIVE_TIMEOUT_SECONDS (mx.eval releases the GIL while it waits).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from core.errors import ConfigError, UserError
from core.files import file_sha256

DEFAULT_CONNECT_TIMEOUT_S = 60.0
# Settings that may differ between hosts: where files are, and what each device's memory decides.
PER_HOST_SETTINGS = {"data_path", "tokenizer_path", "out_dir", "run_id", "resume_from", "device", "compile",
                     "mlx_max_microbatch_tokens", "mlx_eager_eval", "memory_budget_gb", "plan"}


def replica_settings(settings: dict) -> dict:
    """What every rank must share to train the same replica: every setting but PER_HOST_SETTINGS,
    and the bytes of the RESUME_FROM file (its path may differ between hosts, its content must not:
    a rank resumed from other weights, or another step, would train apart silently)."""
    shared = {k: v for k, v in settings.items() if k not in PER_HOST_SETTINGS}
    if settings.get("resume_from"):
        shared["resume_from_sha256"] = file_sha256(settings["resume_from"])
    return shared


def settings_digest(settings: dict) -> int:
    """48 bits of the SHA-256 of replica_settings(settings): exact in float64, so one all-reduce compares them."""
    text = json.dumps(replica_settings(settings), sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


class DistributedError(UserError):
    """A ring that cannot be formed: a peer not started, an address not reachable, a bad hostfile."""


def ring_hosts(environ=os.environ) -> list[list[str]] | None:
    """Every rank's "ip:port" addresses from mlx.launch's MLX_HOSTFILE, or None for a world of one
    (not launched by mlx.launch, or launched with a single host)."""
    path, rank = environ.get("MLX_HOSTFILE"), environ.get("MLX_RANK")
    if not path or rank is None:
        return None
    try:
        text = Path(path).read_text().strip()
        hosts = json.loads(text) if text else []
    except (OSError, ValueError) as err:
        raise DistributedError(f"MLX_HOSTFILE={path}: cannot read the ring's addresses ({err})") from None
    if not isinstance(hosts, list) or not all(isinstance(h, list) and h for h in hosts):
        raise DistributedError(f"MLX_HOSTFILE={path}: expected a JSON list of each rank's [\"ip:port\", ...]")
    if len(hosts) < 2:
        return None
    if not rank.isdigit() or int(rank) >= len(hosts):
        raise DistributedError(f"MLX_RANK={rank}: must be a rank of the {len(hosts)} in MLX_HOSTFILE={path}")
    return hosts


def local_ranks(environ=os.environ) -> int:
    """How many ranks of the ring run on this rank's host (the same IP address), itself included."""
    hosts = ring_hosts(environ)
    if hosts is None:
        return 1
    addresses = [host[0].rsplit(":", 1)[0] for host in hosts]
    return addresses.count(addresses[int(environ["MLX_RANK"])])


def connect_timeout(environ=os.environ) -> float:
    value = environ.get("MLX_CONNECT_TIMEOUT", str(DEFAULT_CONNECT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"MLX_CONNECT_TIMEOUT={value}: must be a positive number of seconds")
    return seconds


class _Alarm:
    """SIGALRM after `seconds`: a system call waiting in MLX (accept) returns EINTR and MLX raises."""

    def __init__(self, seconds: float):
        self.seconds, self.fired = seconds, False

    def _handle(self, signum, frame):
        self.fired = True

    def __enter__(self):
        self.previous = signal.signal(signal.SIGALRM, self._handle)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


def init_ring(environ=os.environ):
    """The global group of an mlx.launch world (strict: a ring that fails is an error, never a
    silent group of one), or None for a world of one."""
    hosts = ring_hosts(environ)
    if hosts is None:
        return None
    timeout = connect_timeout(environ)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # make train-mlx starts mlx.launch with Ctrl-C ignored, so that the launcher outlives a Ctrl-C
        # (it hangs after one) and relays the ranks' last lines; the ranks themselves take Ctrl-C.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    rank, size = int(environ["MLX_RANK"]), len(hosts)
    left, right = (rank - 1) % size, (rank + 1) % size
    try:
        with _Alarm(timeout) as alarm:
            group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as err:
        if alarm.fired and "accept" in str(err).lower():   # interrupted while waiting for the left peer
            raise DistributedError(
                f"rank {rank} of {size}: rank {left} did not connect to {hosts[rank][0]} within {timeout:g} s "
                f"(MLX_CONNECT_TIMEOUT); is it running, and can it reach this address?") from None
        raise DistributedError(
            f"rank {rank} of {size}: could not reach rank {right} at {hosts[right][0]} (MLX: {err}); "
            "is it running, and is that its IP address?") from None
    if (group.rank(), group.size()) != (rank, size):
        raise DistributedError(f"mx.distributed formed rank {group.rank()} of {group.size()}, "
                               f"MLX_RANK={rank} and MLX_HOSTFILE say rank {rank} of {size}")
    return group


class Watchdog:
    """Ends the process, with one line on stderr and exit status 1, when a guarded wait lasts longer
    than `seconds`: the one way out of a collective blocked inside MLX, which no signal interrupts."""

    def __init__(self, seconds: float, prefix: str):
        self.seconds, self.prefix = seconds, prefix
        self.deadline: float | None = None
        self.what = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._watch, name="collective-watchdog", daemon=True).start()

    @contextmanager
    def guard(self, what: str):
        with self.changed:
            self.deadline, self.what = time.monotonic() + self.seconds, what
            self.changed.notify()
        try:
            yield
        finally:
            with self.changed:
                self.deadline = None

    def _watch(self) -> None:
        with self.changed:
            while True:
                if self.deadline is None:
                    self.changed.wait()
                elif time.monotonic() >= self.deadline:
                    sys.stderr.write(f"error: {self.prefix}: {self.what} made no progress for {self.seconds:g} s "
                                     "(COLLECTIVE_TIMEOUT_SECONDS); a peer has failed, was killed or hangs\n")
                    sys.stderr.flush()
                    os._exit(1)
                else:
                    self.changed.wait(self.deadline - time.monotonic())


class Ring:
    """The collectives of one data-parallel run (world_size > 1)."""

    # Gradients are summed in pieces of at least this many bytes, as mlx.nn.average_gradients groups them.
    ALL_REDUCE_BYTES = 32 * 1024 ** 2

    def __init__(self, group):
        self.group = group
        self.rank, self.world_size = group.rank(), group.size()
        # Payload handed to the all-reduces so far (a ring sends 2(N-1)/N of it from each rank); counted
        # as the graphs are built, so under mx.compile the compiled update's share counts once.
        self.bytes_reduced = 0
        self.watchdog: Watchdog | None = None

    def set_timeout(self, seconds: float) -> None:
        """Every later wait() that lasts longer than `seconds` ends the process (COLLECTIVE_TIMEOUT_SECONDS)."""
        self.watchdog = Watchdog(seconds, f"rank {self.rank} of {self.world_size}")

    def wait(self, what: str, *arrays) -> None:
        """mx.eval(*arrays), which runs collectives, under the watchdog once a timeout is set."""
        if self.watchdog is None:
            mx.eval(*arrays)
            return
        with self.watchdog.guard(what):
            mx.eval(*arrays)

    def all_sum(self, x: mx.array) -> mx.array:
        self.bytes_reduced += x.nbytes
        return mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)

    def average_gradients(self, grads: dict[str, mx.array]) -> dict[str, mx.array]:
        """The mean over ranks of a flat dict of gradients, in concatenated pieces of ALL_REDUCE_BYTES."""
        self.bytes_reduced += sum(g.nbytes for g in grads.values())
        # average_gradients takes a tree: nest the dotted names and flatten them back after.
        tree = tree_unflatten(list(grads.items()))
        averaged = nn.average_gradients(tree, self.group, self.ALL_REDUCE_BYTES, communication_stream=mx.cpu)
        return dict(tree_flatten(averaged))

    def all_reduce(self, values, op: str) -> list[float]:
        """Host floats summed ("sum") or maximized ("max") across ranks, in float64 on the CPU."""
        x = mx.array([float(v) for v in values], dtype=mx.float64)
        reduce = mx.distributed.all_sum if op == "sum" else mx.distributed.all_max
        self.bytes_reduced += x.nbytes
        result = reduce(x, group=self.group, stream=mx.cpu)
        self.wait(f"an all-reduce ({op})", result)
        return result.tolist()

    def check_same_settings(self, settings: dict) -> None:
        """Every rank must train with the same settings (PER_HOST_SETTINGS aside) from the same resume
        file, if any (replica_settings): there is no broadcast of weights. ssh passes no
        environment variables to another host, so `ITERATIONS=500 HOSTFILE=... make train-mlx` would
        otherwise train the remote ranks with other settings, silently."""
        digest = settings_digest(settings)
        highest, negated_lowest = self.all_reduce([digest, -digest], "max")
        if highest != digest or -negated_lowest != digest:
            raise ConfigError(f"rank {self.rank} of {self.world_size}: the ranks were given different settings "
                              "(or RESUME_FROM files of different content); "
                              "on several hosts give them as flags (ARGS=...), in a CONFIG file or in the "
                              "hostfile's \"envs\": environment variables reach local ranks only")

    def barrier(self) -> None:
        """Wait for every rank (a peer leaving while rank 0 still writes would be seen as a failure)."""
        self.all_reduce([0.0], "sum")
