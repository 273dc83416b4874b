"""python -m backend_mlx.train: train with MLX (Metal on Apple silicon, the CPU backend on Linux).

The same settings, log lines, checkpoints and artifact as python -m backend_torch.train.
"""

import sys

from backend_mlx.blas import ensure_fast_blas
from trainer import loop as train_loop


def make_session(cfg):
    if __name__ == "__main__":
        ensure_fast_blas("backend_mlx.train", sys.argv[1:])  # may re-execute this process with OpenBLAS
    from backend_mlx.session import MLXSession  # imported late: --help and bad settings answer at once

    return MLXSession()


def main(argv=None):
    return train_loop.main("python -m backend_mlx.train", make_session, argv)


if __name__ == "__main__":
    main()
