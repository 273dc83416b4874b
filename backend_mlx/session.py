"""MLX's side of the one training loop: trainer.backend.TrainerBackend on Metal or MLX's CPU backend.

Everything crosses the boundary as numpy arrays and Python floats. A training step is:
    for each micro-batch, for each chunk of at most MLX_MAX_MICROBATCH_TOKENS tokens (whole
    sequences): gradient of the chunk's SUMMED token loss, scaled by 1/(tokens of the micro-batch
    x number of micro-batches) and accumulated; then clipping (optional), Muon and Adam.
Summing per chunk and dividing once by the micro-batch's token count weights each chunk by its
token count, so the gradient equals the unchunked one (up to rounding); MLX_EAGER_EVAL=1 evaluates
after every chunk so the lazy graph, and with it memory, stays bounded (16 GB Macs).
"""

from __future__ import annotations

import sys
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from trainer.backend import Batch, checked_optimizer_state, observing_inputs
from trainer.plan import runtime_choices, wired_limit_bytes
from core.config import ModelSpec, TrainConfig
from core.errors import TrainingError
from core.flops import measure_gflops
from core.memory import machine_ram_bytes
from core.optimizer import bias_corrections, group_weight_decay
from core.params import MATRIX, param_table

from backend_mlx.blas import blas_note
from backend_mlx.distributed import Ring, init_ring, local_ranks
from backend_mlx.model import GPT, Linear
from backend_mlx.optim import adam_update, clip_grad_norm, muon_update

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def chunks(x: np.ndarray, y: np.ndarray, max_tokens: int):
    """(x, y) split along the batch into runs of whole sequences of at most max_tokens tokens
    (one sequence per chunk when a sequence alone is longer)."""
    rows = max(1, max_tokens // x.shape[1])
    for i in range(0, x.shape[0], rows):
        yield x[i:i + rows], y[i:i + rows]


def _ids(a: np.ndarray) -> mx.array:
    # One integer dtype for every batch (shards hold uint16): a compiled function is traced per dtype.
    return mx.array(np.asarray(a, dtype=np.int32))


class MLXSession:
    name = "mlx"
    rank = 0
    world_size = 1
    local_ranks = 1

    def __init__(self):
        on_gpu = mx.default_device().type == mx.gpu
        metal = on_gpu and mx.metal.is_available()   # an MLX CUDA build's GPU is not Metal
        self.device = ("mlx gpu (Metal)" if metal else "mlx gpu (CUDA)") if on_gpu else "mlx cpu"
        self.device_kind = ("metal" if metal else "cuda") if on_gpu else "cpu"
        # backend_mlx/model.py: mx.fast's attention on a GPU (MLX runs it unfused while training on Metal).
        self.attention = ("mx.fast scaled_dot_product_attention" + (" (unfused while training)" if metal else "")
                          if on_gpu else "blocked causal attention (CPU)")
        self.compute_dtype = ""
        self.notes: list[str] = []
        self.compiled = False
        self.model: GPT | None = None
        # Under mlx.launch: one rank of a ring (backend_mlx/distributed.py); otherwise a world of one.
        group = init_ring()
        self.ring = Ring(group) if group is not None else None
        if self.ring is not None:
            self.rank, self.world_size = self.ring.rank, self.ring.world_size
            self.local_ranks = local_ranks()

    # -- building --

    def setup(self, spec: ModelSpec, cfg: TrainConfig) -> None:
        on_gpu = self.device_kind != "cpu"
        self.spec, self.cfg = spec, cfg
        if self.ring is not None:
            self.ring.set_timeout(cfg.collective_timeout_seconds)
            self.ring.check_same_settings(cfg.to_dict())
        if self.device_kind == "metal":
            # The run's memory wired (resident), as mlx-lm does: the plan's budget, within this rank's share.
            limit = wired_limit_bytes(cfg, self.device_memory_bytes(), self.local_ranks)
            if limit is not None and hasattr(mx, "set_wired_limit"):
                mx.set_wired_limit(limit)
        if not on_gpu:
            # On the CPU, MLX 0.32 keeps at most 32 MB of freed buffers for reuse, so every larger
            # array is fresh memory, page-faulted in: a 16M-element add took 37 ms, 5 ms from the
            # cache. Its memory limit, as on Metal, took the BASE step from 4.02 to 3.76 s.
            mx.set_cache_limit(mx.get_memory_limit())
        self.compute_dtype, self.use_compile = self.runtime_choices(cfg)
        # As the plan resolved it (trainer/plan.py); a session set up without a plan evaluates lazily.
        self.eager_eval = cfg.mlx_eager_eval is True
        dtype = DTYPES[self.compute_dtype]
        self.model = GPT(spec, compute_dtype=dtype)
        mx.eval(self.model.parameters())

        self.table = param_table(spec)
        self.matrix_names = [p.name for p in self.table if p.group == MATRIX]
        self.state: dict[str, mx.array] = {}
        self.load_optimizer_state({})

        self.ema = None   # the loop starts it (load_ema) when EMA_DECAY > 0
        self.compiled = self.use_compile
        self._forwards: dict[bool, tuple] = {}   # looping -> (loss and grad, eval loss), built on first use
        self._update = self._update_impl
        if self.use_compile:
            # The weights and optimizer state are captured state: read at every call, written back
            # after the update, so the compiled functions never see stale (trace-time) weights.
            self._update = mx.compile(self._update, inputs=self._compile_state(), outputs=self._compile_state())
        self.set_looping(False)

        self.notes = [
            f"mlx {mx.__version__} on {self.device}, compute dtype {self.compute_dtype}, "
            f"mx.compile {'on' if self.use_compile else 'off'} (COMPILE={cfg.compile}), "
            f"chunks of at most {cfg.mlx_max_microbatch_tokens} tokens, eager eval {'on' if self.eager_eval else 'off'}"
        ]
        if not on_gpu and (note := blas_note()):
            self.notes.append(note)
        if self.ring is not None:
            self.notes.append(f"mx.distributed ring: {self.world_size} ranks, gradients averaged across ranks, "
                              "Newton-Schulz shared, collectives on the CPU stream")

    def runtime_choices(self, cfg: TrainConfig) -> tuple[str, bool]:
        """(compute dtype, compiled) this session will use for `cfg`, before setup (the memory plan
        reads them): trainer/plan.py's rules, given that every MLX GPU (Metal, CUDA) computes in bf16."""
        return runtime_choices(cfg, self.device_kind, bf16_supported=self.device_kind != "cpu")

    def _loss_sum(self, x: mx.array, y: mx.array) -> mx.array:
        return self.model.loss(x, y, reduction="sum")

    # -- weights and optimizer state, as numpy --

    def _compile_state(self) -> list:
        return [self.model.state, self.state]

    def set_looping(self, active: bool) -> None:
        """A compiled function traces model.looping once: each value has its own pair of functions."""
        looping = bool(active) and self.spec.num_loops > 0
        self.model.looping = looping
        if looping not in self._forwards:
            loss_and_grad, eval_loss = nn.value_and_grad(self.model, self._loss_sum), self._loss_sum
            if self.use_compile:
                state = self._compile_state()
                loss_and_grad = mx.compile(loss_and_grad, inputs=state, outputs=state)
                eval_loss = mx.compile(eval_loss, inputs=state)
            self._forwards[looping] = (loss_and_grad, eval_loss)
        self._loss_and_grad, self._eval_loss = self._forwards[looping]

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.model.load_weights(weights)

    def export_weights(self) -> dict[str, np.ndarray]:
        return self.model.export_weights()

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Flat dict "<name>.<slot>" (trainer/backend.py); empty means fresh zeros. All checked before any is set."""
        for key, value in checked_optimizer_state(self.spec, state).items():
            self.state[key] = mx.array(value)   # in place: the compiled step holds this dict
        mx.eval(self.state)

    def export_optimizer_state(self) -> dict[str, np.ndarray]:
        return {key: np.array(value) for key, value in self.state.items()}

    def load_ema(self, weights: dict[str, np.ndarray] | None) -> None:
        self.ema = None if weights is None else {name: mx.array(np.asarray(weights[name], np.float32))
                                                 for name in (p.name for p in self.table)}

    def export_ema(self) -> dict[str, np.ndarray] | None:
        return None if self.ema is None else {name: np.array(a) for name, a in self.ema.items()}

    def _update_ema(self) -> None:
        decay = self.cfg.ema_decay
        params = dict(tree_flatten(self.model.parameters()))
        self.ema = {name: decay * avg + (1.0 - decay) * params[name] for name, avg in self.ema.items()}

    # -- training and evaluation --

    def _update_impl(self, grads: dict[str, mx.array], scalars: dict[str, mx.array]) -> None:
        """Clipping (optional), Muon for the matrices, Adam for the rest: backend_torch/session.py's
        _optimizer_step on immutable arrays (the new weights and state are written back)."""
        cfg, state = self.cfg, self.state
        if cfg.grad_clip_norm > 0:
            grads = dict(zip(grads, clip_grad_norm(list(grads.values()), cfg.grad_clip_norm)))
        params = dict(tree_flatten(self.model.parameters()))
        matrices = self.matrix_names
        new_matrices, bufs = muon_update(
            [params[n] for n in matrices], [grads[n] for n in matrices],
            [state[f"{n}.momentum_buffer"] for n in matrices],
            lr=scalars[MATRIX], momentum=scalars["momentum"], steps=cfg.muon_backend_steps,
            dtype=DTYPES[self.compute_dtype], rank=self.rank, world_size=self.world_size,
            all_sum=self.ring.all_sum if self.ring is not None else None, coeffs=cfg.muon_ns_coeffs,
            row_normalize=cfg.muon_row_normalize, weight_decay=cfg.muon_wd)
        adam = [p for p in self.table if p.group != MATRIX]
        new_adam, ms, vs = adam_update(
            [params[p.name] for p in adam], [grads[p.name] for p in adam],
            [state[f"{p.name}.exp_avg"] for p in adam], [state[f"{p.name}.exp_avg_sq"] for p in adam],
            lrs=[scalars[p.group] for p in adam], beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.adam_eps,
            bias_correction1=scalars["bc1"], bias_correction2=scalars["bc2"],
            weight_decays=[group_weight_decay(p.group, cfg) for p in adam])
        for name, buf in zip(matrices, bufs):
            state[f"{name}.momentum_buffer"] = buf
        for p, m, v in zip(adam, ms, vs):
            state[f"{p.name}.exp_avg"], state[f"{p.name}.exp_avg_sq"] = m, v
        new = dict(zip(matrices, new_matrices)) | {p.name: w for p, w in zip(adam, new_adam)}
        self.model.update(tree_unflatten(list(new.items())))

    def gradients(self, micro_batches: Sequence[Batch]) -> tuple[mx.array, dict[str, mx.array]]:
        """(mean loss, mean gradient by parameter name) over the micro-batches, chunk by chunk."""
        total_grads, total_loss = None, mx.array(0.0)
        for x, y in micro_batches:
            scale = 1.0 / (x.size * len(micro_batches))
            for xc, yc in chunks(x, y, self.cfg.mlx_max_microbatch_tokens):
                loss_sum, grads = self._loss_and_grad(_ids(xc), _ids(yc))
                grads = tree_map(lambda g: g * scale, grads)
                total_grads = grads if total_grads is None else tree_map(mx.add, total_grads, grads)
                total_loss = total_loss + loss_sum * scale
                if self.eager_eval:
                    mx.eval(total_grads, total_loss)
        return total_loss, dict(tree_flatten(total_grads))

    def train_step(self, micro_batches: Sequence[Batch], lrs: dict[str, float], muon_momentum: float,
                   step: int) -> mx.array:
        loss, grads = self.gradients(micro_batches)
        if self.ring is not None:
            loss, grads = self._mean_over_ranks(loss, grads, step)
        # Schedule values as 0-d arrays: a compiled update is traced once, not once per new lr.
        bc1, bc2 = bias_corrections(self.cfg.beta1, self.cfg.beta2, step + 1)
        scalars = {group: mx.array(lr, dtype=mx.float32) for group, lr in lrs.items()}
        scalars.update(momentum=mx.array(muon_momentum, dtype=mx.float32),
                       bc1=mx.array(bc1, dtype=mx.float32), bc2=mx.array(bc2, dtype=mx.float32))
        self._update(grads, scalars)
        if self.ema is not None:
            self._update_ema()
        updated = (loss, self.model.parameters(), self.state, self.ema or {})
        if self.ring is not None:
            self.ring.wait(f"step {step + 1}'s Muon all-reduce", *updated)
        else:
            mx.eval(*updated)
        return loss   # a 0-d array: the loop reads it with float() on log steps

    def _mean_over_ranks(self, loss: mx.array, grads: dict[str, mx.array],
                         step: int) -> tuple[mx.array, dict[str, mx.array]]:
        """The loss and gradients averaged across ranks, evaluated before the update is built: every
        rank's graph of these all-reduces is the same, so every rank runs them in the same order (the
        update's graph differs by rank, since each orthogonalizes its own share of the matrices).
        This rank's gradients are computed first, so the watchdog times the all-reduce alone."""
        mx.eval(loss, grads)
        loss = self.ring.all_sum(loss) / self.world_size
        grads = self.ring.average_gradients(grads)
        self.ring.wait(f"step {step + 1}'s gradient all-reduce", loss, grads)
        return loss, grads

    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        """Sum of token cross-entropies; each chunk evaluated before the next is built."""
        total = 0.0
        for xc, yc in chunks(x, y, self.cfg.mlx_max_microbatch_tokens):
            total += float(self._eval_loss(_ids(xc), _ids(yc)))   # float(): evaluates, sums in float64
        return total

    def ttt_adapter(self, cfg: TrainConfig):
        """The test-time training adapter of this session's model (trainer/ttt.py)."""
        from backend_mlx.ttt import MLXTTT

        return MLXTTT(self, cfg)

    def eval_token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-token cross-entropies, chunk by chunk as eval_loss_sum, as float64 on the host."""
        rows = [np.array(self.model.loss(_ids(xc), _ids(yc), reduction="none"), dtype=np.float64)
                for xc, yc in chunks(x, y, self.cfg.mlx_max_microbatch_tokens)]
        return np.concatenate(rows).reshape(np.shape(y))

    # -- GPTQ's calibration statistics (QUANT=gptq; core/quantize.py does the rest on the host) --

    def input_second_moments(self, batches: Sequence[Batch]) -> dict[str, np.ndarray]:
        """X^T X of the inputs of every matrix the model multiplies by, summed over `batches` (this
        rank's, chunk by chunk) and all ranks, float32, keyed by the weight's name (the tied head's:
        tok_emb.weight)."""
        sums: dict[str, mx.array] = {}

        def observer(name: str):
            def observe(x: mx.array) -> None:
                x = x.astype(mx.float32).reshape(-1, x.shape[-1])
                sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            return observe

        with observing_inputs(self.model, Linear, observer):
            for x, y in batches:
                for xc, _ in chunks(x, y, self.cfg.mlx_max_microbatch_tokens):
                    self.model.logits(_ids(xc))
                    mx.eval(sums)   # the sums only: the logits are never needed
        if self.ring is not None:
            sums = {name: self.ring.all_sum(sums[name]) for name in sorted(sums)}
        return {name: np.array(sums[name], dtype=np.float32) for name in sorted(sums)}

    # -- the rest of the interface --

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return self.ring.all_reduce(values, "sum") if self.ring is not None else list(values)

    def all_reduce_max(self, values: Sequence[float]) -> list[float]:
        return self.ring.all_reduce(values, "max") if self.ring is not None else list(values)

    def synchronize(self) -> None:
        mx.synchronize()

    def matmul_gflops(self, dtype: str = "float32", n: int = 2048, seconds: float = 1.0) -> float:
        """GFLOP/s of an n x n product on this device: the ceiling MFU is measured against."""
        a = mx.random.normal((n, n)).astype(DTYPES[dtype])
        b = mx.random.normal((n, n)).astype(DTYPES[dtype])
        mx.eval(a, b)
        return measure_gflops(lambda: mx.eval(a @ b), 2 * n ** 3, seconds)

    def device_memory_bytes(self) -> int:
        if self.device_kind == "metal":
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            return int(info["max_recommended_working_set_size"])
        if self.device_kind == "cuda":
            # MLX's CUDA build reports free_memory and total_memory (not Metal's memory_size): the free
            # memory, as torch's mem_get_info gives the CUDA budget.
            info = mx.device_info()
            for key in ("free_memory", "total_memory", "memory_size"):
                if info.get(key):
                    return int(info[key])
            return machine_ram_bytes()
        return machine_ram_bytes()

    def peak_memory_bytes(self) -> int | None:
        if hasattr(mx, "get_peak_memory"):
            return int(mx.get_peak_memory())
        if mx.metal.is_available():
            return int(mx.metal.get_peak_memory())
        return None

    def close(self) -> None:
        # A rank leaving early can look like a failure to its peers, so a rank waits here for rank 0
        # to finish writing: after a normal end, and after an interruption or a diverged loss
        # (TrainingError), which every rank raises after the same step. Not after an error of one
        # rank alone: its peers are not coming; they end at the collective watchdog (distributed.py).
        in_flight = sys.exc_info()[1]
        if self.ring is not None and (in_flight is None or isinstance(in_flight, TrainingError)):
            self.ring.barrier()
