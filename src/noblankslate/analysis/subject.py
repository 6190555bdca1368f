"""What every analysis runs on: one model, its tokenizer, the evaluated items, and their prompts.

All generation goes through :func:`noblankslate.eval.evaluate.evaluate_generation` (batched, KV-cached,
with the :class:`~noblankslate.model.coconut.ThoughtController` hook). The analyses batch the prompts
themselves, sorted by length, and hand the evaluation one batch at a time, so that a controller knows
which item each row of the batch is (an intervention that swaps thoughts between items needs that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from noblankslate.data.collator import LatentCollator
from noblankslate.data.curriculum import CurriculumSpec, Features, prompt_view
from noblankslate.data.schema import Example
from noblankslate.data.tokenize import TokenizedExample
from noblankslate.errors import NbsError
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.model.coconut import Coconut
from noblankslate.runtime import DistributedContext

ControllerFactory = Callable[[list[int]], Any]
"""Given the item positions of a batch's rows, the controller for that batch (or None)."""


class AnalysisError(NbsError):
    """An analysis cannot start: a missing checkpoint, a bad flag. The message names what is wrong."""

    label = "analysis error"


@dataclass
class Subject:
    """A model and the items it is analysed on.

    Attributes:
        examples, tokens: the evaluated items, aligned (position i of both is item i).
        stage: the curriculum stage of the ordinary evaluation (the checkpoint's stage).
        method: the run's variant (coconut, pause_as_thought, cot, ...), for the report.
    """

    model: Coconut
    tokenizer: Any
    examples: list[Example]
    tokens: list[TokenizedExample]
    spec: CurriculumSpec
    collate: LatentCollator
    stage: int
    method: str
    batch_size: int
    max_new_tokens: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step_separator: str = "\n"
    """The run's ``step_separator`` (for the chain-of-thought match)."""

    @property
    def has_latent_budget(self) -> bool:
        """Whether prompts carry latent tokens between markers (Coconut and the pause variants)."""
        return bool(self.spec.latent_slots) and self.spec.c_thought > 0

    @property
    def feeds_thoughts(self) -> bool:
        """Whether the latent tokens receive continuous thoughts (not pause tokens)."""
        return self.has_latent_budget and self.model.feed_thoughts

    @property
    def position_limit(self) -> int | None:
        """The model's positions, when they are learned absolute positions (GPT-2); None otherwise."""
        return getattr(self.model.base_causallm.config, "n_positions", None)

    def ordinary_prompts(self) -> list[Features]:
        """The prompts the training loop's evaluation uses at this stage."""
        return prompt_view(self.tokens, self.stage, self.spec)

    def latent_counts(self) -> list[int]:
        """Latent tokens each item gets in the ordinary evaluation (its ``T``)."""
        return [f["input_ids"].count(self.spec.latent_id) for f in self.ordinary_prompts()] if self.has_latent_budget \
            else [0] * len(self.tokens)


def generate(subject: Subject, prompts: Sequence[Features], controller: ControllerFactory | None = None,
             keep_thoughts: bool = False) -> list[dict[str, Any]]:
    """Greedy generation of every prompt; the evaluation's records, in the order of ``prompts``.

    ``prompts[i]`` belongs to item ``i``. Batches hold prompts of similar length (as the evaluation sorts
    them); each is passed to :func:`evaluate_generation` on its own, with ``controller(positions)``
    built for its rows, in the order the evaluation keeps them (a stable sort of an already sorted batch).
    """
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=subject.device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]))
    by_idx = {prompt["idx"]: i for i, prompt in enumerate(prompts)}
    if len(by_idx) != len(prompts):
        raise ValueError("every prompt must belong to a different item (idx)")
    records: list[dict[str, Any] | None] = [None] * len(prompts)
    for begin in range(0, len(order), subject.batch_size):
        rows = order[begin : begin + subject.batch_size]
        batch = [prompts[i] for i in rows]
        result = evaluate_generation(
            subject.model, subject.tokenizer, subject.examples, batch, subject.collate,
            batch_size=len(batch), max_new_tokens=subject.max_new_tokens, context=context,
            controller=controller(rows) if controller is not None else None, keep_thoughts=keep_thoughts,
            step_separator=subject.step_separator,
        )
        for record in result.predictions:
            records[by_idx[record["idx"]]] = record
    return records  # type: ignore[return-value]


def summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, mean generated tokens and mean forward passes of a set of records."""
    n = len(records)
    return {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "mean_generated_tokens": sum(r["generated_tokens"] for r in records) / n if n else 0.0,
        "mean_forward_passes": sum(r["forward_passes"] for r in records) / n if n else 0.0,
    }
