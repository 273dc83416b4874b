"""The loss plot of a run: train and validation loss against tokens seen, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            train.append((record["tokens"], record["train_loss"]))
        elif record["kind"] == "val":
            val.append((record["tokens"], record["val_loss"], record["val_bpb"]))

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if train:
        ax.plot([t for t, _ in train], [loss for _, loss in train], label="train loss", color="tab:blue",
                alpha=0.8, linewidth=1.2)
    if val:
        ax.plot([t for t, _, _ in val], [loss for _, loss, _ in val], "o-", label="val loss", color="tab:orange",
                linewidth=2, markersize=5)
        tokens, loss, bpb = val[-1]
        ax.annotate(f"val_bpb {bpb:.4f}", (tokens, loss), textcoords="offset points", xytext=(-10, 12),
                    ha="right", fontsize=9, color="tab:orange")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
