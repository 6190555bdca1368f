"""Table 1 from the experiment's results: mean +- std over seeds, tokens, passes, paired tests, a figure.

Each row is compared with Coconut on the same items and the same seed (exact McNemar, the accuracy
difference and its 95% interval); the "pooled" comparison puts every seed's pairs together (item x seed
pairs; an item then appears once per seed, so it is a summary, not an independent-sample test).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from noblankslate.eval.paired import paired_comparison
from noblankslate.experiment.rows import REFERENCE_ROW, Row


def _aligned(first: dict[str, Any], second: dict[str, Any]) -> tuple[list[bool], list[bool]]:
    a = {i["idx"]: i["correct"] for i in first["items"]}
    b = {i["idx"]: i["correct"] for i in second["items"]}
    if set(a) != set(b):
        raise ValueError(f"{first['row']} seed {first['seed']} and {second['row']} seed {second['seed']} were "
                         "evaluated on different items; they cannot be paired")
    keys = sorted(a)
    return [a[k] for k in keys], [b[k] for k in keys]


def _accuracy_by_steps(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy over all seeds' items, grouped by the item's number of reasoning steps (hops)."""
    right: dict[int, list[bool]] = {}
    for run in runs:
        for item in run["items"]:
            right.setdefault(item["reasoning_steps"], []).append(item["correct"])
    return {str(k): sum(v) / len(v) for k, v in sorted(right.items())}


def build_table(results: dict[str, dict[str, Any]], rows: Sequence[Row], seeds: Sequence[int]) -> dict[str, Any]:
    """The table as data (what ``table.json`` holds)."""
    by_key = {(r["row"], r["seed"]): r for r in results.values()}
    table_rows = []
    for row in rows:
        runs = [by_key[(row.name, s)] for s in seeds if (row.name, s) in by_key]
        if not runs:
            continue
        accuracies = [r["accuracy"] for r in runs]
        entry: dict[str, Any] = {
            "row": row.name, "label": row.label, "paper_prosqa_gpt2": row.paper_prosqa,
            "seeds": [r["seed"] for r in runs],
            "accuracy": {str(r["seed"]): r["accuracy"] for r in runs},
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "mean_generated_tokens": statistics.fmean(r["mean_generated_tokens"] for r in runs),
            "mean_forward_passes": statistics.fmean(r["mean_forward_passes"] for r in runs),
            "optimizer_steps": sorted({r["optimizer_steps"] for r in runs}),
            "wall_seconds": {str(r["seed"]): r["wall_seconds"] for r in runs},
            "accuracy_by_steps": _accuracy_by_steps(runs),
            "accuracy_per_epoch": [statistics.fmean(r["epochs"][e]["accuracy"] for r in runs)
                                   for e in range(min(len(r["epochs"]) for r in runs))],
        }
        if row.name != REFERENCE_ROW:
            per_seed, pooled_a, pooled_b = {}, [], []
            for r in runs:
                reference = by_key.get((REFERENCE_ROW, r["seed"]))
                if reference is None:
                    continue
                ours, theirs = _aligned(reference, r)
                per_seed[str(r["seed"])] = paired_comparison(ours, theirs).to_dict()
                pooled_a += ours
                pooled_b += theirs
            if per_seed:
                entry["coconut_vs_row"] = {"per_seed": per_seed, "pooled": paired_comparison(pooled_a, pooled_b).to_dict()}
        table_rows.append(entry)
    steps = sorted({s for e in table_rows for s in e["optimizer_steps"]})
    return {"reference_row": REFERENCE_ROW, "seeds": list(seeds), "rows": table_rows,
            "equal_optimizer_steps": len(steps) == 1, "optimizer_steps": steps}


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def format_markdown(table: dict[str, Any]) -> str:
    """A markdown table; the last columns are Coconut minus the row, paired on the same items."""
    lines = [
        "| row | paper (ProsQA, GPT-2) | accuracy (mean +- std) | per seed | tokens | passes "
        "| Coconut - row [95% CI] (pooled) | b / c | McNemar p per seed |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for e in table["rows"]:
        paper = f"{100 * e['paper_prosqa_gpt2']:.1f}%" if e["paper_prosqa_gpt2"] is not None else "-"
        seeds = ", ".join(f"{100 * a:.1f}" for a in e["accuracy"].values())
        versus = e.get("coconut_vs_row")
        if versus:
            pooled = versus["pooled"]
            low, high = pooled["ci95"]
            diff = f"{100 * pooled['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
            counts = f"{pooled['only_first']} / {pooled['only_second']}"
            p_values = ", ".join(_p(v["p_value"]) for v in versus["per_seed"].values()) + f" (pooled {_p(pooled['p_value'])})"
        else:
            diff, counts, p_values = ("(reference)", "", "") if e["row"] == REFERENCE_ROW else ("-", "-", "-")
        lines.append(
            f"| {e['label']} | {paper} | {100 * e['accuracy_mean']:.1f}% +- {100 * e['accuracy_std']:.1f} | {seeds} "
            f"| {e['mean_generated_tokens']:.1f} | {e['mean_forward_passes']:.1f} | {diff} | {counts} | {p_values} |")
    steps = ", ".join(str(s) for s in table["optimizer_steps"])
    note = "equal for every row" if table["equal_optimizer_steps"] else "NOT equal across rows"
    lines.append("")
    lines.append(f"Seeds {', '.join(str(s) for s in table['seeds'])}; optimizer steps per run: {steps} ({note}). "
                 "b / c: items only Coconut / only the row gets right, over all seeds.")
    hops = sorted({k for e in table["rows"] for k in e["accuracy_by_steps"]}, key=int)
    if len(hops) > 1:
        lines += ["", "Accuracy by the question's number of reasoning steps (all seeds):", "",
                  "| row | " + " | ".join(f"{h} step" + ("s" if h != "1" else "") for h in hops) + " |",
                  "|---|" + "---:|" * len(hops)]
        for e in table["rows"]:
            cells = [f"{100 * e['accuracy_by_steps'][h]:.1f}%" if h in e["accuracy_by_steps"] else "-" for h in hops]
            lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_table(table: dict[str, Any], out: str | Path) -> Path:
    """Left: final accuracy per row (bar: mean over seeds; dots: seeds). Right: accuracy per epoch."""
    from noblankslate.eval.plots import plt, save_figure

    rows = table["rows"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
    x = range(len(rows))
    bars.bar(x, [e["accuracy_mean"] for e in rows], color="#9bb7d4")
    for i, e in enumerate(rows):
        values = list(e["accuracy"].values())
        bars.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        bars.text(i, min(e["accuracy_mean"] + 0.02, 0.97), f"{100 * e['accuracy_mean']:.1f}", ha="center", fontsize=8)
        if e["paper_prosqa_gpt2"] is not None:
            bars.scatter([i], [e["paper_prosqa_gpt2"]], marker="_", s=300, color="#c0392b", zorder=3)
    bars.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    bars.set_xticks(list(x), [e["label"].replace("Coconut ", "Coconut\n") for e in rows], fontsize=8)
    bars.set_ylim(0, 1.02)
    bars.set_ylabel("held-out accuracy")
    bars.set_title("last epoch (dots: seeds; red: paper, ProsQA GPT-2; dotted: chance)")
    for e in rows:
        per_epoch = e["accuracy_per_epoch"]
        curves.plot(range(1, len(per_epoch) + 1), per_epoch, marker="o", markersize=3, label=e["label"])
    curves.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    curves.set_ylim(0, 1.02)
    curves.set_xlabel("epoch")
    curves.set_title("accuracy per epoch (mean over seeds)")
    curves.legend(fontsize=7)
    return save_figure(fig, out)

