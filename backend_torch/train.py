"""python -m backend_torch.train: train with PyTorch (CUDA, or the CPU). Under torchrun, one process per GPU.

Every setting is an environment variable, a flag or a config-file entry (python -m backend_torch.train --help).
"""

from trainer import loop as train_loop


def make_session(cfg):
    from backend_torch.session import TorchSession  # imported late: --help and bad settings answer at once

    return TorchSession(cfg)


def main(argv=None):
    return train_loop.main("python -m backend_torch.train", make_session, argv)


if __name__ == "__main__":
    main()
