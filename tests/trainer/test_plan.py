"""The memory plan as a user meets it: auto micro-steps, --plan, and a run that cannot fit."""

import os
import subprocess
import sys

import pytest

from core import memory
from core.config import load_config
from trainer_helpers import REPO, make_session, run_mlx_ranks, tiny_env, train

BACKENDS = ["torch", "mlx"]
GIB = 2 ** 30


def estimate(backend, env, accum) -> int:
    """The plan's estimate for this run with `accum` micro-steps, as the trainer computes it."""
    from trainer.plan import make_plan

    cfg = load_config([], environ=dict(env, GRAD_ACCUM_STEPS=str(accum), MEMORY_BUDGET_GB="1000"))
    session = make_session(backend, cfg)
    try:
        return make_plan(cfg, session).memory.estimate.total
    finally:
        session.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_micro_steps_fit_the_budget_and_train_as_the_same_value_written_out(backend, tiny_dataset, tmp_path):
    env = tiny_env(tiny_dataset, tmp_path, TRAIN_BATCH_TOKENS=1024)   # one MLX chunk a micro-batch
    one, four = estimate(backend, env, 1), estimate(backend, env, 4)
    assert four < one
    budget = (estimate(backend, env, 2) + four) / 2 / GIB   # 1 and 2 micro-steps do not fit, 4 does
    auto = train(backend, dict(env, RUN_ID="auto", MEMORY_BUDGET_GB=f"{budget:.12f}"))
    log = (tmp_path / "runs" / "auto" / "log.txt").read_text()
    assert "grad_accum_steps:4 " in log and "memory_plan: grad_accum_steps:4 " in log
    explicit = train(backend, dict(env, RUN_ID="explicit", GRAD_ACCUM_STEPS="4"))
    assert auto.train_losses == explicit.train_losses and auto.val_loss == explicit.val_loss
    assert auto.summary["peak_memory_estimate_bytes"] <= budget * GIB


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_that_cannot_fit_is_one_line_before_anything_is_written(backend, tiny_dataset, tmp_path):
    env = os.environ | tiny_env(tiny_dataset, tmp_path, MEMORY_BUDGET_GB="0.0001", RUN_ID="too-big")
    proc = subprocess.run([sys.executable, "-m", f"backend_{backend}.train"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: memory plan: estimated peak ")
    assert "GiB budget (MEMORY_BUDGET_GB=0.0001)" in proc.stderr and "nothing was written" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_with_the_reference_defaults_fits_12_gib_and_writes_nothing(backend, tmp_path):
    """The reference run (9 x 512, 524,288 tokens a step, seq 1024) on a 12 GiB budget: --plan only."""
    env = {k: v for k, v in os.environ.items() if k not in memory_settings()} | {
        "MEMORY_BUDGET_GB": "12", "OUT_DIR": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-m", f"backend_{backend}.train", "--plan"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"plan for {backend} on ") and "524,288 tokens a step = 1 rank(s) x " in out
    assert "budget: 12.00 GiB (MEMORY_BUDGET_GB=12): fits" in out
    estimated = float(out.split("memory: est ")[1].split(" GiB")[0])
    assert 0 < estimated <= 12
    assert not (tmp_path / "runs").exists()


def memory_settings():
    return {"GRAD_ACCUM_STEPS", "MLX_EAGER_EVAL", "MEMORY_BUDGET_GB", "TRAIN_BATCH_TOKENS", "VAL_BATCH_SIZE",
            "NUM_LAYERS", "MODEL_DIM", "TRAIN_SEQ_LEN", "MLX_MAX_MICROBATCH_TOKENS", "PLAN"}


def test_the_auto_budget_is_the_documented_share_of_the_machine(tiny_dataset, tmp_path):
    from trainer.plan import budget_bytes

    cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path))
    session = make_session("torch", cfg)
    budget, source = budget_bytes(cfg, session)
    ram = memory.machine_ram_bytes()
    assert budget == int(0.6 * ram) and source == f"auto: 0.6 of {ram / GIB:.1f} GiB RAM"
    assert budget_bytes(cfg.replace(memory_budget_gb=1.5), session) == (int(1.5 * GIB), "MEMORY_BUDGET_GB=1.5")



def plan_budget(out: str) -> float:
    """The budget --plan prints, in GiB."""
    (line,) = [line for line in out.splitlines() if line.strip().startswith("budget: ")]
    return float(line.split("budget: ")[1].split(" GiB")[0])


def test_two_local_mlx_ranks_split_the_auto_budget_of_their_machine(tiny_dataset, tmp_path):
    """PLAN=1 on 2 local ranks (mlx.launch -n 2): each rank plans for half of what one rank plans for,
    not the whole machine each (two MLX ranks on one Mac each wired 0.75 of its working set)."""
    env = tiny_env(tiny_dataset, tmp_path, PLAN=1, TWINGPT_NO_BLAS_PRELOAD=1)
    one = subprocess.run([sys.executable, "-m", "backend_mlx.train"], cwd=REPO, env=os.environ | env,
                         capture_output=True, text=True)
    two = run_mlx_ranks(env, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert "(world size 2)" in two.stdout and ", split between 2 local ranks)" in two.stdout
    assert plan_budget(two.stdout) <= plan_budget(one.stdout) / 2 + 0.01   # printed to 0.01 GiB


def test_local_torch_ranks_on_the_cpu_split_the_auto_budget_and_gpus_do_not(tiny_dataset, tmp_path, monkeypatch, capsys):
    """torchrun's LOCAL_WORLD_SIZE processes on one CPU share its RAM; on CUDA each rank has its own GPU.
    (Two real torchrun ranks cost a minute here; the session reads what torchrun sets.)"""
    from backend_torch.session import TorchSession
    from trainer.loop import print_plan

    cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path, PLAN=1))
    budgets = []
    for environ in ({}, {"LOCAL_WORLD_SIZE": "2"}):
        session = TorchSession(cfg, environ=environ)
        print_plan(cfg, session)
        budgets.append(plan_budget(capsys.readouterr().out))
    assert budgets[1] <= budgets[0] / 2 + 0.01
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: (9, 0))
    from backend_torch.session import resolve_runtime
    assert resolve_runtime(cfg.replace(device="cuda"), {"LOCAL_WORLD_SIZE": "8"}).local_ranks == 1


def test_the_geometry_is_checked_once_with_one_error_and_gives_plain_numbers():
    from core.config import TrainConfig
    from core.errors import ConfigError
    from trainer.plan import eval_geometry, micro_batch_tokens, run_geometry

    cfg = TrainConfig(train_batch_tokens=8192, train_seq_len=256, val_batch_size=65536, eval_seq_len=512)
    assert micro_batch_tokens(cfg, 2, 2) == 2048   # 8 sequences a micro-step on each rank
    with pytest.raises(ConfigError, match="^TRAIN_BATCH_TOKENS=8192: must split into WORLD_SIZE=3 x GRAD_ACCUM_STEPS=1 "):
        micro_batch_tokens(cfg, 3, 1)
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS=8192: must split into WORLD_SIZE=1 x GRAD_ACCUM_STEPS=64 "):
        micro_batch_tokens(cfg, 1, 64)   # 128 tokens: half a sequence
    g = run_geometry(cfg, 2, 4, eager_eval=True)
    # validation: VAL_BATCH_SIZE / (WORLD_SIZE x GRAD_ACCUM_STEPS) = 8192 tokens a rank, as the reference
    assert (g.micro_steps, g.micro_batch_tokens, g.val_batch_seqs, g.sliding_batch_seqs) == (4, 1024, 32, 16)
    assert run_geometry(cfg.replace(eval_batch_seqs=3), 2, 4, eager_eval=True).sliding_batch_seqs == 3
    # make eval: no training batch to check; GRAD_ACCUM_STEPS=auto counts as one micro-step
    assert eval_geometry(cfg.replace(train_batch_tokens=100), 1).val_batch_seqs == 256


def test_every_runtime_auto_is_resolved_by_one_rule_from_the_facts_a_backend_reports():
    """Both backends hand trainer/plan.py what the machine has; the settings' auto becomes plain values there."""
    from core.config import TrainConfig
    from core.errors import ConfigError
    from trainer.plan import device_choice, runtime_choices, wired_limit_bytes

    auto = TrainConfig()
    assert (device_choice("auto", True, False, 1), device_choice("auto", False, True, 1)) == ("cuda", "cpu")
    assert (device_choice("cpu", True, False, 1), device_choice("mps", False, True, 1)) == ("cpu", "mps")
    for device, cuda, mps, world in (("cuda", False, True, 1), ("mps", True, False, 1), ("mps", False, True, 2)):
        with pytest.raises(ConfigError, match=f"^DEVICE={device}: "):
            device_choice(device, cuda, mps, world)
    # CUDA (bf16 from sm80) and Metal: bf16, compiled; the CPU and mps: fp32, eager; set values honoured.
    assert runtime_choices(auto, "cuda", True) == runtime_choices(auto, "metal", True) == ("bfloat16", True)
    assert runtime_choices(auto, "cuda", False) == ("float32", True)
    assert runtime_choices(auto, "cpu", False) == runtime_choices(auto, "mps", False) == ("float32", False)
    assert runtime_choices(auto.replace(compute_dtype="bfloat16", compile="1"), "cpu", False) == ("bfloat16", True)
    assert runtime_choices(auto.replace(compute_dtype="float32", compile="0"), "cuda", True) == ("float32", False)
    # Metal's wired memory: the planned budget within this rank's share; nothing before a plan.
    assert wired_limit_bytes(auto, 16 * GIB, 1) is None
    assert wired_limit_bytes(auto.replace(memory_budget_gb=12.0), 16 * GIB, 1) == 12 * GIB
    assert wired_limit_bytes(auto.replace(memory_budget_gb=12.0), 16 * GIB, 2) == 8 * GIB


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_plan_counts_the_ema_copy_of_the_weights_when_ema_decay_is_set(backend, tiny_dataset, tmp_path):
    """A run with EMA_DECAY > 0 keeps a float32 copy of every weight: the plan's estimate says so."""
    from core.params import count_params
    from trainer.plan import make_plan

    plans = {}
    for decay in ("0", "0.99"):
        cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path, EMA_DECAY=decay, GRAD_ACCUM_STEPS="1",
                                               MEMORY_BUDGET_GB="1000"))
        session = make_session(backend, cfg)
        try:
            plans[decay] = make_plan(cfg, session).memory.estimate
        finally:
            session.close()
    assert plans["0"].ema == 0
    assert plans["0.99"].ema >= 4 * count_params(cfg.model_spec()).unique
    assert plans["0.99"].total - plans["0"].total == plans["0.99"].ema
