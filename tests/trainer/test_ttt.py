"""Score-first test-time training (trainer/ttt.py, backend_*/ttt.py, docs/spec.md §14): the same
figures in both backends, the legality record catching an evaluation that learns before it scores,
TTT at the end of training and in make eval, and bad settings as one-line errors with exit 2."""

import json

import numpy as np
import pytest

import backend_mlx.eval as mlx_eval
import backend_torch.eval as torch_eval
from core.checkpoint import save_checkpoint
from core.config import ModelSpec, TrainConfig
from core.init import random_weights
from core.metrics import ByteTables
from trainer import check_submission
from trainer.ttt import evaluate_ttt, legality_line, record_legal
from trainer_helpers import make_session, tiny_env, train

V = 64
TABLES = ByteTables(base_bytes=(np.arange(V) % 4 + 1).astype(np.int16), has_leading_space=np.arange(V) % 3 == 0,
                    is_boundary=np.arange(V) == 1)
SPEC = ModelSpec(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
BASE = TrainConfig(**SPEC.to_dict(), train_seq_len=32, ttt_chunk_size=8, ttt_lora_rank=4, ttt_lora_lr=1e-3,
                   ttt_grad_steps=2, ttt_batch_size=2, phased_ttt_prefix_docs=0, global_ttt_chunk_tokens=48,
                   global_ttt_batch_seqs=2, device="cpu")


@pytest.fixture(autouse=True)
def torch_one_thread():
    """Windows of one document are small: torch's thread pool costs more than it gives on them here
    (measured 3 s with one thread, 53 s with two on this busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def documents(lengths, seed=0):
    """BOS-led documents of random tokens (ids 2..V-1), one after another."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate([[1], rng.integers(2, V, n)]) for n in lengths]).astype(np.uint16)


def ttt(backend, cfg, tokens, **kwargs):
    session = make_session(backend, cfg)
    session.setup(SPEC, cfg)
    session.load_weights(random_weights(SPEC, seed=3))
    return evaluate_ttt(session.ttt_adapter(cfg), tokens, TABLES, cfg, bos_id=1, **kwargs)


def test_torch_and_mlx_give_the_same_ttt_figures_with_adapters_and_global_phases():
    tokens = documents([70, 20, 45, 9, 33, 60])
    cfg = BASE.replace(phased_ttt_prefix_docs=4, phased_ttt_num_phases=2)
    got = {backend: ttt(backend, cfg, tokens) for backend in ("torch", "mlx")}
    t, m = got["torch"], got["mlx"]
    assert abs(t.val_bpb - m.val_bpb) <= 1e-4 * t.val_bpb and abs(t.val_loss - m.val_loss) <= 1e-4 * t.val_loss
    assert t.phases_run == m.phases_run == 2 and t.targets == len(tokens) - 1
    assert record_legal(t.record) and t.record == m.record
    assert t.record["adapter_updates"] > 0 and t.record["global_updates"] == 2 + 4   # each phase: every document scored so far
    frozen = ttt("mlx", cfg.replace(ttt_lora_lr=0.0, phased_ttt_prefix_docs=0), tokens)
    assert abs(frozen.val_bpb - m.val_bpb) > 1e-3 * m.val_bpb   # the adaptation changed the figures


def test_documents_shorter_than_a_chunk_leave_legal_ttt_nothing_to_learn_from():
    tokens = documents([3, 6, 5, 6, 2, 6])   # every document fits in one chunk of 8 targets (its own n and the next BOS)
    frozen = ttt("mlx", BASE.replace(ttt_lora_lr=0.0), tokens)
    progress = []
    legal = ttt("mlx", BASE.replace(ttt_lora_lr=0.05), tokens, on_progress=lambda *a: progress.append(a))
    done = [d for d, _ in progress]                    # after every chunk: one a document here
    assert len(done) == 6 and done == sorted(done) and progress[-1] == (len(tokens) - 1, len(tokens) - 1)
    assert legal.val_bpb == frozen.val_bpb and legal.record["adapter_updates"] == 0 and record_legal(legal.record)
    cheat = ttt("mlx", BASE.replace(ttt_lora_lr=0.05), tokens, update_before_score=True)
    assert cheat.val_bpb < frozen.val_bpb - 0.01       # learning the tokens before scoring them pays ...
    assert not record_legal(cheat.record)              # ... and the record says so
    assert not cheat.record["score_before_update"] and cheat.record["unscored_tokens_used"] == 6
    assert "unscored token" in cheat.record["first_violation"]


def test_an_adapter_that_keeps_what_it_learned_across_documents_is_caught():
    session = make_session("mlx", BASE)
    session.setup(SPEC, BASE)
    session.load_weights(random_weights(SPEC, seed=3))
    adapter = session.ttt_adapter(BASE)
    adapter.reset = lambda: None                       # a reset that forgets to reset
    result = evaluate_ttt(adapter, documents([20, 20]), TABLES, BASE, bos_id=1)
    assert not result.record["adapters_reset_per_document"] and not record_legal(result.record)
    assert result.record["violations"]["adapter_not_reset"] == 1   # the second document found it trained


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    data_path, tokenizer = tiny_dataset
    spec = ModelSpec(vocab_size=512, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    config = TrainConfig(**spec.to_dict(), data_path=data_path, tokenizer_path=tokenizer, train_seq_len=32,
                         val_batch_size=2048)
    path = tmp_path_factory.mktemp("ttt") / "step_000001.safetensors"
    save_checkpoint(path, spec=spec, config=config, step=1, weights=random_weights(spec, seed=5),
                    optimizer_state={}, data_state={})
    return path


MAINS = {"torch": torch_eval.main, "mlx": mlx_eval.main}
TTT_ENV = {"DEVICE": "cpu", "TTT_ENABLED": "1", "TTT_CHUNK_SIZE": "64", "TTT_EVAL_SEQ_LEN": "64", "TTT_LORA_RANK": "4", "TTT_LORA_LR": "1e-3"}


def test_make_eval_with_ttt_gives_the_same_figures_in_both_backends(checkpoint, capsys, tmp_path):
    got = {}
    for backend, main in MAINS.items():
        got[backend] = main([], {**TTT_ENV, "CHECKPOINT": str(checkpoint), "OUT": str(tmp_path / f"{backend}.json")})
        lines = capsys.readouterr().out.strip().splitlines()
        f = got[backend]
        assert lines[1].startswith(f"eval_ttt backend:{backend} ") and f"val_bpb:{f['ttt_val_bpb']:.8f}" in lines[1]
        assert lines[2].startswith("ttt_legality score_before_update:1 adapters_reset_per_document:1")
        assert json.loads((tmp_path / f"{backend}.json").read_text())["ttt_legality"]["score_before_update"]
    t, m = got["torch"], got["mlx"]
    assert abs(t["ttt_val_bpb"] - m["ttt_val_bpb"]) <= 1e-4 * t["ttt_val_bpb"]
    assert t["ttt_val_bpb"] != t["val_bpb"]


@pytest.mark.parametrize("env,message", [
    ({"TTT_LORA_RANK": "0"}, "error: TTT_LORA_RANK=0: must be positive"),
    ({"TTT_BETA2": "1"}, "error: TTT_BETA2=1.0: must be in [0, 1)"),
    ({"TTT_CHUNK_SIZE": "65"}, "error: TTT_CHUNK_SIZE=65: must not exceed the TTT window 64"),
    ({"EVAL_TIME_BUDGET_SECONDS": "1e-9"}, "error: EVAL_TIME_BUDGET_SECONDS=1e-09: the test-time training "
                                           "evaluation ran out of time before its first document was done"),
])
def test_bad_ttt_settings_are_one_line_errors_with_exit_status_2(checkpoint, env, message, capsys):
    with pytest.raises(SystemExit) as e:
        mlx_eval.main([], {**TTT_ENV, "CHECKPOINT": str(checkpoint), **env})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


@pytest.fixture(scope="module")
def ttt_run(tiny_dataset, tmp_path_factory):
    """A tiny MLX training run with TTT_ENABLED=1: its folder."""
    tmp = tmp_path_factory.mktemp("ttt_run")
    return train("mlx", tiny_env(tiny_dataset, tmp, TTT_ENABLED=1, TTT_CHUNK_SIZE=64, TTT_EVAL_SEQ_LEN=64,
                                 TTT_LORA_RANK=4, RUN_ID="ttt")).run_dir


def test_training_ends_with_the_ttt_figures_and_their_legality_record(ttt_run):
    summary = json.loads((ttt_run / "summary.json").read_text())
    assert summary["ttt_legality"]["score_before_update"] and summary["ttt_targets"] > 0
    log = (ttt_run / "log.txt").read_text()
    assert f"final_int8_zlib_roundtrip_ttt val_loss:{summary['ttt_val_loss']:.8f}" in log
    assert "ttt_legality score_before_update:1" in log


def check(capsys, run):
    code = check_submission.main([], {"RUN": str(run)})
    return code, capsys.readouterr().out


def test_check_submission_passes_a_legal_run_and_fails_one_that_learned_before_scoring(ttt_run, tmp_path, capsys):
    code, out = check(capsys, ttt_run)
    assert code == 0 and out.rstrip().endswith("verdict: PASS (every check held)")
    assert "score before update                   held" in out and "evaluation time (ttt)" in out
    # The same log, but with the record of an evaluation that trained on each chunk before scoring it.
    cheat = ttt("mlx", BASE.replace(ttt_lora_lr=0.05), documents([3, 6, 5]), update_before_score=True)
    log = (ttt_run / "log.txt").read_text()
    legal_line = next(line for line in log.splitlines() if line.startswith("ttt_legality "))
    (tmp_path / "cheat.txt").write_text(log.replace(legal_line, legality_line(cheat.record)))
    code, out = check(capsys, tmp_path / "cheat.txt")
    assert code == 1 and "verdict: FAIL (2 check(s) failed)" in out
    assert "score before update                   VIOLATED" in out
    assert "validation tokens used before scored  3 update(s)" in out
    # A run whose TTT evaluation passed its budget: the log's error line, no figures, no record.
    lines = [line for line in log.splitlines() if not line.startswith(("final_int8_zlib_roundtrip_ttt", "ttt_legality"))]
    lines.append("final_int8_zlib_roundtrip_ttt error: EVAL_TIME_BUDGET_SECONDS=600: ran out of time")
    (tmp_path / "slow.txt").write_text("\n".join(lines) + "\n")
    code, out = check(capsys, tmp_path / "slow.txt")
    row = next(line for line in out.splitlines() if line.startswith("evaluation time"))
    assert code == 1 and "over (EVAL_TIME_BUDGET_SECONDS=600" in row and row.endswith("FAIL")


def test_ttt_runs_in_one_process_only():
    from core.errors import ConfigError
    from trainer.ttt import check_ttt_runnable

    check_ttt_runnable(BASE, world_size=2)                      # off: nothing to say
    with pytest.raises(ConfigError, match="TTT_ENABLED=1: the test-time training evaluation runs in one process"):
        check_ttt_runnable(BASE.replace(ttt_enabled=True), world_size=2)


def test_the_adapters_adamw_is_torchs_adamw_in_both_backends():
    """Three steps on fixed gradients against torch.optim.AdamW (the record's optimizer), betas and
    weight decay not the defaults, so every term counts."""
    import mlx.core as mx
    import torch

    cfg = BASE.replace(ttt_lora_lr=0.01, ttt_beta1=0.5, ttt_beta2=0.9, ttt_weight_decay=0.3)
    adapters = {}
    for backend in ("torch", "mlx"):
        session = make_session(backend, cfg)
        session.setup(SPEC, cfg)
        adapters[backend] = session.ttt_adapter(cfg)
    names = list(adapters["torch"].lora)
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(tuple(adapters["torch"].lora[k].shape)).astype(np.float32) for k in names}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(3)]
    oracle = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start.items()}
    opt = torch.optim.AdamW(oracle.values(), lr=0.01, betas=(0.5, 0.9), eps=1e-10, weight_decay=0.3)
    for g in grads:
        for k, p in oracle.items():
            p.grad = torch.from_numpy(g[k])
        opt.step()
    with torch.no_grad():
        for k in names:
            adapters["torch"].lora[k].copy_(torch.from_numpy(start[k]))
    adapters["mlx"].lora = {k: mx.array(start[k]) for k in names}
    for g in grads:
        adapters["torch"]._adamw({k: torch.from_numpy(v) for k, v in g.items()})
        adapters["mlx"]._adamw({k: mx.array(v) for k, v in g.items()})
    for k in names:
        want = oracle[k].detach().numpy()
        assert np.allclose(adapters["torch"].lora[k].detach().numpy(), want, rtol=1e-5, atol=1e-6)
        assert np.allclose(np.array(adapters["mlx"].lora[k]), want, rtol=1e-5, atol=1e-6)
