"""python -m backend_mlx.train: train with MLX (Metal on Apple silicon, the CPU backend on Linux).

The same settings, log lines, checkpoints and artifact as python -m backend_torch.train.
"""

import sys

from backend_mlx.blas import ensure_fast_blas
from core.config import load_config
from core.errors import exit_on_user_error
from core.train_loop import run_training


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv, prog="python -m backend_mlx.train")
    if __name__ == "__main__":
        ensure_fast_blas("backend_mlx.train", list(argv))  # may re-execute this process with OpenBLAS
    from backend_mlx.session import MLXSession  # after the config, so --help and bad settings are instant

    session = MLXSession()
    try:
        return run_training(cfg, session)
    finally:
        session.close()


if __name__ == "__main__":
    main()
