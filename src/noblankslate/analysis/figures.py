"""The analysis figures (PNG, matplotlib's Agg backend): one function per figure, each from the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

GROUP_COLOURS = {"frontier": "tab:green", "earlier": "tab:grey", "later": "tab:blue", "unreachable": "tab:red"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_budget(budget: dict[str, Any], ordinary_accuracy: float, path: Path, title: str = "") -> Path:
    """Accuracy and forward passes per thinking budget j, the ordinary evaluation marked."""
    rows = budget["budgets"]
    j = [r["j"] for r in rows]
    fig, (acc_ax, pass_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    acc_ax.plot(j, [r["accuracy"] for r in rows], marker="o", label="answer after j thoughts")
    acc_ax.axhline(ordinary_accuracy, color="grey", linestyle="--", linewidth=1, label="ordinary evaluation")
    acc_ax.axvline(budget["T"], color="grey", linestyle=":", linewidth=1)
    acc_ax.set(xlabel="latent tokens j (T dotted)", ylabel="accuracy", ylim=(-0.02, 1.02), xticks=j)
    acc_ax.legend(fontsize=8)
    pass_ax.plot(j, [r["mean_forward_passes"] for r in rows], marker="o", label="forward passes")
    pass_ax.plot(j, [r["mean_generated_tokens"] for r in rows], marker=".", linestyle="--", label="generated tokens")
    pass_ax.set(xlabel="latent tokens j", ylabel="mean per item", xticks=j)
    pass_ax.legend(fontsize=8)
    fig.suptitle(title or "thinking budget", fontsize=10)
    return _save(fig, path)


def plot_interventions(report: dict[str, Any], base_accuracy: float, path: Path, title: str = "") -> Path:
    """Flip rate and accuracy under every intervention."""
    runs = report["runs"]
    names = [r["name"] for r in runs]
    y = range(len(runs))
    fig, (flip_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 0.35 * len(runs) + 1.6), sharey=True)
    flip_ax.barh(list(y), [r["flip_rate"] for r in runs], color="tab:orange")
    flip_ax.set(xlabel="answer flip rate vs unperturbed", xlim=(0, 1), yticks=list(y), yticklabels=names)
    acc_ax.barh(list(y), [r["accuracy"] for r in runs], color="tab:blue")
    acc_ax.axvline(base_accuracy, color="grey", linestyle="--", linewidth=1)
    acc_ax.set(xlabel="accuracy (unperturbed dashed)", xlim=(0, 1))
    flip_ax.invert_yaxis()
    fig.suptitle(title or "interventions on the thoughts", fontsize=10)
    return _save(fig, path)


def plot_search_mass(search: dict[str, Any], path: Path, title: str = "") -> Path:
    """Mean LM-head mass on each node group per thought (left) and per node of the group (right)."""
    steps = search["per_step"]
    groups = list(GROUP_COLOURS)
    width = 0.8 / len(groups)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "mean_mass", "probability mass of the group"),
                           (axes[1], "mean_mass_per_node", "mass per node of the group")):
        for g_index, group in enumerate(groups):
            xs = [s["t"] + (g_index - 1.5) * width for s in steps]
            ax.bar(xs, [s[key][group] or 0.0 for s in steps], width=width, color=GROUP_COLOURS[group], label=group)
        ax.set(xlabel="thought t", ylabel=label, xticks=[s["t"] for s in steps])
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "where the thoughts put probability on the graph", fontsize=10)
    return _save(fig, path)


def plot_search_value(search: dict[str, Any], path: Path, title: str = "") -> Path:
    """Mean value of frontier nodes against height, leading to the target or not, one line per thought."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, label in ((axes[0], "value_by_height", "height (shortest distance to a leaf)"),
                           (axes[1], "value_by_longest_path_below", "longest path below the node")):
        table = search[key]
        cells = table["cells"]
        for t in sorted({c["t"] for c in cells}):
            for leads, style in ((True, "-"), (False, "--")):
                points = sorted((c[table["definition"]], c["mean_value"]) for c in cells
                                if c["t"] == t and c["leads_to_target"] is leads)
                if points:
                    ax.plot(*zip(*points), linestyle=style, marker="o",
                            label=f"thought {t}, {'leads to target' if leads else 'other'}")
        ax.set(xlabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("mean value of frontier nodes")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "value of frontier nodes vs height", fontsize=10)
    return _save(fig, path)


def plot_norms(decoded: dict[str, Any], path: Path, title: str = "") -> Path:
    """Thought norms per thought index against the token embeddings' norm range."""
    norms = {}
    for item in decoded["items"]:
        for thought in item["thoughts"]:
            norms.setdefault(thought["t"], []).append(thought["norm"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ts = sorted(norms)
    ax.boxplot([norms[t] for t in ts], positions=ts)
    e = decoded["embedding_norms"]
    ax.axhspan(e["min"], e["max"], color="tab:grey", alpha=0.2, label="token embedding norms (min-max)")
    ax.axhline(e["median"], color="tab:grey", linestyle="--", linewidth=1, label="median embedding norm")
    ax.set(xlabel="thought t", ylabel="L2 norm")
    ax.legend(fontsize=7)
    fig.suptitle(title or "thought norms", fontsize=10)
    return _save(fig, path)
