"""The learned exit probe: from a thought, the probability that exiting now gives the right answer.

Trained by actually exiting: for training examples, the answer is generated with j thoughts for every
j, and the thought the model holds at that point (the hidden state before slot j) is labelled with
whether that answer was right. A logistic regression on standardised features is enough here (the
thought is the model's own summary of its state; a linear read-out keeps the probe cheap at every latent
step), and its logit is then calibrated on held-out examples so the exit threshold is a probability.

The calibration is one map for every thought by default. With ``nudge.probe_calibration: per_thought``
each thought index gets its own map, fitted on that thought's held-out samples: the weights are fitted on
training examples, which the model answers right at nearly every thought, so the logit can rank one
thought's states well and still read too high at another on new questions. Measured on the chain task
it did not help (docs/memory.md, P43), so it is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from noblankslate.memory.calibration import Calibrator, make_calibrator

MIN_THOUGHT_SAMPLES = 20
"""Fewest calibration samples (with both outcomes) a thought needs for a map of its own."""


@dataclass
class ExitProbe:
    """``logit(h) = w . (h - mean) / std + b``, then ``probability = calibrator(logit)``, with the calibrator
    of the thought's index when there is one per thought."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    weight: np.ndarray  # (D,)
    bias: float
    calibrator: Calibrator
    """The map for every thought (or for thoughts past the last of ``by_thought``)."""
    by_thought: list[Calibrator | None] | None = None
    """One map per thought index (index 0: the first thought; None there: ``calibrator``), or None:
    ``calibrator`` for all."""

    def logit(self, thoughts: Tensor) -> Tensor:
        """(B, D) thoughts -> (B,) logits (float32, on the thoughts' device)."""
        params = [torch.as_tensor(a, dtype=torch.float32, device=thoughts.device) for a in (self.mean, self.std, self.weight)]
        mean, std, weight = params
        return ((thoughts.float() - mean) / std) @ weight + self.bias

    def probability(self, thoughts: Tensor, step: int | Tensor) -> Tensor:
        """(B, D) thoughts -> (B,) calibrated probabilities that exiting now is right.

        Args:
            step: the thoughts' index (0: the first thought), one int for the batch or (B,) per row.
        """
        logits = self.logit(thoughts)
        if self.by_thought is None:
            return self.calibrator(logits)
        steps = torch.as_tensor(step, device=logits.device).expand(logits.shape)
        out = torch.empty_like(logits)
        for j in torch.unique(steps).tolist():
            rows = steps == j
            out[rows] = self.calibrator_of(j)(logits[rows]).to(out.dtype)
        return out

    def calibrator_of(self, step: int) -> Calibrator:
        if self.by_thought is not None and step < len(self.by_thought) and self.by_thought[step] is not None:
            return self.by_thought[step]
        return self.calibrator

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "weight": self.weight.tolist(),
                "bias": self.bias, "calibrator": self.calibrator.to_dict(),
                "by_thought": None if self.by_thought is None else
                [c.to_dict() if c is not None else None for c in self.by_thought]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ExitProbe:
        return ExitProbe(mean=np.asarray(d["mean"], dtype=np.float32), std=np.asarray(d["std"], dtype=np.float32),
                         weight=np.asarray(d["weight"], dtype=np.float32), bias=float(d["bias"]),
                         calibrator=Calibrator.from_dict(d["calibrator"]),
                         by_thought=None if d.get("by_thought") is None else
                         [Calibrator.from_dict(c) if c is not None else None for c in d["by_thought"]])


def fit_exit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    held_out_features: np.ndarray,
    held_out_labels: np.ndarray,
    calibration: str,
    l2: float = 1e-2,
    steps: int = 200,
    held_out_steps: np.ndarray | None = None,
) -> ExitProbe:
    """Fit the logistic probe on one split and its calibration on another.

    Args:
        features, labels: (N, D) thoughts and (N,) 0/1 "exiting here was right".
        held_out_features, held_out_labels: the calibration split (examples not used for the fit).
        calibration: the calibrator kind (``nudge.calibration``).
        l2: ridge penalty on the weights (standardised features), which keeps a separable fit finite.
        held_out_steps: (M,) each calibration sample's thought index; given, every index gets its own
            calibrator (``nudge.probe_calibration: per_thought``), fitted on its samples only.
    """
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    weight = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y) + l2 * weight.square().sum() / len(y)
        loss.backward()
        return loss

    if len(y) and 0 < float(y.mean()) < 1:
        optimizer.step(closure)
    probe = ExitProbe(mean=mean.numpy(), std=std.numpy(), weight=weight.detach().numpy(), bias=float(bias.detach()),
                      calibrator=make_calibrator(calibration))
    held_logits = probe.logit(torch.as_tensor(held_out_features, dtype=torch.float32)).numpy()
    held_labels = np.asarray(held_out_labels)
    probe.calibrator.fit(held_logits, held_labels)
    if held_out_steps is not None:
        held_steps = np.asarray(held_out_steps)
        by_thought: list[Calibrator | None] = []
        for j in range(int(held_steps.max()) + 1 if len(held_steps) else 0):
            logits_j, labels_j = held_logits[held_steps == j], held_labels[held_steps == j]
            # Too few samples, or one outcome only, say nothing of how this thought's logit maps to a
            # probability (a constant 1 would make every row stop there): the pooled map stands in.
            enough = len(labels_j) >= MIN_THOUGHT_SAMPLES and 0 < labels_j.mean() < 1
            by_thought.append(make_calibrator(calibration).fit(logits_j, labels_j) if enough else None)
        probe.by_thought = by_thought
    return probe
