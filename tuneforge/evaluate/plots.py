"""Loss-curve PNG from metrics.jsonl (train and validation)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    import matplotlib  # deferred: the plotting stack loads only when a plot is drawn

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt  # deferred: the plotting stack loads only when a plot is drawn

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
