"""resolve_runtime's choices for CUDA and mps, with the device's availability injected (no GPU needed).

Every device, dtype and compile choice of the torch backend is made in resolve_runtime, so these
are the choices a GPU run gets; a CPU run takes the same function with only the answers different.
"""

import pytest
import torch

from backend_torch.session import TorchSession, resolve_runtime
from core.config import load_config
from core.errors import ConfigError

TINY = {"VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1"}


def runtime(environ: dict, **settings):
    cfg = load_config([], environ=TINY | {k: str(v) for k, v in settings.items()})
    rt = resolve_runtime(cfg, environ)
    return rt.device, rt.compute_dtype, rt.compile, rt.rank, rt.local_rank, rt.world_size


@pytest.fixture
def cuda(monkeypatch):
    """An H100 (sm90) stood in; the SDPA kernel flags recorded, not set (the CPU's SDPA reads them too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    pinned = {}
    for kernel in ("flash", "mem_efficient", "math", "cudnn"):
        monkeypatch.setattr(torch.backends.cuda, f"enable_{kernel}_sdp",
                            lambda on, kernel=kernel: pinned.__setitem__(kernel, on))
    return pinned


@pytest.fixture
def mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cuda_defaults_to_bf16_and_compile_on_the_local_rank(cuda, device):
    torchrun = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}   # the second GPU of the third node
    assert runtime(torchrun, DEVICE=device) == (torch.device("cuda", 1), "bfloat16", True, 5, 1, 8)
    assert runtime({}, DEVICE=device) == (torch.device("cuda", 0), "bfloat16", True, 0, 0, 1)


def test_cuda_honours_compute_dtype_and_compile_overrides(cuda):
    assert runtime({}, DEVICE="cuda", COMPUTE_DTYPE="float32")[1:3] == ("float32", True)
    assert runtime({}, DEVICE="cuda", COMPILE=0)[1:3] == ("bfloat16", False)
    assert runtime({}, DEVICE="cuda", COMPUTE_DTYPE="float32", COMPILE=0)[1:3] == ("float32", False)


def test_device_cpu_stays_on_the_cpu_when_cuda_is_there(cuda):
    assert runtime({}, DEVICE="cpu") == (torch.device("cpu"), "float32", False, 0, 0, 1)
    assert runtime({}, DEVICE="cpu", COMPUTE_DTYPE="bfloat16", COMPILE=1)[:3] == (torch.device("cpu"), "bfloat16", True)


@pytest.fixture
def tf32_on():
    """TF32 allowed for matrix products and cuDNN convolutions, through the fp32_precision API (the
    legacy allow_tf32 flags may not be mixed with it), then put back as it was."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision   # module properties: monkeypatch cannot restore them
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    yield
    matmul.fp32_precision, conv.fp32_precision = before


def test_a_torch_session_on_cuda_turns_tf32_off(cuda, tf32_on, monkeypatch):
    """The session's constructor is the one place that touches the GPU before setup: set_device and
    the device's name. With those two stubbed it runs here, and must leave TF32 off for matrix
    products and cuDNN, whatever they were (fp32 means fp32: parity holds on GPUs too), through the
    current API."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Injected GPU")
    cfg = load_config([], environ=TINY | {"DEVICE": "cuda"})
    session = TorchSession(cfg, environ={"LOCAL_RANK": "1"})
    assert session.device == "cuda:1 (Injected GPU)" and session.device_kind == "cuda"
    assert (session.compute_dtype, session.compiled) == ("bfloat16", True)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"


def test_mps_is_opt_in_fp32_and_eager_by_default(mps):
    assert runtime({}, DEVICE="mps") == (torch.device("mps"), "float32", False, 0, 0, 1)
    assert runtime({}, DEVICE="mps", COMPUTE_DTYPE="bfloat16", COMPILE=1)[:3] == (torch.device("mps"), "bfloat16", True)
    assert runtime({}, DEVICE="auto")[0] == torch.device("cpu")   # auto never picks mps
    with pytest.raises(ConfigError, match="DEVICE=mps: one process only \\(WORLD_SIZE=2\\)"):
        runtime({"WORLD_SIZE": "2"}, DEVICE="mps")


def test_auto_without_a_gpu_is_the_cpu_in_fp32_eager(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime({}, DEVICE="auto") == (torch.device("cpu"), "float32", False, 0, 0, 1)


@pytest.mark.parametrize("gpu, capability, auto_dtype, kernel", [
    ("H100", (9, 0), "bfloat16", "flash"), ("A100", (8, 0), "bfloat16", "flash"),
    ("T4", (7, 5), "float32", "efficient"), ("V100", (7, 0), "float32", "efficient")])
def test_cuda_picks_bf16_and_flash_from_sm80_and_pins_sdpa_to_one_kernel(cuda, monkeypatch, gpu, capability,
                                                                         auto_dtype, kernel):
    """The reference's choice (flash alone, no cuDNN, no math fallback) where flash exists; below sm80
    fp32 and the memory-efficient kernel alone (no bf16 tensor cores, no flash): never a silent fall
    to the math kernel's B·H·T² scores."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: gpu)
    session = TorchSession(load_config([], environ=TINY | {"DEVICE": "cuda"}), environ={})
    assert session.compute_dtype == auto_dtype and session.runtime.attention == kernel
    assert cuda == {"flash": kernel == "flash", "mem_efficient": kernel == "efficient", "math": False, "cudnn": False}
    assert f"attention:{kernel}" in session.notes[0]
    fp32 = resolve_runtime(load_config([], environ=TINY | {"DEVICE": "cuda", "COMPUTE_DTYPE": "float32"}), {})
    assert fp32.attention == "efficient"    # flash has no fp32
    documents = resolve_runtime(load_config([], environ=TINY | {"DEVICE": "cuda", "DOC_ATTENTION_ENABLED": "1"}), {})
    assert documents.attention == "efficient"   # flash takes no mask
    if capability < (8, 0):
        with pytest.raises(ConfigError, match=f"COMPUTE_DTYPE=bfloat16: this GPU \\(sm_{capability[0]}{capability[1]}\\) "
                                              "has no bf16 tensor cores"):
            runtime({}, DEVICE="cuda", COMPUTE_DTYPE="bfloat16")


def test_mps_and_the_cpu_attention_kernels(mps):
    assert resolve_runtime(load_config([], environ=TINY | {"DEVICE": "mps"}), {}).attention == "math"
    assert resolve_runtime(load_config([], environ=TINY | {"DEVICE": "cpu"}), {}).attention == "blocked"


@pytest.mark.parametrize("kernel, in_place", [("flash", True), ("efficient", False), ("math", False)])
def test_only_the_flash_kernel_gets_grouped_kv_heads_in_place(kernel, in_place, monkeypatch):
    """enable_gqa is flash-only: given to the memory-efficient kernel (below sm80) it falls to the math
    kernel; on mps GQA with a mask aborts on several torch versions. Elsewhere K/V come expanded."""
    import numpy as np

    from backend_torch import model as torch_model
    from backend_torch.attention_kernels import use_kernel

    spec = load_config([], environ=TINY | {"NUM_HEADS": "4", "NUM_KV_HEADS": "2"}).model_spec()
    model = torch_model.GPT(spec, torch.bfloat16)
    use_kernel(model, kernel)
    for block in model.blocks:
        block.attn.fused_attention = True       # the GPU's path, on the CPU
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((k.size(1), kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch_model.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.logits(torch.from_numpy(np.zeros((1, 8), dtype=np.int64)))
    assert set(seen) == {(2, True) if in_place else (4, False)}


def test_mps_copies_block_and_validation_reaches_float64_on_the_host(monkeypatch):
    """mps stood in: a tensor whose float64 cast raises as mps's does, until it is on the host; and the
    host-to-device copy of the token ids must wait (non_blocking copies to mps can read freed memory)."""
    import numpy as np

    from backend_torch import session as torch_session
    from core.init import init_weights

    class OnMPS(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            wants64 = func is torch.Tensor.double or (func is torch.Tensor.to and (
                torch.float64 in args[1:] or kwargs.get("dtype") == torch.float64))
            if wants64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                                "float64. Please use float32 instead.")
            out = super().__torch_function__(func, types, args, kwargs)
            leaves = func in (torch.Tensor.cpu, torch.Tensor.to) and isinstance(out, torch.Tensor)
            return out.as_subclass(torch.Tensor) if leaves else out

    cfg = load_config([], environ=TINY | {"DEVICE": "cpu", "TRAIN_SEQ_LEN": "8"})
    session = TorchSession(cfg, environ={})
    session.setup(cfg.model_spec(), cfg)
    session.load_weights(init_weights(cfg.model_spec(), 0))
    x = np.arange(16).reshape(2, 8) % 64
    expected = session.eval_token_losses(x, x)
    loss = session.model.loss
    monkeypatch.setattr(session.model, "loss", lambda *a, **k: loss(*a, **k).as_subclass(OnMPS))
    got = session.eval_token_losses(x, x)
    assert got.dtype == np.float64 and np.array_equal(got, expected)

    copies = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, **kw: copies.append(kw) or to(self, "cpu"))
    torch_session.to_device(x, torch.device("mps"))
    torch_session.to_device(x, torch.device("cuda", 0))
    assert copies == [{"non_blocking": False}, {"non_blocking": True}]


def test_nccl_gets_the_device_id_except_on_the_torch_versions_where_it_hangs():
    from backend_torch.session import nccl_device_id

    gpu = torch.device("cuda", 3)
    for version in ("2.5.1+cu124", "2.6.0", "2.7.1", "2.9.0", "2.14.1+cu130"):
        assert nccl_device_id(version, gpu) == gpu, version
    for version in ("2.6.1", "2.7.0+cu126"):
        assert nccl_device_id(version, gpu) is None, version


def test_the_process_group_times_out_after_collective_timeout_seconds(cuda, monkeypatch):
    """A collective that a failed or hung peer never joins must fail after COLLECTIVE_TIMEOUT_SECONDS,
    not torch's default 10 minutes (NCCL) or 30 (gloo); NCCL is bound to this rank's GPU."""
    from datetime import timedelta

    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Injected GPU")
    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    TorchSession(load_config([], environ=TINY | {"DEVICE": "cuda", "COLLECTIVE_TIMEOUT_SECONDS": "7"}), environ=torchrun)
    TorchSession(load_config([], environ=TINY | {"DEVICE": "cpu"}), environ=torchrun)
    assert [(c["backend"], c["timeout"], c["device_id"]) for c in calls] == [
        ("nccl", timedelta(seconds=7), torch.device("cuda", 1)), ("gloo", timedelta(seconds=60), None)]
