"""What a user sees while a run trains: a progress bar on a terminal, plain lines elsewhere.

On a terminal (rank 0 only) a tqdm bar shows the step, the loss, tokens/s and the ETA, and the
log lines scroll above it. When the output is a file or a pipe there is no bar: the log lines
themselves carry tokens/s and the ETA.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total_steps: int, first_step: int, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                            file=self.stream, leave=True, smoothing=0.1)

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
