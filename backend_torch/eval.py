"""python -m backend_torch.eval: evaluate a checkpoint or an artifact with PyTorch, without training
(trainer/eval_file.py; `make eval`)."""

from trainer import eval_file


def make_session(cfg):
    from backend_torch.session import TorchSession  # imported late: --help and bad settings answer at once

    return TorchSession(cfg)


def main(argv=None, environ=None):
    return eval_file.main("python -m backend_torch.eval", make_session, argv, environ)


if __name__ == "__main__":
    main()
