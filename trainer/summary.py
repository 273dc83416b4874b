"""The end-of-run summary a user reads: the figures of summary.json, as a few lines of text."""

from __future__ import annotations

from pathlib import Path

from trainer.progress import format_seconds


def val_subset_note(cfg) -> str:
    """VAL_MAX_TOKENS > 0: a few words for the log saying that validation sees only part of the val split."""
    if not cfg.val_max_tokens:
        return ""
    return (f" (VAL_MAX_TOKENS={cfg.val_max_tokens}: only the first targets of the val split; "
            "val_bpb is not the challenge's, which scores all of it)")


def format_summary(s: dict) -> list[str]:
    beat = s["unigram_val_bpb"] - s["val_bpb"]
    lines = [
        f"==== summary of run {s['run_id']} ====",
        f"val_loss {s['val_loss']:.4f}  val_bpb {s['val_bpb']:.4f}  after {s['steps']} steps, "
        f"{s['tokens_seen']:,} tokens of {s['dataset']}"
        + (f"; validated on the first {s['val_tokens']:,} val targets only (VAL_MAX_TOKENS={s['val_max_tokens']}): "
           "not the challenge's val_bpb" if s.get("val_max_tokens") else ""),
        f"unigram baseline val_bpb {s['unigram_val_bpb']:.4f}: the model is "
        + (f"{beat:.4f} bits per byte better" if beat > 0 else f"{-beat:.4f} bits per byte WORSE (train longer)"),
        f"{s.get('artifact_label', 'int8_zlib').replace('_', '+')} roundtrip val_bpb {s['roundtrip_val_bpb']:.4f}; artifact {s['artifact_bytes']:,} bytes "
        f"({100.0 * s['artifact_bytes'] / s['artifact_budget_bytes']:.1f}% of the "
        f"{s['artifact_budget_bytes']:,}-byte budget)"
        + (f"; sliding (stride {s['eval_stride']}) val_bpb {s['roundtrip_sliding_val_bpb']:.4f}"
           if "roundtrip_sliding_val_bpb" in s else "")
        + (f"; test-time training val_bpb {s['ttt_val_bpb']:.4f} in {s['ttt_eval_time_s']:.0f} s"
           if "ttt_val_bpb" in s else "")
        + ("; test-time training failed: " + s["ttt_error"] if "ttt_error" in s else ""),
        f"parameters {s['params_unique']:,} unique ({s['params_non_embedding']:,} non-embedding); "
        f"{s['params_total']:,} as used, tying the head to the embedding saves {s['params_saved_by_tying']:,}",
        f"speed {s['tokens_per_s']:,.0f} tokens/s, {s['step_avg_ms']:.0f} ms/step, "
        f"{s['achieved_tflops'] * 1000:.1f} GFLOP/s of model FLOPs"
        + (f", MFU {100 * s['mfu']:.1f}% of the {s['compute_dtype']} matmul ceiling measured here "
           f"({s['matmul_gflops']:.0f} GFLOP/s)" if s.get("mfu") else ""),
        f"peak memory {s['peak_memory_bytes'] / 2**20:,.0f} MiB measured"
        + (f" ({(s['peak_memory_bytes'] - s['peak_memory_baseline_bytes']) / 2**20:,.0f} MiB above the process's "
           f"{s['peak_memory_baseline_bytes'] / 2**20:,.0f} MiB at start)" if s.get("peak_memory_baseline_bytes") else "")
        + f", {s['peak_memory_estimate_bytes'] / 2**20:,.0f} MiB estimated by the plan "
        f"(budget {s['memory_budget_bytes'] / 2**30:.1f} GiB); wall time {format_seconds(s['wall_time_s'])}; "
        f"backend {s['backend']} on {s['device']} ({s['compute_dtype']})",
        f"files in {s['run_dir']}: log.txt, metrics.jsonl, loss.png, checkpoints/, "
        f"{Path(s.get('artifact') or 'model.int8.zlib').name}, summary.json",
    ]
    return lines
