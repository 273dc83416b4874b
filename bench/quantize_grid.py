"""The README's table of artifact settings: matrix bits x GPTQ/LQER x compressor on one checkpoint.

    python -m bench.quantize_grid CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors [BITS=6,8,4] [BACKEND=torch]
    python -m bench.quantize_grid CHECKPOINT=... EMBED_BITS=8 MLP_CLIP_SIGMAS=10 EMBED_LOOKUP_WEIGHT=0.5

The settings are make quantize's (trainer/quantize_file.py): KEY=VALUE arguments > environment > the
checkpoint's run > defaults, except DEVICE, cpu unless given. The grid varies only MATRIX_BITS (BITS),
GPTQ and LQER_ENABLED (METHODS) and the compressor; QUANT is gptq; every other quantizer setting
(EMBED_BITS, the clip sigmas, EMBED_LOOKUP_WEIGHT, LQER_*, GPTQ_CALIBRATION_BATCHES) is as given.

The calibration statistics are collected once; each (bits, method) is quantized once and evaluated
once after the round trip (the compressor changes the bytes, not the weights), and packed with every
compressor. Prints a markdown table and writes bench/quantize_grid.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from core import artifact
from core.config import TrainConfig
from core.errors import ConfigError, exit_on_user_error
from core.metrics import build_byte_tables
from core.params import param_table
from core.quantize import quantize_model
from data.datasets import resolve_dataset
from data.stream import load_validation_tokens
from trainer.model_files import load_model_file
from trainer.plan import eval_geometry
from trainer.quantize_file import calibration_batches, parse_quantize_settings
from trainer.summary import val_subset_note
from trainer.validation import evaluate

METHODS = {"rtn": {"gptq": False, "lqer_enabled": False}, "gptq": {"gptq": True, "lqer_enabled": False},
           "gptq+lqer": {"gptq": True, "lqer_enabled": True}}


def grid_settings(env) -> tuple[str, TrainConfig]:
    """(CHECKPOINT, the settings every cell starts from), as make quantize reads them; QUANT=gptq."""
    settings, cfg = parse_quantize_settings([], {"DEVICE": "cpu", **env}, "python -m bench.quantize_grid")
    return settings.checkpoint, cfg.replace(quant="gptq")


@exit_on_user_error
def main() -> None:
    bad = [arg for arg in sys.argv[1:] if "=" not in arg]
    if bad:
        raise ConfigError(f"{bad[0]!r}: give settings as KEY=VALUE (CHECKPOINT=..., BITS=6,8,4, EMBED_BITS=8, ...)")
    env = dict(os.environ) | dict(arg.split("=", 1) for arg in sys.argv[1:])
    checkpoint, cfg = grid_settings(env)
    model = load_model_file(checkpoint, "checkpoint", cfg)
    if env.get("BACKEND", "torch") == "torch":
        from backend_torch.session import TorchSession
        session = TorchSession(cfg, environ={})
    else:
        from backend_mlx.session import MLXSession
        session = MLXSession()
    spec, weights = model.spec, model.weights
    dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, spec.vocab_size, check_tokens=False)
    tables = build_byte_tables(dataset.tokenizer_path, spec.vocab_size)
    val_tokens = load_validation_tokens(dataset.val_files, cfg.train_seq_len, spec.vocab_size, cfg.val_max_tokens)
    session.setup(spec, cfg)
    session.load_weights(weights)
    rows = []

    def score(label, tensors, seconds):
        packed = {}
        for compressor in artifact.COMPRESSORS:
            t0 = time.perf_counter()
            packed[compressor] = (len(artifact.pack_tensors(tensors, compressor)), time.perf_counter() - t0)
        session.load_weights(artifact.dequantize(tensors))
        _, bpb = evaluate(session, val_tokens, tables, cfg.train_seq_len,
                          eval_geometry(cfg, session.world_size).val_batch_seqs)
        rows.append({"setting": label, "quantize_s": seconds, "roundtrip_val_bpb": bpb,
                     **{f"{c}_bytes": n for c, (n, _) in packed.items()},
                     **{f"{c}_s": s for c, (_, s) in packed.items()}})
        print(json.dumps(rows[-1]), flush=True)

    t0 = time.perf_counter()
    score("int8 (baseline)", artifact.quantize(weights), time.perf_counter() - t0)
    t0 = time.perf_counter()
    sums = session.input_second_moments(calibration_batches(cfg, dataset.train_files, 0, 1, spec.vocab_size))
    calibration_s = time.perf_counter() - t0
    print(f"calibration {cfg.gptq_calibration_batches} batches in {calibration_s:.1f}s", flush=True)
    for bits in (int(b) for b in env.get("BITS", "6,8,4").split(",")):
        for method, changes in METHODS.items():
            c = cfg.replace(matrix_bits=bits, **changes)
            t0 = time.perf_counter()
            tensors = quantize_model(weights, param_table(spec), sums, c)
            score(f"{method} matrices {bits}-bit, embedding {c.embed_bits}-bit", tensors, time.perf_counter() - t0)
    result = {"checkpoint": checkpoint, "calibration_s": calibration_s, "settings": cfg.to_dict(), "rows": rows}
    Path("bench/quantize_grid.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.val_max_tokens:
        print("round-trip val_bpb" + val_subset_note(cfg))
    print("| setting | " + " | ".join(f"{c} bytes" for c in artifact.COMPRESSORS) + " | round-trip val_bpb | quantize s |")
    print("|---|" + "---:|" * (len(artifact.COMPRESSORS) + 2))
    for r in rows:
        print(f"| {r['setting']} | " + " | ".join(f"{r[c + '_bytes']:,}" for c in artifact.COMPRESSORS)
              + f" | {r['roundtrip_val_bpb']:.4f} | {r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main()
