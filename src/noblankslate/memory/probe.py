"""The learned exit probe: from a thought, the probability that exiting now gives the right answer.

Trained by actually exiting: for training examples, the answer is generated with j thoughts for every
j, and the thought the model holds at that point (the hidden state before slot j) is labelled with
whether that answer was right. A logistic regression on standardised features is enough here (the
thought is the model's own summary of its state; a linear read-out keeps the probe cheap at every latent
step), and its logit is then calibrated on held-out examples so the exit threshold is a probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from noblankslate.memory.calibration import Calibrator, make_calibrator


@dataclass
class ExitProbe:
    """``logit(h) = w . (h - mean) / std + b``, then ``probability = calibrator(logit)``."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)
    weight: np.ndarray  # (D,)
    bias: float
    calibrator: Calibrator

    def logit(self, thoughts: Tensor) -> Tensor:
        """(B, D) thoughts -> (B,) logits (float32, on the thoughts' device)."""
        params = [torch.as_tensor(a, dtype=torch.float32, device=thoughts.device) for a in (self.mean, self.std, self.weight)]
        mean, std, weight = params
        return ((thoughts.float() - mean) / std) @ weight + self.bias

    def probability(self, thoughts: Tensor) -> Tensor:
        """(B, D) thoughts -> (B,) calibrated probabilities that exiting now is right."""
        return self.calibrator(self.logit(thoughts))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "weight": self.weight.tolist(),
                "bias": self.bias, "calibrator": self.calibrator.to_dict()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ExitProbe:
        return ExitProbe(mean=np.asarray(d["mean"], dtype=np.float32), std=np.asarray(d["std"], dtype=np.float32),
                         weight=np.asarray(d["weight"], dtype=np.float32), bias=float(d["bias"]),
                         calibrator=Calibrator.from_dict(d["calibrator"]))


def fit_exit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    held_out_features: np.ndarray,
    held_out_labels: np.ndarray,
    calibration: str,
    l2: float = 1e-2,
    steps: int = 200,
) -> ExitProbe:
    """Fit the logistic probe on one split and its calibration on another.

    Args:
        features, labels: (N, D) thoughts and (N,) 0/1 "exiting here was right".
        held_out_features, held_out_labels: the calibration split (examples not used for the fit).
        calibration: the calibrator kind (``nudge.calibration``).
        l2: ridge penalty on the weights (standardised features), which keeps a separable fit finite.
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
    probe.calibrator.fit(held_logits, np.asarray(held_out_labels))
    return probe
