"""python -m backend_mlx.quantize: re-quantize a checkpoint with MLX's calibration statistics and score
the round trip (trainer/quantize_file.py; `make quantize BACKEND=mlx`)."""

import sys

from backend_mlx.blas import ensure_fast_blas
from trainer import quantize_file


def make_session(cfg):
    if __name__ == "__main__":
        ensure_fast_blas("backend_mlx.quantize", sys.argv[1:])  # may re-execute this process with OpenBLAS
    from backend_mlx.session import MLXSession  # imported late: --help and bad settings answer at once

    return MLXSession()


def main(argv=None, environ=None):
    return quantize_file.main("python -m backend_mlx.quantize", make_session, argv, environ)


if __name__ == "__main__":
    main()
