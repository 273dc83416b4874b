"""Shared pieces of the cross-backend parity suite (docs/spec.md §10).

The spec matrix, the error measure rel(a, b) = ||a - b||_2 / ||b||_2, both backends behind the same
small numpy-in / numpy-out functions, a variant of the reference forward with deliberate mutations
(for the tests that prove the suite can fail), the devices the suite runs on, and the collector of
worst errors that tests/parity/conftest.py prints as the final table and writes to
runs/parity/parity_report.json.

Devices. The kernel-level rows (forward, gradients, one optimizer step, the tied head, the exported
weights) run on every device present: torch on the CPU and on cuda and mps when available, MLX on
the CPU and on its GPU (Metal, or CUDA in an MLX CUDA build) when available. devices() probes them;
device_pairs() pairs a torch device with an MLX device so that every present device is compared
with the other backend and with the float64 reference; conftest.py parametrizes every test with a
`pair` argument over those pairs, so an absent device produces no test at all (nothing skipped).
So do the 20-step runs of the two real trainers. The validation, checkpoint and roundtrip rows and
the mutants stay on the CPU: they are labelled "(cpu only)" in the table.

Tolerances are the same on every device (docs/spec.md §10): fp32 means fp32 (TF32 off on CUDA
while a parity computation runs, as TorchSession sets it), so the fp32 rows hold there too; the bf16
rows are bf16 products wherever they run. No row is loosened for a device.

torch and mlx are imported at module level on purpose: a missing backend is a collection error,
that is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import torch
from mlx.utils import tree_flatten

import backend_mlx.model as mlx_model
import backend_torch.model as torch_model
from backend_mlx.session import MLXSession
from backend_torch.session import TorchSession
from backend_torch.threads import single_thread
from core.config import ModelSpec, TrainConfig
from core.init import random_weights

REPO = Path(__file__).resolve().parents[2]
REPORT_PATH = REPO / "runs" / "parity" / "parity_report.json"
BACKENDS = ("torch", "mlx")


def rel(a, b) -> float:
    """docs/spec.md §10: ||a - b||_2 / ||b||_2, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# Devices: every device present, for both backends; the CPU always
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    backend: str          # "torch" or "mlx"
    name: str             # torch: "cpu", "cuda", "mps"; mlx: "cpu", "metal", "cuda" (an MLX CUDA build)
    present: bool = True
    note: str = ""        # why an absent device is absent

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.name}"

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    @property
    def torch_device(self) -> torch.device:
        assert self.backend == "torch", self
        return torch.device(self.name)

    @property
    def mlx_device(self):
        assert self.backend == "mlx", self
        return mx.cpu if self.is_cpu else mx.gpu


def _mlx_cuda_available() -> bool:
    return hasattr(mx, "cuda") and bool(mx.cuda.is_available())


# (backend, name, probe). The probes look the availability functions up when called, so a test can
# monkeypatch torch.cuda.is_available, torch.backends.mps.is_available or mx.metal.is_available.
# MLX has one GPU device, mx.gpu: Metal on a Mac, CUDA in an MLX CUDA build.
DEVICE_PROBES = (
    ("torch", "cpu", lambda: True),
    ("torch", "cuda", lambda: torch.cuda.is_available()),
    ("torch", "mps", lambda: torch.backends.mps.is_available()),
    ("mlx", "cpu", lambda: True),
    ("mlx", "metal", lambda: mx.metal.is_available()),
    ("mlx", "cuda", _mlx_cuda_available),
)


def devices(probes=DEVICE_PROBES) -> list[Device]:
    """Every device the suite knows, present or not, in the order of DEVICE_PROBES. A probe that
    raises makes its device absent, with the error as the note (the header shows it)."""
    out = []
    for backend, name, probe in probes:
        try:
            present, note = bool(probe()), "not present"
        except Exception as err:   # a broken driver: absent, and the header says why
            present, note = False, f"probe failed: {type(err).__name__}: {err}"
        out.append(Device(backend, name, present, "" if present else note))
    return out


def present(devs: list[Device], backend: str | None = None) -> list[Device]:
    return [d for d in devs if d.present and (backend is None or d.backend == backend)]


@dataclass(frozen=True)
class DevicePair:
    """A torch device and an MLX device: each is compared with the float64 reference and with the other."""
    torch: Device
    mlx: Device

    @property
    def label(self) -> str:
        return f"{self.torch.label} vs {self.mlx.label}"

    @property
    def id(self) -> str:   # the test id
        return f"{self.torch.label}-vs-{self.mlx.label}"

    def of(self, backend: str) -> Device:
        return self.torch if backend == "torch" else self.mlx

    @property
    def is_cpu(self) -> bool:
        return self.torch.is_cpu and self.mlx.is_cpu


def device_pairs(devs: list[Device]) -> list[DevicePair]:
    """The CPU pair first, always; then each present GPU device once, paired with the other backend's
    first GPU if it has one (torch:mps vs mlx:metal on a Mac), else with its CPU (torch:cuda vs
    mlx:cpu). Every present device is in a pair; the cost grows with the GPUs present, not their product."""
    cpu = {b: next(d for d in devs if d.backend == b and d.is_cpu) for b in BACKENDS}
    gpus = {b: [d for d in present(devs, b) if not d.is_cpu] for b in BACKENDS}
    pairs = [DevicePair(cpu["torch"], cpu["mlx"])]
    for t in gpus["torch"]:
        pairs.append(DevicePair(t, gpus["mlx"][0] if gpus["mlx"] else cpu["mlx"]))
    paired = {p.mlx for p in pairs}
    for m in gpus["mlx"]:
        if m not in paired:
            pairs.append(DevicePair(gpus["torch"][0] if gpus["torch"] else cpu["torch"], m))
    return pairs


def pair_params(devs: list[Device]) -> tuple[list[DevicePair], list[str]]:
    """(values, ids) of the `pair` parametrization (conftest.pytest_generate_tests)."""
    pairs = device_pairs(devs)
    return pairs, [p.id for p in pairs]


def devices_header(devs: list[Device]) -> str:
    absent = [f"{d.label} ({d.note})" for d in devs if not d.present]
    return (f"devices: {', '.join(d.label for d in present(devs))}; "
            f"absent: {', '.join(absent) if absent else 'none'}")


@contextlib.contextmanager
def on_device(device: Device):
    """Around a computation on `device`. MLX: its default device is set (models, arrays and sessions
    made inside use it; MLXSession reads it in __init__ and setup) and restored after. torch on
    CUDA: TF32 off, as TorchSession sets it, restored after (fp32 means fp32); torch places tensors
    itself (Device.torch_device)."""
    if device.backend == "mlx":
        before = mx.default_device()
        mx.set_default_device(device.mlx_device)
        try:
            yield
        finally:
            mx.set_default_device(before)
    elif device.name == "cuda":
        from backend_torch.precision import exact_fp32

        with exact_fp32():
            yield
    else:
        yield


DEVICES = devices()                      # this session's enumeration, made once at import
PAIRS = device_pairs(DEVICES)
CPU_PAIR = PAIRS[0]
CPU_LABEL = CPU_PAIR.label               # "torch:cpu vs mlx:cpu"


# ---------------------------------------------------------------------------------------------
# The report: every row of docs/spec.md §10 (and the suite's own extra rows), worst error over the matrix
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str
    compared: str
    tolerance: float          # errors must be <= this; for kind "exceeds", must be > this
    tol_text: str
    spec_row: bool            # a row of docs/spec.md §10's table (else an extra check of this suite)
    kind: str = "max"         # "max": the worst is the largest; "exceeds": the worst is the smallest
    expanded: bool = True     # measured on every device pair; False: on the CPU only ("(cpu only)")


ROWS = [
    Row("logits_fp32", "logits and loss, fp32: torch vs MLX, each vs float64 reference", 1e-5, "<= 1e-5", True),
    Row("logits_bf16", "logits and loss, bf16: torch vs MLX, each vs float64 reference", 2e-2, "<= 2e-2", True),
    Row("grads", "gradients of every parameter, torch vs MLX (fp32)", 1e-4, "<= 1e-4", True),
    Row("optim_step", "weights after one Muon + Adam step, torch vs MLX", 1e-5, "<= 1e-5", True),
    Row("recipe_ref", "recipe options: 1 and 20 steps, each backend vs float64 step",
        1e-5, "<= 1e-5", True),
    # The 20-step runs of both real trainers run on every device pair (one run per trainer and device;
    # on the CPU, the runs the checkpoint and validation tests start from). The rows that evaluate,
    # resume or pack (val, checkpoint, trained_roundtrip) stay on the CPU: what they add to the device
    # rows is the loop's, the data's and the formats' code, which has no device code.
    Row("train_losses", "per-step training loss over 20 steps, torch vs MLX", 1e-4, "<= 1e-4", True),
    Row("artifact", "int8+zlib artifact from the same weights (bytes differing)", 0.0, "byte-identical", True),
    Row("val", "val_loss and val_bpb from the same weights and data", 1e-6, "<= 1e-6", True, expanded=False),
    Row("grads_fd", "gradients vs central differences of the float64 reference", 1e-4, "<= 1e-4", False),
    Row("trained_val", "final val_loss/val_bpb after the 20 trained steps", 1e-6, "<= 1e-6", False),
    # The two runs' weights differ by training's rounding (~1e-7), and int8 rounding is a step
    # function: one weight on either side of a rounding boundary moves the roundtrip val by ~1e-6.
    # Same weights give the same artifact bytes (the §10 artifact row); here, the training tolerance.
    Row("trained_roundtrip", "roundtrip val_loss/val_bpb of the two 20-step runs' own artifacts", 1e-4,
        "<= 1e-4", False, expanded=False),
    Row("sliding_val", "sliding-window val (EVAL_STRIDE), torch vs MLX, both attention paths", 1e-6,
        "<= 1e-6", False),
    Row("sliding_ref", "sliding-window val, each backend vs float64 reference windows", 1e-5,
        "<= 1e-5", False),
    Row("sliding_standard", "sliding val, stride = window, vs the other backend's standard val (EVAL_STRIDE=0)", 1e-6,
        "<= 1e-6", False, expanded=False),
    Row("checkpoint", "checkpoint across backends: logits, continued losses, val", 1e-4, "<= 1e-5|1e-4|1e-6", False,
        expanded=False),
    # Data parallelism (docs/spec.md §6, §7): the same 20-step run by 2 MLX ranks under mlx.launch (ring)
    # against the 1-rank MLX run with 2 accumulation steps (the same micro-batches) and torch on 2 gloo ranks.
    Row("ranks_mlx", "per-step train loss, 2 MLX ranks vs 1 MLX rank x 2 accum. steps", 1e-5, "<= 1e-5",
        True, expanded=False),
    Row("ranks_torch", "per-step train loss, 2 MLX ranks vs torch on 2 gloo ranks", 1e-4, "<= 1e-4",
        True, expanded=False),
    Row("ranks_val", "final val_loss/val_bpb, 2 MLX ranks vs those two runs", 1e-6, "<= 1e-6", True,
        expanded=False),
    Row("tied_head", "tied head is tok_emb; unique params vs count_params (abs)", 0.0, "== 0", False),
    # The record's attention options (docs/spec.md §4.1-§4.5; tests/parity/test_parity_record_attention.py),
    # each alone and all together, at the §10 tolerances of the rows above.
    Row("record_attn_logits", "record attention options: logits fp32, torch/MLX/ref, 2 paths",
        1e-5, "<= 1e-5", False),
    Row("record_attn_grads", "record attention options: gradients, torch vs MLX and vs FD", 1e-4,
        "<= 1e-4", False),
    Row("record_attn_step", "record attention options: weights after one Muon + Adam step", 1e-5, "<= 1e-5", False),
    # The record's block and layout options (docs/spec.md §4.6-§4.10), one case per option and all at
    # once, looping off and on: tests/parity/test_parity_record_blocks.py.
    Row("blocks_logits", "record blocks: logits fp32, torch and MLX vs float64 reference", 1e-5, "<= 1e-5", False),
    Row("blocks_grads", "record blocks: gradients, torch vs MLX, vs float64 differences", 1e-4, "<= 1e-4", False),
    Row("blocks_step", "record blocks: weights after one Muon + Adam step, torch vs MLX", 1e-5, "<= 1e-5", False),
    Row("blocks_curve", "record blocks: 8-step losses, looping on at step 5, torch vs MLX", 1e-4, "<= 1e-4", False),
    # The mutants prove the comparison can fail: a property of the reference and the checks, not of a device.
    Row("mutants", "mutants (RoPE reversed, eps, no softcap): smallest error", 1e-5, "> 1e-5", False, "exceeds",
        expanded=False),
]
ROW_BY_KEY = {row.key: row for row in ROWS}


class ParityReport:
    """Worst error per (row, devices), with the case where it was measured.

    `devices` is the enumeration of devices() the session runs on: the table's header lists the
    present and the absent ones, and an expanded row gets one line per device pair of it."""

    def __init__(self, devices: list[Device] | None = None):
        self.devices = list(DEVICES if devices is None else devices)
        self.pairs = device_pairs(self.devices)
        self.worst: dict[tuple[str, str], tuple[float, str]] = {}
        self.count: dict[tuple[str, str], int] = {}

    def record(self, key: str, err: float, case: str, devices: str | None = None) -> None:
        """`devices`: the label of the measurement's devices (a DevicePair's, "torch:cpu vs mlx:cpu" by default)."""
        row = ROW_BY_KEY[key]
        err = float(err)
        slot = (key, CPU_LABEL if devices is None else devices)
        self.count[slot] = self.count.get(slot, 0) + 1
        old = self.worst.get(slot)
        if old is None or (err < old[0] if row.kind == "exceeds" else err > old[0]) or math.isnan(err):
            self.worst[slot] = (err, case)

    def check(self, key: str, err: float, case: str, tol: float | None = None, devices: str | None = None) -> float:
        """Record err under `key` (and `devices`), then assert it is within the row's tolerance (or `tol`)."""
        self.record(key, err, case, devices)
        row = ROW_BY_KEY[key]
        tol = row.tolerance if tol is None else tol
        where = case if devices is None else f"{devices}: {case}"
        if row.kind == "exceeds":
            assert err > tol, f"{key} [{where}]: mutant error {err:.3e} does not exceed {tol:g}"
        else:
            assert err <= tol, f"{key} [{where}]: error {err:.3e} > tolerance {tol:g}"
        return err

    def labels(self, row: Row) -> list[str]:
        """The device labels of a row's lines: every pair if the row is expanded, else the CPU pair;
        then any other label something was recorded under."""
        labels = [p.label for p in self.pairs] if row.expanded else [CPU_LABEL]
        return labels + sorted({d for k, d in self.worst if k == row.key and d not in labels})

    def rows(self) -> list[dict]:
        out = []
        for row in ROWS:
            for label in self.labels(row):
                err, case = self.worst.get((row.key, label), (None, ""))
                ok = None
                if err is not None:
                    ok = err > row.tolerance if row.kind == "exceeds" else err <= row.tolerance
                out.append({"row": row.key, "compared": row.compared, "spec_row": row.spec_row,
                            "devices": label, "cpu_only": not row.expanded,
                            "worst": err, "tolerance": row.tol_text, "ok": ok, "case": case,
                            "measurements": self.count.get((row.key, label), 0)})
        return out

    def header(self) -> str:
        return devices_header(self.devices)

    def table(self) -> list[str]:
        lines = [self.header(),
                 f"{'spec':<5}{'compared':<66}{'devices':<37}{'worst':>10}  {'tolerance':<19}{'n':>5}  worst case"]
        for r in self.rows():
            worst = "-" if r["worst"] is None else f"{r['worst']:.2e}"
            if r["row"] == "artifact" and r["worst"] is not None:
                worst = "identical" if r["worst"] == 0 else f"{int(r['worst'])} bytes"
            flag = "" if r["ok"] in (True, None) else "  FAIL"
            devices = r["devices"] + (" (cpu only)" if r["cpu_only"] else "")
            lines.append(f"{'§10' if r['spec_row'] else '+':<5}{r['compared']:<66}{devices:<37}{worst:>10}  "
                         f"{r['tolerance']:<19}{r['measurements']:>5}  {r['case']}{flag}")
        return lines


REPORT = ParityReport()


# ---------------------------------------------------------------------------------------------
# The spec matrix
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    spec: ModelSpec
    shapes: tuple[tuple[int, int], ...]   # (B, T) batches of the forward tests
    seed: int
    embed_std: float | None = None        # rescale tok_emb to this std (the real tied init is 0.005)

    def weights(self) -> dict[str, np.ndarray]:
        w = random_weights(self.spec, self.seed)
        if self.embed_std is not None:
            e = w["tok_emb.weight"].astype(np.float64)
            w["tok_emb.weight"] = (e * (self.embed_std / e.std())).astype(np.float32)
        return w

    def batch(self, shape: tuple[int, int], salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, shape[0], shape[1], salt])
        V = self.spec.vocab_size
        return rng.integers(0, V, shape), rng.integers(0, V, shape)


# Tied and untied; MHA (K = H), GQA (1 < K < H), MQA (K = 1); depth 1 to 5 and the default 9;
# T from 1 up to 256; softcap 2, 5, 15 and the default 30; rope_base 500 and 1e6; qk_gain_init
# 0.7 and 3; one case at the real tied-embedding scale (std 0.005), where RMSNorm's eps matters.
CASES = [
    Case("tied-gqa-L3", ModelSpec(vocab_size=128, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2),
         ((1, 1), (2, 9), (2, 64)), seed=1),
    Case("untied-mha-L4-cap5", ModelSpec(vocab_size=96, num_layers=4, model_dim=48, num_heads=4, num_kv_heads=4,
                                     tie_embeddings=False, logit_softcap=5.0),
         ((1, 1), (3, 17)), seed=2),
    Case("tied-mqa-L1-rope500-gain0.7", ModelSpec(vocab_size=64, num_layers=1, model_dim=32, num_heads=4,
                                              num_kv_heads=1, rope_base=500.0, qk_gain_init=0.7),
         ((1, 1), (2, 33)), seed=3),
    Case("untied-gqa-L5-cap2-rope1e6-gain3", ModelSpec(vocab_size=80, num_layers=5, model_dim=96, num_heads=8,
                                                   num_kv_heads=2, tie_embeddings=False, logit_softcap=2.0,
                                                   rope_base=1e6, qk_gain_init=3.0),
         ((1, 2), (1, 256)), seed=4),
    Case("tied-mha-L2-cap15-emb0.005", ModelSpec(vocab_size=128, num_layers=2, model_dim=32, num_heads=2,
                                             num_kv_heads=2, logit_softcap=15.0),
         ((1, 1), (2, 16)), seed=5, embed_std=0.005),
    Case("default-spec", ModelSpec(), ((1, 1), (1, 12)), seed=6),
]
CASE_BY_NAME = {c.name: c for c in CASES}
SMALL_CASES = [c for c in CASES if c.name != "default-spec"]   # for the (costly) optimizer steps


def forward_params():
    """(case name, (B, T)) for every forward test."""
    return [(c.name, shape) for c in CASES for shape in c.shapes]


# The training runs (fixture trained_runs of conftest.py) shared by the training, checkpoint and
# artifact tests: one spec, both real trainers, fp32, 20 steps, the same seed and data. Odd depth (skip weights), GQA, two accumulation steps, MLX
# chunks smaller than a micro-batch, a warmdown inside the run, a validation and a checkpoint at 10.
TRAIN_SETTINGS = dict(
    NUM_LAYERS=3, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, ITERATIONS=20, WARMDOWN_ITERS=8,
    TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=512, GRAD_ACCUM_STEPS=2, MLX_MAX_MICROBATCH_TOKENS=128,
    COMPUTE_DTYPE="float32", COMPILE="0", VAL_LOSS_EVERY=10, CHECKPOINT_EVERY=10, TRAIN_LOG_EVERY=10, SEED=11,
)
RESUME_STEP = 10


def run_settings(device: "Device") -> dict[str, str]:
    """The settings of the 20-step run on `device` besides TRAIN_SETTINGS: its run id, and DEVICE for
    torch (MLX reads none: its default device, set by on_device around the run, decides)."""
    run_id = f"full-{device.backend}" if device.is_cpu else f"full-{device.backend}-{device.name}"
    return {"RUN_ID": run_id, "DEVICE": device.name if device.backend == "torch" else "cpu"}


# ---------------------------------------------------------------------------------------------
# Both backends behind numpy in, numpy out
# ---------------------------------------------------------------------------------------------

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def as_device(backend: str | Device) -> Device:
    """A Device as is; a backend name ("torch" or "mlx") means that backend's CPU."""
    return backend if isinstance(backend, Device) else Device(backend, "cpu")


def _torch_model(spec: ModelSpec, w, dtype: str, device: Device):
    # As TorchSession does: built, moved to the device, then the weights copied in.
    return torch_model.GPT(spec, TORCH_DTYPES[dtype]).to(device.torch_device).load_weights(w)


def _torch_ids(a, device: Device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.int64)).to(device.torch_device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """float64 numpy of a tensor on any device (to the CPU first: mps has no float64)."""
    return t.detach().float().cpu().numpy().astype(np.float64)


def logits(backend: str | Device, spec: ModelSpec, w, ids, dtype: str = "float32") -> np.ndarray:
    """(B, T, V) logits as float64 numpy, computed on `backend`'s device (a name: its CPU)."""
    device = as_device(backend)
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, dtype, device)
            with torch.no_grad():
                return to_numpy(model.logits(_torch_ids(ids, device)))
        model = mlx_model.GPT(spec, compute_dtype=MLX_DTYPES[dtype]).load_weights(w)
        return np.array(model.logits(mx.array(np.asarray(ids, np.int32))), dtype=np.float64)


def loss(backend: str | Device, spec: ModelSpec, w, ids, targets, dtype: str = "float32") -> float:
    device = as_device(backend)
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, dtype, device)
            with torch.no_grad():
                return float(model.loss(_torch_ids(ids, device), _torch_ids(targets, device)))
        model = mlx_model.GPT(spec, compute_dtype=MLX_DTYPES[dtype]).load_weights(w)
        return float(model.loss(mx.array(np.asarray(ids, np.int32)), mx.array(np.asarray(targets, np.int32))))


def loss_and_grads(backend: str | Device, spec: ModelSpec, w, ids, targets) -> tuple[float, dict[str, np.ndarray]]:
    """fp32 mean loss and the gradient of every parameter (docs/spec.md §2 names) as float64 numpy."""
    device = as_device(backend)
    with on_device(device):
        if device.backend == "torch":
            model = _torch_model(spec, w, "float32", device)
            value = model.loss(_torch_ids(ids, device), _torch_ids(targets, device))
            value.backward()
            grads = {}
            for name, p in model.named_parameters():
                # A zero-size parameter (skip_weights of a 1-layer model) gets no gradient at all.
                grads[name] = np.zeros(p.shape) if p.grad is None else to_numpy(p.grad)
            return float(value.detach()), grads
        model = mlx_model.GPT(spec).load_weights(w)
        value, grads = mlx_nn.value_and_grad(model, model.loss)(mx.array(np.asarray(ids, np.int32)),
                                                               mx.array(np.asarray(targets, np.int32)))
        return float(value), {name: np.array(g, dtype=np.float64) for name, g in tree_flatten(grads)}


torch_single_thread = single_thread   # backend_torch/threads.py


def train_config(spec: ModelSpec, **overrides) -> TrainConfig:
    """A CPU fp32 TrainConfig for `spec` (no compile, so both sessions run eagerly)."""
    settings = dict(spec.to_dict(), device="cpu", compute_dtype="float32", compile="0")
    settings.update(overrides)
    return TrainConfig(**settings)


def make_session(backend: str, cfg: TrainConfig):
    """A set-up CPU session of either backend, through the trainer.backend interface
    (open_session: on any device)."""
    assert backend in BACKENDS and cfg.device == "cpu", (backend, cfg.device)
    session = TorchSession(cfg, environ={}) if backend == "torch" else MLXSession()
    session.setup(cfg.model_spec(), cfg)
    return session


def session_config(device: Device, cfg: TrainConfig) -> TrainConfig:
    """cfg for a session on `device`: torch reads DEVICE (cpu, cuda, mps); MLX ignores it and uses
    its default device, which open_session sets."""
    return cfg.replace(device=device.name) if device.backend == "torch" else cfg


@contextlib.contextmanager
def open_session(backend: str | Device, cfg: TrainConfig):
    """A set-up session on the device, closed after; for MLX the default device stays set for the
    session's whole life (its arrays and steps run on the default device of when they are made)."""
    device = as_device(backend)
    cfg = session_config(device, cfg)
    with on_device(device):
        session = TorchSession(cfg, environ={}) if device.backend == "torch" else MLXSession()
        try:
            session.setup(cfg.model_spec(), cfg)
            yield session
        finally:
            session.close()


# ---------------------------------------------------------------------------------------------
# A variant reference forward with mutations (docs/spec.md §4, float64), for the tests that must fail
# ---------------------------------------------------------------------------------------------

def variant_logits(spec: ModelSpec, weights, ids, *, rope_sign: float = 1.0, eps: float | None = None,
                   softcap: bool = True) -> np.ndarray:
    """docs/spec.md §4 written again, independently of core.reference, with three switches:
    rope_sign=-1 rotates by -theta (the PyTorch reference script's direction), `eps` replaces
    norm_eps in every RMSNorm, softcap=False drops c*tanh(raw/c) from the head.
    With the defaults it is the spec's function (tests check it against core.reference)."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    eps = spec.norm_eps if eps is None else eps
    H, K, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim

    def norm(x):
        return x * (np.mean(x * x, axis=-1, keepdims=True) + eps) ** -0.5

    def rotate(x):  # x (B, heads, T, hd)
        T, half = x.shape[2], hd // 2
        theta = rope_sign * np.arange(T)[:, None] * spec.rope_base ** (-np.arange(0, hd, 2) / hd)[None, :]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], -1)

    def block(x, x0, i):
        p = f"blocks.{i}."
        x = w[p + "resid_mix"][0] * x + w[p + "resid_mix"][1] * x0
        h = norm(x)
        B, T, _ = h.shape
        q = np.einsum("btd,ed->bte", h, w[p + "attn.c_q.weight"]).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        k = np.einsum("btd,ed->bte", h, w[p + "attn.c_k.weight"]).reshape(B, T, K, hd).transpose(0, 2, 1, 3)
        v = np.einsum("btd,ed->bte", h, w[p + "attn.c_v.weight"]).reshape(B, T, K, hd).transpose(0, 2, 1, 3)
        q = rotate(norm(q)) * w[p + "attn.q_gain"][None, :, None, None]
        k = rotate(norm(k))
        group = H // K
        kv_of = np.arange(H) // group
        s = np.einsum("bhtc,bhsc->bhts", q, k[:, kv_of]) / math.sqrt(hd)
        s = s + np.where(np.tril(np.ones((T, T))) > 0, 0.0, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        y = np.einsum("bhts,bhsc->bhtc", s / s.sum(-1, keepdims=True), v[:, kv_of])
        y = y.transpose(0, 2, 1, 3).reshape(B, T, H * hd) @ w[p + "attn.proj.weight"].T
        x = x + w[p + "attn_scale"] * y
        m = np.maximum(norm(x) @ w[p + "mlp.fc.weight"].T, 0.0) ** 2 @ w[p + "mlp.proj.weight"].T
        return x + w[p + "mlp_scale"] * m

    x = x0 = norm(w["tok_emb.weight"][np.asarray(ids)])
    E, D = spec.num_encoder_layers, spec.num_decoder_layers
    stack = []
    for i in range(E):
        x = block(x, x0, i)
        stack.append(x)
    for j in range(D):
        if stack:
            x = x + w["skip_weights"][j] * stack.pop()
        x = block(x, x0, E + j)
    head = w["tok_emb.weight"] if spec.tie_embeddings else w["lm_head.weight"]
    raw = norm(x) @ head.T
    c = spec.logit_softcap
    return c * np.tanh(raw / c) if softcap else raw

