"""Interventions on the continuous thoughts, each paired with the unperturbed run on the same items.

Each intervention replaces the thoughts as they are fed, through the generation's
:class:`~noblankslate.model.coconut.ThoughtController` hook, so the later thoughts and the answer are
computed from the perturbed ones (nothing else changes: same prompts, same greedy decoding):

* ``noise_{s}``: Gaussian noise added to every thought, with norm about ``s`` times the thought's own
  norm (``z * s * |h| / sqrt(D)``, ``z`` standard normal, drawn once per item and thought from ``seed``,
  so the result does not depend on batching);
* ``swap``: every thought replaced by the thought of the same index of another item (a fixed random
  pairing without fixed points), from the unperturbed run;
* ``mean``: every thought replaced by the mean over the items of the thoughts of that index;
* ``zero_{p}``: thought ``p`` (1-based) replaced by zeros, the others computed as usual.

A flip is an item whose answer (the text after the last ``#``) differs from its unperturbed answer. A model
whose answer does not depend on its thoughts flips nothing; one whose answer is computed from them flips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from noblankslate.analysis.subject import Subject, generate, summary
from noblankslate.eval.paired import paired_comparison

Replacement = Callable[[int, Tensor, Tensor], Tensor]
"""(step, thoughts (B, D), item positions (B,)) -> the thoughts to feed (B, D)."""

DEFAULT_SCALES = (0.1, 0.5, 1.0, 2.0)


class ReplaceThoughts:
    """A controller that feeds ``replace(step, thought, items)`` instead of each thought; it stops no row."""

    record = None  # evaluate_generation merges a controller's per-row record; this one keeps none

    def __init__(self, items: Sequence[int], replace: Replacement):
        self.items = torch.as_tensor(list(items), dtype=torch.long)
        self.replace = replace

    def __call__(self, step: int, thought: Tensor, thinking: Tensor) -> tuple[Tensor, Tensor]:
        new = self.replace(step, thought, self.items.to(thought.device)).to(thought.dtype)
        return torch.where(thinking[:, None], new, thought), torch.zeros_like(thinking)


def thought_table(records: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """The unperturbed thoughts as (N, T, D) (zeros past an item's count) and the counts (N,)."""
    counts = torch.tensor([len(r["thoughts"]) for r in records])
    width = int(counts.max()) if len(records) else 0
    dim = next((r["thoughts"].shape[1] for r in records if len(r["thoughts"])), 0)
    table = torch.zeros(len(records), width, dim)
    for i, r in enumerate(records):
        if len(r["thoughts"]):
            table[i, : len(r["thoughts"])] = torch.from_numpy(r["thoughts"])
    return table, counts


def derangement(n: int, seed: int) -> Tensor:
    """A seeded pairing of n items with no item paired with itself (n >= 2)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner


def replacements(base: Sequence[dict[str, Any]], scales: Sequence[float], seed: int) -> dict[str, Replacement]:
    """Every intervention of the module docstring, as functions of (step, thoughts, items)."""
    table, counts = thought_table(base)  # (N, T, D), (N,)
    n, width, dim = table.shape
    noise = torch.randn(n, width, dim, generator=torch.Generator().manual_seed(seed))  # (N, T, D)
    have = (torch.arange(width)[None, :] < counts[:, None]).float()  # (N, T)
    mean = (table * have[..., None]).sum(0) / have.sum(0).clamp(min=1)[:, None]  # (T, D)
    out: dict[str, Replacement] = {}
    for scale in scales:
        def noisy(step, thought, items, scale=scale):
            z = noise[items, step].to(thought.device)  # (B, D)
            return thought + z * (scale * thought.norm(dim=-1, keepdim=True) / dim ** 0.5)
        out[f"noise_{scale:g}"] = noisy
    if n >= 2:
        partner = derangement(n, seed)

        def swapped(step, thought, items):
            other = partner[items.cpu()]
            usable = (counts[other] > step).to(thought.device)[:, None]  # the partner has this thought
            return torch.where(usable, table[other, step].to(thought.device), thought)
        out["swap"] = swapped
    out["mean"] = lambda step, thought, items: mean[step].to(thought.device).expand_as(thought)
    for position in range(width):
        out[f"zero_{position + 1}"] = (lambda step, thought, items, position=position:
                                       torch.zeros_like(thought) if step == position else thought)
    return out


def interventions(subject: Subject, base: list[dict[str, Any]], scales: Sequence[float] = DEFAULT_SCALES,
                  seed: int = 0) -> dict[str, Any]:
    """Run every intervention on the ordinary prompts; flip rates and accuracy, paired with ``base``.

    Args:
        base: the unperturbed run's records with their thoughts (``keep_thoughts=True``).

    Returns:
        ``{"runs": [...], "items": [...]}``; each run has its summary, ``flip_rate``, ``flips`` and the
        paired comparison with the unperturbed run; each item its prediction under every intervention.
    """
    prompts = subject.ordinary_prompts()
    base_correct = [bool(r["correct"]) for r in base]
    runs, predictions = [], {}
    for name, replace in replacements(base, scales, seed).items():
        records = generate(subject, prompts, controller=lambda rows, replace=replace: ReplaceThoughts(rows, replace))
        flips = sum(r["prediction"] != b["prediction"] for r, b in zip(records, base))
        runs.append({"name": name, **summary(records), "flips": flips,
                     "flip_rate": flips / len(records) if records else 0.0,
                     "vs_unperturbed": paired_comparison([bool(r["correct"]) for r in records], base_correct).to_dict()})
        predictions[name] = [r["prediction"] for r in records]
    items = [{"idx": b["idx"], "unperturbed": b["prediction"], **{k: v[i] for k, v in predictions.items()}}
             for i, b in enumerate(base)]
    return {"seed": seed, "noise_scales": list(scales), "runs": runs, "items": items}
