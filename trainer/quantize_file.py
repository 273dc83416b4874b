"""Re-quantizing a checkpoint without training: `make quantize`, python -m backend_{torch,mlx}.quantize.

    make quantize CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors [OUT=model.gptq.brotli]
    make quantize CHECKPOINT=... QUANT=gptq MATRIX_BITS=5 EMBED_BITS=7 LQER_ENABLED=0 COMPRESSOR=lzma

The artifact of docs/spec.md §9 is built from the checkpoint's weights with the QUANT, COMPRESSOR and
GPTQ settings given (QUANT=gptq: the session collects X^T X of every matrix's inputs over
GPTQ_CALIBRATION_BATCHES training batches, core/quantize.py does the rest), then the model is scored
again after the round trip. Unset settings are the checkpoint's run's, as with `make eval`.

Prints (stdout) the artifact's bytes, the budget line and the round-trip val_loss/val_bpb; progress
goes to stderr. Writes nothing unless OUT=path is given: then the artifact, atomically.

The budget counts what a submission ships: the artifact plus the code that trains the model and
reads the artifact back, which for twingpt is every .py file of core/, data/, interop/, trainer/ and
the backend used (CODE_PACKAGES), counted as they are on disk, uncompressed.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from core import artifact
from core.config import TrainConfig, env_name, load_config, parse_settings, setting
from core.errors import ConfigError, DatasetError, exit_on_user_error
from core.metrics import build_byte_tables
from core.params import param_table
from core.quantize import quantize_model
from data.datasets import resolve_dataset
from data.stream import DistributedTokenLoader, load_validation_tokens
from trainer.model_files import UNSHAPED, load_model_file, run_config
from trainer.plan import eval_geometry
from trainer.progress import EvalProgress
from trainer.summary import val_subset_note
from trainer.validation import evaluate

REPO = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("core", "data", "interop", "trainer")   # and backend_<name>
# The settings a checkpoint's own run gives when the user does not (its data and windows).
INHERITED = ("data_path", "tokenizer_path", "train_seq_len", "train_batch_tokens", "val_batch_size", *UNSHAPED)


@dataclass(frozen=True)
class QuantizeFileSettings:
    checkpoint: str = setting("", "twingpt checkpoint (.safetensors) to quantize")
    out: str = setting("", "write the artifact to this file (empty: write nothing)")


# ---------------------------------------------------------------------------------------------
# The artifact of a run's weights: written once for the training loop and make quantize
# ---------------------------------------------------------------------------------------------

def artifact_label(cfg: TrainConfig) -> str:
    """int8_zlib (the baseline's), or e.g. gptq6_brotli / rtn6_lzma (matrix bits, compressor)."""
    if cfg.quant == "int8":
        return f"int8_{cfg.compressor}"
    return f"{'gptq' if cfg.gptq else 'rtn'}{cfg.matrix_bits}_{cfg.compressor}"


def artifact_name(cfg: TrainConfig) -> str:
    """The run folder's artifact: model.int8.zlib by default, model.gptq.brotli for QUANT=gptq COMPRESSOR=brotli."""
    return f"model.{cfg.quant}.{cfg.compressor}"


def calibration_batches(cfg: TrainConfig, train_files, rank: int, world_size: int, vocab_size: int) -> list:
    """This rank's share of the first GPTQ_CALIBRATION_BATCHES training batches (TRAIN_BATCH_TOKENS
    each), from the start of the training stream: the same tokens for every backend and run."""
    if cfg.train_batch_tokens % (world_size * cfg.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens}: GPTQ's calibration batches must split into "
                          f"{world_size} rank(s) of whole TRAIN_SEQ_LEN={cfg.train_seq_len} sequences")
    loader = DistributedTokenLoader(train_files, rank, world_size, vocab_size)
    return [loader.next_batch(cfg.train_batch_tokens // world_size, cfg.train_seq_len)
            for _ in range(cfg.gptq_calibration_batches)]


def build_artifact(cfg: TrainConfig, spec, weights: dict, session, train_files, say=None) -> bytes:
    """The artifact bytes of `weights` under cfg's QUANT/COMPRESSOR settings. `say(line)` hears progress."""
    say = say or (lambda line: None)
    artifact.check_compressor(cfg.compressor)
    if cfg.quant == "int8":
        return compress(artifact.quantize(weights), cfg.compressor, say)
    hessians = {}
    if cfg.gptq:
        t0 = time.perf_counter()
        batches = calibration_batches(cfg, train_files, session.rank, session.world_size, spec.vocab_size)
        say(f"calibration: X^T X of every matrix's inputs over {len(batches)} batches of "
            f"{cfg.train_batch_tokens:,} tokens ...")
        hessians = session.input_second_moments(batches)
        say(f"calibration: {len(hessians)} statistics in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    tensors = quantize_model(weights, param_table(spec), hessians, cfg,
                             progress=lambda i, n, name: say(f"quantize [{i + 1}/{n}] {name}"))
    lqer = [name for name, t in tensors.items() if "lqer" in t.info]
    say(f"quantized in {time.perf_counter() - t0:.1f}s ({'GPTQ' if cfg.gptq else 'round-to-nearest'}"
        + (f"; LQER on {', '.join(lqer)})" if lqer else ")"))
    return compress(tensors, cfg.compressor, say)


def compress(tensors: dict, compressor: str, say) -> bytes:
    t0 = time.perf_counter()
    blob = artifact.pack_tensors(tensors, compressor)
    say(f"compressed ({compressor}) to {len(blob):,} bytes in {time.perf_counter() - t0:.1f}s")
    return blob


# ---------------------------------------------------------------------------------------------
# The budget: the artifact plus the code
# ---------------------------------------------------------------------------------------------

def code_files(backend: str) -> list[Path]:
    """The code a twingpt submission ships with `backend`: every .py of CODE_PACKAGES and backend_<name>."""
    return [path for package in (*CODE_PACKAGES, f"backend_{backend}")
            for path in sorted((REPO / package).rglob("*.py"))]


def budget_line(artifact_bytes: int, backend: str) -> str:
    files = code_files(backend)
    code = sum(path.stat().st_size for path in files)
    total = artifact_bytes + code
    budget = artifact.ARTIFACT_BUDGET_BYTES
    verdict = f"{budget - total:,} to spare" if total <= budget else f"{total - budget:,} OVER"
    packages = ", ".join(f"{p}/" for p in (*CODE_PACKAGES, f"backend_{backend}"))
    return (f"budget: artifact {artifact_bytes:,} + code {code:,} ({len(files)} .py files of {packages}) "
            f"= {total:,} bytes of {budget:,} ({100.0 * total / budget:.1f}%, {verdict})")


# ---------------------------------------------------------------------------------------------
# make quantize
# ---------------------------------------------------------------------------------------------

def parse_quantize_settings(argv: Sequence[str], environ: Mapping[str, str], prog: str):
    """(QuantizeFileSettings, TrainConfig): CHECKPOINT and OUT, then every trainer setting from flags >
    environment > the checkpoint's run > defaults."""
    settings, rest = parse_settings(QuantizeFileSettings, argv, environ, prog, pass_on=True)
    if "--help" in rest or "-h" in rest:
        print(__doc__.strip(), "\n\nSettings besides --checkpoint and --out: those of the trainers:")
        load_config(["--help"], environ={}, prog=prog)   # prints them and exits
    if not settings.checkpoint:
        raise ConfigError("give CHECKPOINT=<checkpoint.safetensors> to quantize")
    base = run_config(settings.checkpoint, "checkpoint")
    inherited = {env_name(k): str(base[k]) for k in INHERITED if base.get(k) not in (None, "")}
    cfg = load_config(rest, environ={**inherited, **environ}, prog=prog)
    artifact.check_compressor(cfg.compressor)
    if settings.out and Path(settings.out).is_dir():
        raise ConfigError(f"OUT={settings.out}: is a folder; give the artifact's file name")
    return settings, cfg


def run_quantize(settings: QuantizeFileSettings, cfg: TrainConfig, session, out=None, err=None) -> dict:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    model = load_model_file(settings.checkpoint, "checkpoint", cfg)
    try:
        dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, model.spec.vocab_size, check_tokens=False)
        tables = build_byte_tables(dataset.tokenizer_path, model.spec.vocab_size)
        val_tokens = load_validation_tokens(dataset.val_files, cfg.train_seq_len, model.spec.vocab_size,
                                            cfg.val_max_tokens)
    except DatasetError as e:
        raise DatasetError(str(e).replace("VOCAB_SIZE=", f"the model of CHECKPOINT={settings.checkpoint} "
                                          "has vocab_size=")) from None
    master = session.rank == 0

    def say(line: str) -> None:
        if master:
            print(line, file=err, flush=True)

    session.setup(model.spec, cfg)
    session.load_weights(model.weights)
    t0 = time.perf_counter()
    blob = build_artifact(cfg, model.spec, model.weights, session, dataset.train_files, say)
    seconds = time.perf_counter() - t0
    if master and settings.out:
        artifact.write_artifact(settings.out, blob)
    t0 = time.perf_counter()
    restored = artifact.unpack(blob)
    unpack_seconds = time.perf_counter() - t0
    say(f"read back (decompressed and dequantized) in {unpack_seconds:.1f}s")
    session.load_weights(restored)
    geometry = eval_geometry(cfg, session.world_size)
    loss, bpb = evaluate(session, val_tokens, tables, cfg.train_seq_len, geometry.val_batch_seqs,
                         EvalProgress("roundtrip val", master, stream=err))
    label = artifact_label(cfg)
    figures = {"checkpoint": settings.checkpoint, "label": label, "artifact_bytes": len(blob),
               "quantize_time_s": seconds, "unpack_time_s": unpack_seconds, "roundtrip_val_loss": loss, "roundtrip_val_bpb": bpb}
    if master:
        print(f"quantize backend:{session.name} checkpoint:{settings.checkpoint} {label} in {seconds:.1f}s"
              + (f" -> {settings.out}" if settings.out else " (OUT= not given: nothing written)"), file=out)
        print(artifact.size_report(len(blob)), file=out)
        print(budget_line(len(blob), session.name), file=out)
        print(f"final_{label}_roundtrip val_loss:{loss:.8f} val_bpb:{bpb:.8f}" + val_subset_note(cfg), file=out,
              flush=True)
    return figures


@exit_on_user_error
def main(prog: str, make_session, argv=None, environ=None) -> dict:
    """The command line of python -m backend_torch.quantize and python -m backend_mlx.quantize."""
    argv = sys.argv[1:] if argv is None else argv
    settings, cfg = parse_quantize_settings(argv, os.environ if environ is None else environ, prog)
    session = make_session(cfg)
    try:
        return run_quantize(settings, cfg, session)
    finally:
        session.close()
