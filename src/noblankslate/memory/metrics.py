"""The per-epoch retrieval metrics, paired on the same items so no selection effect passes for a gain.

Three generations of the same prompts with the same model: ``off`` (plain Coconut), ``full`` (memory
on, nudge only: every thought is used) and ``on`` (memory on: nudge and early exit). Accuracy and flips
compare ``off`` with ``on``; exits compare ``on`` with ``full`` (an exit is false when the row stopped
early and was wrong where its full-length run was right); forward passes are reported for all three.
``paired`` gives each comparison's discordant pairs, exact McNemar p-value and the 95% interval of the
accuracy difference, so a difference of a point or two can be read against its noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from noblankslate.eval.evaluate import GenerationEval
from noblankslate.eval.metrics import brier_score, expected_calibration_error, reliability_table
from noblankslate.eval.paired import paired_comparison

METRICS_FILE = "retrieval_metrics_epoch_{epoch}.json"


def _by_idx(evaluation: GenerationEval) -> dict[int, dict[str, Any]]:
    return {r["idx"]: r for r in evaluation.predictions}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _histogram(values: list[float], bins: int = 20) -> dict[str, list]:
    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def retrieval_metrics(
    off: GenerationEval,
    full: GenerationEval,
    on: GenerationEval,
    index_stats: dict[str, Any],
    seconds: dict[str, float],
    epoch: int,
    stage: int,
) -> dict[str, Any]:
    """Everything the design lists, as one JSON-ready dict.

    Args:
        off, full, on: the three evaluations (predictions on the main rank, same items).
        index_stats: ``LatentMemory.stats()`` plus build information.
        seconds: wall time of each generation ("off", "full", "on") and of the controller ("memory").
    """
    a, f, o = _by_idx(off), _by_idx(full), _by_idx(on)
    if not (a.keys() == f.keys() == o.keys()):
        raise ValueError("the three evaluations must cover the same items")
    items = sorted(a)
    n = len(items)
    right_off = np.array([a[i]["correct"] for i in items], dtype=bool)
    right_full = np.array([f[i]["correct"] for i in items], dtype=bool)
    right_on = np.array([o[i]["correct"] for i in items], dtype=bool)
    memory = [o[i].get("memory") for i in items]
    has_memory = [m is not None for m in memory]
    hit = np.array([bool(m and m["hit"]) for m in memory])
    confidence = np.array([m["confidence"] if m else 0.0 for m in memory])
    best = [m["best_similarity"] for m in memory if m and m["best_similarity"] == m["best_similarity"]]
    nudged = [m for m in memory if m and m["nudged_steps"] > 0]
    used = np.array([o[i]["thoughts_used"] for i in items])
    latent = np.array([o[i]["latent_count"] for i in items])
    exited = used < latent
    false_exits = exited & ~right_on & right_full
    passes = {name: _mean([e[i]["forward_passes"] for i in items]) for name, e in (("off", a), ("full", f), ("on", o))}
    runs = {name: {"accuracy": _mean([float(e[i]["correct"]) for i in items]),
                   "mean_generated_tokens": _mean([e[i]["generated_tokens"] for i in items]),
                   "mean_forward_passes": passes[name],
                   "mean_thoughts": _mean([e[i]["thoughts_used"] for i in items])}
            for name, e in (("off", a), ("full", f), ("on", o))}
    return {
        "epoch": epoch,
        "stage": stage,
        "items": n,
        "runs": runs,
        "accuracy": {
            "without_retrieval": float(right_off.mean()) if n else 0.0,
            "with_retrieval": float(right_on.mean()) if n else 0.0,
            "with_nudge_only": float(right_full.mean()) if n else 0.0,
            "difference": float(right_on.mean() - right_off.mean()) if n else 0.0,
            "flips_wrong_to_right": int((~right_off & right_on).sum()),
            "flips_right_to_wrong": int((right_off & ~right_on).sum()),
        },
        "paired": {
            "memory_vs_off": paired_comparison(right_on, right_off).to_dict() if n else None,
            "nudge_only_vs_off": paired_comparison(right_full, right_off).to_dict() if n else None,
            "exit_vs_no_exit": paired_comparison(right_on, right_full).to_dict() if n else None,
        },
        "retrieval": {
            "queried": int(sum(has_memory)),
            "hit_rate": float(hit.mean()) if n else 0.0,
            "mean_best_similarity": _mean(best),
            # The spread says whether similarity separates problems (all near 1: it does not).
            "best_similarity_quantiles": ({str(q): float(np.quantile(best, q / 100)) for q in (5, 25, 50, 75, 95)}
                                          if best else {}),
            "best_similarity_histogram": _histogram(best),
        },
        "nudge": {
            "applied_rate": len(nudged) / n if n else 0.0,
            "mean_alpha": _mean([m["alpha"] for m in memory if m and m["hit"]]),
            "mean_nudge_norm": _mean([m["mean_nudge_norm"] for m in nudged]),
            "clip_rate": (sum(m["clipped_steps"] for m in nudged) / max(sum(m["nudged_steps"] for m in nudged), 1)),
        },
        "exit": {
            "exit_rate": float(exited.mean()) if n else 0.0,
            "mean_latent_steps": float(used.mean()) if n else 0.0,
            "mean_latent_steps_without_exit": float(latent.mean()) if n else 0.0,
            "mean_forward_passes_without_retrieval": passes["off"],
            "mean_forward_passes_without_exit": passes["full"],
            "mean_forward_passes_with_exit": passes["on"],
            "compute_saved": 1.0 - passes["on"] / passes["full"] if passes["full"] else 0.0,
            "false_exits": int(false_exits.sum()),
            "false_exit_rate": float(false_exits.mean()) if n else 0.0,
            "generation_seconds_without_exit": seconds.get("full"),
            "generation_seconds_with_exit": seconds.get("on"),
            "wall_clock_saved": 1.0 - seconds["on"] / seconds["full"] if seconds.get("full") and "on" in seconds else None,
        },
        # The retrieval confidence is fitted to "the model answers right" with all thoughts and the memory
        # off (on the build data's held-out part), so it is scored against that event here.
        "calibration": {
            "event": "right without the memory (what the confidence is fitted to)",
            "ece": expected_calibration_error(confidence, right_off) if n else float("nan"),
            "brier": brier_score(confidence, right_off) if n else float("nan"),
            "reliability": reliability_table(confidence, right_off) if n else [],
        },
        "index": index_stats,
        "time": {
            "generation_seconds": seconds,
            "memory_overhead_per_example": seconds.get("memory", 0.0) / n if n else 0.0,
            "overhead_fraction": (seconds["on"] - seconds["off"]) / seconds["off"] if seconds.get("off") else None,
        },
    }
