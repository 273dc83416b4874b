"""What a run reports while it trains, as callbacks (as mlx-lm's trainer takes a TrainingCallback):
the loop calls these hooks and imports no reporter. `default_reporters` builds the usual set in one
place; `run_training(cfg, backend, reporters=[...])` adds a user's own to it. Rank 0 only reports.

    on_train_begin(step)                      training starts at `step` (0, or a checkpoint's)
    on_train_step(step, loss, tokens_per_s, eta_s)
                                              after every step; `loss` is the last one read (log steps),
                                              `eta_s` the seconds left, the wall-clock cap counted
    on_validation(step, val_loss, val_bpb)    after every validation, once its record is in metrics.jsonl
    on_metric(record)                         every record of metrics.jsonl as written: train, val, the
                                              final evaluations (kind "sliding_val", "ttt_val")
    on_train_end(step)                        training stopped: the last step, the wall-clock cap or Ctrl-C
    on_end(summary)                           the final figures, as in summary.json
    close()                                   the run is over (also after Ctrl-C)

A reporter overrides the hooks it needs; Reporter's do nothing. The run's own log.txt, metrics.jsonl
and summary.json are written by the loop (trainer/run_folder.py), whatever the reporters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from trainer.plot import plot_losses
from trainer.progress import Progress
from trainer.run_folder import RunLog
from trainer.tracking import check_trackers, open_trackers


class Reporter:
    def on_train_begin(self, step: int) -> None: ...

    def on_train_step(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None: ...

    def on_validation(self, step: int, val_loss: float, val_bpb: float) -> None: ...

    def on_metric(self, record: dict) -> None: ...

    def on_train_end(self, step: int) -> None: ...

    def on_end(self, summary: dict) -> None: ...

    def close(self) -> None: ...


class ProgressBar(Reporter):
    """The terminal's progress bar (trainer/progress.py), with the log's console lines scrolling above it."""

    def __init__(self, log: RunLog, iterations: int):
        self.log, self.iterations, self.progress = log, iterations, None

    def on_train_begin(self, step: int) -> None:
        self.progress = self.log.progress = Progress(self.iterations, step, enabled=True)

    def on_train_step(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        self.progress.update(step, loss, tokens_per_s, eta_s)

    def on_train_end(self, step: int) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = self.log.progress = None


class LossPlot(Reporter):
    """loss.png, redrawn from metrics.jsonl at each validation (trainer/plot.py) and when training stops
    after its last one: a run stopped by Ctrl-C before any validation has its train loss drawn too."""

    def __init__(self, run_dir: Path, title: str):
        self.run_dir, self.title, self.drawn_at = run_dir, title, None

    def on_validation(self, step: int, val_loss: float, val_bpb: float) -> None:
        self.draw(step)

    def on_train_end(self, step: int) -> None:
        if step != self.drawn_at:
            self.draw(step)

    def draw(self, step: int) -> None:
        plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", title=self.title)
        self.drawn_at = step


class Trackers(Reporter):
    """REPORT_TO's experiment trackers (trainer/tracking.py): the config, every metric, the summary."""

    def __init__(self, report_to: str, run_dir: Path, config: dict):
        self.trackers = open_trackers(report_to, run_dir, config.get("run_id", run_dir.name))
        for tracker in self.trackers:
            tracker.config(config)

    def on_metric(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.record(record)

    def on_end(self, summary: dict) -> None:
        for tracker in self.trackers:
            tracker.summary(summary)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def check_reporters(report_to: str) -> None:
    """Before anything is written: every tracker REPORT_TO names is installed (one-line ConfigError)."""
    check_trackers(report_to)


def default_reporters(log: RunLog, run_dir: Path, config: dict, title: str) -> list[Reporter]:
    """The usual set: the progress bar, the loss plot, and the trackers REPORT_TO names."""
    return [ProgressBar(log, config["iterations"]), LossPlot(run_dir, title),
            Trackers(config.get("report_to", ""), run_dir, config)]


class Reporters(Reporter):
    """Several reporters as one, called in order."""

    def __init__(self, reporters: Iterable[Reporter]):
        self.reporters = list(reporters)

    def _each(self, hook: str, *args) -> None:
        for reporter in self.reporters:
            getattr(reporter, hook)(*args)

    def on_train_begin(self, step: int) -> None:
        self._each("on_train_begin", step)

    def on_train_step(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        self._each("on_train_step", step, loss, tokens_per_s, eta_s)

    def on_validation(self, step: int, val_loss: float, val_bpb: float) -> None:
        self._each("on_validation", step, val_loss, val_bpb)

    def on_metric(self, record: dict) -> None:
        self._each("on_metric", record)

    def on_train_end(self, step: int) -> None:
        self._each("on_train_end", step)

    def on_end(self, summary: dict) -> None:
        self._each("on_end", summary)

    def close(self) -> None:
        self._each("close")
