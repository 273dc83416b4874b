"""The parameter table: every parameter of a spec, once, with everything anyone needs to know of it.

Both backends build their modules from these names and shapes, the initializer draws from these
init rules, the optimizers group parameters by `group`, and the artifact keeps `keep_float`
tensors in float. Nothing else in the project lists parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ModelSpec

# Names matching one of these are control parameters (docs/spec.md §6): Adam, never Muon, and kept in
# fp32 in the artifact. The plural forms are the reference trainers' spellings.
CONTROL_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights", "skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas",
    "attn_gate_w", "smear_gate", "smear_lambda",   # record options: attention (docs/spec.md §4.3, §4.4)
)

# The initial weight of each lane's own residual in the parallel decoder (docs/spec.md §4.9), the record's.
PARALLEL_RESID_INIT = 1.1

# Optimizer groups (docs/spec.md §6).
EMBED, HEAD, MATRIX, SCALAR = "embed", "head", "matrix", "scalar"


def optimizer_slots(group: str) -> tuple[str, ...]:
    """State slots each optimizer group keeps per parameter: Muon's momentum buffer for the matrix
    group, Adam's two moments for the others (keys "<name>.<slot>", trainer/backend.py)."""
    return ("momentum_buffer",) if group == MATRIX else ("exp_avg", "exp_avg_sq")


def is_control(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_PATTERNS)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    init: str          # "normal", "zeros", "ones", "const", "linear_uniform", "resid_mix"
    group: str         # EMBED, HEAD, MATRIX or SCALAR
    init_value: float = 0.0   # std for "normal", value for "const"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def keep_float(self) -> bool:
        """Kept in fp32 in the artifact whatever its size (docs/spec.md §9)."""
        return is_control(self.name)


def param_table(spec: ModelSpec) -> list[ParamInfo]:
    """Every parameter of `spec`, in the fixed order the initializer draws them (docs/spec.md §3)."""
    V, d, H = spec.vocab_size, spec.model_dim, spec.num_heads
    kv, F = spec.kv_dim, spec.hidden_dim
    embed_std = spec.tied_embed_init_std if spec.tie_embeddings else 1.0
    table = [ParamInfo("tok_emb.weight", (V, d), "normal", EMBED, embed_std)]
    if not spec.tie_embeddings:
        table.append(ParamInfo("lm_head.weight", (V, d), "zeros", HEAD))
    table.append(ParamInfo("skip_weights", (spec.num_skip_weights, d), "ones", SCALAR))
    # record options: blocks and layout (docs/spec.md §4.8, §4.9); no random draws, so the other
    # parameters' initial values do not depend on them.
    if spec.skip_gates_enabled:
        table.append(ParamInfo("skip_gates", (spec.num_skip_weights, d), "zeros", SCALAR))
    if spec.parallel_start_layer:
        L = spec.num_layers
        table.append(ParamInfo("parallel_post_lambdas", (L, 2, 2), "ones", SCALAR))
        table.append(ParamInfo("parallel_resid_lambdas", (L, 2), "const", SCALAR, PARALLEL_RESID_INIT))
    if spec.smear_gate_enabled:   # docs/spec.md §4.4
        table += [ParamInfo("smear_gate.weight", (1, spec.gate_window), "zeros", SCALAR),
                  ParamInfo("smear_lambda", (1,), "zeros", SCALAR)]
    for i in range(spec.num_layers):
        p = f"blocks.{i}."
        table += [
            ParamInfo(p + "attn.c_q.weight", (d, d), "linear_uniform", MATRIX),
            ParamInfo(p + "attn.c_k.weight", (kv, d), "linear_uniform", MATRIX),
            ParamInfo(p + "attn.c_v.weight", (kv, d), "linear_uniform", MATRIX),
            ParamInfo(p + "attn.proj.weight", (d, d), "zeros", MATRIX),
            ParamInfo(p + "attn.q_gain", (H,), "const", SCALAR, spec.qk_gain_init),
        ]
        if spec.sparse_attn_gate_enabled:   # docs/spec.md §4.3
            std = spec.sparse_attn_gate_init_std
            table.append(ParamInfo(p + "attn.attn_gate_w", (H, spec.gate_window), "normal" if std else "zeros",
                                   SCALAR, std))
        table += [
            ParamInfo(p + "mlp.fc.weight", (F, d), "linear_uniform", MATRIX),
            ParamInfo(p + "mlp.proj.weight", (d, F), "zeros", MATRIX),
            ParamInfo(p + "attn_scale", (d,), "ones", SCALAR),
            ParamInfo(p + "mlp_scale", (d,), "ones", SCALAR),
            ParamInfo(p + "resid_mix", (2, d), "resid_mix", SCALAR),
        ]
    for info in table:  # the group rule of docs/spec.md §6, checked against the table itself
        if info.name.startswith("blocks."):
            expected = MATRIX if len(info.shape) == 2 and not is_control(info.name) else SCALAR
            assert info.group == expected, info
    return table


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in param_table(spec)}


def param_groups(spec: ModelSpec) -> dict[str, list[str]]:
    """Optimizer group -> parameter names (groups with no parameter are absent)."""
    groups: dict[str, list[str]] = {}
    for p in param_table(spec):
        groups.setdefault(p.group, []).append(p.name)
    return groups


def group_lr(group: str, cfg) -> float:
    """Base learning rate of an optimizer group (docs/spec.md §6); `cfg` is a TrainConfig."""
    if group == EMBED:
        return cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    return {HEAD: cfg.head_lr, MATRIX: cfg.matrix_lr, SCALAR: cfg.scalar_lr}[group]


@dataclass(frozen=True)
class ParamCount:
    total: int            # every parameter as the model uses it (the tied matrix counted twice: embed + head)
    unique: int           # distinct stored numbers (the tied matrix once)
    embedding: int        # tok_emb (+ lm_head when untied)
    non_embedding: int    # unique - embedding
    saved_by_tying: int   # V*d when tied, else 0


def count_params(spec: ModelSpec) -> ParamCount:
    table = param_table(spec)
    unique = sum(p.numel for p in table)
    embedding = sum(p.numel for p in table if p.group in (EMBED, HEAD))
    saved = spec.vocab_size * spec.model_dim if spec.tie_embeddings else 0
    return ParamCount(total=unique + saved, unique=unique, embedding=embedding,
                      non_embedding=unique - embedding, saved_by_tying=saved)


def check_weights(spec: ModelSpec, weights: dict, *, source: str = "weights") -> None:
    """Every name of the table present with its shape, and nothing else (as nanoGPT's from_pretrained asserts)."""
    from core.errors import CheckpointError

    expected = param_shapes(spec)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing parameter(s) {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else "") + " for this model spec")
    if extra:
        raise CheckpointError(f"{source}: unexpected parameter(s) {', '.join(extra[:5])}"
                              + (" ..." if len(extra) > 5 else "") + " for this model spec")
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: {name} has shape {got}, this model spec needs {shape}")


def infer_spec(weights: dict, *, source: str = "weights", **settings) -> ModelSpec:
    """The ModelSpec whose parameter table `weights` match, read from the tensor shapes.

    Every size is in a shape: V and d in tok_emb, L in the block count, H in q_gain, K in c_k's
    rows over the head width, the MLP multiple in fc (a float when fc's rows are no multiple of d),
    tying in lm_head's absence, gated skips in skip_gates' presence, the sparse attention and smear
    gates in their presence and GATE_WINDOW in their width. What no shape holds (logit_softcap,
    rope_base, norm_eps, XSA_LAST_N, ROPE_DIMS, the loop and lane settings, ...) comes from
    `settings` or the defaults. Used by
    everything that reads weights without a spec: our artifact and the reference trainers' files.
    """
    from core.errors import CheckpointError, ConfigError

    def shape(name: str) -> tuple[int, ...]:
        if name not in weights:
            raise CheckpointError(f"{source}: has no {name}; not the weights of this GPT")
        return tuple(weights[name].shape)

    vocab_size, model_dim = shape("tok_emb.weight")
    num_layers = len({name.split(".")[1] for name in weights if name.startswith("blocks.")})
    if num_layers == 0:
        raise CheckpointError(f"{source}: has no blocks.N parameters; not the weights of this GPT")
    (num_heads,) = shape("blocks.0.attn.q_gain")
    kv_rows, hidden = shape("blocks.0.attn.c_k.weight")[0], shape("blocks.0.mlp.fc.weight")[0]
    head_dim = model_dim // num_heads if num_heads and model_dim % num_heads == 0 else 0
    mlp_mult = hidden // model_dim if hidden % model_dim == 0 else hidden / model_dim
    if not head_dim or kv_rows % head_dim or int(mlp_mult * model_dim) != hidden:
        raise CheckpointError(f"{source}: shapes tok_emb {(vocab_size, model_dim)}, q_gain {(num_heads,)}, "
                              f"c_k {(kv_rows, model_dim)}, fc {(hidden, model_dim)} fit no model spec")
    # The gates of docs/spec.md §4.3-§4.4 are there or not, and their width is GATE_WINDOW.
    gates = {"sparse_attn_gate_enabled": "blocks.0.attn.attn_gate_w" in weights,
             "smear_gate_enabled": "smear_gate.weight" in weights}
    for name in ("blocks.0.attn.attn_gate_w", "smear_gate.weight"):
        if name in weights:
            gates["gate_window"] = shape(name)[-1]
    shaped = {"vocab_size": vocab_size, "num_layers": num_layers, "model_dim": model_dim, "num_heads": num_heads,
              "num_kv_heads": kv_rows // head_dim, "mlp_mult": mlp_mult,
              "tie_embeddings": "lm_head.weight" not in weights, "skip_gates_enabled": "skip_gates" in weights,
              **gates}
    try:
        spec = ModelSpec(**{**settings, **shaped})
    except ConfigError as err:   # the settings do not fit the shapes (LOOP_END past these layers, ...)
        raise CheckpointError(f"{source}: {err}") from None
    check_weights(spec, weights, source=source)
    return spec
