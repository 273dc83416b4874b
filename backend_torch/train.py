"""python -m backend_torch.train: train with PyTorch (CUDA, or the CPU). Under torchrun, one process per GPU.

Every setting is an environment variable, a flag or a config-file entry (python -m backend_torch.train --help).
"""

import sys

from core.config import load_config
from core.errors import exit_on_user_error
from core.train_loop import run_training


@exit_on_user_error
def main(argv=None):
    cfg = load_config(sys.argv[1:] if argv is None else argv, prog="python -m backend_torch.train")
    from backend_torch.session import TorchSession  # after the config, so --help and bad settings are instant

    session = TorchSession(cfg)
    try:
        return run_training(cfg, session)
    finally:
        session.close()


if __name__ == "__main__":
    main()
