"""The MLX side of score-first test-time training (trainer/ttt.py's TTTAdapter; docs/spec.md §14).
It mirrors backend_torch/ttt.py.

The adapted model is the session's own GPT with each adapted matrix replaced by W + (alpha/r) B A
through model.update inside the differentiated function (mx.value_and_grad over the adapters
only), then the base weights put back, so the model file knows nothing of LoRA and every model
option is adapted the same way. One document at a time (batch 1), as in torch.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from backend_mlx.optim import clip_grad_norm
from core.config import TrainConfig
from trainer.ttt import ADAM_EPS, adamw_scalars, lora_init, lora_targets


def _ids(a: np.ndarray) -> mx.array:
    return mx.array(np.asarray(a, dtype=np.int32))


class MLXTTT:
    def __init__(self, session, cfg: TrainConfig):
        self.cfg, self.model = cfg, session.model
        self.scale = cfg.ttt_lora_alpha / cfg.ttt_lora_rank
        self.targets = lora_targets(session.spec, cfg)
        self.a_init = {n: mx.array(a) for n, a in lora_init(self.targets, cfg.ttt_lora_rank).items()}
        self._loss_and_grad = mx.value_and_grad(self._chunk_loss)
        self.reset()

    # -- the adapter of one document --

    def reset(self) -> None:
        r = self.cfg.ttt_lora_rank
        self.lora = {}
        for t in self.targets:
            self.lora[t.name + ".A"] = self.a_init[t.name]
            self.lora[t.name + ".B"] = mx.zeros((t.out_features, r))
        self.m = {k: mx.zeros_like(p) for k, p in self.lora.items()}
        self.v = {k: mx.zeros_like(p) for k, p in self.lora.items()}
        self.t = 0

    def is_fresh(self) -> bool:
        return self.t == 0 and all(not bool(mx.any(self.lora[t.name + ".B"])) and
                                   bool(mx.array_equal(self.lora[t.name + ".A"], self.a_init[t.name])) for t in self.targets)

    def _losses(self, lora: dict[str, mx.array], x: mx.array, y: mx.array) -> mx.array:
        base = dict(tree_flatten(self.model.parameters()))
        adapted = [(t.name, base[t.name] + self.scale * (lora[t.name + ".B"] @ lora[t.name + ".A"])) for t in self.targets]
        self.model.update(tree_unflatten(adapted))
        try:
            return self.model.loss(x, y, reduction="none")
        finally:
            self.model.update(tree_unflatten([(t.name, base[t.name]) for t in self.targets]))

    def _chunk_loss(self, lora, x, y, offset: int, count: int):
        losses = self._losses(lora, x, y)
        return losses[:, offset:offset + count].mean(), losses

    def token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.array(self._losses(self.lora, _ids(x), _ids(y)), dtype=np.float64)

    def train(self, x: np.ndarray, y: np.ndarray, offset: int, count: int) -> np.ndarray:
        scored = None
        for _ in range(self.cfg.ttt_grad_steps):
            (_, losses), grads = self._loss_and_grad(self.lora, _ids(x), _ids(y), offset, count)
            if scored is None:   # the first forward's losses: before any update
                scored = np.array(losses, dtype=np.float64)
            self._adamw(grads)
        return scored

    def _adamw(self, grads: dict[str, mx.array]) -> None:
        b1, b2 = self.cfg.ttt_beta1, self.cfg.ttt_beta2
        self.t += 1
        decay, step, root = adamw_scalars(self.cfg, self.t)
        for k, p in self.lora.items():
            g = grads[k]
            self.m[k] = b1 * self.m[k] + (1.0 - b1) * g
            self.v[k] = b2 * self.v[k] + (1.0 - b2) * g * g
            self.lora[k] = p * decay - step * self.m[k] / (mx.sqrt(self.v[k]) / root + ADAM_EPS)
        mx.eval(self.lora, self.m, self.v)

    # -- global phases: SGD on the base weights --

    def begin_global(self) -> None:
        self.momentum = {n: mx.zeros_like(p) for n, p in tree_flatten(self.model.parameters())}

    def global_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        loss_and_grad = nn.value_and_grad(self.model, lambda a, b: self.model.loss(a, b))
        _, grads = loss_and_grad(_ids(x), _ids(y))
        grads = dict(tree_flatten(grads))
        if self.cfg.global_ttt_grad_clip > 0:
            grads = dict(zip(grads, clip_grad_norm(list(grads.values()), self.cfg.global_ttt_grad_clip)))
        params = dict(tree_flatten(self.model.parameters()))
        new = {}
        for n, p in params.items():
            self.momentum[n] = self.cfg.global_ttt_momentum * self.momentum[n] + grads[n]
            new[n] = p - lr * self.momentum[n]
        self.model.update(tree_unflatten(list(new.items())))
        mx.eval(self.model.parameters(), self.momentum)
