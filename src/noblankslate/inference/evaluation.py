"""Evaluate a loaded model on any data file: greedy accuracy, or k samples per question with pass@k and
majority vote.

The prompts are the ones training's evaluation builds for the checkpoint's stage (``prompt_view``), or,
with ``num_thoughts``, the same layout with that many thoughts for every question. Generation, answer
extraction and the per-example records are :func:`noblankslate.eval.evaluate.evaluate_generation`'s,
sharded over ranks under torchrun. For sampling, each prompt is repeated ``num_samples`` times in the
list, so the copies of a question sit in the same batches (one ``generate`` call draws them all).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noblankslate.data.curriculum import (
    prompt_view,
    prompt_with_latents,
)
from noblankslate.data.schema import DataError, Example, RecordProblem, load_examples
from noblankslate.data.tokenize import tokenize_examples
from noblankslate.eval.answers import normalize_answer
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.inference.model import InferenceError, ThinkingModel
from noblankslate.inference.sampling import majority_vote, mean_pass_at_k
from noblankslate.model.coconut import Sampling
from noblankslate.runtime import DistributedContext


@dataclass(frozen=True)
class SamplingOptions:
    """``--sample``: how to draw, and how many answers per question."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise InferenceError(f"num_samples must be >= 1, got {self.num_samples}")
        try:
            Sampling(self.temperature, self.top_k, self.top_p)
        except ValueError as error:
            raise InferenceError(str(error)) from None

    def sampling(self, context: DistributedContext) -> Sampling:
        """A generator seeded per rank (each rank draws its own stream; one process reproduces exactly)."""
        generator = torch.Generator(device=context.device).manual_seed(self.seed + 1_000_003 * context.rank)
        return Sampling(self.temperature, self.top_k, self.top_p, generator)


@dataclass
class FileEval:
    """Results on one data file (totals over ranks; ``predictions`` on the main rank only).

    Attributes:
        total: questions.
        accuracy: greedy accuracy, or without sampling options the mean accuracy of the samples (pass@1).
        pass_at_k: with sampling, pass@k for k = 1..num_samples (unbiased estimator).
        majority_accuracy: with sampling, accuracy of the most frequent answer of each question.
        predictions: one record per generated answer (``sample``: its index among the question's).
    """

    data: str
    total: int
    accuracy: float
    cot_match: float
    mean_generated_tokens: float
    mean_forward_passes: float
    num_thoughts: int | None
    sampling: dict[str, Any] | None = None
    pass_at_k: dict[int, float] | None = None
    majority_accuracy: float | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "predictions" and v is not None}
        if self.pass_at_k is not None:
            out["pass_at_k"] = {str(k): v for k, v in self.pass_at_k.items()}
        return out


def _check_fits(thinking: ThinkingModel, path: str, prompts: list[dict], budget: int) -> None:
    """A prompt plus the generation budget must fit a model with learned positions (GPT-2)."""
    limit = getattr(thinking.model.base_causallm.config, "n_positions", None)
    if limit is None:
        return
    problems = [RecordProblem(path, p["idx"], None, f"a prompt of {len(p['input_ids'])} tokens + max_new_tokens "
                              f"{budget} exceed the model's {limit} positions")
                for p in prompts if len(p["input_ids"]) + budget > limit]
    if problems:
        raise DataError(problems)


def evaluate_file(
    thinking: ThinkingModel,
    data: str | Path,
    context: DistributedContext,
    *,
    num_thoughts: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    sample: SamplingOptions | None = None,
    examples: list[Example] | None = None,
) -> FileEval:
    """Score ``thinking`` on a data file in the Coconut format.

    Args:
        examples: the file's examples when already loaded (``nbs eval`` validates the file before it
            loads the model).

    Raises:
        DataError: naming the file, record and field of every bad record (before any generation).
    """
    examples = load_examples(data) if examples is None else examples
    tokens = tokenize_examples(examples, thinking.tokenizer, separator=thinking.step_separator)
    if num_thoughts is None:
        prompts = prompt_view(tokens, thinking.stage, thinking.spec)
    else:
        count = thinking.check_num_thoughts(num_thoughts)
        prompts = [prompt_with_latents(t, count, thinking.spec) for t in tokens]
    budget = thinking.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise InferenceError(f"max_new_tokens must be >= 1, got {budget}")
    _check_fits(thinking, str(data), prompts, budget)
    copies = sample.num_samples if sample is not None else 1
    repeated = [p for p in prompts for _ in range(copies)]
    result = evaluate_generation(
        thinking.model, thinking.tokenizer, examples, repeated, thinking.collator(), batch_size=batch_size,
        max_new_tokens=budget, context=context, sampling=sample.sampling(context) if sample is not None else None,
        step_separator=thinking.step_separator,
    )
    questions = result.total // copies
    report = FileEval(
        data=str(data), total=questions, accuracy=result.accuracy, cot_match=result.cot_match,
        mean_generated_tokens=result.mean_generated_tokens, mean_forward_passes=result.mean_forward_passes,
        num_thoughts=num_thoughts,
    )
    seen: dict[int, int] = defaultdict(int)
    for record in result.predictions:
        record["sample"] = seen[record["idx"]]
        seen[record["idx"]] += 1
    report.predictions = result.predictions
    if sample is not None:
        report.sampling = {"temperature": sample.temperature, "top_k": sample.top_k, "top_p": sample.top_p,
                           "num_samples": sample.num_samples, "seed": sample.seed}
        if context.is_main:
            by_question: dict[int, list[dict]] = defaultdict(list)
            for record in result.predictions:
                by_question[record["idx"]].append(record)
            report.pass_at_k = mean_pass_at_k([sum(r["correct"] for r in group) for group in by_question.values()], copies)
            answers = {e.idx: normalize_answer(e.answer) for e in examples}
            report.majority_accuracy = sum(
                majority_vote([r["prediction"] for r in group]) == answers[idx] for idx, group in by_question.items()
            ) / len(by_question)
    return report
