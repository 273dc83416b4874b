"""python -m backend_mlx.sample: continue a prompt with a checkpoint, in MLX (trainer/sampling.py).

The model runs in fp32 on MLX's default device (Metal on a Mac, the CPU on Linux); tokens are
chosen on the host.
"""

import sys

import numpy as np

from backend_mlx.blas import ensure_fast_blas
from core.errors import exit_on_user_error
from trainer.sampling import parse_sample_settings, run_sampling


def make_last_logits(spec, weights, looping: bool = False):
    """The GPT of these weights, as trainer.sampling's LastLogits: (1, T) ids + caches -> (V,) numpy."""
    import mlx.core as mx

    from backend_mlx.model import GPT

    model = GPT(spec).load_weights(weights)
    model.looping = looping

    def last_logits(ids: np.ndarray, caches: list) -> np.ndarray:
        out = model.logits(mx.array(ids.astype(np.int32)), caches)[0, -1]
        # Evaluate the caches with the logits, so the next step's graph starts from arrays, not from
        # every earlier step's lazy graph.
        mx.eval(out, [(c["k"], c["v"]) for c in caches])
        return np.array(out)

    return last_logits


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_sample_settings(argv, prog="python -m backend_mlx.sample")
    if __name__ == "__main__":
        ensure_fast_blas("backend_mlx.sample", list(argv))  # may re-execute this process with OpenBLAS
    return run_sampling(settings, make_last_logits, backend="mlx")


if __name__ == "__main__":
    main()
