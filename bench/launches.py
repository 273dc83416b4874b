"""What decides a GPU step's speed beyond FLOPs, counted on the CPU: `python -m bench.launches` (part of `make bench`).

On a GPU each aten op is (at least) one kernel launch of a few microseconds, a host read of a
device value (.item(), float(), .tolist()) stalls the queue, and a recompile costs seconds inside
the timed loop. None of that is visible in CPU step times, but all of it is countable on the CPU:

    ops / optimizer step   aten ops dispatched by one optimizer step (TorchDispatchMode), ours vs
                           the reference trainer's structure (torch.optim.Adam(fused=True) and a
                           per-matrix Muon, built below); views (free on a GPU) counted apart.
                           Compiled functions do not run under a dispatch mode, so Newton-Schulz is
                           counted eagerly; "NS calls" is how many compiled graphs a step launches
    ops / full step        the same for forward + backward + optimizer (eager)
    host syncs / step      reads of a device value and collectives in train_step (SyncCounter)
    recompiles             graphs compiled after the first step, across steps, lr changes and a
                           resume (torch.compile with the aot_eager backend: the same guards as
                           inductor, without its C++ code generation)
    step ms                the optimizer step alone and the full step, ours vs the reference
                           structure, eager and with Newton-Schulz compiled (inductor)

The model is ModelSpec()'s default (9 layers x 512), 2,048 tokens a step, on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from core.config import TrainConfig
from core.init import init_weights
from core.params import MATRIX
from core.schedule import learning_rates, momentum

# Ops that only make a view or read metadata: no kernel on a GPU.
VIEW_OPS = {"view", "_unsafe_view", "expand", "permute", "transpose", "t", "slice", "select", "unbind",
            "alias", "as_strided", "unsqueeze", "squeeze", "detach", "split", "reshape", "mT"}


# ---------------------------------------------------------------------------------------------
# Counters (the tests use them too)
# ---------------------------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active: .total, .kernels (views excluded), .by_op."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[func.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.by_op.items() if name.split(".")[0] not in VIEW_OPS)


SYNCING_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier")


class SyncCounter:
    """Counts, while active, every Tensor method that reads a device value on the host (a sync on a
    GPU) and every torch.distributed collective: .counts {name: calls}. With fake_collectives the
    collectives do nothing (no process group needed), so a world_size > 1 step can be counted here."""

    def __init__(self, fake_collectives: bool = False):
        self.fake = fake_collectives
        self.counts: collections.Counter = collections.Counter()
        self._saved: list = []

    def reads(self) -> int:
        return sum(self.counts[m] for m in SYNCING_METHODS)

    def collectives(self) -> int:
        return sum(self.counts[c] for c in COLLECTIVES)

    def _wrap(self, owner, name):
        original = getattr(owner, name)
        fake = self.fake and owner is dist

        def counted(*args, **kwargs):
            self.counts[name] += 1
            return None if fake else original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self):
        for m in SYNCING_METHODS:
            self._wrap(torch.Tensor, m)
        for c in COLLECTIVES:
            self._wrap(dist, c)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------------------------
# The reference trainer's optimizer structure, for comparison
# ---------------------------------------------------------------------------------------------

def reference_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """One matrix at a time, bf16, as the reference compiles it (torch.compile per call site)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    if g.size(0) > g.size(1):
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if g.size(0) > g.size(1) else x


class ReferenceOptimizers:
    """torch.optim.Adam(fused=True) for the Adam groups and a per-matrix Muon that fills one flat
    update buffer (the buffer the reference all-reduces), on a TorchSession's parameters."""

    def __init__(self, session, compiled: bool):
        self.session = session
        table = session.table
        groups = collections.defaultdict(list)
        for p in table:
            if p.group != MATRIX:
                groups[p.group].append(session.params[p.name])
        self.adam = torch.optim.Adam([{"params": ps, "lr": 0.0, "group": g} for g, ps in groups.items()],
                                     betas=(0.9, 0.95), eps=1e-8, fused=True)
        self.matrices = [session.params[p.name] for p in table if p.group == MATRIX]
        self.bufs = [torch.zeros_like(p) for p in self.matrices]
        self.ns = torch.compile(reference_newton_schulz) if compiled else reference_newton_schulz

    @torch.no_grad()
    def step(self, lrs: dict, mu: float, steps: int = 5) -> None:
        flat = torch.zeros(sum(p.numel() for p in self.matrices), dtype=torch.bfloat16)
        offset = 0
        for p, buf in zip(self.matrices, self.bufs):
            g = p.grad
            buf.mul_(mu).add_(g)
            g = self.ns(g.add(buf, alpha=mu), steps)
            g *= max(1, g.size(0) / g.size(1)) ** 0.5
            flat[offset:offset + p.numel()] = g.flatten()
            offset += p.numel()
        offset = 0
        for p in self.matrices:
            p.add_(flat[offset:offset + p.numel()].view_as(p).type_as(p), alpha=-lrs[MATRIX])
            offset += p.numel()
        for group in self.adam.param_groups:
            group["lr"] = lrs[group["group"]]
        self.adam.step()
        for p in self.session.params.values():
            p.grad = None


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------

TOKENS = 2048


def make_session(compile_ns: bool, compute_dtype: str = "bfloat16", seq_len: int = 1024, **model):
    """A torch session on the CPU at ModelSpec()'s default size (or `model`'s overrides), weights initialized."""
    from backend_torch.optim import newton_schulz
    from backend_torch.session import TorchSession
    cfg = TrainConfig(**model, train_seq_len=seq_len, train_batch_tokens=TOKENS, device="cpu", compute_dtype=compute_dtype,
                      compile="0", max_wallclock_seconds=0, warmup_steps=0)
    session = TorchSession(cfg, environ={})
    spec = cfg.model_spec()
    session.setup(spec, cfg)
    session.load_weights(init_weights(spec, cfg.seed))
    if compile_ns:   # Newton-Schulz compiled as a compiled session does it, the model left eager
        session.orthogonalize = torch.compile(newton_schulz, fullgraph=True, dynamic=False)
    return session, cfg


def fill_grads(session, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in session.params.values():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def optimizer_ops(session, cfg, reference: ReferenceOptimizers | None = None) -> OpCounter:
    """aten ops of one optimizer step (gradients filled at random), Newton-Schulz run eagerly."""
    fill_grads(session)
    lrs, mu = learning_rates(cfg, 10, 0.0), momentum(cfg, 10)
    with OpCounter() as ops:
        if reference is None:
            session._optimizer_step(lrs, mu, t=11)
        else:
            reference.step(lrs, mu)
    return ops


def timed(fn, repeats: int) -> float:
    fn()   # the first call compiles, where anything is compiled
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def op_counts(session, cfg, rng, ref: ReferenceOptimizers) -> dict:
    """aten ops of an optimizer step and of a full train_step, ours against the reference's."""
    ours, ref_ops = optimizer_ops(session, cfg), optimizer_ops(session, cfg, ref)
    lrs, mu = learning_rates(cfg, 10, 0.0), momentum(cfg, 10)
    with OpCounter() as full:
        session.train_step(batch_for(cfg, rng), lrs, mu, 10)
    fill_grads(session)
    with OpCounter() as fwd_bwd:   # the model part, to add the reference's optimizer to it
        loss = session.train_model(*[torch.from_numpy(a) for a in batch_for(cfg, rng)[0]])
        loss.backward()
    return {"optimizer_ops": {"ours": ours.total, "ours_kernels": ours.kernels,
                              "reference": ref_ops.total, "reference_kernels": ref_ops.kernels},
            "ns_calls_per_step": {"ours": len({tuple(p.shape) for p in ref.matrices}), "reference": len(ref.matrices)},
            "full_step_ops": {"ours": full.total, "reference": fwd_bwd.total + ref_ops.total}}


def sync_counts(session, cfg, rng, lrs, mu) -> dict:
    """Host syncs and collectives per train_step: one rank, and two ranks with faked collectives."""
    with SyncCounter() as one:
        session.train_step(batch_for(cfg, rng), lrs, mu, 11)
    session.world_size = 2
    with SyncCounter(fake_collectives=True) as two:
        session.train_step(batch_for(cfg, rng), lrs, mu, 12)
    session.world_size = 1
    return {"host_reads_1_rank": one.reads(), "collectives_1_rank": one.collectives(),
            "host_reads_2_ranks": two.reads(), "collectives_2_ranks": two.collectives(),
            "reference_host_reads": 0, "reference_note": "the reference reads the loss on log steps only"}


def optimizer_times(session, lrs, mu, ref_eager: ReferenceOptimizers, ref_compiled: ReferenceOptimizers,
                    repeats: int) -> dict:
    """Milliseconds of an optimizer step alone (filling the gradients subtracted), eager and with
    Newton-Schulz compiled, ours and the reference's; the compile time and any recompile."""
    def ours_step():
        fill_grads(session)
        session._optimizer_step(lrs, mu, t=11)

    def ref_step(r):
        def run():
            fill_grads(session)
            r.step(lrs, mu)
        return run

    base = timed(lambda: fill_grads(session), repeats)
    times = {"ours_eager": timed(ours_step, repeats) - base, "reference_eager": timed(ref_step(ref_eager), repeats) - base}
    t0 = time.perf_counter()
    from backend_torch.optim import newton_schulz
    session.orthogonalize = torch.compile(newton_schulz, fullgraph=True, dynamic=False)
    ours_step()                      # compiles Newton-Schulz, once per matrix shape
    graphs = graphs_compiled()
    times["ours_compiled"] = timed(ours_step, repeats) - base
    times["recompiles_in_timed_loop"] = graphs_compiled() - graphs
    times["reference_compiled"] = timed(ref_step(ref_compiled), repeats) - base
    times["compile_s"] = time.perf_counter() - t0
    session.orthogonalize = newton_schulz
    return times


def full_step_times(session, cfg, rng, lrs, mu, ref: ReferenceOptimizers, repeats: int) -> dict:
    """Milliseconds of a whole eager step: our train_step, and the model's forward and backward
    followed by the reference's optimizer."""
    def full_ours():
        session.train_step(batch_for(cfg, rng), lrs, mu, 11)

    def full_ref():
        loss = session.train_model(*[torch.from_numpy(a) for a in batch_for(cfg, rng)[0]])
        loss.backward()
        ref.step(lrs, mu)

    return {"ours": timed(full_ours, repeats), "reference": timed(full_ref, repeats)}


def measure(repeats: int) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    session, cfg = make_session(compile_ns=False)
    ref_eager = ReferenceOptimizers(session, compiled=False)
    ref_compiled = ReferenceOptimizers(session, compiled=True)
    lrs, mu = learning_rates(cfg, 10, 0.0), momentum(cfg, 10)
    out: dict = {"model": "ModelSpec() default: 9 layers x 512, vocab 1024, seq 1024",
                 "tokens_per_step": TOKENS, "compute_dtype": "bfloat16"}
    out |= op_counts(session, cfg, rng, ref_eager)
    out["syncs_per_step"] = sync_counts(session, cfg, rng, lrs, mu)
    out["optimizer_step_ms"] = optimizer_times(session, lrs, mu, ref_eager, ref_compiled, repeats)
    out["full_step_ms_eager"] = full_step_times(session, cfg, rng, lrs, mu, ref_eager, max(1, repeats // 2))
    session.close()
    out["recompiles"] = count_recompiles()
    return out


def count_recompiles(steps: int = 4) -> dict:
    """Graphs compiled by the first step of a compiled session (aot_eager) and after it: over
    further steps with moving lrs and momentum, then after a resume (weights and state reloaded)."""
    import functools

    from backend_torch.session import TorchSession
    cfg = TrainConfig(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64, train_seq_len=16,
                      train_batch_tokens=64, device="cpu", compile="1", max_wallclock_seconds=0, warmup_steps=0)
    original = torch.compile
    torch.compile = functools.partial(original, backend="aot_eager")
    try:
        session = TorchSession(cfg, environ={})
        spec = cfg.model_spec()
        session.setup(spec, cfg)
        session.load_weights(init_weights(spec, cfg.seed))
        rng = np.random.default_rng(0)
        before = graphs_compiled()
        session.train_step(batch_for(cfg, rng), learning_rates(cfg, 0, 0.0), momentum(cfg, 0), 0)
        first = graphs_compiled() - before
        for step in range(1, steps):
            session.train_step(batch_for(cfg, rng), {k: v * (1 - 0.1 * step) for k, v in learning_rates(cfg, step, 0.0).items()},
                               momentum(cfg, step), step)
        session.load_weights(session.export_weights())
        session.load_optimizer_state(session.export_optimizer_state())
        session.train_step(batch_for(cfg, rng), learning_rates(cfg, steps, 0.0), momentum(cfg, steps), steps)
        session.close()
    finally:
        torch.compile = original
    return {"graphs_first_step": first, "recompiles_after": graphs_compiled() - before - first}


def batch_for(cfg, rng):
    rows = cfg.train_batch_tokens // cfg.train_seq_len
    x = rng.integers(0, cfg.vocab_size, (rows, cfg.train_seq_len))
    return [(x, np.roll(x, -1, axis=1))]


def format_rows(r: dict) -> str:
    o, f, s, t, fs, rc = (r["optimizer_ops"], r["full_step_ops"], r["syncs_per_step"], r["optimizer_step_ms"],
                          r["full_step_ms_eager"], r["recompiles"])
    lines = [f"launch-bound costs, {r['model']}, {r['tokens_per_step']} tokens, {r['compute_dtype']}, CPU:",
             f"{'':34} {'ours':>10} {'reference structure':>20}",
             f"{'aten ops / optimizer step':34} {o['ours']:>10} {o['reference']:>20}",
             f"{'  of which not views':34} {o['ours_kernels']:>10} {o['reference_kernels']:>20}",
             f"{'compiled NS calls / step':34} {r['ns_calls_per_step']['ours']:>10} {r['ns_calls_per_step']['reference']:>20}",
             f"{'aten ops / full step (eager)':34} {f['ours']:>10} {f['reference']:>20}",
             f"{'host reads / step, 1 rank':34} {s['host_reads_1_rank']:>10} {s['reference_host_reads']:>20}",
             f"{'collectives / step, 2 ranks':34} {s['collectives_2_ranks']:>10} {'':>20}",
             f"{'host reads / step, 2 ranks':34} {s['host_reads_2_ranks']:>10} {'':>20}",
             f"{'recompiles after step 1':34} {rc['recompiles_after']:>10} {'':>20}",
             f"{'  inductor NS, timed loop':34} {t['recompiles_in_timed_loop']:>10} {'':>20}",
             f"{'optimizer step ms, eager':34} {t['ours_eager']:>10.0f} {t['reference_eager']:>20.0f}",
             f"{'optimizer step ms, NS compiled':34} {t['ours_compiled']:>10.0f} {t['reference_compiled']:>20.0f}",
             f"{'full step ms, eager':34} {fs['ours']:>10.0f} {fs['reference']:>20.0f}",
             "(2 ranks: collectives faked, the DDP gradient all-reduce not counted; the loop's wall-clock",
             " agreement adds one small all-reduce and its read per step. Reference: fused Adam + per-matrix",
             " compiled NS, built in bench/launches.py; its loss is read on log steps only.)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each step (median)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    t0 = time.time()
    result = measure(args.repeats)
    print(format_rows(result))
    print(f"({time.time() - t0:.0f} s, of which {result['optimizer_step_ms']['compile_s']:.0f} s compiling "
          "Newton-Schulz with inductor, ours and the reference's)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
