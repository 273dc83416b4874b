"""Score-first test-time training at evaluation (docs/spec.md §14), written once for both backends.

For each document (data/ttt_plan.py), with a fresh LoRA adapter: score a chunk of targets, record
their losses, then train the adapter on that chunk, and go on to the next chunk. Every target is
scored before any update that could have seen it; the adapter is reset at each document. With
global phases, after the first PHASED_TTT_PREFIX_DOCS documents (in equal steps) the base weights
also take SGD steps over every document scored so far.

The backend's part is the adapter (backend_torch/ttt.py, backend_mlx/ttt.py, the TTTAdapter
protocol below): a LoRA-adapted forward by functional weight override, its AdamW, and the global
SGD step. The Ledger here records what the evaluation did, token by token, and says whether the
rules held; `make check-submission` reads that record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from core.config import ModelSpec, TrainConfig
from core.errors import ConfigError, DatasetError
from core.metrics import EvalAccumulator, token_bytes
from core.params import param_shapes
from data.ttt_plan import chunk_plan, document_order, find_documents, global_batches, phase_boundaries

ADAM_EPS = 1e-10          # the record's AdamW epsilon for the adapters
LORA_SEED = 20260423      # the adapters' initial A: one fixed draw, the same in both backends


# ---------------------------------------------------------------------------------------------
# Which matrices are adapted, and the adapters' initial values
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRATarget:
    name: str        # the adapted weight, by its docs/spec.md §2 name: W (out, in) becomes W + s B A
    out_features: int
    in_features: int


def lora_targets(spec: ModelSpec, cfg: TrainConfig) -> list[LoRATarget]:
    """The adapted matrices of every block (queries and values always; keys, attention output and
    MLP output projections by TTT_K_LORA, TTT_O_LORA, TTT_MLP_LORA) and the output head (TTT_HEAD_LORA;
    when tied, the one embedding matrix, so its rows as inputs adapt too)."""
    suffixes = ["attn.c_q.weight", "attn.c_v.weight"]
    suffixes += ["attn.c_k.weight"] if cfg.ttt_k_lora else []
    suffixes += ["attn.proj.weight"] if cfg.ttt_o_lora else []
    suffixes += ["mlp.proj.weight"] if cfg.ttt_mlp_lora else []
    shapes = param_shapes(spec)
    names = [n for n in shapes if n.startswith("blocks.") and n.split(".", 2)[2] in suffixes]
    if cfg.ttt_head_lora:
        names.append("tok_emb.weight" if spec.tie_embeddings else "lm_head.weight")
    return [LoRATarget(n, *shapes[n]) for n in names]


def lora_init(targets: list[LoRATarget], rank: int) -> dict[str, np.ndarray]:
    """Each adapter's A (rank, in), uniform in ±1/sqrt(in) as a Linear's init; B starts at zero, so
    a fresh adapter leaves the model unchanged."""
    rng = np.random.default_rng(LORA_SEED)
    return {t.name: rng.uniform(-1.0, 1.0, (rank, t.in_features)).astype(np.float32) / np.float32(math.sqrt(t.in_features))
            for t in targets}


def adamw_scalars(cfg: TrainConfig, t: int) -> tuple[float, float, float]:
    """(decay, step size, sqrt of beta2's bias correction) of the adapters' AdamW step t (from 1):
    p <- p*decay - step * m / (sqrt(v) / root + eps), the same in both backends."""
    lr, b1, b2 = cfg.ttt_lora_lr, cfg.ttt_beta1, cfg.ttt_beta2
    return 1.0 - lr * cfg.ttt_weight_decay, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t)


class TTTAdapter(Protocol):
    """A backend's side: windows cross as (1, T) integer arrays, losses as float64 numpy arrays."""

    def reset(self) -> None:
        """A fresh adapter: every B zero, every A its initial value, AdamW's moments and step at 0."""

    def is_fresh(self) -> bool:
        """Whether the adapter is as reset leaves it: every B zero, every A its initial draw, AdamW at
        step 0 (the legality record asks at each document)."""

    def token_losses(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-target losses (1, T) of the adapted model, without gradients."""

    def train(self, x: np.ndarray, y: np.ndarray, offset: int, count: int) -> np.ndarray:
        """TTT_GRAD_STEPS AdamW steps of the adapter on the mean loss of targets offset..offset+count-1;
        returns the per-target losses of the first forward, taken before any of the steps."""

    def begin_global(self) -> None:
        """A global phase starts: a fresh SGD momentum for the base weights."""

    def global_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        """One SGD step (momentum, gradient clip) of every base weight on the mean loss of (x, y)."""


# ---------------------------------------------------------------------------------------------
# The legality record
# ---------------------------------------------------------------------------------------------

class Ledger:
    """What the evaluation did, checked as it happens. Target t is token t+1 predicted from tokens
    0..t. A token counts as seen once it has been scored as a target, or when it is a BOS (every
    document opens with one; it carries nothing of the text)."""

    def __init__(self, tokens: np.ndarray, bos_id: int):
        self.scored = np.zeros(max(len(tokens) - 1, 0), dtype=bool)
        self.is_bos = np.asarray(tokens) == bos_id
        self.adapter_doc: int | None = None
        self.counts = dict(documents=0, resets=0, targets_scored=0, adapter_updates=0, global_updates=0)
        self.violations: dict[str, int] = dict(scored_twice=0, update_before_score=0, adapter_not_reset=0,
                                               context_outside_document=0)
        self.first_violation: str | None = None

    def _violate(self, kind: str, what: str) -> None:
        self.violations[kind] += 1
        if self.first_violation is None:
            self.first_violation = what

    def _unseen(self, lo: int, hi: int) -> int:
        """Tokens lo..hi-1 not yet seen."""
        idx = np.arange(lo, hi)
        seen = self.is_bos[idx].copy()
        later = idx > 0                      # token 0 is no one's target
        seen[later] |= self.scored[idx[later] - 1]
        return int((~seen).sum())

    def reset(self, doc: int, fresh: bool) -> None:
        """Document `doc` starts; `fresh`: the adapter's own word that it holds nothing learned."""
        self.adapter_doc = doc
        self.counts["documents"] += 1
        if fresh:
            self.counts["resets"] += 1
        else:
            self._violate("adapter_not_reset", f"the adapter was not fresh at the start of document {doc}")

    def score(self, doc_start: int, window_lo: int, lo: int, hi: int) -> None:
        """Targets lo..hi-1 scored by a forward whose first input is token window_lo."""
        if window_lo < doc_start:
            self._violate("context_outside_document", f"targets {lo}..{hi - 1} read token {window_lo}, before their document")
        if self.scored[lo:hi].any():
            self._violate("scored_twice", f"targets {lo}..{hi - 1} scored a second time")
        self.scored[lo:hi] = True
        self.counts["targets_scored"] += hi - lo

    def adapter_update(self, doc: int, lo: int, hi: int) -> None:
        """The adapter trained on a forward that read tokens lo..hi-1 (inputs and targets)."""
        self.counts["adapter_updates"] += 1
        if self.adapter_doc != doc:
            self._violate("adapter_not_reset", f"the adapter of document {self.adapter_doc} trained on document {doc}")
        if unseen := self._unseen(lo, hi):
            self._violate("update_before_score", f"an adapter update read {unseen} unscored token(s) in {lo}..{hi - 1}")

    def global_update(self, lo: int, hi: int) -> None:
        """The base weights trained on tokens lo..hi-1."""
        self.counts["global_updates"] += 1
        if unseen := self._unseen(lo, hi):
            self._violate("update_before_score", f"a global update read {unseen} unscored token(s) in {lo}..{hi - 1}")

    def record(self) -> dict:
        v = self.violations
        return {
            "score_before_update": v["update_before_score"] == 0,
            "adapters_reset_per_document": v["adapter_not_reset"] == 0 and self.counts["resets"] == self.counts["documents"],
            "each_target_scored_once": v["scored_twice"] == 0,
            "context_within_document": v["context_outside_document"] == 0,
            "unscored_tokens_used": v["update_before_score"],
            **self.counts, "violations": dict(v), "first_violation": self.first_violation,
        }


def record_legal(record: dict) -> bool:
    return all(record[k] for k in ("score_before_update", "adapters_reset_per_document", "each_target_scored_once",
                                   "context_within_document"))


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

@dataclass
class TTTResult:
    val_loss: float
    val_bpb: float
    seconds: float
    documents: int
    targets: int
    phases_run: int
    record: dict = field(default_factory=dict)


class BudgetExceeded(ConfigError):
    """The evaluation passed EVAL_TIME_BUDGET_SECONDS (exit 2: a setting to change, nothing to fix)."""


def global_lr(cfg: TrainConfig, chunk: int, num_chunks: int) -> float:
    """The record's schedule of a global phase: linear warmup over GLOBAL_TTT_WARMUP_CHUNKS, then a
    cosine from GLOBAL_TTT_LR to 0 at the last chunk (which is not trained)."""
    warmup = max(0, min(cfg.global_ttt_warmup_chunks, num_chunks - 1))
    if warmup > 0 and chunk < warmup:
        t = chunk / max(warmup - 1, 1)
        return cfg.global_ttt_warmup_start_lr + (cfg.global_ttt_lr - cfg.global_ttt_warmup_start_lr) * t
    steps = max(num_chunks - 1 - warmup, 1)
    return cfg.global_ttt_lr * 0.5 * (1.0 + math.cos(math.pi * max(chunk - warmup, 0) / steps))


OnProgress = Callable[[int, int], None]   # (targets scored, targets in all), after every chunk


def evaluate_ttt(adapter: TTTAdapter, val_tokens: np.ndarray, tables, cfg: TrainConfig, bos_id: int,
                 on_progress: OnProgress | None = None, clock=time.perf_counter,
                 update_before_score: bool = False) -> TTTResult:
    """val_loss and val_bpb of score-first TTT over every document of val_tokens, with its record.

    `update_before_score=True` trains on every chunk before scoring it: an illegal evaluation, for
    the tests that show the record catches it. Raises BudgetExceeded past EVAL_TIME_BUDGET_SECONDS."""
    val_tokens = np.asarray(val_tokens)
    docs = find_documents(val_tokens, bos_id)
    if not docs:
        raise DatasetError(f"test-time training: the validation tokens hold no document (no BOS id {bos_id})")
    order = document_order(docs, cfg.ttt_batch_size)
    boundaries = phase_boundaries(len(order), cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    ledger = Ledger(val_tokens, bos_id)
    acc = EvalAccumulator()
    t0 = clock()

    total_targets = sum(d.length - 1 for d in docs)

    def check_budget(done: int) -> None:
        elapsed = clock() - t0
        if cfg.eval_time_budget_seconds and elapsed > cfg.eval_time_budget_seconds:
            projected = elapsed * total_targets / max(acc.tokens, 1)   # documents differ in length, targets less so
            what = f"after {done} of {len(order)} documents (projected {projected:,.0f} s)" if done else \
                "before its first document was done"
            raise BudgetExceeded(f"EVAL_TIME_BUDGET_SECONDS={cfg.eval_time_budget_seconds:g}: the test-time training "
                                 f"evaluation ran out of time {what}; raise the budget, or lower TTT_GRAD_STEPS or "
                                 "PHASED_TTT_PREFIX_DOCS")

    phases = 0
    for k, i in enumerate(order):
        doc = docs[i]
        adapter.reset()
        ledger.reset(i, adapter.is_fresh())
        for ch in chunk_plan(doc.length - 1, cfg.ttt_chunk_size, cfg.ttt_window):
            lo = doc.start + ch.window_start
            x = val_tokens[lo:lo + ch.window_len][None]
            y = val_tokens[lo + 1:lo + ch.window_len + 1][None]
            first = lo + ch.offset
            if update_before_score:          # illegal on purpose: learn every chunk, then score it
                adapter.train(x, y, ch.offset, ch.count)
                ledger.adapter_update(i, lo, lo + ch.window_len + 1)
                losses = adapter.token_losses(x, y)
                ledger.score(doc.start, lo, first, first + ch.count)
            else:
                losses = adapter.train(x, y, ch.offset, ch.count) if ch.train else adapter.token_losses(x, y)
                ledger.score(doc.start, lo, first, first + ch.count)
                if ch.train:
                    ledger.adapter_update(i, lo, lo + ch.window_len + 1)
            s = slice(ch.offset, ch.offset + ch.count)
            acc.add(float(losses[0, s].sum()), ch.count, int(token_bytes(tables, x[0, s], y[0, s]).sum()))
            if on_progress is not None:
                on_progress(int(acc.tokens), total_targets)
            check_budget(k)   # after every chunk: a long document cannot overrun by much
        # A phase after the last document would change no score: it is not run.
        if phases < len(boundaries) and k + 1 == boundaries[phases] and k + 1 < len(order):
            _global_phase(adapter, val_tokens, [docs[j] for j in order[:k + 1]], cfg, ledger,
                          lambda: check_budget(k + 1))
            phases += 1
    return TTTResult(acc.val_loss, acc.val_bpb, clock() - t0, len(order), int(acc.tokens), phases, ledger.record())


def _global_phase(adapter: TTTAdapter, val_tokens: np.ndarray, scored_docs, cfg: TrainConfig, ledger: Ledger,
                  check_budget: Callable[[], None]) -> None:
    """SGD on the base weights over the scored documents, one after another in their order."""
    pieces = [val_tokens[d.start:d.start + d.length] for d in scored_docs]
    stream = np.concatenate(pieces)
    for d in scored_docs:
        ledger.global_update(d.start, d.start + d.length)
    adapter.begin_global()
    L = cfg.ttt_window
    for c, n, steps in global_batches(len(stream), cfg.global_ttt_chunk_tokens, L, cfg.global_ttt_batch_seqs):
        lr = global_lr(cfg, c, n)
        for _ in range(cfg.global_ttt_epochs):
            for first, seqs in steps:
                x = stream[first:first + seqs * L].reshape(seqs, L)
                y = stream[first + 1:first + 1 + seqs * L].reshape(seqs, L)
                adapter.global_step(x, y, lr)
        check_budget()


def ttt_summary(result: TTTResult) -> dict:
    """The figures a run's summary.json keeps of its TTT evaluation."""
    return {"ttt_val_loss": result.val_loss, "ttt_val_bpb": result.val_bpb, "ttt_eval_time_s": result.seconds,
            "ttt_documents": result.documents, "ttt_targets": result.targets, "ttt_phases_run": result.phases_run,
            "ttt_legality": result.record}


def legality_line(record: dict) -> str:
    """One log line of the record, key:value (make check-submission reads it back from a log)."""
    return ("ttt_legality " + " ".join(f"{k}:{int(record[k])}" for k in
            ("score_before_update", "adapters_reset_per_document", "each_target_scored_once", "context_within_document",
             "unscored_tokens_used", "documents", "resets", "targets_scored", "adapter_updates", "global_updates")))


def check_ttt_runnable(cfg: TrainConfig, world_size: int) -> None:
    """TTT_ENABLED=1 runs in one process: the global phases need every scored document in one place."""
    if cfg.ttt_enabled and world_size > 1:
        raise ConfigError(f"TTT_ENABLED=1: the test-time training evaluation runs in one process "
                          f"(WORLD_SIZE={world_size}); evaluate the checkpoint with make eval")


def run_ttt(backend, val_tokens: np.ndarray, tables, cfg: TrainConfig, progress: OnProgress | None = None) -> TTTResult:
    """The TTT evaluation of the backend's current weights (which global phases change: reload them after)."""
    from data.tokenizer import BOS_ID   # the BOS of every twingpt and Parameter Golf shard

    check_ttt_runnable(cfg, backend.world_size)
    return evaluate_ttt(backend.ttt_adapter(cfg), val_tokens, tables, cfg, BOS_ID, progress)
