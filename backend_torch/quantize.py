"""python -m backend_torch.quantize: re-quantize a checkpoint with PyTorch's calibration statistics and
score the round trip (trainer/quantize_file.py; `make quantize`)."""

from trainer import quantize_file


def make_session(cfg):
    from backend_torch.session import TorchSession  # imported late: --help and bad settings answer at once

    return TorchSession(cfg)


def main(argv=None, environ=None):
    return quantize_file.main("python -m backend_torch.quantize", make_session, argv, environ)


if __name__ == "__main__":
    main()
