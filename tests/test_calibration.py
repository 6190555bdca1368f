"""Calibrators: known answers, parameter recovery, improvement over raw scores, persistence, degenerate data."""

import itertools
import json

import numpy as np
import pytest
import torch

from noblankslate.eval.metrics import expected_calibration_error
from noblankslate.memory.calibration import (
    CALIBRATION_KINDS,
    ISOTONIC_EPS,
    Calibrator,
    IsotonicCalibrator,
    PlattCalibrator,
    TemperatureCalibrator,
    make_calibrator,
    pool_adjacent_violators,
)

FITTED_KINDS = ("temperature", "platt", "isotonic")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _isotonic_oracle(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The min-max formula: f_i = max over j <= i of min over k >= i of the weighted mean of y[j..k]."""
    n = len(y)

    def mean(j: int, k: int) -> float:
        return float(np.sum(w[j : k + 1] * y[j : k + 1]) / np.sum(w[j : k + 1]))

    return np.array([max(min(mean(j, k) for k in range(i, n)) for j in range(i + 1)) for i in range(n)])


def test_pav_textbook_examples() -> None:
    # Blocks {1, 2} -> 0.5, then x5 = 0 violates x4 = 1, pooling {4, 5}, which then violates x3 and gives
    # {3, 4, 5} -> 2/3; x6 stays 1.
    np.testing.assert_allclose(pool_adjacent_violators([1, 0, 1, 1, 0, 1]), [0.5, 0.5, 2 / 3, 2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(pool_adjacent_violators([1, 3, 2, 4, 3, 5]), [1, 2.5, 2.5, 3.5, 3.5, 5])
    np.testing.assert_allclose(pool_adjacent_violators([3, 2, 1]), [2, 2, 2])
    np.testing.assert_allclose(pool_adjacent_violators([1, 0], weights=[3, 1]), [0.75, 0.75])
    assert pool_adjacent_violators([]).shape == (0,)


def test_pav_matches_min_max_oracle() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 12):
        for _ in range(20):
            y = rng.integers(0, 2, n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)
            w = rng.integers(1, 4, n).astype(float)
            np.testing.assert_allclose(pool_adjacent_violators(y, w), _isotonic_oracle(y, w), atol=1e-12)


def test_pav_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        pool_adjacent_violators([1, 0], weights=[1, 0])
    with pytest.raises(ValueError, match="match"):
        pool_adjacent_violators([1, 0], weights=[1])


def test_isotonic_textbook_fit_and_interpolation() -> None:
    iso = make_calibrator("isotonic").fit([1, 2, 3, 4, 5, 6], [1, 0, 1, 1, 0, 1])
    top = 1 - ISOTONIC_EPS
    np.testing.assert_allclose(iso(np.arange(1, 7)), [0.5, 0.5, 2 / 3, 2 / 3, 2 / 3, top], atol=1e-15)
    # Only block ends are stored; between blocks the prediction is a linear ramp, outside it is flat.
    assert iso.x == [1.0, 2.0, 3.0, 5.0, 6.0]
    np.testing.assert_allclose(iso([0.0, 2.5, 5.5, 9.0]), [0.5, (0.5 + 2 / 3) / 2, (2 / 3 + top) / 2, top])


def test_isotonic_ties_are_pooled_whatever_their_order() -> None:
    """Equal scores get one confidence: their labels are averaged before PAV, so order cannot matter."""
    scores = [0.0, 1.0, 1.0, 2.0]
    a = make_calibrator("isotonic").fit(scores, [0, 0, 1, 1])
    b = make_calibrator("isotonic").fit(scores, [0, 1, 0, 1])
    c = make_calibrator("isotonic").fit([1.0, 2.0, 0.0, 1.0], [1, 1, 0, 0])
    for cal in (a, b, c):
        np.testing.assert_allclose(cal(np.array(scores)), [ISOTONIC_EPS, 0.5, 0.5, 1 - ISOTONIC_EPS])
    # A tie that violates its neighbour is pooled as a weighted point: (1 + 1 + 0 + 0) / 4 at scores 1 and 2.
    d = make_calibrator("isotonic").fit([1, 1, 2, 2, 3], [1, 1, 0, 0, 1])
    np.testing.assert_allclose(d(np.array([1.0, 2.0, 3.0])), [0.5, 0.5, 1 - ISOTONIC_EPS])


def test_platt_recovers_known_parameters() -> None:
    rng = np.random.default_rng(2)
    a, b = 4.0, -1.0
    scores = rng.uniform(-1.0, 1.0, 50_000)  # like a cosine similarity
    correct = rng.random(scores.size) < _sigmoid(a * scores + b)
    cal = make_calibrator("platt").fit(scores, correct)
    assert cal.a == pytest.approx(a, abs=0.15)
    assert cal.b == pytest.approx(b, abs=0.06)


def test_platt_fit_is_the_smoothed_nll_minimum() -> None:
    """Damped Newton must land on the minimum: nudging either parameter cannot lower the loss."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=200)
    correct = (rng.random(200) < _sigmoid(2 * scores + 0.3)).astype(float)
    cal = make_calibrator("platt").fit(scores, correct)
    n_pos, n_neg = correct.sum(), (1 - correct).sum()
    targets = np.where(correct == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:
        z = a * scores + b
        return float(np.sum(np.logaddexp(0, z) - targets * z))

    best = loss(cal.a, cal.b)
    for da, db in itertools.product((-1e-4, 0.0, 1e-4), repeat=2):
        assert loss(cal.a + da, cal.b + db) >= best - 1e-12


def test_temperature_recovers_known_temperature() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 3.0, 50_000)  # an overconfident probe's logits
    correct = rng.random(logits.size) < _sigmoid(logits / 2.5)
    cal = make_calibrator("temperature").fit(logits, correct)
    assert cal.temperature == pytest.approx(2.5, rel=0.04)


def test_separable_data_gives_finite_parameters() -> None:
    """Plain NLL would send the slope to infinity; the smoothed targets keep it finite."""
    platt = make_calibrator("platt").fit([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    assert np.isfinite([platt.a, platt.b]).all() and platt.a > 0
    temp = make_calibrator("temperature").fit([-2.0, -1.0, 2.0, 3.0], [0, 0, 1, 1])
    assert np.isfinite(temp.temperature) and temp.temperature > 0
    json.dumps(platt.to_dict(), allow_nan=False)


@pytest.mark.parametrize("kind", FITTED_KINDS)
def test_calibration_lowers_nll_and_ece_on_held_out_data(kind: str) -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 3.0, 8_000)
    bias = 0.0 if kind == "temperature" else 0.5  # a shift is out of temperature scaling's reach
    correct = (rng.random(logits.size) < _sigmoid(0.4 * logits + bias)).astype(float)  # raw is overconfident
    fit, test = slice(0, 4_000), slice(4_000, None)
    cal = make_calibrator(kind).fit(logits[fit], correct[fit])
    raw, calibrated = _sigmoid(logits[test]), cal(logits[test])
    y = correct[test]
    assert _nll(calibrated, y) < _nll(raw, y) - 0.05
    assert expected_calibration_error(calibrated, y) < expected_calibration_error(raw, y) / 3


@pytest.mark.parametrize("kind", ("platt", "isotonic"))
def test_monotone(kind: str) -> None:
    rng = np.random.default_rng(6)
    scores = rng.uniform(-1, 1, 500)
    correct = rng.random(500) < _sigmoid(3 * scores)
    cal = make_calibrator(kind).fit(scores, correct)
    if kind == "platt":
        assert cal.a > 0
    probs = cal(np.linspace(-1.5, 1.5, 1001))
    assert (np.diff(probs) >= 0).all()
    assert ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("kind", CALIBRATION_KINDS)
def test_round_trip_through_json(kind: str) -> None:
    rng = np.random.default_rng(7)
    scores = rng.uniform(-1, 1, 300)
    correct = rng.random(300) < _sigmoid(3 * scores)
    cal = make_calibrator(kind).fit(scores, correct)
    restored = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    assert type(restored) is type(cal) and restored == cal
    probe = np.concatenate([rng.uniform(-2, 2, 100), [np.nan, np.inf, -np.inf]])
    assert np.array_equal(restored(probe), cal(probe))


def test_round_trip_of_a_fallback() -> None:
    cal = make_calibrator("platt").fit([0.3, 0.4, 0.5], [1, 1, 1])
    restored = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    assert restored.to_dict() == {"kind": "platt", "a": None, "b": None, "constant": 1.0}
    assert restored(np.array([0.0, 0.9])).tolist() == [1.0, 1.0]


def test_none_is_one_for_every_finite_score_and_zero_without_a_hit() -> None:
    cal = make_calibrator("none").fit([0.1, 0.2], [0, 1])
    np.testing.assert_array_equal(cal(np.array([-5.0, 0.0, 0.7, np.nan, np.inf])), [1, 1, 1, 0, 0])


@pytest.mark.parametrize("kind", FITTED_KINDS)
@pytest.mark.parametrize(
    ("scores", "correct", "base_rate"),
    [
        ([0.1, 0.5, 0.9], [1, 1, 1], 1.0),
        ([0.1, 0.5, 0.9], [0, 0, 0], 0.0),
        ([0.4], [1], 1.0),
        ([0.4], [0], 0.0),
        ([], [], 0.5),
        ([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 1], 0.75),  # one distinct score carries no information
    ],
)
def test_degenerate_data_falls_back_to_the_base_rate(kind: str, scores: list, correct: list, base_rate: float) -> None:
    cal = make_calibrator(kind).fit(scores, correct)
    assert cal.constant == base_rate
    np.testing.assert_array_equal(cal(np.array([-1.0, 0.3, 2.0, np.nan])), [base_rate] * 3 + [0.0])


def test_temperature_falls_back_when_scores_point_the_wrong_way() -> None:
    cal = make_calibrator("temperature").fit([1.0, 2.0, -1.0, -2.0, 0.5], [0, 0, 1, 1, 0])
    assert cal.temperature is None and cal.constant == pytest.approx(0.4)


def test_refit_clears_the_previous_fit() -> None:
    cal = make_calibrator("platt").fit([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1])
    cal.fit([0.0, 1.0], [1, 1])
    assert (cal.a, cal.b, cal.constant) == (None, None, 1.0)


def test_torch_in_torch_out() -> None:
    cal = make_calibrator("platt").fit([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1])
    scores = torch.tensor([0.5, float("nan"), 2.5], dtype=torch.float32)
    probs = cal(scores)
    assert isinstance(probs, torch.Tensor) and probs.dtype == torch.float32 and probs.shape == (3,)
    np.testing.assert_allclose(probs.numpy(), cal(scores.double().numpy()), rtol=1e-6)
    assert cal(torch.tensor([1, 2])).dtype == torch.float32


def test_shape_is_kept() -> None:
    cal = make_calibrator("temperature").fit([-1.0, 1.0, 2.0, -2.0, 0.5], [0, 1, 1, 0, 0])
    assert cal(np.zeros((2, 3))).shape == (2, 3)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown calibration"):
        make_calibrator("beta")
    with pytest.raises(RuntimeError, match="before fit"):
        make_calibrator("isotonic")(np.array([0.5]))
    with pytest.raises(ValueError, match="finite"):
        make_calibrator("platt").fit([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        make_calibrator("platt").fit([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="same shape"):
        make_calibrator("platt").fit([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="unknown calibrator kind"):
        Calibrator.from_dict({"kind": "beta"})
    with pytest.raises(ValueError, match="keys"):
        Calibrator.from_dict({"kind": "platt", "a": 1.0})


def test_classes_match_kinds() -> None:
    assert isinstance(make_calibrator("temperature"), TemperatureCalibrator)
    assert isinstance(make_calibrator("platt"), PlattCalibrator)
    assert isinstance(make_calibrator("isotonic"), IsotonicCalibrator)
