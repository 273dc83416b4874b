"""Evaluating a model file without training: `make eval`, python -m backend_{torch,mlx}.eval.

    make eval CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors [EVAL_STRIDE=64] [BACKEND=mlx]
    make eval ARTIFACT=runs/<run>/model.int8.zlib [DATA_PATH=... TOKENIZER_PATH=...] [OUT=eval.json]

One of CHECKPOINT (our .safetensors) or ARTIFACT (our model.int8.zlib), read by
trainer.model_files. Every trainer setting applies (DATA_PATH, TOKENIZER_PATH, TRAIN_SEQ_LEN,
VAL_BATCH_SIZE, EVAL_STRIDE, EVAL_SEQ_LEN, EVAL_BATCH_SEQS, DEVICE, COMPUTE_DTYPE, ...); those not
given are the run's that wrote the file (a checkpoint's own settings, an artifact's run folder's
config.json), so by default the file is scored as its run scored it. EVAL_STRIDE=0 is the standard
evaluation (non-overlapping TRAIN_SEQ_LEN windows), EVAL_STRIDE>0 the sliding one (docs/spec.md §7).

Prints one line (stdout): `eval ... stride:S seq_len:L val_loss:... val_bpb:...`; progress goes to
stderr. Writes nothing unless OUT=path is given: then the figures as JSON, written atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from core.config import env_name, load_config, parse_settings, setting
from core.errors import ConfigError, DatasetError, exit_on_user_error
from core.files import write_bytes_atomic
from core.metrics import build_byte_tables
from data.datasets import resolve_dataset
from data.stream import load_validation_tokens
from trainer.model_files import NOT_IN_SHAPES, SETTING, load_model_file, run_config
from trainer.plan import eval_geometry
from trainer.progress import EvalProgress
from trainer.summary import val_subset_note
from trainer.ttt import check_ttt_runnable, legality_line, run_ttt, ttt_summary
from trainer.validation import evaluate, evaluate_sliding

# The settings a file's own run gives when the user does not: its data, its windows, its batches.
INHERITED = ("data_path", "tokenizer_path", "train_seq_len", "val_batch_size", *NOT_IN_SHAPES)


@dataclass(frozen=True)
class EvalFileSettings:
    checkpoint: str = setting("", "twingpt checkpoint (.safetensors) to evaluate")
    artifact: str = setting("", "twingpt artifact (model.int8.zlib, or model.gptq.brotli ... of QUANT/COMPRESSOR) to evaluate")
    out: str = setting("", "write the figures to this JSON file (empty: write nothing)")


def parse_eval_settings(argv: Sequence[str], environ: Mapping[str, str], prog: str):
    """(EvalFileSettings, path, kind, TrainConfig): --checkpoint/--artifact/--out (or CHECKPOINT,
    ARTIFACT, OUT), every trainer setting from flags > environment > the file's run > defaults."""
    settings, rest = parse_settings(EvalFileSettings, argv, environ, prog, pass_on=True)
    if "--help" in rest or "-h" in rest:
        print(__doc__.strip(), "\n\nSettings besides --checkpoint, --artifact and --out: those of the trainers:")
        load_config(["--help"], environ={}, prog=prog)   # prints them and exits
    if bool(settings.checkpoint) == bool(settings.artifact):
        raise ConfigError("give exactly one of CHECKPOINT=<checkpoint.safetensors> or ARTIFACT=<model.int8.zlib>"
                          + (" (both were given)" if settings.checkpoint else ""))
    kind = "checkpoint" if settings.checkpoint else "artifact"
    path = Path(settings.checkpoint or settings.artifact)
    base = run_config(path, kind)
    inherited = {env_name(k): str(base[k]) for k in INHERITED if base.get(k) not in (None, "")}
    cfg = load_config(rest, environ={**inherited, **environ}, prog=prog)
    return settings, path, kind, cfg


def run_eval(settings: EvalFileSettings, path: Path, kind: str, cfg, session, out=None, err=None) -> dict:
    """Load the file, check it against the dataset, score it, print the line; returns the figures."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    model = load_model_file(path, kind, cfg)
    name, vocab = f"{SETTING[kind]}={path}", model.spec.vocab_size
    try:
        dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, vocab, check_tokens=False)
        tables = build_byte_tables(dataset.tokenizer_path, vocab)
        val_tokens = load_validation_tokens(dataset.val_files, cfg.train_seq_len, vocab, cfg.val_max_tokens)
    except DatasetError as e:   # the vocabulary is the model's, not a VOCAB_SIZE setting
        raise DatasetError(str(e).replace("VOCAB_SIZE=", f"the model of {name} has vocab_size=")) from None
    check_ttt_runnable(cfg, session.world_size)
    session.setup(model.spec, cfg)
    session.load_weights(model.weights)
    session.set_looping(model.looping)
    master = session.rank == 0
    t0 = time.perf_counter()
    geometry = eval_geometry(cfg, session.world_size)
    progress = EvalProgress("eval", master, stream=err)
    if cfg.eval_stride > 0:
        loss, bpb = evaluate_sliding(session, val_tokens, tables, cfg.eval_window, cfg.eval_stride,
                                     geometry.sliding_batch_seqs, progress)
    else:
        loss, bpb = evaluate(session, val_tokens, tables, cfg.train_seq_len, geometry.val_batch_seqs, progress)
    seconds = time.perf_counter() - t0
    seq_len = cfg.eval_window if cfg.eval_stride > 0 else cfg.train_seq_len
    figures = {"backend": session.name, "device": session.device, "compute_dtype": session.compute_dtype,
               kind: str(path), "dataset": dataset.name, "tokenizer": str(dataset.tokenizer_path),
               "eval_stride": cfg.eval_stride, "eval_seq_len": seq_len, "targets": int(len(val_tokens) - 1),
               "val_loss": loss, "val_bpb": bpb, "eval_time_s": seconds}
    if master:
        print(f"eval backend:{session.name} {kind}:{path} dataset:{dataset.name} stride:{cfg.eval_stride} "
              f"seq_len:{seq_len} targets:{figures['targets']} val_loss:{loss:.8f} val_bpb:{bpb:.8f} "
              f"eval_time:{seconds:.1f}s" + val_subset_note(cfg), file=out, flush=True)
    if cfg.ttt_enabled:   # after the plain figures, which it leaves as they are
        ttt = run_ttt(session, val_tokens, tables, cfg, EvalProgress("ttt", master, stream=err, unit="target"))
        figures |= ttt_summary(ttt)
        if master:
            print(f"eval_ttt backend:{session.name} {kind}:{path} documents:{ttt.documents} targets:{ttt.targets} "
                  f"val_loss:{ttt.val_loss:.8f} val_bpb:{ttt.val_bpb:.8f} eval_time:{ttt.seconds:.1f}s "
                  f"(budget {cfg.eval_time_budget_seconds:g}s)", file=out, flush=True)
            print(legality_line(ttt.record), file=out, flush=True)
    if master:
        if settings.out:
            write_bytes_atomic(settings.out, (json.dumps(figures, indent=2) + "\n").encode())
    return figures


@exit_on_user_error
def main(prog: str, make_session, argv=None, environ=None) -> dict:
    """The command line of python -m backend_torch.eval and python -m backend_mlx.eval.

    `make_session(cfg)` is called once the settings are good (a bad one answers before torch or MLX
    is imported)."""
    argv = sys.argv[1:] if argv is None else argv
    settings, path, kind, cfg = parse_eval_settings(argv, os.environ if environ is None else environ, prog)
    session = make_session(cfg)
    try:
        return run_eval(settings, path, kind, cfg, session)
    finally:
        session.close()
