"""The README's table of artifact settings: matrix bits x GPTQ/LQER x compressor on one checkpoint.

    python -m bench.quantize_grid CHECKPOINT=runs/<run>/checkpoints/step_NNNNNN.safetensors [BITS=6,8,4] [BACKEND=torch]

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
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.metrics import build_byte_tables
from core.params import param_table
from core.quantize import quantize_model
from data.datasets import resolve_dataset
from data.stream import load_validation_tokens
from trainer.plan import eval_geometry
from trainer.quantize_file import INHERITED, calibration_batches
from trainer.validation import evaluate

METHODS = {"rtn": {"gptq": False, "lqer_enabled": False}, "gptq": {"gptq": True, "lqer_enabled": False},
           "gptq+lqer": {"gptq": True, "lqer_enabled": True}}


def main() -> None:
    env = dict(os.environ) | dict(arg.split("=", 1) for arg in sys.argv[1:])
    ckpt = load_checkpoint(env["CHECKPOINT"])
    base = {k.upper(): str(v) for k, v in ckpt.config.items() if k in INHERITED and v not in (None, "")}
    cfg = load_config([], environ=base | {"DEVICE": "cpu"} | {k: v for k, v in env.items() if k in ("DEVICE",)})
    cfg = cfg.replace(**ckpt.spec.to_dict(), quant="gptq")
    if env.get("BACKEND", "torch") == "torch":
        from backend_torch.session import TorchSession
        session = TorchSession(cfg, environ={})
    else:
        from backend_mlx.session import MLXSession
        session = MLXSession()
    spec, weights = ckpt.spec, ckpt.weights
    dataset = resolve_dataset(cfg.data_path, cfg.tokenizer_path, spec.vocab_size, check_tokens=False)
    tables = build_byte_tables(dataset.tokenizer_path, spec.vocab_size)
    val_tokens = load_validation_tokens(dataset.val_files, cfg.train_seq_len, spec.vocab_size)
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
    result = {"checkpoint": env["CHECKPOINT"], "calibration_s": calibration_s, "rows": rows}
    Path("bench/quantize_grid.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| setting | " + " | ".join(f"{c} bytes" for c in artifact.COMPRESSORS) + " | round-trip val_bpb | quantize s |")
    print("|---|" + "---:|" * (len(artifact.COMPRESSORS) + 2))
    for r in rows:
        print(f"| {r['setting']} | " + " | ".join(f"{r[c + '_bytes']:,}" for c in artifact.COMPRESSORS)
              + f" | {r['roundtrip_val_bpb']:.4f} | {r['quantize_s']:.1f} |")


if __name__ == "__main__":
    main()
