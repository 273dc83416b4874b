"""The tying tradeoff, measured: python -m commands.ablate_tying (make ablate-tying).

Trains the same run twice with one backend, tied (TIE_EMBEDDINGS=1) and untied (TIE_EMBEDDINGS=0,
with the reference's untied learning rates EMBED_LR and HEAD_LR): same seed, same data order, same
steps (the wall-clock cap is off, so neither run stops early), every other setting as the
environment gives it (`make ablate-tying` passes the `make train` preset). ABLATE_MATCH_PARAMS=1 adds a third run, untied at about the tied run's unique parameter
count: the widest MODEL_DIM (a multiple of 2 x NUM_HEADS, so heads stay even) whose untied model
has no more unique parameters than the tied one. Narrowing the width, rather than the depth or the
MLP, keeps the architecture and the schedule the same and spends the head's V x d parameters where
an untied model must find them.

Each run is a normal run of the trainer in its own process, in runs/<ABLATE_ID>/<name>/ (tied,
untied, untied-matched). Run again, a finished run (it has summary.json) is reused, not retrained;
an unfinished one is kept as <name>.unfinished-N and continued from its last checkpoint. Either only
when its config.json holds the settings this invocation would give it (those that do not change the
figures aside: trainer/run_folder.py's NOT_COMPARED); else one line names the first that differs,
exit 2, before anything is trained. For each
run the direct-path analysis of trainer/tying.py reads its final checkpoint. The result: one
side-by-side table, loss.png (both loss curves against tokens) and ablation.json in runs/<ABLATE_ID>/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from core.config import load_config
from core.errors import ConfigError, TrainingError, exit_on_user_error
from core.files import atomic_writer
from core.params import count_params
from trainer.plot import label_loss_axes, new_figure, read_losses, save_figure
from trainer.run_folder import setting_difference

ROOT = Path(__file__).resolve().parent.parent
RUNS = ("tied", "untied")
MATCHED = "untied-matched"


def matched_width(cfg) -> int:
    """The widest MODEL_DIM, a multiple of 2 x NUM_HEADS, whose untied model has no more unique
    parameters than the tied model of `cfg`."""
    spec = cfg.model_spec()
    target = count_params(spec.__class__(**dict(spec.to_dict(), tie_embeddings=True))).unique
    step = 2 * spec.num_heads
    best = None
    for d in range(step, spec.model_dim + 1, step):
        try:
            untied = spec.__class__(**dict(spec.to_dict(), model_dim=d, tie_embeddings=False))
        except ConfigError:
            continue
        if count_params(untied).unique <= target:
            best = d
    if best is None:
        raise ConfigError(f"ABLATE_MATCH_PARAMS=1: no untied width of this model fits {target:,} parameters")
    return best


def run_settings(cfg, match_params: bool) -> dict[str, dict[str, str]]:
    """The settings each run adds to the environment."""
    # No wall-clock cap: under a cap a slower run would stop earlier and the runs would not see the
    # same steps and tokens, which is the point of the comparison.
    runs = {"tied": {"TIE_EMBEDDINGS": "1", "MAX_WALLCLOCK_SECONDS": "0"},
            "untied": {"TIE_EMBEDDINGS": "0", "MAX_WALLCLOCK_SECONDS": "0"}}
    if match_params:
        runs[MATCHED] = dict(runs["untied"], MODEL_DIM=str(matched_width(cfg)))
    return runs


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*.safetensors"))
    return found[-1] if found else None


def run_env(out: Path, name: str, extra: dict[str, str]) -> dict[str, str]:
    """The environment the run `name` is trained with: this one, its folder and its settings."""
    env = dict(os.environ, OUT_DIR=str(out), RUN_ID=name, **extra)
    env.pop("RESUME_FROM", None)
    return env


def check_reusable(out: Path, runs: dict[str, dict[str, str]], argv, prefix: str) -> None:
    """Before anything is trained: every run of `runs` already in `out` (finished or not) was made with
    the settings this invocation would give it (trainer/run_folder.py's setting_difference), else one
    line naming the first that differs, and nothing is trained, moved or written."""
    for name, extra in runs.items():
        run_dir = out / name
        if not (run_dir.is_dir() and any(run_dir.iterdir())):
            continue
        difference = setting_difference(run_dir, load_config(argv, environ=run_env(out, name, extra)))
        if difference:
            raise ConfigError(f"{prefix}: the run {run_dir} was made with other settings ({difference}); "
                              f"choose another ABLATE_ID for these (nothing was written)")


def train_one(backend: str, out: Path, name: str, extra: dict[str, str], log, prefix: str = "ablate-tying",
              argv=()) -> dict:
    """A finished run's summary: reused when there, else trained (continuing an unfinished one), with
    the flags `argv`. `prefix` starts every line it logs and names the make target that continues a
    stopped run. Callers check_reusable first."""
    run_dir = out / name
    summary = run_dir / "summary.json"
    if summary.is_file():
        log(f"{prefix}: {name}: finished before, reused ({run_dir})")
        return json.loads(summary.read_text())
    env = run_env(out, name, extra)
    if run_dir.exists() and any(run_dir.iterdir()):
        n = 1
        while (out / f"{name}.unfinished-{n}").exists():
            n += 1
        kept = out / f"{name}.unfinished-{n}"
        run_dir.rename(kept)   # nothing is lost: the unfinished run stays, and is continued
        ckpt = latest_checkpoint(kept)
        log(f"{prefix}: {name}: unfinished before, kept as {kept}"
            + (f"; continuing from {ckpt}" if ckpt else "; starting again"))
        if ckpt:
            env["RESUME_FROM"] = str(ckpt)
    log(f"{prefix}: {name}: training ({' '.join(f'{k}={v}' for k, v in extra.items())})")
    proc = subprocess.run([sys.executable, "-m", f"backend_{backend}.train", *argv], cwd=ROOT, env=env)
    if proc.returncode != 0 or not summary.is_file():
        raise TrainingError(f"{prefix}: the {name} run stopped (exit {proc.returncode}); run make {prefix} "
                            f"again to continue it from its last checkpoint in {run_dir}")
    return json.loads(summary.read_text())


def plot(out: Path, names: list[str], title: str) -> Path:
    fig, ax = new_figure(8, 5)
    for i, name in enumerate(names):
        train, val = read_losses(out / name / "metrics.jsonl")
        color = f"C{i}"
        ax.plot([t for t, _ in train], [v for _, v in train], color=color, alpha=0.5, linewidth=1,
                label=f"{name} train")
        ax.plot([t for t, _, _ in val], [v for _, v, _ in val], "o-", color=color, linewidth=2, markersize=4,
                label=f"{name} val")
    label_loss_axes(ax, title)
    return save_figure(fig, out / "loss.png")


ROWS = (  # (label, key, format)
    ("val_loss", "val_loss", "{:.4f}"),
    ("val_bpb", "val_bpb", "{:.4f}"),
    ("int8 roundtrip val_bpb", "roundtrip_val_bpb", "{:.4f}"),
    ("unique parameters", "params_unique", "{:,}"),
    ("model_dim", "model_dim", "{}"),
    ("artifact bytes", "artifact_bytes", "{:,}"),
    ("artifact, % of 16,000,000", "artifact_share", "{:.1%}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("direct path: symmetry of W_E W_U^T", "symmetry", "{:.4f}"),
    ("direct path, bits/token (val bigrams)", "direct_path_bits_per_token", "{:.3f}"),
    ("unigram model, bits/token", "unigram_bits_per_token", "{:.3f}"),
    ("bigram model, bits/token", "bigram_bits_per_token", "{:.3f}"),
    ("data bigram asymmetry", "data_asymmetry", "{:.4f}"),
)


def table(results: dict[str, dict]) -> list[str]:
    names = list(results)
    width = max(len(label) for label, _, _ in ROWS)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>16}" for n in names)]
    for label, key, fmt in ROWS:
        cells = []
        for n in names:
            value = results[n].get(key)
            cells.append(f"{'-' if value is None else fmt.format(value):>16}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return lines


@exit_on_user_error
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)   # the settings every run shares: validated once, here
    backend = os.environ.get("BACKEND") or "torch"
    if backend not in ("torch", "mlx"):
        raise ConfigError(f"BACKEND={backend}: must be torch or mlx")
    ablate_id = os.environ.get("ABLATE_ID", "ablate-tying")
    match = os.environ.get("ABLATE_MATCH_PARAMS", "0") == "1"
    out = Path(cfg.out_dir) / ablate_id
    runs = run_settings(cfg, match)
    check_reusable(out, runs, argv, "ablate-tying")
    out.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)   # noqa: E731
    start = time.perf_counter()
    summaries = {name: train_one(backend, out, name, extra, log, argv=argv) for name, extra in runs.items()}
    from trainer.tying import analyze_tying   # after training: the analysis reads the final checkpoints

    results = {}
    for name, summary in summaries.items():
        analysis = analyze_tying(str(latest_checkpoint(out / name)), cfg.data_path, cfg.tokenizer_path)
        results[name] = {**summary, **{k: v for k, v in analysis.items() if k not in summary}, "settings": runs[name],
                         "artifact_share": summary["artifact_bytes"] / summary["artifact_budget_bytes"]}
    png = plot(out, list(results), f"tied vs untied ({backend}, {cfg.model_spec().num_layers} layers)")
    lines = table(results)
    record = {"ablate_id": ablate_id, "backend": backend, "runs": results, "table": lines, "plot": str(png),
              "seconds": time.perf_counter() - start}
    with atomic_writer(out / "ablation.json") as f:
        f.write((json.dumps(record, indent=2, default=str) + "\n").encode())
    print(f"==== tied vs untied: {backend}, same seed, data order and steps ====")
    for line in lines:
        print(line)
    print(f"files in {out}: ablation.json, loss.png, " + ", ".join(f"{n}/" for n in results))
    return record


if __name__ == "__main__":
    main()
