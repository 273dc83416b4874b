"""Running either trainer in-process on the tiny dataset of conftest.py."""

from pathlib import Path

from core.config import load_config
from trainer.loop import run_training

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "VOCAB_SIZE": "512", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "8", "WARMUP_STEPS": "0",
    "WARMDOWN_ITERS": "4", "VAL_BATCH_SIZE": "4096", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
    "MAX_WALLCLOCK_SECONDS": "0", "DEVICE": "cpu", "SEED": "7",
}


def tiny_env(tiny_dataset, tmp_path, **overrides) -> dict[str, str]:
    """Environment variables of a tiny run writing under tmp_path/runs."""
    data_path, tokenizer = tiny_dataset
    env = dict(TINY, DATA_PATH=data_path, TOKENIZER_PATH=tokenizer, OUT_DIR=str(tmp_path / "runs"))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def make_session(backend: str, cfg):
    if backend == "torch":
        from backend_torch.session import TorchSession
        return TorchSession(cfg, environ={})
    from backend_mlx.session import MLXSession
    return MLXSession()


def train(backend: str, env: dict[str, str]):
    cfg = load_config([], environ=env)
    session = make_session(backend, cfg)
    try:
        return run_training(cfg, session)
    finally:
        session.close()
