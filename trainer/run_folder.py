"""The run folder, OUT_DIR/RUN_ID, and the log written into it (rank 0 only).

    log.txt            the console log, preceded by the config and the source of this run
    config.json        every setting
    metrics.jsonl      one JSON object per logged step and per validation
    checkpoints/       step_NNNNNN.safetensors (CHECKPOINT_EVERY and the last step)
    loss.png           train and val loss against tokens, redrawn at each validation and at a stop
    model.int8.zlib    the artifact (docs/spec.md §9; model.<QUANT>.<COMPRESSOR> with other settings)
    summary.json       the final figures
    tensorboard/, wandb/   with REPORT_TO: the trackers' own files (trainer/tracking.py)
loss.png and the trackers' files come from the run's reporters (trainer/reporters.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import fields
from pathlib import Path

from core.config import AUTO, TrainConfig, env_name
from core.errors import ConfigError
from trainer.progress import Progress

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("core", "data", "trainer", "backend_torch", "backend_mlx")


def make_run_dir(cfg: TrainConfig, backend_name: str, master: bool) -> tuple[str, Path]:
    """The run's id and folder; only rank 0 writes, so only rank 0 checks the folder is free."""
    run_id = cfg.run_id or time.strftime("%Y%m%d-%H%M%S") + f"-{backend_name}"
    run_dir = Path(cfg.out_dir) / run_id
    if master and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"RUN_ID={run_id!r}: the run folder {run_dir} already exists and is not empty; "
                          "choose another RUN_ID (nothing was overwritten)")
    return run_id, run_dir


def create_run_dir(run_dir: Path, config: dict) -> None:
    """The folder, its checkpoints/ and config.json: the first things a run writes."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# Settings that do not change a run's figures, left out when a finished run is matched to settings:
# how often it logs, validates along the way and writes checkpoints, its trackers, how long a
# collective may wait, the memory it may plan for (GRAD_ACCUM_STEPS, what that decides, is compared);
# and its folder's name and place and the checkpoint it continued from, which name the same run.
NOT_COMPARED = ("train_log_every", "val_loss_every", "checkpoint_every", "report_to", "collective_timeout_seconds",
                "memory_budget_gb", "run_id", "out_dir", "resume_from")


def setting_difference(run_dir: Path, cfg: TrainConfig) -> str | None:
    """None when the run in `run_dir` was made with the settings of `cfg` (its config.json), else the
    first that differs, "ITERATIONS=2 there, 3 now". A setting `cfg` leaves to auto is not compared
    (the run resolved it on its machine); one its config.json lacks (an older build) had its default."""
    path = run_dir / "config.json"
    if not path.is_file():
        return "no config.json records its settings"
    recorded = json.loads(path.read_text())
    wanted = json.loads(json.dumps(cfg.to_dict()))   # as config.json holds it: lists, not tuples
    for f in fields(TrainConfig):
        if f.name in NOT_COMPARED or wanted[f.name] == AUTO:
            continue
        old = recorded.get(f.name, json.loads(json.dumps(f.default)))
        if old != wanted[f.name]:
            shown = lambda v: str(int(v)) if isinstance(v, bool) else str(v)   # noqa: E731
            return f"{env_name(f.name)}={shown(old)} there, {shown(wanted[f.name])} now"
    return None


def source_snapshot() -> str:
    """The code of this run, for the log: git commit (and whether dirty) and a hash of the sources."""
    h = hashlib.sha256()
    for folder in SOURCE_FOLDERS:
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return f"git:{commit}{'+dirty' if dirty else ''} sources_sha256:{h.hexdigest()[:16]}"


class RunLog:
    """Console and log.txt, metrics as JSON lines, summary.json: rank 0 only."""

    def __init__(self, run_dir: Path | None, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.text = open(run_dir / "log.txt", "a") if enabled else None
        self.metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.progress: Progress | None = None  # while training, console lines scroll above its bar

    def __call__(self, line: str = "", console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            if self.progress is not None:
                self.progress.print(line)
            else:
                print(line, flush=True)
        self.text.write(line + "\n")
        self.text.flush()

    def metric(self, **record) -> None:
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def summary(self, summary: dict) -> None:
        """The final figures: summary.json."""
        if self.enabled:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        for f in (self.text, self.metrics):
            if f is not None and not f.closed:
                f.close()
