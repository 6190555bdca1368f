"""Calibration metrics for a confidence against answer correctness: ECE, Brier score, reliability table.

These score the memory's confidence c (and the exit probe's) on the same items whose answers were checked,
so ``confidence[i]`` and ``correct[i]`` describe one example. Inputs are array-likes (numpy arrays, lists,
CPU tensors); outputs are plain Python floats and dicts, ready for the per-epoch JSON.

Binning: ``n_bins`` equal-width bins with the edges of ``np.linspace(0, 1, n_bins + 1)``; every bin is
half-open ``[lower, upper)`` except the last, which is closed so that a confidence of exactly 1 counts. A
confidence on an interior edge falls in the bin above it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def _validate(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 arrays, after checking what would otherwise give a silently wrong number."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct must have the same shape, got {conf.shape} and {corr.shape}")
    conf, corr = conf.ravel(), corr.ravel()
    if np.isnan(conf).any():
        raise ValueError("confidence contains NaN")
    if ((conf < 0.0) | (conf > 1.0)).any():
        raise ValueError(f"confidence must lie in [0, 1], got values in [{conf.min()}, {conf.max()}]")
    if corr.dtype != np.bool_:
        corr_f = corr.astype(np.float64)
        if not np.isin(corr_f, (0.0, 1.0)).all():
            raise ValueError("correct must be booleans or 0/1 values")
        corr = corr_f
    return conf, corr.astype(np.float64)


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _bin_index(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each confidence: ``[lower, upper)``, the last bin closed at 1."""
    n_bins = len(edges) - 1
    return np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)


def expected_calibration_error(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width bins.

    ECE = sum over non-empty bins of (n_bin / N) * |accuracy_bin - mean confidence_bin|.

    Args:
        confidence: (N,) probabilities in [0, 1].
        correct: (N,) booleans or 0/1, whether each answer was right.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        The ECE in [0, 1]; NaN when N = 0 (there is nothing to be calibrated about).
    """
    _check_bins(n_bins)
    conf, corr = _validate(confidence, correct)
    if conf.size == 0:
        return float("nan")
    idx = _bin_index(conf, np.linspace(0.0, 1.0, n_bins + 1))
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    # |sum(correct) - sum(conf)| / N equals (n_bin / N) * |acc - mean conf|, and empty bins add 0.
    return float(np.abs(corr_sum - conf_sum).sum() / conf.size)


def brier_score(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Mean squared difference between confidence and correctness (0 is perfect); NaN when N = 0.

    Args:
        confidence: (N,) probabilities in [0, 1].
        correct: (N,) booleans or 0/1.
    """
    conf, corr = _validate(confidence, correct)
    if conf.size == 0:
        return float("nan")
    return float(np.mean((conf - corr) ** 2))


def reliability_table(confidence: ArrayLike, correct: ArrayLike, n_bins: int = 10) -> list[dict[str, Any]]:
    """Per-bin counts, mean confidence and accuracy, for reliability diagrams and reports.

    Every bin is listed, empty ones too, so that tables from different epochs line up; an empty bin has
    ``mean_confidence`` and ``accuracy`` None (JSON null, where NaN would not be valid JSON).

    Args:
        confidence: (N,) probabilities in [0, 1].
        correct: (N,) booleans or 0/1.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        ``n_bins`` dicts with keys ``lower``, ``upper``, ``count``, ``mean_confidence``, ``accuracy``.
    """
    _check_bins(n_bins)
    conf, corr = _validate(confidence, correct)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = _bin_index(conf, edges)
    rows = []
    for b in range(n_bins):
        in_bin = idx == b
        count = int(in_bin.sum())
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "mean_confidence": float(conf[in_bin].mean()) if count else None,
                "accuracy": float(corr[in_bin].mean()) if count else None,
            }
        )
    return rows
