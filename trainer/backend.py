"""The small interface each backend implements for the one training loop (trainer/loop.py).

Everything crosses this boundary as numpy arrays and Python floats (the training loss as a device
scalar, read with float() when the loop logs), so the loop, the checkpoint,
the metric and the artifact are written once. Each backend has one class implementing it:
backend_torch.session.TorchSession and backend_mlx.session.MLXSession.

Optimizer state crosses as a flat dict of float32 arrays keyed by parameter name and slot:
    "<name>.exp_avg", "<name>.exp_avg_sq"   Adam moments (embed, head and scalar groups)
    "<name>.momentum_buffer"                Muon momentum (matrix group)
An empty dict means fresh (all zeros). Adam's bias correction counts optimizer steps from the
`step` argument of train_step, so the state needs no step counter of its own and moves between
backends unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol, Sequence

import numpy as np

from core.config import ModelSpec, TrainConfig
from core.errors import CheckpointError
from core.params import optimizer_slots, param_table

Batch = tuple[np.ndarray, np.ndarray]   # (x, y) int arrays of shape (B, T)
DeviceScalar = object                   # a 0-d torch tensor or mx.array; float() reads it (and waits)


def checked_optimizer_state(spec: ModelSpec, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every optimizer slot of `spec` as a float32 array: `state`'s, or zeros when `state` is empty.

    Both backends load through this, so a state with missing, unexpected or misshapen slots is the
    same one-line CheckpointError in either, raised before anything is set.
    """
    shapes = {f"{p.name}.{slot}": p.shape for p in param_table(spec) for slot in optimizer_slots(p.group)}
    if not state:
        return {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"optimizer state: missing {', '.join(missing[:5]) or 'nothing'}, "
                              f"unexpected {', '.join(extra[:5]) or 'nothing'}")
    values = {key: np.asarray(state[key], dtype=np.float32) for key in shapes}
    for key, shape in shapes.items():
        if values[key].shape != shape:
            raise CheckpointError(f"optimizer state: {key} has shape {values[key].shape}, this model spec needs {shape}")
    return values


@contextmanager
def observing_inputs(model, linear_type: type, observer: Callable[[str], Callable]):
    """Inside: every `linear_type` module of `model`, and its tied head, calls observer(weight name)
    with each input (the sessions' input_second_moments, GPTQ's statistics; docs/spec.md §9.2).
    Both backends' models have a `.observer` on their Linear and a `.head_observer` for the tied head."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, linear_type)]
    for name, module in linears:
        module.observer = observer(f"{name}.weight")
    model.head_observer = observer("tok_emb.weight")
    try:
        yield
    finally:
        for _, module in linears:
            module.observer = None
        model.head_observer = None


class TrainerBackend(Protocol):
    name: str            # "torch" or "mlx"
    rank: int            # this process's rank (0 when not distributed)
    world_size: int      # number of processes
    device: str          # human-readable, e.g. "cpu", "cuda:0 (NVIDIA H100 80GB)", "mlx cpu"
    device_kind: str     # what the memory plan needs to know: "cpu", "cuda", "mps" or "metal"
    compute_dtype: str   # "float32" or "bfloat16", resolved from the config
    notes: list[str]     # lines the loop writes to the log at start (BLAS in use, compile, ...)
    compiled: bool       # whether the train step is compiled (the loop's warmup steps exist to prime it)
    local_ranks: int     # processes of this run sharing this device (local CPU or Mac ranks): they split its memory
    attention: str       # the attention kernel a training step runs on this device (make doctor shows it)

    def runtime_choices(self, cfg: TrainConfig) -> tuple[str, bool]:
        """(compute dtype, compiled) the session uses for `cfg`; known before setup, for the memory plan."""

    def setup(self, spec: ModelSpec, cfg: TrainConfig) -> None:
        """Build the model and its optimizers (weights are loaded separately)."""

    def load_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    def set_looping(self, active: bool) -> None:
        """Whether the layers loop from now on (NUM_LOOPS > 0; docs/spec.md §4.10). Compiled, the
        looped forward is a second graph, traced the first time it runs."""

    def export_weights(self) -> dict[str, np.ndarray]: ...

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None: ...

    def export_optimizer_state(self) -> dict[str, np.ndarray]: ...

    def load_ema(self, weights: dict[str, np.ndarray] | None) -> None:
        """Start the moving average of the weights (EMA_DECAY, docs/spec.md §6) from `weights` (a
        checkpoint's, or the weights training starts from); None turns it off. While it is on, every
        train_step ends with ema = EMA_DECAY * ema + (1 - EMA_DECAY) * weights, in fp32."""

    def export_ema(self) -> dict[str, np.ndarray] | None:
        """The moving average as numpy float32, keyed as export_weights; None when it is off."""

    def train_step(self, micro_batches: Sequence[Batch], lrs: dict[str, float], muon_momentum: float,
                   step: int) -> DeviceScalar:
        """One optimizer step over this rank's micro-batches; `step` = optimizer steps already done.

        Gradients are the mean over all micro-batches of all ranks. Returns the mean training loss
        over all ranks as a device scalar (a 0-d tensor or array) that `float()` reads: the step
        queues its work and returns without waiting for the device, and the loop reads the losses
        on log steps only (docs/spec.md §6).
        """

    def eval_loss_sum(self, x: np.ndarray, y: np.ndarray) -> float:
        """Sum (not mean) of token cross-entropies of this batch, in nats, without gradients."""

    def eval_token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The cross-entropy of every target of this batch, in nats, float64 of shape y.shape, without
        gradients (the sliding evaluation keeps only each window's new targets)."""

    def input_second_moments(self, batches: Sequence[Batch]) -> dict[str, np.ndarray]:
        """QUANT=gptq's calibration: X^T X (float32) of the inputs of every matrix the model multiplies
        by, summed over this rank's `batches` and over all ranks, keyed by the weight's name."""

    def ttt_adapter(self, cfg: TrainConfig):
        """The score-first test-time training adapter of this model (trainer/ttt.py's TTTAdapter)."""

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum across ranks (identity on one process)."""

    def all_reduce_max(self, values: Sequence[float]) -> list[float]:
        """Maximum across ranks, element by element (identity on one process)."""

    def synchronize(self) -> None:
        """Wait for queued device work, so timings are honest."""

    def matmul_gflops(self, dtype: str = "float32", n: int = 2048, seconds: float = 1.0) -> float:
        """GFLOP/s of an n x n product on this device: the ceiling MFU is measured against."""

    def device_memory_bytes(self) -> int:
        """The memory this process's device offers a run: CUDA's free memory (mem_get_info), Metal's
        recommended working set, the machine's RAM on the CPU, whole. MEMORY_BUDGET_GB=auto is a fraction of
        it, divided between the local_ranks that share it."""

    def peak_memory_bytes(self) -> int | None: ...

    def close(self) -> None: ...
