"""python -m backend_mlx.eval: evaluate a checkpoint or an artifact with MLX, without training
(trainer/eval_file.py; `make eval BACKEND=mlx`)."""

import sys

from backend_mlx.blas import ensure_fast_blas
from trainer import eval_file


def make_session(cfg):
    if __name__ == "__main__":
        ensure_fast_blas("backend_mlx.eval", sys.argv[1:])  # may re-execute this process with OpenBLAS
    from backend_mlx.session import MLXSession  # imported late: --help and bad settings answer at once

    return MLXSession()


def main(argv=None, environ=None):
    return eval_file.main("python -m backend_mlx.eval", make_session, argv, environ)


if __name__ == "__main__":
    main()
