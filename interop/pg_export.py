"""`make pg-export CHECKPOINT=... OUT=final_model.pt`: a twingpt checkpoint as train_gpt.py's state dict.

The file is what train_gpt.py writes as final_model.pt (interop/export.py): its names and dtypes,
RoPE converted to its -θ direction, loadable with `model.load_state_dict(torch.load(OUT), strict=True)`.
train_gpt.py's RMSNorm epsilon is float32's machine epsilon; when the checkpoint's norm_eps differs,
one warning line gives the difference that makes, measured with the float64 reference forward on the
first EPS_CHECK_SEQS validation sequences (TRAIN_SEQ_LEN tokens each) of the checkpoint's own
dataset (or DATA_PATH): Δval_loss (mean cross-entropy, train_gpt.py's epsilon minus ours) and the
largest |Δlogit|. Nothing is written on an error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core.checkpoint import load_checkpoint
from core.config import parse_settings, setting
from core.errors import CheckpointError, ConfigError, DatasetError, exit_on_user_error
from core.files import write_bytes_atomic
from data.datasets import resolve_dataset
from data.stream import load_validation_tokens
from interop.conventions import TORCH_SCRIPT_EPS
from interop.export import eps_difference, reference_state_dict
from interop.record_layout import bank, check_exportable, record_settings_text, uses_record_options


@dataclass(frozen=True)
class ExportSettings:
    checkpoint: str = setting("", "the twingpt checkpoint (.safetensors) to export")
    out: str = setting("", "the state dict to write (final_model.pt)")
    data_path: str = setting("", "dataset of the epsilon check (empty: the one the checkpoint was trained on)")
    tokenizer_path: str = setting("", "its tokenizer (empty: the dataset's)")
    eps_check_seqs: int = setting(1, "validation sequences the epsilon check scores (0: no check)")
    layout: str = setting("auto", "baseline (the naive baseline's train_gpt.py), record (the 1.0611 record's banked "
                                  "train_gpt.py) or auto (record when the checkpoint uses a record option)",
                          choices=("auto", "baseline", "record"))

    def __post_init__(self):
        if self.layout not in ("auto", "baseline", "record"):
            raise ConfigError(f"LAYOUT={self.layout!r}: must be one of auto, baseline, record")
        if self.eps_check_seqs < 0:
            raise ConfigError(f"EPS_CHECK_SEQS={self.eps_check_seqs}: must be >= 0")


def eps_warning(ckpt, settings: ExportSettings) -> str | None:
    """The one-line warning when the checkpoint's norm_eps is not train_gpt.py's, else None."""
    spec = ckpt.spec
    if spec.norm_eps == TORCH_SCRIPT_EPS:
        return None
    head = (f"warning: {ckpt.path} has norm_eps={spec.norm_eps:.8g}, train_gpt.py uses {TORCH_SCRIPT_EPS:.8g}: "
            "its logits will differ from ours")
    if settings.eps_check_seqs == 0:
        return head + " (not measured: EPS_CHECK_SEQS=0)"
    data_path = settings.data_path or str(ckpt.config.get("data_path", ""))
    tokenizer_path = settings.tokenizer_path or (str(ckpt.config.get("tokenizer_path", "")) if not settings.data_path else "")
    seq_len = int(ckpt.config.get("train_seq_len", 1024))
    try:
        dataset = resolve_dataset(data_path, tokenizer_path, spec.vocab_size, check_tokens=False)
        tokens = load_validation_tokens(dataset.val_files, seq_len, spec.vocab_size)
        d = eps_difference(spec, ckpt.weights, tokens, seq_len, settings.eps_check_seqs)
    except (DatasetError, ValueError) as err:
        return head + f" (not measured: {' '.join(str(err).split())}; set DATA_PATH=)"
    return head + (f" by Δval_loss {d.delta_loss:+.3g} nats, max |Δlogit| {d.max_delta_logit:.3g} "
                   f"on the first {d.tokens} validation tokens of {dataset.name}")


def resolved_layout(layout: str, spec) -> str:
    """LAYOUT as "baseline" or "record": as set, or auto, record when the checkpoint uses a record option."""
    if layout == "auto":
        return "record" if uses_record_options(spec) else "baseline"
    return layout


def export_checkpoint(settings: ExportSettings) -> list[str]:
    """Write the state dict; returns the lines to print (warning first, when there is one)."""
    if not settings.checkpoint:
        raise ConfigError("CHECKPOINT is not set: CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors")
    if not settings.out:
        raise ConfigError("OUT is not set: OUT=final_model.pt")
    ckpt = load_checkpoint(settings.checkpoint)
    record = resolved_layout(settings.layout, ckpt.spec) == "record"
    if record:
        check_exportable(ckpt.spec)
    arrays, notes = reference_state_dict(ckpt.spec, ckpt.weights)
    if record:
        arrays = bank(ckpt.spec, arrays)
        notes.append("banked as the record's train_gpt.py holds them (qo_bank, kv_bank, mlp_up_bank, mlp_down_bank); "
                     "load it with the run's settings: " + record_settings_text(ckpt.spec))
    warning = eps_warning(ckpt, settings)
    from interop.torch_files import torch_save_bytes
    try:
        write_bytes_atomic(Path(settings.out), torch_save_bytes(arrays))
    except OSError as err:
        raise CheckpointError(f"OUT={settings.out}: cannot write it ({err.strerror or err})") from None
    lines = [warning] if warning else []
    script = "the record's train_gpt.py" if record else "train_gpt.py"
    lines.append(f"wrote {settings.out}: {len(arrays)} tensors as {script} saves them (tok_emb.weight bfloat16, "
                 "the rest float32), RoPE converted to its -θ direction")
    return lines + [f"  {note}" for note in notes]


@exit_on_user_error
def main(argv=None, environ=None) -> list[str]:
    settings = parse_settings(ExportSettings, sys.argv[1:] if argv is None else argv, environ,
                              prog="python -m interop.pg_export",
                              description="A twingpt checkpoint as the state dict train_gpt.py loads.")
    lines = export_checkpoint(settings)
    for line in lines:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)
    return lines


if __name__ == "__main__":
    main()
