"""Every setting of a twingpt run: the model's shape (ModelSpec) and the whole run (TrainConfig).

The settings and their defaults are those of the Parameter Golf reference trainers, under the same
environment-variable names (NUM_LAYERS, TRAIN_BATCH_TOKENS, ...), plus a few of ours (NORM_EPS,
DEVICE, COMPUTE_DTYPE, ...). Each setting can come from four places; the first that has it wins:

    command-line flag (--num-layers 9)  >  environment (NUM_LAYERS=9)  >  config file  >  default

A config file is JSON: {"NUM_LAYERS": 9} or {"num_layers": 9}. A bad value is a one-line
ConfigError that names the setting and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.errors import ConfigError
from core.presets import Preset, load_preset


AUTO = "auto"
# Every document of every twingpt dataset starts with this token id (data/tokenizer.py; the Parameter
# Golf FineWeb shards too): the document boundary of SMEAR_GATE_ENABLED and DOC_ATTENTION_ENABLED.
BOS_ID = 1
TRACKERS = ("tensorboard", "wandb")   # the experiment trackers REPORT_TO may name (trainer/tracking.py)
NS_COEFF_CHOICES = ("fixed", "polar-express")   # MUON_NS_COEFFS (core/optimizer.py)


def parse_report_to(value: str) -> list[str]:
    """REPORT_TO's tracker names, in order, without repeats; a ConfigError names an unknown one."""
    names = list(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"REPORT_TO={value}: unknown tracker {unknown[0]!r}; known: {', '.join(TRACKERS)} "
                          "(comma-separated, empty = none)")
    return names


# The role of each model setting (the `role` of its `setting`): what a file of weights tells of it,
# and whether a resumed run must keep it.
SHAPES = "shapes"         # the weights' shapes follow it: read back from the tensors (core.params.infer_spec)
INIT_ONLY = "init_only"   # only the initial weights follow it: a resumed run may change it
UNSHAPED = "unshaped"     # what the model computes follows it, no shape does: weights alone do not hold it
ROLES = (SHAPES, INIT_ONLY, UNSHAPED)


def setting(default, help: str, *, choices: Sequence[str] | None = None, auto: str | None = None,
            role: str | None = None):
    """A dataclass field with its help text (and allowed values) in the metadata, as mlx-lm does.

    `auto` names the field's kind ("int", "float" or "bool") when it also accepts the word "auto":
    a value the run resolves itself (the memory plan, trainer/plan.py). `role` (one of ROLES) is
    what a model setting is to the weights; every ModelSettings field has one."""
    return field(default=default, metadata={"help": help, "choices": choices, "auto": auto, "role": role})


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings:
    """The model's settings, declared once: ModelSpec (validated, with its derived sizes) and TrainConfig
    (whose flags and environment variables they also are) both inherit them. A new model option is one
    `setting(default, help, role=...)` line here, OFF by default."""

    vocab_size: int = setting(1024, "tokenizer vocabulary size V", role=SHAPES)
    num_layers: int = setting(9, "transformer blocks L (first L//2 encoder, rest decoder)", role=SHAPES)
    model_dim: int = setting(512, "residual width d", role=SHAPES)
    num_heads: int = setting(8, "query heads H", role=SHAPES)
    num_kv_heads: int = setting(4, "key/value heads K (H % K == 0; K < H is grouped-query attention)", role=SHAPES)
    mlp_mult: int | float = setting(2, "MLP hidden width as a multiple of d (a float allowed: hidden = int(mlp_mult*d))",
                                    role=SHAPES)
    tie_embeddings: bool = setting(True, "use the token embedding as the output head", role=SHAPES)
    tied_embed_init_std: float = setting(0.005, "std of the tied embedding's normal init", role=INIT_ONLY)
    logit_softcap: float = setting(30.0, "logits = c*tanh(raw/c)", role=UNSHAPED)
    rope_base: float = setting(10000.0, "RoPE base frequency", role=UNSHAPED)
    qk_gain_init: float = setting(1.5, "initial per-head gain applied to normed, rotated queries", role=INIT_ONLY)
    norm_eps: float = setting(1e-6, "RMSNorm epsilon (both backends and the reference)", role=UNSHAPED)
    # record options: attention (docs/spec.md §4.1-§4.5); every one off by default
    xsa_last_n: int = setting(0, "exclusive self-attention in the last N layers: each head's output loses its "
                              "component along its own token's value (0 = off)", role=UNSHAPED)
    rope_dims: int = setting(0, "partial RoPE: rotate only the first ROPE_DIMS dims of each head, even, at most "
                             "head_dim (0 = all)", role=UNSHAPED)
    rope_yarn: bool = setting(False, "RoPE base grows with a sequence longer than ROPE_TRAIN_SEQ_LEN (YaRN-style)",
                              role=UNSHAPED)
    rope_train_seq_len: int = setting(0, "the length ROPE_YARN scales from (0 = TRAIN_SEQ_LEN)", role=UNSHAPED)
    sparse_attn_gate_enabled: bool = setting(False, "sigmoid gate per head on the attention output, from the "
                                             "first GATE_WINDOW dims of the attention input", role=SHAPES)
    sparse_attn_gate_scale: float = setting(1.0, "the sparse gate's logit multiplier", role=UNSHAPED)
    sparse_attn_gate_init_std: float = setting(0.0, "std of the sparse gate weights' normal init (0 = zeros)",
                                               role=INIT_ONLY)
    smear_gate_enabled: bool = setting(False, "add a gated share of the previous token's embedding to each "
                                       "token's (never across BOS)", role=SHAPES)
    gate_window: int = setting(12, "input dims of the sparse attention gate and the smear gate", role=SHAPES)
    doc_attention_enabled: bool = setting(False, "attention never crosses a BOS (id 1): each token attends "
                                          "only within its own document of the packed sequence", role=UNSHAPED)
    # record options: blocks and layout (docs/spec.md §4.6-§4.10); each is off by default
    mlp_negative_slope: float = setting(0.0, "MLP activation leaky_relu(x, slope)^2 (0: relu^2, the baseline; "
                                             "the record: 0.5)", role=UNSHAPED)
    ln_scale: bool = setting(False, "scale each block's normed attention and MLP inputs by 1/sqrt(layer+1)",
                             role=UNSHAPED)
    skip_gates_enabled: bool = setting(False, "gated U-Net skips: x = lerp(w*skip, x, sigmoid(gate)) instead of "
                                       "x + w*skip", role=SHAPES)
    parallel_start_layer: int = setting(0, "decoder layers from this index on run as two parallel lanes "
                                           "(attention, MLP) with learned mixing (0 = off; the record: 8)", role=UNSHAPED)
    parallel_final_lane: str = setting("mean", "the hidden state the parallel lanes end in: mean, attn or mlp",
                                       choices=("mean", "attn", "mlp"), role=UNSHAPED)
    num_loops: int = setting(0, "extra passes through layers LOOP_START..LOOP_END once looping is on "
                                "(0 = off; the record: 2)", role=UNSHAPED)
    loop_start: int = setting(3, "first layer of the looped segment (with NUM_LOOPS > 0)", role=UNSHAPED)
    loop_end: int = setting(5, "last layer of the looped segment, inclusive (with NUM_LOOPS > 0)", role=UNSHAPED)


def model_fields(*roles: str) -> tuple[str, ...]:
    """Names of the model settings with one of `roles` (all of them when none is given), in order."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {ROLES}")
    return tuple(f.name for f in fields(ModelSettings) if not roles or f.metadata["role"] in roles)


@dataclass(frozen=True)
class ModelSpec(ModelSettings):
    """The shape of the GPT (docs/spec.md §2-§4): the model settings, validated on construction."""

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        m = self.mlp_mult
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or int(m * self.model_dim) <= 0:
            raise ConfigError(f"mlp_mult={m!r}: must be a positive number (hidden width int(mlp_mult*model_dim) >= 1)")
        if isinstance(m, float) and m.is_integer():   # 4.0 is 4: the same spec, and the same checkpoint
            object.__setattr__(self, "mlp_mult", int(m))
        self._check_layout()
        for name in ("tied_embed_init_std", "logit_softcap", "rope_base", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive number")
        if not isinstance(self.qk_gain_init, (int, float)) or not math.isfinite(self.qk_gain_init):
            raise ConfigError(f"qk_gain_init={self.qk_gain_init!r}: must be a finite number")
        if self.model_dim % self.num_heads:
            raise ConfigError(f"num_heads={self.num_heads}: must divide model_dim={self.model_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads={self.num_kv_heads}: must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(
                f"model_dim={self.model_dim}: head_dim = model_dim/num_heads = {self.head_dim} must be even (RoPE)"
            )
        self._check_attention_options()

    def _check_attention_options(self):
        """The record's attention options (docs/spec.md §4.1-§4.5)."""
        for name in ("xsa_last_n", "rope_dims", "rope_train_seq_len", "gate_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be a non-negative integer")
        for name in ("sparse_attn_gate_scale", "sparse_attn_gate_init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r}: must be a finite number")
        if self.sparse_attn_gate_init_std < 0:
            raise ConfigError(f"sparse_attn_gate_init_std={self.sparse_attn_gate_init_std}: must not be negative")
        if self.xsa_last_n > self.num_layers:
            raise ConfigError(f"xsa_last_n={self.xsa_last_n}: more than num_layers={self.num_layers}")
        if self.rope_dims % 2 or self.rope_dims > self.head_dim:
            raise ConfigError(f"rope_dims={self.rope_dims}: must be even and at most head_dim={self.head_dim} "
                              "(0 = all)")
        if self.rope_yarn and self.rotary_dims < 4:
            raise ConfigError(f"rope_dims={self.rope_dims}: ROPE_YARN needs at least 4 rotated dims")
        if self.rope_yarn and self.rope_train_seq_len == 0:
            raise ConfigError("rope_train_seq_len=0: ROPE_YARN needs the length it scales from")
        if (self.sparse_attn_gate_enabled or self.smear_gate_enabled) and not 1 <= self.gate_window <= self.model_dim:
            raise ConfigError(f"gate_window={self.gate_window}: must be in 1..model_dim={self.model_dim}")

    def _check_layout(self) -> None:
        if not isinstance(self.mlp_negative_slope, (int, float)) or not math.isfinite(self.mlp_negative_slope):
            raise ConfigError(f"mlp_negative_slope={self.mlp_negative_slope!r}: must be a finite number")
        if self.parallel_final_lane not in ("mean", "attn", "mlp"):
            raise ConfigError(f"parallel_final_lane={self.parallel_final_lane!r}: must be one of mean, attn, mlp")
        for name in ("parallel_start_layer", "num_loops", "loop_start", "loop_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}: must be a non-negative integer")
        L = self.num_layers
        if self.parallel_start_layer >= L:
            raise ConfigError(f"parallel_start_layer={self.parallel_start_layer}: must be below num_layers={L} "
                              "(layers 0..num_layers-1; 0 = off)")
        if self.num_loops:
            if not self.loop_start <= self.loop_end < L:
                raise ConfigError(f"loop_end={self.loop_end}: the looped segment loop_start={self.loop_start}.."
                                  f"loop_end={self.loop_end} must lie within layers 0..{L - 1} (num_layers={L})")
            if 0 < self.parallel_start_layer <= self.loop_end:
                raise ConfigError(f"parallel_start_layer={self.parallel_start_layer}: must be after the looped segment "
                                  f"(loop_end={self.loop_end}) when num_loops > 0")

    def layer_order(self, looping: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(encoder, decoder) block indices in the order they run (docs/spec.md §4.10). Looping on:
        the segment loop_start..loop_end runs 1 + num_loops times, and the whole sequence is split in
        half again; off (or num_loops = 0): the first num_layers//2 blocks, then the rest."""
        L = self.num_layers
        if looping and self.num_loops:
            segment = list(range(self.loop_start, self.loop_end + 1))
            order = list(range(self.loop_start)) + segment * (self.num_loops + 1) + list(range(self.loop_end + 1, L))
        else:
            order = list(range(L))
        half = len(order) // 2
        return tuple(order[:half]), tuple(order[half:])

    def block_calls(self, looping: bool) -> int:
        """Blocks one forward runs (a looped block counts once per pass): the caches a sampler keeps."""
        return sum(map(len, self.layer_order(looping)))

    # Derived sizes (docs/spec.md §2 notation).
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def rotary_dims(self) -> int:
        """r of docs/spec.md §4.2: the dims of each head that RoPE rotates."""
        return self.rope_dims or self.head_dim

    def rope_base_for(self, n: int) -> float:
        """docs/spec.md §4.2: the RoPE base of a sequence of n positions (ROPE_YARN grows it past
        ROPE_TRAIN_SEQ_LEN by (n/L)^(r/(r-2)))."""
        r, L = self.rotary_dims, self.rope_train_seq_len
        if self.rope_yarn and n > L:
            return self.rope_base * (n / L) ** (r / (r - 2))
        return self.rope_base

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def hidden_dim(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers // 2

    @property
    def num_decoder_layers(self) -> int:
        return self.num_layers - self.num_encoder_layers

    @property
    def num_skip_weights(self) -> int:
        """One per skip connection of the longest layer order (the looped one when NUM_LOOPS > 0)."""
        encoder, decoder = self.layer_order(looping=True)
        return min(len(encoder), len(decoder))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model setting(s) {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig(ModelSettings):
    """Every setting of a training run: the model's (inherited from ModelSettings) and the run's.
    Field `num_layers` is env NUM_LAYERS and flag --num-layers."""

    # Data and bookkeeping
    data_path: str = setting("", "dataset folder of *_train_*.bin / *_val_*.bin shards "
                             "(empty: the FineWeb sp1024 folder if present, else the default stdlib dataset)")
    tokenizer_path: str = setting("", "SentencePiece model (empty: the one that belongs to the dataset)")
    run_id: str = setting("", "name of the run folder runs/<run_id> (empty: a timestamp)")
    seed: int = setting(1337, "seed of the initial weights")
    out_dir: str = setting("runs", "where run folders are written")
    # Length of training
    iterations: int = setting(20000, "optimizer steps")
    warmup_steps: int = setting(20, "steps run to prime compilation, then undone (weights, optimizer, data restored)")
    warmdown_iters: int = setting(1200, "final steps over which the learning rate falls linearly to 0")
    train_batch_tokens: int = setting(524288, "tokens per optimizer step, over all ranks and accumulation steps")
    train_seq_len: int = setting(1024, "sequence length of training and validation")
    max_wallclock_seconds: float = setting(600.0, "stop training after this many seconds (0 = no cap)")
    grad_accum_steps: int | str = setting(AUTO, "micro-steps per optimizer step on each rank: a number, or auto "
                                          "(the fewest that fit MEMORY_BUDGET_GB)", auto="int")
    # Validation and logging
    val_batch_size: int = setting(524288, "validation tokens per evaluation batch, over all ranks and accumulation steps (as the reference)")
    val_max_tokens: int = setting(0, "validate (training, make eval, make quantize) on only the first N targets of "
                                  "the val split, for quick comparisons (0 = all of it, the challenge's val_bpb; a run with N > 0 says so in its log and "
                                  "summary)")
    eval_stride: int = setting(0, "sliding-window evaluation at the end of training (and in make eval): windows "
                               "advance by this many tokens, each target scored once with at least window-stride "
                               "tokens of context (0 = off: only the non-overlapping windows of the reference)")
    eval_seq_len: int = setting(0, "window length of the sliding evaluation (0 = TRAIN_SEQ_LEN)")
    eval_batch_seqs: int = setting(0, "windows per batch of the sliding evaluation on each rank "
                                   "(0 = as many as the VAL_BATCH_SIZE batch holds tokens)")
    val_loss_every: int = setting(1000, "validate every N steps (0 = only at the end)")
    train_log_every: int = setting(200, "log the training loss every N steps")
    checkpoint_every: int = setting(0, "write a checkpoint every N steps (0 = only at the end)")
    resume_from: str = setting("", "checkpoint to continue from (weights, optimizer, step, data position)")
    report_to: str = setting("", "experiment trackers that also get every train/val record, the config and the "
                             "summary (rank 0): comma-separated tensorboard, wandb (offline); empty = none")
    # Score-first test-time training at evaluation (docs/spec.md §14, trainer/ttt.py). Per document a
    # LoRA adapter scores each chunk, then trains on it; adapters reset at every document. The
    # defaults are the Parameter Golf record's run (train_seed42.log).
    ttt_enabled: bool = setting(False, "score-first test-time training at the end of training and in make eval")
    ttt_lora_rank: int = setting(80, "rank r of each LoRA adapter")
    ttt_lora_alpha: float = setting(144.0, "LoRA scale: the adapted matrix is W + (alpha/r) B A")
    ttt_lora_lr: float = setting(1e-4, "AdamW learning rate of the adapters")
    ttt_chunk_size: int = setting(48, "targets scored per chunk; the adapter trains on each chunk once it is scored")
    ttt_eval_seq_len: int = setting(0, "context window of each chunk's forward (0 = TRAIN_SEQ_LEN)")
    ttt_batch_size: int = setting(64, "documents per batch of the record's order (sorted by length, longest "
                                  "batch first); here each is adapted one at a time, with the same result")
    ttt_grad_steps: int = setting(1, "adapter optimizer steps on each scored chunk")
    ttt_weight_decay: float = setting(0.5, "AdamW weight decay of the adapters")
    ttt_beta1: float = setting(0.0, "AdamW beta1 of the adapters")
    ttt_beta2: float = setting(0.99, "AdamW beta2 of the adapters")
    ttt_k_lora: bool = setting(True, "adapt the key projections (queries and values always are)")
    ttt_mlp_lora: bool = setting(True, "adapt the MLP output projections")
    ttt_o_lora: bool = setting(True, "adapt the attention output projections")
    ttt_head_lora: bool = setting(True, "adapt the output head (when tied: the shared embedding matrix)")
    phased_ttt_prefix_docs: int = setting(2500, "documents (in TTT order) after which global SGD runs on what "
                                          "is scored so far (0 = no global phases)")
    phased_ttt_num_phases: int = setting(3, "global SGD phases, at equal steps of the prefix documents")
    global_ttt_lr: float = setting(0.001, "SGD learning rate of a global phase (cosine over its chunks)")
    global_ttt_momentum: float = setting(0.9, "SGD momentum of a global phase")
    global_ttt_epochs: int = setting(1, "passes over each chunk of a global phase")
    global_ttt_chunk_tokens: int = setting(32768, "tokens per chunk of a global phase (its last chunk is not trained)")
    global_ttt_batch_seqs: int = setting(32, "sequences of TTT_EVAL_SEQ_LEN per SGD step of a global phase")
    global_ttt_warmup_start_lr: float = setting(0.0, "learning rate of a global phase's first warmup chunk")
    global_ttt_warmup_chunks: int = setting(0, "chunks of linear warmup in a global phase")
    global_ttt_grad_clip: float = setting(1.0, "gradient norm clip of a global phase (0 = off)")
    eval_time_budget_seconds: float = setting(600.0, "the TTT evaluation stops with an error past this time "
                                              "(0 = no budget)")
    # Layer looping (the model's NUM_LOOPS, LOOP_START, LOOP_END): when it starts
    enable_looping_at: float = setting(0.0, "fraction of training (of ITERATIONS, or of MAX_WALLCLOCK_SECONDS when "
                                            "capped, whichever is further) after which the layers loop (NUM_LOOPS > 0)")
    # Optimizers
    embed_lr: float = setting(0.6, "Adam learning rate of the embedding when untied")
    head_lr: float = setting(0.008, "Adam learning rate of the untied output head")
    tied_embed_lr: float = setting(0.05, "Adam learning rate of the tied embedding")
    matrix_lr: float = setting(0.04, "Muon learning rate of the block matrices")
    scalar_lr: float = setting(0.04, "Adam learning rate of the control parameters and skip weights")
    muon_momentum: float = setting(0.95, "Muon momentum after warmup")
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations of Muon")
    muon_momentum_warmup_start: float = setting(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = setting(500, "steps over which Muon momentum rises to MUON_MOMENTUM")
    beta1: float = setting(0.9, "Adam beta1")
    beta2: float = setting(0.95, "Adam beta2")
    adam_eps: float = setting(1e-8, "Adam epsilon")
    grad_clip_norm: float = setting(0.0, "clip the global gradient norm to this (0 = off)")
    # The record's training recipe (docs/spec.md §6; the record's names and meanings). Each is off
    # by default, and a run with all of them off is the baseline's, loss for loss.
    muon_ns_coeffs: str = setting("fixed", "Newton-Schulz coefficients of Muon: fixed (one (a, b, c) for every "
                                  "iteration) or polar-express (one tuple per iteration, the record's)",
                                  choices=NS_COEFF_CHOICES)
    muon_row_normalize: bool = setting(False, "Muon: divide each row of the momentum update by its L2 norm "
                                       "before Newton-Schulz")
    muon_wd: float = setting(0.0, "decoupled weight decay of the Muon matrices: w *= 1 - lr*MUON_WD each step")
    adam_wd: float = setting(0.0, "decoupled weight decay of the Adam scalar (and untied head) parameters")
    embed_wd: float = setting(0.0, "decoupled weight decay of the token embedding")
    warmdown_frac: float = setting(0.0, "warm down over this fraction of training, by steps or by the wall-clock "
                                   "cap, whichever is further (0 = WARMDOWN_ITERS decides)")
    min_lr: float = setting(0.0, "floor of the learning-rate multiplier during the warmdown (a fraction of each peak rate)")
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights with this decay; it is "
                               "what is evaluated at the end and exported (0 = off)")
    preset: str = setting("", "a named set of settings (presets/<name>.json) under the environment, flags and "
                          "CONFIG file; empty = none")
    # Hardware
    device: str = setting("auto", "torch device: cuda, cpu, mps (Apple GPU), or auto (cuda when available, else cpu)",
                          choices=("auto", "cpu", "cuda", "mps"))
    compute_dtype: str = setting("auto", "matrix-product dtype: float32, bfloat16, or auto (bf16 on CUDA and Metal, fp32 on CPU and mps)",
                                 choices=("auto", "float32", "bfloat16"))
    compile: str = setting("auto", "torch.compile / mx.compile: 1, 0, or auto (the backend's measured choice)",
                           choices=("auto", "0", "1"))
    mlx_max_microbatch_tokens: int = setting(8192, "MLX: split each micro-batch into chunks of at most this many tokens")
    mlx_eager_eval: bool | str = setting(AUTO, "MLX: evaluate after each chunk to bound memory: 1, 0, or auto "
                                         "(on whenever a step has more than one chunk)", auto="bool")
    # Memory
    memory_budget_gb: float | str = setting(AUTO, "memory (GB) a run may plan for on each device: a number, or auto "
                                            "(0.8 of free CUDA memory, 0.75 of Metal's working set, 0.6 of RAM)",
                                            auto="float")
    # Several processes
    collective_timeout_seconds: float = setting(60.0, "several ranks: a collective (all-reduce, barrier) that makes no "
                                                "progress for this many seconds ends the run with a one-line error "
                                                "(a peer that failed, was killed or hangs)")
    plan: bool = setting(False, "print the resolved run (device, dtype, micro-steps, memory estimate vs budget) "
                         "and exit without writing anything")
    # The artifact's quantization (docs/spec.md §9; QUANT=gptq: §9.2, make quantize). Defaults: the record's run.
    quant: str = setting("int8", "artifact quantization: int8 (the baseline's int8+zlib) or gptq (MATRIX_BITS/EMBED_BITS "
                         "codes with per-row scales, GPTQ or round-to-nearest, optional LQER)", choices=("int8", "gptq"))
    gptq: bool = setting(True, "QUANT=gptq: 1 = GPTQ's error-compensating rounding, 0 = round-to-nearest with the "
                         "same scales (the control)")
    gptq_calibration_batches: int = setting(16, "QUANT=gptq: training batches (TRAIN_BATCH_TOKENS each, from the start "
                                            "of the training stream) whose linear-layer inputs give GPTQ its X^T X")
    matrix_bits: int = setting(6, "QUANT=gptq: bits of the block matrices' codes (2 to 8)")
    embed_bits: int = setting(7, "QUANT=gptq: bits of the embedding's (and an untied head's) codes (2 to 8)")
    matrix_clip_sigmas: float = setting(12.85, "QUANT=gptq: row scale = this many row standard deviations per "
                                        "largest code, for block matrices neither attention nor MLP")
    mlp_clip_sigmas: float = setting(11.5, "QUANT=gptq: the same for matrices named .mlp.")
    attn_clip_sigmas: float = setting(13.0, "QUANT=gptq: the same for matrices named .attn.")
    embed_clip_sigmas: float = setting(14.0, "QUANT=gptq: the same for the embedding and an untied head")
    embed_lookup_weight: float = setting(0.0, "QUANT=gptq: GPTQ of a tied embedding uses the head's X^T X plus this "
                                         "times its mean diagonal times I, for the rows' other use as the input "
                                         "lookup (0: the head's alone, the record's)")
    lqer_enabled: bool = setting(True, "QUANT=gptq: add a low-rank correction of the error to the LQER_TOP_K matrices "
                                 "with the largest error")
    lqer_rank: int = setting(4, "QUANT=gptq: rank of the LQER correction")
    lqer_top_k: int = setting(3, "QUANT=gptq: how many matrices get an LQER correction")
    lqer_factor_bits: int = setting(4, "QUANT=gptq: bits of the LQER factors' codes (symmetric, per row)")
    lqer_asym_enabled: bool = setting(True, "QUANT=gptq: store LQER's A in 2 bits (one scale) and B in 4 bits by groups "
                                      "of LQER_ASYM_GROUP instead")
    lqer_asym_group: int = setting(64, "QUANT=gptq: group size of B's scales when LQER_ASYM_ENABLED")
    compressor: str = setting("zlib", "compressor of the artifact: zlib (level 9), lzma (preset 9), brotli "
                              "(quality 11) or pergroup (codes by role through lrzip's ZPAQ, the rest brotli)",
                              choices=("zlib", "lzma", "brotli", "pergroup"))

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{env_name(f.name)}={value!r}: must be one of {', '.join(choices)}")
        positive = ("iterations", "train_batch_tokens", "train_seq_len", "grad_accum_steps", "val_batch_size",
                    "train_log_every", "muon_backend_steps", "memory_budget_gb",
                    "collective_timeout_seconds",
                    "gptq_calibration_batches", "matrix_clip_sigmas", "mlp_clip_sigmas", "attn_clip_sigmas",
                    "embed_clip_sigmas", "lqer_rank", "lqer_asym_group")
        for name in positive:
            if getattr(self, name) != AUTO and getattr(self, name) <= 0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must be positive")
        non_negative = ("warmup_steps", "warmdown_iters", "max_wallclock_seconds", "val_loss_every",
                        "eval_stride", "eval_seq_len", "eval_batch_seqs", "val_max_tokens",
                        "checkpoint_every", "muon_momentum_warmup_steps", "grad_clip_norm", "adam_eps", "lqer_top_k",
                        "embed_lookup_weight")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must not be negative")
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must be in [0, 1)")
        for name in ("muon_wd", "adam_wd", "embed_wd", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must not be negative")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ConfigError(f"WARMDOWN_FRAC={self.warmdown_frac}: must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"EMA_DECAY={self.ema_decay}: must be in [0, 1)")
        if self.min_lr > 1.0:
            raise ConfigError(f"MIN_LR={self.min_lr}: must be in [0, 1] (a fraction of the peak rate)")
        if 0 < self.val_max_tokens < self.train_seq_len:
            raise ConfigError(f"VAL_MAX_TOKENS={self.val_max_tokens}: must be 0 (all) or at least TRAIN_SEQ_LEN "
                              f"= {self.train_seq_len} (one whole validation window)")
        if self.eval_stride > self.eval_window:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride}: must not exceed the window length "
                              f"{self.eval_window} (EVAL_SEQ_LEN, else TRAIN_SEQ_LEN); a longer stride skips targets")
        self.check_ttt()
        if not 0.0 <= self.enable_looping_at <= 1.0:
            raise ConfigError(f"ENABLE_LOOPING_AT={self.enable_looping_at}: must be a fraction of training in [0, 1]")
        if not math.isfinite(self.embed_lookup_weight):
            raise ConfigError(f"EMBED_LOOKUP_WEIGHT={self.embed_lookup_weight}: must be a finite number")
        if not math.isfinite(self.collective_timeout_seconds):
            raise ConfigError(f"COLLECTIVE_TIMEOUT_SECONDS={self.collective_timeout_seconds}: must be a finite number")
        if self.mlx_max_microbatch_tokens <= 0:
            raise ConfigError(f"MLX_MAX_MICROBATCH_TOKENS={self.mlx_max_microbatch_tokens}: must be positive")
        for name in ("matrix_bits", "embed_bits", "lqer_factor_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: unsupported; must be 2 to 8 (codes are "
                                  "stored one per int8)")
        parse_report_to(self.report_to)
        self.model_spec()  # validates the model settings too

    def check_ttt(self) -> None:
        """The TTT settings' ranges, checked whether or not TTT_ENABLED (a typo never waits for the end of
        a run); the chunk against the window only when on (TRAIN_SEQ_LEN may be shorter than 48)."""
        for name in ("ttt_lora_rank", "ttt_chunk_size", "ttt_batch_size", "ttt_grad_steps",
                     "phased_ttt_num_phases", "global_ttt_chunk_tokens", "global_ttt_batch_seqs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must be positive")
        for name in ("ttt_lora_alpha", "ttt_lora_lr", "ttt_eval_seq_len", "ttt_weight_decay", "phased_ttt_prefix_docs",
                     "global_ttt_lr", "global_ttt_epochs", "global_ttt_warmup_start_lr", "global_ttt_warmup_chunks",
                     "global_ttt_grad_clip", "eval_time_budget_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must not be negative")
        for name in ("ttt_beta1", "ttt_beta2", "global_ttt_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must be in [0, 1)")
        if self.ttt_enabled and self.ttt_chunk_size > self.ttt_window:
            raise ConfigError(f"TTT_CHUNK_SIZE={self.ttt_chunk_size}: must not exceed the TTT window {self.ttt_window} "
                              "(TTT_EVAL_SEQ_LEN, else TRAIN_SEQ_LEN)")

    @property
    def ttt_window(self) -> int:
        """Context window of the TTT forwards: TTT_EVAL_SEQ_LEN, else TRAIN_SEQ_LEN."""
        return self.ttt_eval_seq_len or self.train_seq_len

    def model_spec(self) -> ModelSpec:
        names = model_fields()
        try:
            return ModelSpec(**{name: self.spec_value(name) for name in names})
        except ConfigError as e:
            # Name the setting as the user typed it: NUM_HEADS, not num_heads.
            message = str(e)
            for name in names:
                if message.startswith(name + "="):
                    message = env_name(name) + message[len(name):]
            raise ConfigError(message) from None

    def spec_value(self, name: str):
        """The value of ModelSpec field `name` this run's model gets (ROPE_TRAIN_SEQ_LEN=0 under ROPE_YARN
        is TRAIN_SEQ_LEN)."""
        if name == "rope_train_seq_len" and self.rope_yarn and not self.rope_train_seq_len:
            return self.train_seq_len
        return getattr(self, name)

    @property
    def eval_window(self) -> int:
        """L of the sliding evaluation: EVAL_SEQ_LEN, else TRAIN_SEQ_LEN."""
        return self.eval_seq_len or self.train_seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Reading settings from flags, environment and file
# ---------------------------------------------------------------------------------------------

def env_name(field_name: str) -> str:
    return field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(field_name: str, raw: Any, kind: str) -> Any:
    """Convert a raw value (a string from env/flags, or a JSON value) to the field's type.

    Kind "int|auto" (and "float|auto", "bool|auto") also takes the word auto."""
    if kind.endswith("|auto"):
        if isinstance(raw, str) and raw.strip().lower() == AUTO:
            return AUTO
        kind = kind[:-len("|auto")]
    label = f"{env_name(field_name)}={raw!r}"
    if kind == "int | float":   # a number: an int when it is whole (MLP_MULT=4.0 is 4), else a float
        value = parse_value(field_name, raw, "float")
        return int(value) if value.is_integer() else value
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"{label}: expected 1/0 or true/false")
    if kind == "int":
        if isinstance(raw, bool):
            raise ConfigError(f"{label}: expected an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        try:
            return int(str(raw).strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{label}: expected an integer") from None
    if kind == "float":
        if isinstance(raw, bool):
            raise ConfigError(f"{label}: expected a number")
        try:
            value = float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
        except ValueError:
            raise ConfigError(f"{label}: expected a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{label}: expected a finite number")
        return value
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise ConfigError(f"{label}: expected a string")
    return str(raw)


def _field_kinds() -> dict[str, str]:
    kinds = {}
    for f in fields(TrainConfig):
        if f.metadata.get("auto"):
            kinds[f.name] = f.metadata["auto"] + "|auto"
        else:
            kinds[f.name] = {"bool": "bool", "int": "int", "float": "float", "int | float": "int | float"}.get(str(f.type), "str")
    return kinds


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object of settings, keyed by env name or field name."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: must hold a JSON object of settings")
    kinds = _field_kinds()
    out = {}
    for key, value in data.items():
        name = str(key).lower()
        if name not in kinds:
            raise ConfigError(f"config file {p}: unknown setting {key!r}")
        out[name] = value
    return out


class _ArgumentParserRaising(argparse.ArgumentParser):
    def error(self, message):  # one-line error instead of usage + exit
        raise ConfigError(message)


def add_setting_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the settings dataclass `cls`, with its help and default."""
    for f in fields(cls):
        # A true/false setting's flag alone means true: --plan is --plan 1.
        flag_alone = {"nargs": "?", "const": "1"} if str(f.type) == "bool" else {}
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=env_name(f.name), **flag_alone,
                            help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"))


def parse_settings(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                   prog: str | None = None, description: str | None = None, pass_on: bool = False):
    """A settings dataclass of a command other than the trainers (sampling, the tying analysis):
    flag > environment (the field's name in capitals) > default; `--help` prints every setting.

    With pass_on=True the command also takes the trainers' settings (make eval): flags that are not
    `cls`'s, and --help, are left for load_config, and (settings, those flags) is returned."""
    environ = os.environ if environ is None else environ
    parser = _ArgumentParserRaising(prog=prog, allow_abbrev=False, description=description, add_help=not pass_on,
                                    epilog="Each flag can also be set as the environment variable named in "
                                           "capitals; a flag wins.")
    add_setting_flags(parser, cls)
    argv = list(argv) if argv is not None else []
    args, rest = parser.parse_known_args(argv) if pass_on else (parser.parse_args(argv), [])
    values = {}
    for f in fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is not None:
            values[f.name] = parse_value(f.name, raw, str(f.type))
    return (cls(**values), rest) if pass_on else cls(**values)


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                prog: str | None = None) -> TrainConfig:
    """TrainConfig from flags > environment > config file > defaults.

    `argv` excludes the program name; `environ` defaults to os.environ. `--help` prints every
    setting and exits.
    """
    environ = os.environ if environ is None else environ
    parser = _ArgumentParserRaising(prog=prog, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="JSON file of settings (env CONFIG)")
    add_setting_flags(parser, TrainConfig)
    args = parser.parse_args(list(argv) if argv is not None else [])
    kinds = _field_kinds()

    raw: dict[str, Any] = {}
    config_path = args.config or environ.get("CONFIG")
    if config_path:
        raw.update(read_config_file(config_path))
    for name in kinds:
        if env_name(name) in environ:
            raw[name] = environ[env_name(name)]
    for name in kinds:
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
    # A preset sits under everything else: what the user set explicitly wins.
    preset_name = str(raw.get("preset", "")).strip()
    if preset_name:
        raw = {**load_preset(preset_name, kinds).settings, **raw, "preset": preset_name}

    values = {name: parse_value(name, value, kinds[name]) for name, value in raw.items()}
    return TrainConfig(**values)


def preset_of(cfg: TrainConfig) -> Preset | None:
    """The preset a config was loaded with (PRESET=...), or None."""
    return load_preset(cfg.preset, _field_kinds()) if cfg.preset else None


def settings_table() -> list[tuple[str, str, Any, str]]:
    """(env name, flag, default, help) of every setting, for the README and --help."""
    return [(env_name(f.name), flag_name(f.name), f.default, f.metadata["help"]) for f in fields(TrainConfig)]
