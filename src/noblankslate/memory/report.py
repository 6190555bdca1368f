"""The retrieval report: a health check of a memory and of the per-epoch retrieval metrics.

Entry count, dims, key and value norms, anchor similarities (each stored key's nearest other stored
key), and a per-epoch table of ECE, Brier, false exits, mean forward passes and index size read from the
``retrieval_metrics_epoch_*.json`` files. Without a metrics folder it looks next to the index, then in
the current folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from noblankslate.errors import InputError
from noblankslate.memory.store import LatentMemory

_EPOCH_FILE = re.compile(r"retrieval_metrics_epoch_(\d+)\.json$")


def find_metrics(index_path: Path, metrics_dir: Path | None) -> tuple[Path | None, list[tuple[int, Path]]]:
    """The folder holding ``retrieval_metrics_epoch_*.json`` and its files sorted by epoch."""
    candidates = [metrics_dir] if metrics_dir is not None else [index_path.parent, Path.cwd()]
    for folder in candidates:
        if folder is None or not folder.is_dir():
            continue
        files = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.search(p.name))))
        if files:
            return folder, files
    return None, []


def anchor_similarities(store: LatentMemory, sample: int = 2048, seed: int = 0) -> dict[str, float]:
    """Similarity of (a sample of) stored keys to their nearest *other* stored key."""
    if len(store) < 2:
        return {}
    ids = store.ids
    chosen = np.random.default_rng(seed).choice(ids, size=min(sample, len(ids)), replace=False)
    keys = store.keys(chosen)  # (S, K)
    sims, found = store.search(keys, 2)
    nearest = np.where(found[:, 0] == chosen, sims[:, 1], sims[:, 0])  # skip the key itself
    nearest = nearest[np.isfinite(nearest)]
    return {"mean": float(nearest.mean()), "min": float(nearest.min()), "median": float(np.median(nearest)),
            "max": float(nearest.max()), "sampled": int(len(chosen))}


def build_report(index_path: str | Path, metrics_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the report prints, as a dict (``--json``)."""
    index_path = Path(index_path)
    store = LatentMemory.load(index_path)
    stats = store.stats()
    folder, files = find_metrics(index_path, Path(metrics_dir) if metrics_dir else None)
    epochs, last = [], None
    for epoch, path in files:
        m = last = json.loads(path.read_text(encoding="utf-8"))
        epochs.append({
            "epoch": epoch, "accuracy_off": m["accuracy"]["without_retrieval"], "accuracy_on": m["accuracy"]["with_retrieval"],
            "ece": m["calibration"]["ece"], "brier": m["calibration"]["brier"], "false_exits": m["exit"]["false_exits"],
            "passes_without_exit": m["exit"]["mean_forward_passes_without_exit"],
            "passes_with_exit": m["exit"]["mean_forward_passes_with_exit"], "index_size": m["index"]["entries"],
        })
    return {"index": str(index_path), "stats": stats, "bytes_per_entry": store.bytes_per_entry(),
            "anchor_similarity": anchor_similarities(store), "build": store.info.get("build", {}),
            "metrics_dir": str(folder) if folder else None, "epochs": epochs, "last_epoch_metrics": last}


def format_report(report: dict[str, Any]) -> str:
    s = report["stats"]
    lines = [f"memory {report['index']}",
             f"  entries {s['entries']}   key_dim {s['key_dim']}   steps {s['steps']}   value_dim {s['value_dim']}   "
             f"metric {s['metric']}   {report['bytes_per_entry']} bytes/entry"]
    for name in ("key_norm", "value_norm"):
        if f"{name}_mean" in s:
            lines.append(f"  {name.replace('_', ' ')}: mean {s[f'{name}_mean']:.4f}  std {s[f'{name}_std']:.4f}")
    a = report["anchor_similarity"]
    if a:
        lines.append(f"  nearest-anchor similarity ({a['sampled']} keys): mean {a['mean']:.4f}  median {a['median']:.4f}  "
                     f"min {a['min']:.4f}  max {a['max']:.4f}")
    if not report["epochs"]:
        lines.append("  no retrieval_metrics_epoch_*.json found" + ("" if report["metrics_dir"] else " (next to the index or here)"))
        return "\n".join(lines)
    lines.append(f"per epoch ({report['metrics_dir']}):")
    header = f"  {'epoch':>5} {'acc off':>8} {'acc on':>8} {'ECE':>7} {'Brier':>7} {'false exits':>11} {'passes':>7} {'w/ exit':>8} {'entries':>8}"
    lines.append(header)
    for e in report["epochs"]:
        lines.append(f"  {e['epoch']:>5} {e['accuracy_off']:>8.4f} {e['accuracy_on']:>8.4f} {e['ece']:>7.4f} {e['brier']:>7.4f} "
                     f"{e['false_exits']:>11} {e['passes_without_exit']:>7.2f} {e['passes_with_exit']:>8.2f} {e['index_size']:>8}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], out: str | Path) -> Path:
    """Top: per-epoch accuracy off/on, forward passes with/without exit, ECE/Brier, index size. Bottom, from
    the last evaluated epoch (so one epoch already says something): reliability of the retrieval confidence
    and of the exit probe, accuracy against thoughts used as the exit threshold moves (with the
    fixed-length point), and the distribution of the best similarities."""
    import matplotlib.pyplot as plt

    from noblankslate.eval.plots import save_figure  # sets the Agg backend

    epochs = report["epochs"]
    if not epochs:
        raise InputError("no per-epoch retrieval metrics to plot")
    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    panels = [("accuracy", [("accuracy_off", "retrieval off"), ("accuracy_on", "retrieval on")]),
              ("mean forward passes", [("passes_without_exit", "without exit"), ("passes_with_exit", "with exit")]),
              ("calibration", [("ece", "ECE"), ("brier", "Brier")]),
              ("index size", [("index_size", "entries")])]
    for ax, (title, series) in zip(axes[0], panels):
        for key, label in series:
            ax.plot(x, [e[key] for e in epochs], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    last = report.get("last_epoch_metrics") or {}
    reliability, curve, histogram, spare = axes[1]
    reliability.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    exit_scores = last.get("exit_calibration") or {}
    for name, table in (("retrieval confidence", (last.get("calibration") or {}).get("reliability")),
                        ("exit probe", exit_scores.get("reliability"))):
        points = [(r["mean_confidence"], r["accuracy"]) for r in table or [] if r["count"]]
        if points:
            reliability.plot(*zip(*points), marker="o", label=name)
    reliability.set(title=f"reliability (epoch {x[-1]})", xlabel="predicted", ylabel="observed", xlim=(0, 1), ylim=(0, 1))
    reliability.legend(fontsize=8)
    points = exit_scores.get("threshold_curve") or []
    if points:
        moving = [p for p in points if p["threshold"] is not None]
        curve.plot([p["mean_thoughts"] for p in moving], [p["accuracy"] for p in moving], marker=".", label="probe exit")
        for p in moving[::2]:
            curve.annotate(f"{p['threshold']:g}", (p["mean_thoughts"], p["accuracy"]), fontsize=7)
        fixed = points[-1]
        curve.scatter([fixed["mean_thoughts"]], [fixed["accuracy"]], color="black", zorder=3, label="fixed length")
        curve.legend(fontsize=8)
    curve.set(title="accuracy vs thoughts as the threshold moves", xlabel="mean thoughts used", ylabel="accuracy")
    hist = (last.get("retrieval") or {}).get("best_similarity_histogram") or {}
    if hist.get("counts"):
        edges = hist["edges"]
        histogram.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
    histogram.set(title="best similarity of each question", xlabel="similarity", ylabel="questions")
    spare.axis("off")
    return save_figure(fig, out)
