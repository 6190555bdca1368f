"""Pictures of a run: loss and accuracy per epoch, with the curriculum's stage boundaries marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from noblankslate.errors import InputError


def stage_boundaries(epochs: list[dict[str, Any]]) -> list[float]:
    """x positions (between epochs) where the stage changes."""
    return [(a["epoch"] + b["epoch"]) / 2 for a, b in zip(epochs, epochs[1:]) if a["stage"] != b["stage"]]


def plot_run(records: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Draw training/validation loss and accuracy/CoT match per epoch into a PNG.

    Args:
        records: the run's ``metrics.jsonl`` records (only ``event == "epoch"`` ones are drawn).
        out: the PNG path.
    """
    epochs = sorted((r for r in records if r.get("event") == "epoch"), key=lambda r: r["epoch"])
    if not epochs:
        raise InputError("no epoch records to plot (has the run finished an epoch?)")
    x = [r["epoch"] for r in epochs]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        points = [(e, r[key]) for e, r in zip(x, epochs) if r.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), marker="o", label=label)
    acc_ax.plot(x, [r["accuracy"] for r in epochs], marker="o", label="accuracy")
    acc_ax.plot(x, [r["cot_match"] for r in epochs], marker=".", linestyle="--", label="CoT exact match")
    acc_ax.set_ylim(-0.02, 1.02)
    for ax, name in ((loss_ax, "loss per labelled token"), (acc_ax, "validation")):
        for boundary in stage_boundaries(epochs):
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch (dotted: stage switch)")
        ax.set_title(name)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Lay out, write a PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
