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
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


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
