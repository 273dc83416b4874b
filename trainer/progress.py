"""What a user sees while a run trains: a progress bar on a terminal, plain lines elsewhere.

On a terminal (rank 0 only) a tqdm bar shows the step, the loss, tokens/s and the ETA, and the
log lines scroll above it. The ETA is the loop's, the one its log lines print: it knows the
wall-clock cap, which ends a run before ITERATIONS when it binds, and tqdm's own estimate does not. When the output is a file or a pipe there is no bar: the log lines
themselves carry tokens/s and the ETA.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# tqdm's bar without its own remaining time: the loop's ETA comes in the postfix.
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class Progress:
    def __init__(self, total_steps: int, first_step: int, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                            file=self.stream, leave=True, smoothing=0.1, bar_format=BAR_FORMAT)

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | eta {format_seconds(eta_s)}",
                                     refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EvalProgress:
    """Progress of a long evaluation, so it never looks hung: on a terminal a bar (shown only after
    `delay_s`, gone when done); elsewhere a `val_progress` line at most every `every_s` seconds.
    Call it after each batch with (batches done, batches in all); `unit` names what is counted."""

    def __init__(self, label: str, enabled: bool, stream=None, every_s: float = 10.0, delay_s: float = 2.0,
                 clock=time.perf_counter, unit: str = "batch"):
        self.label, self.enabled, self.every_s, self.clock, self.unit = label, enabled, every_s, clock, unit
        self.stream = stream or sys.stdout
        self.tty = enabled and self.stream.isatty()
        self.delay_s = delay_s
        self.bar = None
        self.t0 = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=total, unit=self.unit, desc=self.label, dynamic_ncols=True, file=self.stream,
                                leave=False, delay=self.delay_s)
            # update(), not n= and refresh(): tqdm's delay and the clearing at close count only what
            # update() displayed (a refreshed bar stayed on screen, the next line written after it).
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.close()
            return
        now = self.clock()
        if now - self.last >= self.every_s and done < total:
            self.last = now
            elapsed = now - self.t0
            eta = elapsed * (total - done) / max(done, 1)
            counted = "batches" if self.unit == "batch" else self.unit + "s"
            print(f"val_progress {self.label} {counted}:{done}/{total} ({100.0 * done / max(total, 1):.0f}%) "
                  f"elapsed:{format_seconds(elapsed)} eta:{format_seconds(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
