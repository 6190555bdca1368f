"""Per-epoch evaluation: validation loss and generation accuracy, sharded over ranks.

Each rank takes every ``world_size``-th example (so each example is scored exactly once, unlike a
padding ``DistributedSampler``), generates in batches, and the counts are summed over ranks. Ranks whose
shard runs out early run dummy batches whose results are discarded, so that under FSDP every rank makes
the same sequence of forward calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from noblankslate.data.schema import Example
from noblankslate.eval.answers import extract_answer, extract_cot, normalize_answer, reference_cot
from noblankslate.model.coconut import Coconut, Sampling
from noblankslate.runtime import DistributedContext

Features = dict[str, Any]


@dataclass
class GenerationEval:
    """Summed over ranks. ``predictions`` holds every example's record on the main rank only."""

    correct: int
    cot_correct: int
    total: int
    generated_tokens: int
    forward_passes: int
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def cot_match(self) -> float:
        return self.cot_correct / self.total if self.total else 0.0

    @property
    def mean_generated_tokens(self) -> float:
        return self.generated_tokens / self.total if self.total else 0.0

    @property
    def mean_forward_passes(self) -> float:
        return self.forward_passes / self.total if self.total else 0.0


class BatchRecorder(Protocol):
    """What evaluation reads from a thought controller, besides calling it (see ``ThoughtController``).

    A controller may keep a per-batch ``record`` (the memory's :class:`~noblankslate.memory.controller.BatchRecord`):
    after each generated batch evaluation calls ``record.rows()`` (one dict per row, merged into each
    prediction record as ``"memory"``) and sets ``record`` back to None. A controller without a ``record``
    attribute (an intervention, an exit rule) is simply called.
    """

    record: Any


def take_batch_record(controller: object | None) -> list[dict] | None:
    """The per-row records a :class:`BatchRecorder` kept for the last batch (then cleared), or None."""
    record = getattr(controller, "record", None)
    if record is None:
        return None
    controller.record = None
    return record.rows()


def _shard_batches(items: Sequence[Features], context: DistributedContext, batch_size: int, sort_key: Callable) -> tuple[list[list[Features]], int]:
    """This rank's batches (similar lengths together) and the number of batches every rank runs."""
    shard = sorted(items[context.rank :: context.world_size], key=sort_key)
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    return batches, context.all_reduce_max(len(batches))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "idx"}


@torch.no_grad()
def evaluate_generation(
    model: Coconut,
    tokenizer,
    examples: Sequence[Example],
    prompts: Sequence[Features],
    collate: Callable[[list[Features]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    max_new_tokens: int,
    context: DistributedContext,
    lockstep: bool = False,
    controller=None,
    keep_thoughts: bool = False,
    sampling: Sampling | None = None,
    step_separator: str = "\n",
) -> GenerationEval:
    """Generation accuracy (answer after the last ``#``) and CoT exact match; greedy unless ``sampling``.

    Args:
        model: the unwrapped Coconut module (its ``generate`` is called directly).
        examples: the evaluated examples; ``prompts[i]["idx"]`` indexes them by ``Example.idx``.
        prompts: prompt features (question, markers and thoughts) from the curriculum.
        collate: turns a list of features into a padded batch.
        lockstep: run the same number of forward calls on every rank (FSDP).
        controller: a :class:`~noblankslate.model.coconut.ThoughtController` (the memory, an intervention);
            if it is also a :class:`BatchRecorder`, its per-row ``record`` is merged into each prediction.
        keep_thoughts: put each example's fed thoughts (n, D float32 numpy) in its record (``thoughts``).
        sampling: draw the tokens (see :class:`~noblankslate.model.coconut.Sampling`); its generator
            advances batch after batch, so a whole evaluation is reproducible from one seed.
        step_separator: the run's ``step_separator``, for the chain-of-thought match.
    """
    by_idx = {example.idx: example for example in examples}
    batches, n_batches = _shard_batches(prompts, context, batch_size, sort_key=lambda f: len(f["input_ids"]))
    sync = None
    if lockstep:
        latent_id = model.latent_token_id
        sync = max(f["input_ids"].count(latent_id) for f in prompts) + max_new_tokens
    dummy = [prompts[0]]

    counts = torch.zeros(5, dtype=torch.float64)  # correct, cot correct, total, tokens, forward passes
    records: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        features = batches[i] if i < len(batches) else dummy
        batch = collate(features)
        inputs = _to_device(batch, context.device)
        out = model.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                             sync_forward_passes=sync, controller=controller, return_thoughts=keep_thoughts,
                             sampling=sampling)
        if i >= len(batches):
            continue
        texts = tokenizer.batch_decode(out.sequences(), skip_special_tokens=True)
        extras = take_batch_record(controller)
        for row, (idx, text) in enumerate(zip(batch["idx"].tolist(), texts)):
            example = by_idx[idx]
            prediction = extract_answer(text)
            correct = prediction == normalize_answer(example.answer)
            cot_correct = extract_cot(text, step_separator) == reference_cot(example.steps, step_separator)
            tokens, passes = int(out.lengths[row]), int(out.forward_passes[row])
            counts += torch.tensor([correct, cot_correct, 1, tokens, passes], dtype=torch.float64)
            record = {
                "idx": idx, "answer": example.answer, "prediction": prediction, "output": text,
                "correct": correct, "cot_correct": cot_correct, "generated_tokens": tokens,
                "forward_passes": passes, "latent_count": int(out.latent_counts[row]),
                "thoughts_used": int(out.thoughts_used[row]),
            }
            if extras is not None:
                record["memory"] = extras[row]
            if keep_thoughts:
                record["thoughts"] = out.thoughts[row, : int(out.latent_counts[row])].float().cpu().numpy()
            records.append(record)
    model.train(was_training)

    totals = context.all_reduce_sum(counts).tolist()
    gathered = context.gather_objects(records)
    predictions = sorted((r for part in gathered for r in part), key=lambda r: r["idx"]) if context.is_main else []
    return GenerationEval(
        correct=int(totals[0]), cot_correct=int(totals[1]), total=int(totals[2]),
        generated_tokens=int(totals[3]), forward_passes=int(totals[4]), predictions=predictions,
    )


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    features: Sequence[Features],
    collate: Callable[[list[Features]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    context: DistributedContext,
    latent_passes: Callable[[dict[str, torch.Tensor]], int | None] = lambda batch: None,
) -> float:
    """Cross-entropy per labelled token over the whole validation view (all ranks together).

    The original averaged per-batch means; weighting every token equally makes the number independent
    of batch size and world size.
    """
    batches, n_batches = _shard_batches(features, context, batch_size, sort_key=lambda f: len(f["input_ids"]))
    dummy = [features[0]]
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, labelled tokens
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        inputs = _to_device(collate(batches[i] if i < len(batches) else dummy), context.device)
        out = model(**inputs, return_logits=False, reduction="sum", latent_passes=latent_passes(inputs))
        if i < len(batches):
            total += torch.tensor([float(out.loss), float((inputs["labels"][:, 1:] != -100).sum())], dtype=torch.float64)
    model.train(was_training)
    loss_sum, tokens = context.all_reduce_sum(total).tolist()
    return loss_sum / tokens if tokens else float("nan")
