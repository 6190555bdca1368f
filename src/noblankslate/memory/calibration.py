"""Calibration: map a raw score to the probability that the answer is right.

The memory's confidence c = calibrate(best retrieval similarity) scales the nudge (alpha = alpha_max * c)
and the exit probe's calibrated output is compared with ``nudge.exit_threshold``; both only mean something
if c behaves like a probability. A calibrator is fitted on held-out (score, correct) pairs that the caller
supplies (never the data that is evaluated) and stored in the memory's JSON sidecar through ``to_dict``.

Kinds (``nudge.calibration``):

* ``none``: c = 1 for every finite score. Deciding what is a hit (similarity >= ``retrieval.sim_threshold``)
  is the caller's job, so a hit is fully trusted, as the design's ``none`` says.
* ``temperature``: c = sigmoid(score / T), one parameter. Right for a logit-like score that is centred at 0
  (a probe's logit); a raw similarity in [-1, 1] usually also needs a bias, which is ``platt``.
* ``platt``: c = sigmoid(a * score + b).
* ``isotonic``: a non-decreasing step function fitted by pool-adjacent-violators, no parametric shape.

Conventions shared by every kind:

* A non-finite score (NaN for "no hit", +-inf) gets confidence 0: no retrieval, no confidence.
* ``temperature`` and ``platt`` minimise the negative log-likelihood against Platt's smoothed targets
  (N+ + 1) / (N+ + 2) for a right answer and 1 / (N- + 2) for a wrong one, instead of 1 and 0. On perfectly
  separable data the plain NLL has no finite minimum (the slope runs to infinity and every confidence to
  0 or 1); the smoothed targets keep the fit finite and, unlike an L2 penalty, their effect vanishes as the
  held-out set grows, so large samples recover the true parameters.
* Degenerate data (fewer than two points, only one class, or one distinct score) cannot tie the score to
  correctness, so the fit falls back to a constant: the base rate (mean correctness), exactly, or 0.5 when
  there are no points at all. ``temperature`` falls back the same way when the fitted 1/T is not positive
  (the score is not positively related to correctness, which sigmoid(score / T) with T > 0 cannot express).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

import numpy as np
import torch
from numpy.typing import ArrayLike

CALIBRATION_KINDS = ("none", "temperature", "platt", "isotonic")

ISOTONIC_EPS = 1e-6
"""Isotonic outputs are clipped to [eps, 1 - eps]: a block of a few all-right (or all-wrong) held-out
points would otherwise claim certainty, and a confidence of exactly 0 or 1 makes any later NLL infinite."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _fit_inputs(scores: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 scores and 0/1 labels, checked."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    y = np.asarray(correct.detach().cpu() if isinstance(correct, torch.Tensor) else correct)
    if s.shape != y.shape:
        raise ValueError(f"scores and correct must have the same shape, got {s.shape} and {y.shape}")
    s, y = s.ravel(), y.ravel().astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to fit a calibrator; drop the examples without a retrieval hit")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("correct must be booleans or 0/1 values")
    return s, y


def _fit_logistic(x: np.ndarray, y: np.ndarray, bias: bool, max_iter: int = 100) -> np.ndarray:
    """Minimise the NLL of sigmoid(w * x [+ b]) against Platt's smoothed targets by damped Newton.

    The problem is convex with at most two parameters, so Newton with an Armijo backtracking line search
    converges in a handful of steps; the stopping test (half the squared Newton decrement, i.e. the
    predicted decrease of the loss) does not depend on the scale of the scores.

    Returns:
        ``[w, b]`` if ``bias`` else ``[w]``.
    """
    n_pos = y.sum()
    n_neg = y.size - n_pos
    t = np.where(y == 1.0, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    design = np.stack([x, np.ones_like(x)], axis=1) if bias else x[:, None]  # (N, 1 or 2)

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    theta = np.zeros(design.shape[1])
    if bias:
        theta[1] = math.log(t.mean() / (1.0 - t.mean()))
    current = loss(theta)
    for _ in range(max_iter):
        p = _sigmoid(design @ theta)
        grad = design.T @ (p - t)
        hess = design.T @ (design * (p * (1.0 - p))[:, None])
        hess += 1e-12 * np.trace(hess) * np.eye(len(theta))  # guards against exact singularity only
        step = np.linalg.solve(hess, grad)
        decrement = float(grad @ step)
        if decrement / 2.0 < 1e-12:
            break
        size = 1.0
        while size > 1e-10:
            candidate = theta - size * step
            value = loss(candidate)
            if value <= current - 1e-4 * size * decrement:
                break
            size /= 2.0
        else:
            break  # no decrease possible at floating-point precision: converged
        theta, current = candidate, value
    return theta


def pool_adjacent_violators(y: ArrayLike, weights: ArrayLike | None = None) -> np.ndarray:
    """The weighted least-squares non-decreasing fit to ``y`` (in the given order).

    Scans left to right keeping a stack of blocks (weighted mean, weight, length); whenever the newest
    block's mean is below the one before, the two are pooled into their weighted mean, repeatedly. Each
    point is pushed once and pooled at most once, so it runs in O(N).

    Args:
        y: (N,) values, already ordered by the score.
        weights: (N,) positive weights (default 1).

    Returns:
        (N,) fitted values, non-decreasing, constant on each pooled block.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != y.shape:
        raise ValueError(f"weights must match y, got {w.shape} and {y.shape}")
    if (w <= 0).any():
        raise ValueError("weights must be positive")
    means: list[float] = []
    totals: list[float] = []
    lengths: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist()):
        means.append(value)
        totals.append(weight)
        lengths.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m, wt, n = means.pop(), totals.pop(), lengths.pop()
            pooled = totals[-1] + wt
            means[-1] = (means[-1] * totals[-1] + m * wt) / pooled
            totals[-1] = pooled
            lengths[-1] += n
    return np.repeat(np.asarray(means), lengths)


class Calibrator(ABC):
    """A fitted map from raw scores to probabilities of a right answer.

    Subclasses are dataclasses whose fields are the fitted state (plain floats and lists, so ``to_dict`` is
    JSON-serialisable). ``constant`` is set instead of the parameters when the fit falls back to the base
    rate (see the module docstring).
    """

    kind: ClassVar[str]
    constant: float | None

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether the calibrator can be applied."""

    @abstractmethod
    def _fit(self, scores: np.ndarray, correct: np.ndarray) -> None:
        """Fit the parameters on non-degenerate data: both classes, at least two distinct scores."""

    @abstractmethod
    def _predict(self, scores: np.ndarray) -> np.ndarray:
        """Probabilities for finite scores, with the fitted parameters."""

    def fit(self, scores: ArrayLike, correct: ArrayLike) -> Self:
        """Fit on held-out pairs and return self.

        Args:
            scores: (N,) finite raw scores (best similarity, probe logit).
            correct: (N,) booleans or 0/1, whether the answer was right.
        """
        s, y = _fit_inputs(scores, correct)
        for f in fields(self):  # a refit starts from nothing, so no stale parameter survives a fallback
            setattr(self, f.name, None)
        if s.size < 2 or y.min() == y.max() or s.min() == s.max():
            self.constant = float(y.mean()) if s.size else 0.5
        else:
            self._fit(s, y)
        return self

    def __call__(self, scores: ArrayLike | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Probabilities for ``scores``, same shape; non-finite scores get 0.

        A torch tensor gives a tensor on its device (its dtype if floating, else float32); anything else
        gives a float64 numpy array. The computation itself runs in numpy: it is one number per example.
        """
        if isinstance(scores, torch.Tensor):
            probs = torch.from_numpy(self(scores.detach().cpu().double().numpy()))
            dtype = scores.dtype if scores.is_floating_point() else torch.float32
            return probs.to(device=scores.device, dtype=dtype)
        if not self.is_fitted:
            raise RuntimeError(f"{self.kind} calibrator used before fit() (or from_dict())")
        s = np.asarray(scores, dtype=np.float64)
        out = np.zeros_like(s)
        finite = np.isfinite(s)
        out[finite] = self.constant if self.constant is not None else self._predict(s[finite])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as JSON-serialisable plain values, with ``kind`` to rebuild it."""
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Calibrator:
        """Rebuild a calibrator written by ``to_dict`` (of any kind)."""
        d = dict(d)
        kind = d.pop("kind", None)
        cls = _KIND_TO_CLASS.get(kind)
        if cls is None:
            raise ValueError(f"unknown calibrator kind {kind!r}; expected one of {CALIBRATION_KINDS}")
        expected = {f.name for f in fields(cls)}
        if set(d) != expected:
            raise ValueError(f"{kind} calibrator state must have keys {sorted(expected)}, got {sorted(d)}")
        return cls(**d)


@dataclass
class NoCalibration(Calibrator):
    """c = 1 for every finite score: a hit is fully trusted. Fitting changes nothing."""

    kind: ClassVar[str] = "none"
    constant: float | None = None

    @property
    def is_fitted(self) -> bool:
        return True

    def fit(self, scores: ArrayLike, correct: ArrayLike) -> Self:
        _fit_inputs(scores, correct)
        return self

    def _fit(self, scores: np.ndarray, correct: np.ndarray) -> None:
        pass

    def _predict(self, scores: np.ndarray) -> np.ndarray:
        return np.ones_like(scores)


@dataclass
class TemperatureCalibrator(Calibrator):
    """c = sigmoid(score / T) with T > 0 fitted by (smoothed) NLL."""

    kind: ClassVar[str] = "temperature"
    temperature: float | None = None
    constant: float | None = None

    @property
    def is_fitted(self) -> bool:
        return self.temperature is not None or self.constant is not None

    def _fit(self, scores: np.ndarray, correct: np.ndarray) -> None:
        # Fit the inverse temperature: the NLL is convex in 1/T (not in T).
        (inverse,) = _fit_logistic(scores, correct, bias=False)
        if inverse > 0:
            self.temperature = float(1.0 / inverse)
        else:
            self.temperature = None
            self.constant = float(correct.mean())

    def _predict(self, scores: np.ndarray) -> np.ndarray:
        return _sigmoid(scores / self.temperature)


@dataclass
class PlattCalibrator(Calibrator):
    """c = sigmoid(a * score + b) with a, b fitted by (smoothed) NLL; a < 0 is kept if the data says so."""

    kind: ClassVar[str] = "platt"
    a: float | None = None
    b: float | None = None
    constant: float | None = None

    @property
    def is_fitted(self) -> bool:
        return self.a is not None or self.constant is not None

    def _fit(self, scores: np.ndarray, correct: np.ndarray) -> None:
        a, b = _fit_logistic(scores, correct, bias=True)
        self.a, self.b = float(a), float(b)

    def _predict(self, scores: np.ndarray) -> np.ndarray:
        return _sigmoid(self.a * scores + self.b)


@dataclass
class IsotonicCalibrator(Calibrator):
    """A non-decreasing fit by pool-adjacent-violators.

    Tied scores are merged first into one point weighted by its count (their labels averaged), so equal
    scores always get equal confidence whatever their order. Prediction interpolates linearly between the
    distinct fitted scores: constant across a pooled block, a linear ramp across the gap between two blocks,
    and constant beyond the smallest and largest fitted score. Only the first and last score of each block
    are stored (the values in between are implied), then clipped to [ISOTONIC_EPS, 1 - ISOTONIC_EPS].
    """

    kind: ClassVar[str] = "isotonic"
    x: list[float] | None = None
    y: list[float] | None = None
    constant: float | None = None

    @property
    def is_fitted(self) -> bool:
        return self.x is not None or self.constant is not None

    def _fit(self, scores: np.ndarray, correct: np.ndarray) -> None:
        unique, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=correct) / counts
        fitted = pool_adjacent_violators(means, counts)
        # Keep a point where the fitted value changes on either side: the ends of each block.
        change = np.diff(fitted) != 0
        keep = np.ones_like(fitted, dtype=bool)
        keep[1:-1] = change[:-1] | change[1:]
        self.x = unique[keep].tolist()
        self.y = np.clip(fitted[keep], ISOTONIC_EPS, 1.0 - ISOTONIC_EPS).tolist()

    def _predict(self, scores: np.ndarray) -> np.ndarray:
        return np.interp(scores, self.x, self.y)


_KIND_TO_CLASS: dict[str | None, type[Calibrator]] = {
    cls.kind: cls for cls in (NoCalibration, TemperatureCalibrator, PlattCalibrator, IsotonicCalibrator)
}


def make_calibrator(kind: str) -> Calibrator:
    """An unfitted calibrator of ``kind``, one of ``CALIBRATION_KINDS`` (the ``nudge.calibration`` values)."""
    if kind not in _KIND_TO_CLASS:
        raise ValueError(f"unknown calibration {kind!r}; expected one of {CALIBRATION_KINDS}")
    return _KIND_TO_CLASS[kind]()
