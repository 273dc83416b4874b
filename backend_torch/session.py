"""The torch side of the training loop (trainer/backend.py): device, precision, compile, DDP, optimizers.

Every device, dtype and compile choice of the torch backend is made in `resolve_runtime`, from
what the machine has, by trainer/plan.py's shared rules; so the CPU tests run the very code a GPU
run executes, with only these choices different.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from backend_torch.attention_kernels import (DESCRIPTIONS, FLASH_MIN_CAPABILITY, attention_kernel,
                                             pin_cuda_kernel, use_kernel)
from backend_torch.model import GPT, Linear
from backend_torch.optim import adam_update, clip_grad_norm, muon_update, newton_schulz
from backend_torch.precision import tf32_off
from trainer.backend import checked_optimizer_state, observing_inputs
from trainer.plan import device_choice, runtime_choices
from core.config import ModelSpec, TrainConfig
from core.errors import ConfigError, TrainingError
from core.flops import measure_gflops
from core.memory import machine_ram_bytes
from core.optimizer import bias_corrections, group_weight_decay
from core.params import MATRIX, param_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Runtime:
    device: torch.device
    compute_dtype: str
    compile: bool
    rank: int
    local_rank: int
    world_size: int
    local_ranks: int       # processes sharing this device: torchrun's local ranks on the CPU, 1 on a GPU each
    attention: str         # the attention kernel (backend_torch/attention_kernels.py)


def resolve_runtime(cfg: TrainConfig, environ=os.environ) -> Runtime:
    """Device, compute dtype, compile and distributed rank: what this machine has, and torchrun's
    variables, handed to trainer/plan.py's choices (where every "auto" is resolved)."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", "0"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    kind = device_choice(cfg.device, torch.cuda.is_available(), torch.backends.mps.is_available(), world_size)
    device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device(kind)
    # bf16 on CUDA from sm80 (Ampere) on, as the reference; older GPUs have no bf16 tensor cores (and
    # no flash kernel). mps's bf16 support depends on the macOS version: none counted.
    capability = torch.cuda.get_device_capability(device) if kind == "cuda" else None
    bf16_ok = capability is not None and capability >= FLASH_MIN_CAPABILITY
    if cfg.compute_dtype == "bfloat16" and kind == "cuda" and not bf16_ok:
        raise ConfigError(f"COMPUTE_DTYPE=bfloat16: this GPU (sm_{capability[0]}{capability[1]}) has no bf16 tensor "
                          "cores; use COMPUTE_DTYPE=float32 or auto")
    compute_dtype, compile_model = runtime_choices(cfg, kind, bf16_ok)
    local_ranks = int(environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    return Runtime(device, compute_dtype, compile_model, rank, local_rank, world_size, local_ranks,
                   attention_kernel(device.type, capability, compute_dtype, masked=cfg.doc_attention_enabled))


def nccl_device_id(torch_version: str, device: torch.device) -> torch.device | None:
    """init_process_group's device_id: this rank's GPU, as the reference passes it (eager NCCL init;
    without it torch guesses the GPU from the rank, and lazily-created communicators have hung
    all-reduces, pytorch#142356), except on torch after 2.6.0 and before 2.7.1, where passing it makes
    NCCL 2.26 hang at random during communication (pytorch#153960, worked around in 2.7.1)."""
    version = tuple(int(part) for part in re.findall(r"\d+", torch_version)[:3])
    return None if (2, 6, 0) < version < (2, 7, 1) else device


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token ids onto the device. non_blocking only to CUDA: a host-to-mps copy that does not wait can
    read the numpy buffer after it is freed (open torch issues)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=device.type == "cuda")


class TorchSession:
    name = "torch"

    def __init__(self, cfg: TrainConfig, environ=os.environ):
        rt = resolve_runtime(cfg, environ)
        self.runtime = rt
        self.rank, self.world_size, self.local_ranks = rt.rank, rt.world_size, rt.local_ranks
        self.compute_dtype = rt.compute_dtype
        self.compiled = rt.compile
        self.torch_device = rt.device
        self.device_kind = rt.device.type   # "cpu", "cuda" or "mps"
        self.attention = f"{rt.attention}: {DESCRIPTIONS[rt.attention]}"
        if rt.device.type == "cuda":
            torch.cuda.set_device(rt.device)
            self.device = f"cuda:{rt.local_rank} ({torch.cuda.get_device_name(rt.device)})"
            tf32_off()
            pin_cuda_kernel(rt.attention)
        else:
            self.device = str(rt.device)
        if rt.world_size > 1 and not dist.is_initialized():
            # device_id binds NCCL's communicator to this rank's GPU at once (no guessing, no lazy init),
            # as the reference does; not on the torch versions where it hangs NCCL (nccl_device_id).
            # timeout: a collective a failed or hung peer never joins fails after COLLECTIVE_TIMEOUT_SECONDS (60)
            # (gloo at once; NCCL through its watchdog) instead of torch's 10 to 30 minutes.
            cuda = rt.device.type == "cuda"
            dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rt.rank, world_size=rt.world_size,
                                    device_id=nccl_device_id(torch.__version__, rt.device) if cuda else None,
                                    timeout=timedelta(seconds=cfg.collective_timeout_seconds))
        self.notes = [f"torch {torch.__version__} device:{self.device} compute_dtype:{self.compute_dtype} "
                      f"compile:{int(rt.compile)} world_size:{rt.world_size} attention:{rt.attention} "
                      f"({DESCRIPTIONS[rt.attention]})"]

    def runtime_choices(self, cfg: TrainConfig) -> tuple[str, bool]:
        """(compute dtype, compiled), chosen by resolve_runtime (the memory plan reads them)."""
        return self.compute_dtype, self.compiled

    # -- building --

    def setup(self, spec: ModelSpec, cfg: TrainConfig) -> None:
        self.spec, self.cfg = spec, cfg
        self.model = GPT(spec, DTYPES[self.compute_dtype]).to(self.torch_device).build_rotary(cfg.train_seq_len)
        use_kernel(self.model, self.runtime.attention)
        params = dict(self.model.named_parameters())
        self.table = param_table(spec)
        self.params = {p.name: params[p.name] for p in self.table}
        self.matrix_names = [p.name for p in self.table if p.group == MATRIX]
        # Newton-Schulz compiled whole (fullgraph), once per matrix shape, when the model is compiled.
        self.orthogonalize = (torch.compile(newton_schulz, fullgraph=True, dynamic=False) if self.runtime.compile
                              else newton_schulz)
        # Compile first, then wrap in DDP, as the reference trainer does. Evaluation uses the plain model.
        self.train_model = torch.compile(self.model) if self.runtime.compile else self.model
        if self.world_size > 1:
            ids = [self.runtime.local_rank] if self.torch_device.type == "cuda" else None
            # A 1-layer model has skip_weights of shape (0, d), which no forward reads: DDP must be
            # told, or it waits for that gradient forever.
            # broadcast_buffers=False: the only buffers are the RoPE tables, the same on every rank;
            # broadcasting them would be a collective before every forward.
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids, broadcast_buffers=False,
                                                       find_unused_parameters=spec.num_skip_weights == 0)
        self.load_optimizer_state({})
        self.ema = None   # the loop starts it (load_ema) when EMA_DECAY > 0

    def set_looping(self, active: bool) -> None:
        # torch.compile guards on the attribute: the looped forward is a second graph, not a recompile per step.
        self.model.looping = bool(active) and self.spec.num_loops > 0

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.model.load_weights(weights)

    def export_weights(self) -> dict[str, np.ndarray]:
        return self.model.export_weights()

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Flat dict "<name>.<slot>" (trainer/backend.py); empty means fresh zeros. All checked before any is set."""
        self.state = {key: torch.tensor(value, device=self.torch_device)
                      for key, value in checked_optimizer_state(self.spec, state).items()}

    def export_optimizer_state(self) -> dict[str, np.ndarray]:
        return {key: t.detach().cpu().numpy().copy() for key, t in self.state.items()}

    def load_ema(self, weights: dict[str, np.ndarray] | None) -> None:
        self.ema = None if weights is None else {
            p.name: torch.tensor(np.asarray(weights[p.name], np.float32), device=self.torch_device) for p in self.table}

    def export_ema(self) -> dict[str, np.ndarray] | None:
        return None if self.ema is None else {name: t.cpu().numpy().copy() for name, t in self.ema.items()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.ema_decay
        averages = list(self.ema.values())
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, [self.params[name].detach() for name in self.ema], alpha=1.0 - decay)

    # -- training --

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return to_device(a, self.torch_device)

    def train_step(self, micro_batches: Sequence, lrs: dict[str, float], muon_momentum: float,
                   step: int) -> torch.Tensor:
        """Returns the mean loss as a 0-d device tensor: nothing here waits for the device (the loop
        reads the loss on log steps only). With several ranks the loss rides in Muon's all-reduce."""
        n = len(micro_batches)
        total = torch.zeros((), device=self.torch_device)
        for i, (x, y) in enumerate(micro_batches):
            # DDP averages gradients across ranks on the last micro-step only.
            sync = self.world_size == 1 or i == n - 1
            with nullcontext() if sync else self.train_model.no_sync():
                loss = self.train_model(self._to_device(x), self._to_device(y))
                (loss / n).backward()
            total += loss.detach()
        mean_loss = total / n
        if self.cfg.grad_clip_norm > 0:
            clip_grad_norm([p.grad for p in self.params.values() if p.grad is not None], self.cfg.grad_clip_norm)
        summed = self._optimizer_step(lrs, muon_momentum, t=step + 1,
                                      also_sum=mean_loss.reshape(1) if self.world_size > 1 else None)
        if self.ema is not None:
            self._update_ema()
        return mean_loss if summed is None else summed[0] / self.world_size

    def _optimizer_step(self, lrs: dict[str, float], muon_momentum: float, t: int,
                        also_sum: torch.Tensor | None = None) -> torch.Tensor | None:
        cfg, state = self.cfg, self.state
        matrices = [self.params[n] for n in self.matrix_names]
        summed = muon_update(matrices, [p.grad for p in matrices],
                             [state[f"{n}.momentum_buffer"] for n in self.matrix_names],
                             lr=lrs[MATRIX], momentum=muon_momentum, steps=cfg.muon_backend_steps,
                             dtype=DTYPES[self.compute_dtype], rank=self.rank, world_size=self.world_size,
                             orthogonalize=self.orthogonalize, also_sum=also_sum, coeffs=cfg.muon_ns_coeffs,
                             row_normalize=cfg.muon_row_normalize, weight_decay=cfg.muon_wd)
        adam = [p for p in self.table if p.group != MATRIX]
        bc1, bc2 = bias_corrections(cfg.beta1, cfg.beta2, t)
        # A parameter the forward never reads has no .grad: its gradient is zero (as in MLX). This
        # is skip_weights of a 1-layer model, shape (0, d).
        params = [self.params[p.name] for p in adam]
        adam_update(params, [q.grad if q.grad is not None else torch.zeros_like(q) for q in params],
                    [state[f"{p.name}.exp_avg"] for p in adam], [state[f"{p.name}.exp_avg_sq"] for p in adam],
                    lrs=[lrs[p.group] for p in adam], beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.adam_eps,
                    bias_correction1=bc1, bias_correction2=bc2,
                    weight_decays=[group_weight_decay(p.group, cfg) for p in adam])
        for param in self.params.values():
            param.grad = None
        return summed

    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.eval_token_losses(x, y).sum())   # summed in float64 on the host: mps has none

    def ttt_adapter(self, cfg: TrainConfig):
        """The test-time training adapter of this session's model (trainer/ttt.py)."""
        from backend_torch.ttt import TorchTTT

        return TorchTTT(self, cfg)

    @torch.no_grad()
    def eval_token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        losses = self.model.loss(self._to_device(x), self._to_device(y), reduction="none")
        # To the host first, then float64: mps has no float64, and .to("cpu", torch.float64) casts on the device.
        return losses.float().cpu().numpy().astype(np.float64).reshape(np.shape(y))

    # -- GPTQ's calibration statistics (QUANT=gptq; core/quantize.py does the rest on the host) --

    def input_second_moments(self, batches: Sequence) -> dict[str, np.ndarray]:
        """X^T X of the inputs of every matrix the model multiplies by, summed over `batches` (this
        rank's) and all ranks, float32, keyed by the weight's name (the tied head's: tok_emb.weight)."""
        sums: dict[str, torch.Tensor] = {}

        def observer(name: str):
            def observe(x: torch.Tensor) -> None:
                x = x.detach().float().reshape(-1, x.size(-1))
                sums[name] = sums[name].addmm_(x.T, x) if name in sums else x.T @ x
            return observe

        with observing_inputs(self.model, Linear, observer), torch.no_grad():
            for x, _ in batches:
                self.model.logits(self._to_device(x))
        if self.world_size > 1:
            for name in sorted(sums):
                dist.all_reduce(sums[name], op=dist.ReduceOp.SUM)
        return {name: sums[name].cpu().numpy() for name in sorted(sums)}

    # -- distributed and housekeeping --

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_reduce_max(self, values: Sequence[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: Sequence[float], op) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.torch_device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize()
        elif self.torch_device.type == "mps":
            torch.mps.synchronize()

    def matmul_gflops(self, dtype: str = "float32", n: int = 2048, seconds: float = 1.0) -> float:
        """GFLOP/s of an n x n product in `dtype` on this device: the ceiling MFU is measured against.
        Timed in loops of products with one synchronize per loop, so a GPU's queue stays full."""
        a = torch.randn(n, n, device=self.torch_device).to(DTYPES[dtype])
        b = torch.randn(n, n, device=self.torch_device).to(DTYPES[dtype])
        out = torch.empty_like(a)
        return measure_gflops(lambda: torch.mm(a, b, out=out), 2 * n ** 3, seconds, synchronize=self.synchronize)

    def device_memory_bytes(self) -> int:
        if self.torch_device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.torch_device)
            return int(free)
        if self.torch_device.type == "mps":
            return int(torch.mps.recommended_max_memory())
        return machine_ram_bytes()

    def peak_memory_bytes(self) -> int | None:
        if self.torch_device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.torch_device))
        if self.torch_device.type == "mps":  # no peak counter on mps: what the driver holds now
            return int(torch.mps.driver_allocated_memory())
        return None

    def close(self) -> None:
        # A rank waits here for rank 0 to finish writing (a peer leaving early aborts gloo): after a
        # normal end, and after an interruption or a diverged loss (TrainingError), which every rank
        # raises after the same step. Not after an error of this rank alone: its peers wait in a
        # collective, not in this barrier, and would hang; it exits and torchrun stops them.
        in_flight = sys.exc_info()[1]
        if dist.is_initialized() and (in_flight is None or isinstance(in_flight, TrainingError)):
            dist.barrier()
            dist.destroy_process_group()
