"""ECE, Brier score and the reliability table on hand-computed examples, and their input checks."""

import json

import numpy as np
import pytest
import torch

from noblankslate.eval.metrics import (
    brier_score,
    expected_calibration_error,
    reliability_table,
)

CONF = [0.1, 0.4, 0.35, 0.8, 0.9]
CORRECT = [0, 1, 0, 1, 1]


def test_ece_hand_computed() -> None:
    # Bin [0, 0.5): conf 0.1, 0.4, 0.35 (mean 0.85/3), accuracy 1/3 -> |1/3 - 0.85/3| * 3/5 = 0.03.
    # Bin [0.5, 1]: conf 0.8, 0.9 (mean 0.85), accuracy 1 -> 0.15 * 2/5 = 0.06.
    assert expected_calibration_error(CONF, CORRECT, n_bins=2) == pytest.approx(0.09, abs=1e-12)
    # One bin: |3/5 - 2.55/5| = 0.09 as well; ten bins: every point alone in its bin -> mean |c - y|.
    assert expected_calibration_error(CONF, CORRECT, n_bins=1) == pytest.approx(0.09, abs=1e-12)
    expected_10 = np.mean(np.abs(np.array(CONF) - np.array(CORRECT)))
    assert expected_calibration_error(CONF, CORRECT) == pytest.approx(expected_10, abs=1e-12)


def test_ece_matches_per_bin_definition() -> None:
    """The summed form equals the textbook sum of (n_bin / N) * |acc - conf| over non-empty bins."""
    rng = np.random.default_rng(0)
    conf = rng.random(500)
    correct = rng.random(500) < conf**2
    edges = np.linspace(0, 1, 16)
    total = 0.0
    for b in range(15):
        upper_ok = conf <= edges[b + 1] if b == 14 else conf < edges[b + 1]
        in_bin = (conf >= edges[b]) & upper_ok
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert expected_calibration_error(conf, correct, n_bins=15) == pytest.approx(total, abs=1e-12)


def test_perfect_calibration_is_zero() -> None:
    assert expected_calibration_error([0.25] * 4, [1, 0, 0, 0], n_bins=10) == 0.0
    assert expected_calibration_error([1.0, 1.0, 0.0], [True, True, False]) == 0.0
    assert brier_score([1.0, 0.0, 1.0], [1, 0, 1]) == 0.0


def test_brier_hand_computed() -> None:
    # (0.01 + 0.36 + 0.1225 + 0.04 + 0.01) / 5
    assert brier_score(CONF, CORRECT) == pytest.approx(0.1085, abs=1e-12)
    assert brier_score([0.5], [1]) == 0.25


def test_last_bin_closed_and_edges_go_up() -> None:
    rows = reliability_table([0.0, 0.5, 1.0], [0, 1, 1], n_bins=2)
    assert rows == [
        {"lower": 0.0, "upper": 0.5, "count": 1, "mean_confidence": 0.0, "accuracy": 0.0},
        {"lower": 0.5, "upper": 1.0, "count": 2, "mean_confidence": 0.75, "accuracy": 1.0},
    ]


def test_reliability_table_lists_empty_bins_as_json() -> None:
    rows = reliability_table(CONF, CORRECT, n_bins=4)
    assert [r["count"] for r in rows] == [1, 2, 0, 2]
    assert rows[2]["mean_confidence"] is None and rows[2]["accuracy"] is None
    assert rows[1]["mean_confidence"] == pytest.approx(0.375) and rows[1]["accuracy"] == 0.5
    json.dumps(rows, allow_nan=False)


def test_empty_input() -> None:
    assert np.isnan(expected_calibration_error([], []))
    assert np.isnan(brier_score([], []))
    assert [r["count"] for r in reliability_table([], [], n_bins=3)] == [0, 0, 0]


def test_accepts_arrays_and_tensors() -> None:
    value = expected_calibration_error(torch.tensor(CONF), torch.tensor(CORRECT, dtype=torch.bool), n_bins=2)
    assert value == pytest.approx(0.09, abs=1e-7)  # float32 confidences
    assert brier_score(np.array(CONF), np.array(CORRECT, dtype=float)) == pytest.approx(0.1085)


@pytest.mark.parametrize(
    ("confidence", "correct", "message"),
    [
        ([0.1, 0.2], [1], "same shape"),
        ([0.1, float("nan")], [1, 0], "NaN"),
        ([0.1, 1.2], [1, 0], r"\[0, 1\]"),
        ([-0.01], [1], r"\[0, 1\]"),
        ([0.1, 0.2], [1, 2], "0/1"),
    ],
)
def test_bad_inputs(confidence: list, correct: list, message: str) -> None:
    for fn in (expected_calibration_error, brier_score, reliability_table):
        with pytest.raises(ValueError, match=message):
            fn(confidence, correct)


@pytest.mark.parametrize("n_bins", [0, -1, 2.5, True])
def test_bad_bins(n_bins: object) -> None:
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=n_bins)
