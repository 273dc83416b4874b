"""The record's techniques one at a time: python -m commands.ablate (make ablate).

Trains the same run (the settings the environment gives: `make ablate` passes the `make train`
preset) as a baseline, then with each technique of the record (PRESET=record-1.0611) on alone, then
with all of them on, in each backend: same seed, same data order, same steps (the wall-clock cap is
off, so no run stops early). A technique is a few settings of the preset, at the preset's values,
except those that count steps or layers or size the heads, which are scaled to this run (SCALED below).
A technique whose settings this build does not know yet, or that this run's size refuses (say a
layer index the model does not have), is listed in one line saying why and not run.

Each run is a normal run of the trainer in its own process, in runs/<ABLATE_ID>/<backend>-<name>/.
Run again, a finished run (it has summary.json) is reused; an unfinished one is kept and continued
from its last checkpoint (commands/ablate_tying.py's train_one); either only when made with the
settings this invocation would give it, else one line names the first that differs, exit 2, before
anything is trained (check_reusable). A progress line per run on stderr;
the result: one table (val_bpb, int8 roundtrip val_bpb, tokens/s of both backends side by side, how
far apart their val_bpb are, the change from the baseline, parameters), ablation.png and ablation.json
in runs/<ABLATE_ID>/. With VAL_MAX_TOKENS every run validates on the same first targets, and the
table's title says so.

ABLATE_TECHNIQUES=ema,weight-decay runs only those (and the baseline and all-together runs);
ABLATE_BACKENDS=torch runs one backend.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from commands.ablate_tying import check_reusable, train_one
from core.config import TrainConfig, env_name, load_config
from core.errors import ConfigError, exit_on_user_error
from core.files import atomic_writer
from core.presets import load_preset
from trainer.plot import new_figure, save_figure

PRESET = "record-1.0611"
# The record's run stopped at step 4,945 (its wall-clock cap; train_seed42.log): settings that count
# steps are scaled by ITERATIONS / RECORD_STEPS, those that name layers by NUM_LAYERS / RECORD_LAYERS,
# the rotated dimensions by the head's width over the record's (512 / 8 heads).
RECORD_STEPS, RECORD_LAYERS, RECORD_HEAD_DIM = 4945, 11, 64
TECHNIQUES = {   # name -> the preset's settings that make it
    "polar-express": ("MUON_NS_COEFFS",),
    "row-normalize": ("MUON_ROW_NORMALIZE",),
    "weight-decay": ("MUON_WD", "ADAM_WD", "EMBED_WD"),
    "warmdown-frac+min-lr": ("WARMDOWN_FRAC", "MIN_LR"),
    "ema": ("EMA_DECAY",),
    "momentum-0.92-0.97": ("MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START", "MUON_MOMENTUM_WARMUP_STEPS"),
    "beta2+clip": ("BETA2", "GRAD_CLIP_NORM"),
    "learning-rates": ("MATRIX_LR", "SCALAR_LR", "TIED_EMBED_LR"),
    "qk-gain-5": ("QK_GAIN_INIT",),
    "mlp-4x": ("MLP_MULT",),
    "leaky-relu-0.5": ("MLP_NEGATIVE_SLOPE",),
    "xsa": ("XSA_LAST_N",),
    "partial-rope": ("ROPE_DIMS",),
    "ln-scale": ("LN_SCALE",),
    "skip-gates": ("SKIP_GATES_ENABLED",),
    "parallel-lanes": ("PARALLEL_START_LAYER", "PARALLEL_FINAL_LANE"),
    "depth-loops": ("NUM_LOOPS", "LOOP_START", "LOOP_END", "ENABLE_LOOPING_AT"),
    "smear-gate": ("SMEAR_GATE_ENABLED",),
    "sparse-attn-gate": ("SPARSE_ATTN_GATE_ENABLED", "GATE_WINDOW", "SPARSE_ATTN_GATE_SCALE",
                         "SPARSE_ATTN_GATE_INIT_STD"),
    "doc-attention": ("DOC_ATTENTION_ENABLED",),
}


def _layers(value, cfg) -> int:
    return max(0, min(cfg.num_layers - 1, round(value * cfg.num_layers / RECORD_LAYERS)))


SCALED = {   # setting -> its value for this run, from the record's
    "MUON_MOMENTUM_WARMUP_STEPS": lambda v, cfg: round(v * cfg.iterations / RECORD_STEPS),
    # The same averaging horizon as a fraction of training: 1/(1 - decay) steps of RECORD_STEPS.
    "EMA_DECAY": lambda v, cfg: round(max(0.0, 1 - (1 - v) * RECORD_STEPS / cfg.iterations), 6),
    "XSA_LAST_N": lambda v, cfg: min(cfg.num_layers, round(v * cfg.num_layers / RECORD_LAYERS)),
    # The same share of each head rotated (the record's 16 of 64), an even count of at least 2.
    "ROPE_DIMS": lambda v, cfg: max(2, 2 * round(v * cfg.model_dim / cfg.num_heads / RECORD_HEAD_DIM / 2)),
    "PARALLEL_START_LAYER": _layers,
    "LOOP_START": _layers,
    "LOOP_END": _layers,
}


def variants(cfg: TrainConfig, only: list[str] | None = None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(name -> the settings the run adds, in run order; the techniques this build cannot run)."""
    known = {env_name(f.name) for f in fields(TrainConfig)}
    preset = load_preset(PRESET, {f.name for f in fields(TrainConfig)})
    values = {key.upper(): value for key, value in preset.settings.items()}
    values.update({key: value for key, (value, _why) in preset.unsupported.items()})
    unknown = sorted(set(only or ()) - set(TECHNIQUES))
    if unknown:
        raise ConfigError(f"ABLATE_TECHNIQUES: unknown technique {unknown[0]!r}; known: {', '.join(TECHNIQUES)}")
    runs, missing = {"baseline": {}}, []
    for name, keys in TECHNIQUES.items():
        if only and name not in only:
            continue
        if not all(k in known for k in keys):
            missing.append(f"{name} ({', '.join(k for k in keys if k not in known)} not in this build)")
            continue
        runs[name] = {k: _text(SCALED[k](values[k], cfg) if k in SCALED else values[k]) for k in keys}
    runs["all"] = together(runs)
    for extra in runs.values():
        extra["MAX_WALLCLOCK_SECONDS"] = "0"   # the same steps in every run
    return runs, missing


def together(runs: dict[str, dict[str, str]]) -> dict[str, str]:
    """The settings of every technique of `runs` at once: the run "all"."""
    return {k: v for name, extra in runs.items() if name not in ("baseline", "all") for k, v in extra.items()}


def runnable(runs: dict[str, dict[str, str]], argv) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The runs this run's size accepts, every run's settings checked before the first is trained,
    and a line for each it refuses (a technique whose scaled settings do not fit the model; "all"
    when two of them cannot be combined): those are not run, the rest are."""
    refused = []
    for name in [n for n in runs if n not in ("baseline", "all")]:
        try:
            load_config(argv, environ={**os.environ, **runs[name]})
        except ConfigError as err:
            refused.append(f"{name} (at this size: {err})")
            del runs[name]
    runs["all"] = together(runs) | {"MAX_WALLCLOCK_SECONDS": "0"}
    try:
        load_config(argv, environ={**os.environ, **runs["all"]})
    except ConfigError as err:
        refused.append(f"all (at this size: {err})")
        del runs["all"]
    return runs, refused


def _text(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def plot(out: Path, results: dict[str, dict[str, dict]], backends: list[str], title: str) -> Path:
    names = list(results)
    fig, ax = new_figure(8, 0.45 * len(names) * len(backends) + 1.5)
    height = 0.8 / len(backends)
    for j, backend in enumerate(backends):
        bpb = [results[n][backend]["val_bpb"] for n in names]
        ax.barh([i + j * height for i in range(len(names))], bpb, height=height, label=backend, color=f"C{j}")
    base = results["baseline"][backends[0]]["val_bpb"]
    ax.axvline(base, color="gray", linestyle="--", linewidth=1, label=f"baseline ({backends[0]})")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    values = [results[n][b]["val_bpb"] for n in names for b in backends]
    ax.set_xlim(min(values) - 0.02, max(values) + 0.02)
    ax.set_xlabel("val_bpb (lower is better)")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, out / "ablation.png")


def table(results: dict[str, dict[str, dict]], backends: list[str]) -> list[str]:
    cols = [("val_bpb", "val_bpb", "{:.4f}"), ("int8 val_bpb", "roundtrip_val_bpb", "{:.4f}"),
            ("tok/s", "tokens_per_s", "{:,.0f}")]
    both = len(backends) == 2   # then a column of how far apart the two backends' val_bpb are
    head = ["technique", *[f"{label} {b}" for label, _, _ in cols for b in backends],
            *([f"val_bpb {backends[0]}−{backends[1]}"] if both else []), "Δ val_bpb", "params"]
    rows = []
    base = results["baseline"][backends[0]]["val_bpb"]
    for name, by_backend in results.items():
        cells = [name]
        for _, key, fmt in cols:
            cells += [fmt.format(by_backend[b][key]) for b in backends]
        if both:
            cells.append(f"{by_backend[backends[0]]['val_bpb'] - by_backend[backends[1]]['val_bpb']:+.1e}")
        cells += [f"{by_backend[backends[0]]['val_bpb'] - base:+.4f}", f"{by_backend[backends[0]]['params_unique']:,}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return lines


@exit_on_user_error
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)   # the settings every run shares: validated once, here
    backends = [b.strip() for b in os.environ.get("ABLATE_BACKENDS", "torch,mlx").split(",") if b.strip()]
    if not backends or any(b not in ("torch", "mlx") for b in backends):
        raise ConfigError(f"ABLATE_BACKENDS={os.environ.get('ABLATE_BACKENDS')}: torch, mlx or torch,mlx")
    only = [t.strip() for t in os.environ.get("ABLATE_TECHNIQUES", "").split(",") if t.strip()] or None
    runs, missing = variants(cfg, only)
    runs, refused = runnable(runs, argv)
    missing += refused
    ablate_id = os.environ.get("ABLATE_ID", "ablate")
    out = Path(cfg.out_dir) / ablate_id
    check_reusable(out, {f"{b}-{name}": extra for name, extra in runs.items() for b in backends}, argv, "ablate")
    out.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)   # noqa: E731
    for line in missing:
        log(f"ablate: not run: {line}")
    start, total, results = time.perf_counter(), len(runs) * len(backends), {}
    for i, (name, extra) in enumerate(runs.items()):
        results[name] = {}
        for j, backend in enumerate(backends):
            n = i * len(backends) + j + 1
            t0 = time.perf_counter()
            summary = train_one(backend, out, f"{backend}-{name}", extra, log, prefix="ablate", argv=argv)
            results[name][backend] = summary
            log(f"ablate: [{n}/{total}] {backend} {name}: val_bpb {summary['val_bpb']:.4f}, "
                f"{summary['tokens_per_s']:,.0f} tok/s, {time.perf_counter() - t0:.0f} s")
    png = plot(out, results, backends, f"the record's techniques alone and together ({cfg.iterations} steps, "
                                       f"{cfg.num_layers}x{cfg.model_dim})")
    lines = table(results, backends)
    val_tokens = results["baseline"][backends[0]].get("val_tokens")   # None in a run of an older build
    record = {"ablate_id": ablate_id, "backends": backends, "seed": cfg.seed, "iterations": cfg.iterations,
              "val_max_tokens": cfg.val_max_tokens, "val_tokens": val_tokens,
              "settings": runs, "not_run": missing, "table": lines, "plot": str(png),
              "runs": {name: {b: {k: s.get(k) for k in ("val_loss", "val_bpb", "roundtrip_val_bpb", "tokens_per_s",
                                                        "params_unique", "steps", "val_tokens", "run_dir")}
                              for b, s in by_backend.items()} for name, by_backend in results.items()},
              "seconds": time.perf_counter() - start}
    with atomic_writer(out / "ablation.json") as f:
        f.write((json.dumps(record, indent=2, default=str) + "\n").encode())
    print(f"==== the record's techniques, alone and together: {', '.join(backends)}; one seed ({cfg.seed}), "
          f"same data order and steps"
          + (f"; validated on the first {cfg.val_max_tokens:,} val targets only (VAL_MAX_TOKENS)"
             if cfg.val_max_tokens else "") + " ====")
    for line in lines:
        print(line)
    print(f"files in {out}: ablation.json, ablation.png, " + ", ".join(f"{b}-{n}/" for n in results for b in backends))
    return record


if __name__ == "__main__":
    main()
