"""python -m backend_torch.sample: continue a prompt with a checkpoint, in PyTorch (trainer/sampling.py).

The model runs in fp32, on CUDA when available, else on the CPU; tokens are chosen on the host.
"""

import sys

import numpy as np

from core.errors import exit_on_user_error
from trainer.sampling import parse_sample_settings, run_sampling


def make_last_logits(spec, weights, device=None, looping: bool = False):
    """The GPT of these weights, as trainer.sampling's LastLogits: (1, T) ids + caches -> (V,) numpy."""
    import torch

    from backend_torch.model import GPT
    from backend_torch.precision import tf32_off

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf32_off()  # fp32 means fp32, as in training: same logits as MLX
    model = GPT(spec).to(device).load_weights(weights).eval()
    model.looping = looping

    @torch.inference_mode()
    def last_logits(ids: np.ndarray, caches: list) -> np.ndarray:
        return model.logits(torch.from_numpy(ids).to(device), caches)[0, -1].cpu().numpy()

    return last_logits


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_sample_settings(argv, prog="python -m backend_torch.sample")
    return run_sampling(settings, make_last_logits, backend="torch")


if __name__ == "__main__":
    main()
