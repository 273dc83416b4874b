"""Plots written to files: the loss plot of a run (train and validation loss against tokens seen,
from metrics.jsonl), and the figure and file handling every plot of the project shares."""

from __future__ import annotations

import json
from pathlib import Path


def new_figure(width: float, height: float):
    """(figure, axes) drawn off-screen: plots are files only and never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=120)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write and free the figure (pyplot keeps every open figure otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def read_losses(metrics_path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """(train: (tokens, train_loss) per logged step, val: (tokens, val_loss, val_bpb) per validation)."""
    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            train.append((record["tokens"], record["train_loss"]))
        elif record["kind"] == "val":
            val.append((record["tokens"], record["val_loss"], record["val_bpb"]))
    return train, val


def label_loss_axes(ax, title: str) -> None:
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    train, val = read_losses(metrics_path)
    fig, ax = new_figure(8, 5)
    if train:
        ax.plot([t for t, _ in train], [loss for _, loss in train], label="train loss", color="tab:blue",
                alpha=0.8, linewidth=1.2)
    if val:
        ax.plot([t for t, _, _ in val], [loss for _, loss, _ in val], "o-", label="val loss", color="tab:orange",
                linewidth=2, markersize=5)
        tokens, loss, bpb = val[-1]
        ax.annotate(f"val_bpb {bpb:.4f}", (tokens, loss), textcoords="offset points", xytext=(-10, 12),
                    ha="right", fontsize=9, color="tab:orange")
    label_loss_axes(ax, title)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    return save_figure(fig, out_path)
