"""`make pg-import SRC=<file> OUT=<checkpoint.safetensors>`: a reference trainer's file as a twingpt checkpoint.

SRC is any of the four files of interop/reference_files.py (the kind is read from the bytes). The
checkpoint holds weights only, at step 0: no optimizer state and no data position, so
RESUME_FROM=<it> trains on from these weights with fresh optimizer moments from the start of the
data, and make sample / make analyze-tying read it like any checkpoint. Its spec is inferred from
the shapes, with NORM_EPS the source script's epsilon (set NORM_EPS to the same value to train on
from it). Nothing is written unless the whole file was read and converted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core.checkpoint import save_checkpoint
from core.config import INIT_ONLY, ModelSpec, TrainConfig, model_fields, parse_settings, setting
from core.errors import ConfigError, exit_on_user_error
from interop.record_layout import RECORD_SETTINGS
from interop.reference_files import ImportedModel, read_reference_file


@dataclass(frozen=True)
class ImportSettings:
    src: str = setting("", "the reference file: final_model.pt, final_model.int8.ptz, <run>_mlx_model.npz "
                           "or <run>_mlx_model.int8.ptz")
    out: str = setting("", "the twingpt checkpoint to write (.safetensors)")
    norm_eps: float = setting(0.0, "RMSNorm epsilon (0: the source script's, 1.1920929e-07 for train_gpt.py, "
                                   "1e-6 for train_gpt_mlx.py)")
    logit_softcap: float = setting(30.0, "the source run's LOGIT_SOFTCAP (no tensor holds it)")
    rope_base: float = setting(10000.0, "the source run's ROPE_BASE (no tensor holds it)")
    # record options: blocks and layout (the record's final_model.pt: its run's settings; no tensor holds them)
    ln_scale: bool = setting(False, "the source run's LN_SCALE")
    parallel_start_layer: int = setting(0, "the source run's PARALLEL_START_LAYER")
    parallel_final_lane: str = setting("mean", "the source run's PARALLEL_FINAL_LANE")
    num_loops: int = setting(0, "the source run's NUM_LOOPS (an imported model with NUM_LOOPS > 0 loops, as the "
                                "record evaluates its own)")
    loop_start: int = setting(3, "the source run's LOOP_START")
    loop_end: int = setting(5, "the source run's LOOP_END")
    data_path: str = setting("", "dataset recorded in the checkpoint's config (empty: the default one)")
    tokenizer_path: str = setting("", "tokenizer recorded in the checkpoint's config (empty: the dataset's)")


def import_file(settings: ImportSettings) -> ImportedModel:
    if not settings.src:
        raise ConfigError("SRC is not set: SRC=final_model.pt (or final_model.int8.ptz, <run>_mlx_model.npz, "
                          "<run>_mlx_model.int8.ptz)")
    if not settings.out:
        raise ConfigError("OUT is not set: OUT=path/to/checkpoint.safetensors")
    src, out = Path(settings.src), Path(settings.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"OUT={out} is SRC: the checkpoint would overwrite the file it is read from")
    # The record's layout settings (skip gates are read from the tensors).
    model_settings = {name: getattr(settings, name) for name in RECORD_SETTINGS if hasattr(settings, name)}
    model_settings.update(logit_softcap=settings.logit_softcap, rope_base=settings.rope_base)
    if settings.norm_eps:
        model_settings["norm_eps"] = settings.norm_eps
    model = read_reference_file(src, **model_settings)
    config = TrainConfig(**model.spec.to_dict(), data_path=settings.data_path, tokenizer_path=settings.tokenizer_path)
    save_checkpoint(out, spec=model.spec, config=config, step=0, weights=model.weights, optimizer_state={},
                    data_state={}, rng_state=None, backend=f"pg-import {model.kind}", looping=model.spec.num_loops > 0,
                    extra={"imported_from": str(src), "kind": model.kind, "notes": list(model.notes)})
    return model


def model_settings_text(spec: ModelSpec) -> str:
    """The settings a run needs to continue from this spec: every field that differs from the default."""
    default = ModelSpec().to_dict()
    return " ".join(f"{k.upper()}={v:.8g}" if isinstance(v, float) else f"{k.upper()}={int(v) if isinstance(v, bool) else v}"
                    for k, v in spec.to_dict().items() if v != default[k] and k not in model_fields(INIT_ONLY))


@exit_on_user_error
def main(argv=None, environ=None) -> ImportedModel:
    settings = parse_settings(ImportSettings, sys.argv[1:] if argv is None else argv, environ,
                              prog="python -m interop.pg_import",
                              description="A Parameter Golf reference trainer's file as a twingpt checkpoint.")
    model = import_file(settings)
    s = model.spec
    print(f"imported {settings.src} ({model.kind}): layers:{s.num_layers} dim:{s.model_dim} heads:{s.num_heads} "
          f"kv_heads:{s.num_kv_heads} mlp_mult:{s.mlp_mult} vocab:{s.vocab_size} tied:{s.tie_embeddings}", flush=True)
    for note in model.notes:
        print(f"  {note}", flush=True)
    print(f"wrote {settings.out} (weights only, step 0); to train on from it: RESUME_FROM={settings.out} "
          f"{model_settings_text(s)}".rstrip(), flush=True)
    return model


if __name__ == "__main__":
    main()
