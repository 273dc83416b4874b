"""The torch side of score-first test-time training (trainer/ttt.py's TTTAdapter; docs/spec.md §14).
backend_mlx/ttt.py mirrors this file.

The adapted model is the session's own GPT run by torch.func.functional_call with each adapted
matrix replaced by W + (alpha/r) B A, so the model file knows nothing of LoRA and every model
option is adapted the same way. One document at a time (batch 1): the record adapts 64 documents
at once, each with its own adapter; the arithmetic per document is the same, the GPU is busier.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from backend_torch.optim import clip_grad_norm
from core.config import TrainConfig
from trainer.ttt import ADAM_EPS, adamw_scalars, lora_init, lora_targets


class _TokenLosses(nn.Module):
    """The model's per-target losses as a forward, for functional_call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y, reduction="none").view(y.shape)


class TorchTTT:
    def __init__(self, session, cfg: TrainConfig):
        self.session, self.cfg, self.model = session, cfg, session.model
        self.device = session.torch_device
        self.scale = cfg.ttt_lora_alpha / cfg.ttt_lora_rank
        self.targets = lora_targets(session.spec, cfg)
        self.a_init = {n: torch.from_numpy(a).to(self.device) for n, a in lora_init(self.targets, cfg.ttt_lora_rank).items()}
        self.losses_of = _TokenLosses(self.model)
        self.reset()

    # -- the adapter of one document --

    def reset(self) -> None:
        r = self.cfg.ttt_lora_rank
        self.lora = {}
        for t in self.targets:
            self.lora[t.name + ".A"] = self.a_init[t.name].clone().requires_grad_(True)
            self.lora[t.name + ".B"] = torch.zeros(t.out_features, r, device=self.device, requires_grad=True)
        self.m = {k: torch.zeros_like(p) for k, p in self.lora.items()}
        self.v = {k: torch.zeros_like(p) for k, p in self.lora.items()}
        self.t = 0

    def is_fresh(self) -> bool:
        return self.t == 0 and all(not bool(self.lora[t.name + ".B"].any()) and
                                   torch.equal(self.lora[t.name + ".A"], self.a_init[t.name]) for t in self.targets)

    def _losses(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        weights = {"model." + n: p.detach() for n, p in self.model.named_parameters()}
        for t in self.targets:
            delta = self.lora[t.name + ".B"] @ self.lora[t.name + ".A"]
            weights["model." + t.name] = weights["model." + t.name] + self.scale * delta
        return functional_call(self.losses_of, weights, (self.session._to_device(x), self.session._to_device(y)))

    def token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._losses(x, y).to("cpu", torch.float64).numpy()

    def train(self, x: np.ndarray, y: np.ndarray, offset: int, count: int) -> np.ndarray:
        scored = None
        for _ in range(self.cfg.ttt_grad_steps):
            losses = self._losses(x, y)
            if scored is None:   # the first forward's losses: before any update
                scored = losses.detach().to("cpu", torch.float64).numpy()
            grads = torch.autograd.grad(losses[:, offset:offset + count].mean(), list(self.lora.values()))
            self._adamw(dict(zip(self.lora, grads)))
        return scored

    @torch.no_grad()
    def _adamw(self, grads: dict[str, torch.Tensor]) -> None:
        b1, b2 = self.cfg.ttt_beta1, self.cfg.ttt_beta2
        self.t += 1
        decay, step, root = adamw_scalars(self.cfg, self.t)
        for k, p in self.lora.items():
            g = grads[k]
            self.m[k].mul_(b1).add_(g, alpha=1.0 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1.0 - b2)
            p.mul_(decay).sub_(step * self.m[k] / (self.v[k].sqrt() / root + ADAM_EPS))

    # -- global phases: SGD on the base weights --

    def begin_global(self) -> None:
        self.momentum = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}

    def global_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        params = dict(self.model.named_parameters())
        loss = self.model.loss(self.session._to_device(x), self.session._to_device(y))
        grads = list(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        if self.cfg.global_ttt_grad_clip > 0:
            clip_grad_norm(grads, self.cfg.global_ttt_grad_clip)
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads):
                self.momentum[n].mul_(self.cfg.global_ttt_momentum).add_(g)
                p.sub_(lr * self.momentum[n])
