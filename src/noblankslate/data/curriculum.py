"""Per-stage views of the tokenized data: Coconut's curriculum.

At stage ``s`` the first ``s`` reasoning steps of an example are replaced by ``s * c_thought`` latent
tokens between ``<|start-latent|>`` and ``<|end-latent|>``; past ``max_latent_stage`` every step is
removed. This reproduces the original ``get_cot_latent_dataset`` (training and validation-loss
sequences) and ``get_question_latent_dataset`` (generation prompts) case by case, with two changes
that do not alter any sequence:

* parameters are explicit (:class:`CurriculumSpec`), not the whole config;
* the ``uniform_prob`` draws come from a generator seeded with ``(seed, epoch)``, where the original
  called the unseeded global ``random`` inside a 32-process ``map`` (so its draws were not reproducible).

Shuffling is not done here; the sampler does it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from noblankslate.data.tokenize import TokenizedExample

if TYPE_CHECKING:
    from noblankslate.config import Config

IGNORE_INDEX = -100
"""Label of positions that carry no loss (question, markers, latent tokens, padding)."""

Features = dict[str, Any]
"""One sequence: ``input_ids``, ``attention_mask``, ``position_ids``, ``idx`` and, for training, ``labels``."""

_TRAIN_STREAM = 0
_VALID_LOSS_STREAM = 1


class LatentIds(Protocol):
    """The marker ids (``noblankslate.model.special_tokens.LatentTokenIds`` has this shape)."""

    start_id: int
    end_id: int
    latent_id: int


@dataclass(frozen=True)
class CurriculumSpec:
    """What the curriculum needs to build sequences for one run."""

    c_thought: int
    """Latent tokens per removed step; 0 for ``no_thoughts`` (steps removed, nothing in their place)."""
    max_latent_stage: int
    """Last stage that replaces steps one by one; later stages remove every step."""
    pad_latent_to_max: bool
    """Past ``max_latent_stage``, use ``max_latent_stage`` thoughts even for chains with fewer steps."""
    uniform_prob: float
    """Probability that an example is trained at a stage drawn uniformly from ``0..n_steps``."""
    no_cot: bool
    """Remove every step and add no latent tokens, at every stage."""
    use_markers: bool
    """Put ``<|start-latent|>``/``<|end-latent|>`` around the latent tokens (the original's
    ``not no_special_marker``); false for cot, no_cot and no_thoughts, and with ``latent_markers: false``."""
    start_id: int
    end_id: int
    latent_id: int
    latent_slots: bool | None = None
    """Whether prompts carry latent tokens at all (Coconut and the pause variants; not cot, no_cot,
    no_thoughts). None: the same as ``use_markers``, as in the paper's layout."""

    def __post_init__(self) -> None:
        if self.c_thought < 0 or self.max_latent_stage < 0:
            raise ValueError(
                f"c_thought and max_latent_stage must be >= 0, got {self.c_thought} and {self.max_latent_stage}"
            )
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if self.latent_slots is None:
            object.__setattr__(self, "latent_slots", self.use_markers)
        if self.use_markers and not self.latent_slots:
            raise ValueError("markers without latent slots: a method without latent tokens has no markers")

    @classmethod
    def from_config(cls, config: Config, ids: LatentIds) -> CurriculumSpec:
        """The spec of a run, with the original's method rules: no_thoughts sets ``c_thought = 0``, and
        cot, no_cot and no_thoughts omit the markers (as every method does with ``latent_markers: false``)."""
        slots = not (config.cot or config.no_cot or config.no_thoughts)
        return cls(
            c_thought=0 if config.no_thoughts else config.c_thought,
            max_latent_stage=config.max_latent_stage,
            pad_latent_to_max=config.pad_latent_to_max,
            uniform_prob=config.uniform_prob,
            no_cot=config.no_cot,
            use_markers=slots and config.latent_markers,
            start_id=ids.start_id,
            end_id=ids.end_id,
            latent_id=ids.latent_id,
            latent_slots=slots,
        )

    @property
    def n_markers(self) -> int:
        return 2 if self.use_markers else 0


def stage_for_epoch(epoch: int, epochs_per_stage: int, method: str) -> int:
    """The scheduled stage of an epoch (0-based): always 0 for cot and no_cot."""
    if method in ("cot", "no_cot"):
        return 0
    return epoch // epochs_per_stage


def scheduled_stage(config: Config, epoch: int) -> int:
    """The stage a run trains and evaluates at in ``epoch`` (0-based).

    The pause-token baseline and Coconut "w/o curriculum" start at the final stage (every step
    removed, the full number of thoughts); every other method follows :func:`stage_for_epoch`.
    """
    if config.pause_token or config.no_curriculum:
        return config.max_latent_stage + 1
    return stage_for_epoch(epoch, config.epochs_per_stage, config.method)


def _latent_block(spec: CurriculumSpec, n_latent: int) -> list[int]:
    block = [spec.latent_id] * n_latent
    return [spec.start_id, *block, spec.end_id] if spec.use_markers else block


def training_counts(n_steps: int, stage: int, spec: CurriculumSpec) -> tuple[int, int]:
    """(steps removed, latent tokens) of an example with ``n_steps`` steps trained at ``stage``.

    As the original: at ``stage <= max_latent_stage`` it removes ``stage`` steps and adds ``stage``
    thoughts even when the chain is shorter than ``stage``; past it every step goes.
    """
    if stage > spec.max_latent_stage:
        n_skip = n_steps
        n_latent = spec.max_latent_stage if spec.pad_latent_to_max else min(n_steps, spec.max_latent_stage)
    else:
        n_skip = n_latent = stage
    if spec.no_cot:
        n_skip, n_latent = n_steps, 0
    return min(n_skip, n_steps), n_latent * spec.c_thought


def training_features(example: TokenizedExample, stage: int, spec: CurriculumSpec) -> Features:
    """One training sequence: question, latent block, remaining steps, answer.

    Labels are ``-100`` over the question, the markers and the latent tokens, and the tokens themselves
    over the remaining steps and the answer (with its eos).
    """
    n_skip, n_latent = training_counts(example.n_steps, stage, spec)
    prefix = [*example.question_ids, *_latent_block(spec, n_latent)]
    target = [*itertools.chain.from_iterable(example.step_ids[n_skip:]), *example.answer_ids]
    tokens = prefix + target
    return {
        "input_ids": tokens,
        "labels": [IGNORE_INDEX] * len(prefix) + target,
        "attention_mask": [1] * len(tokens),
        "idx": example.idx,
        "position_ids": list(range(len(tokens))),
    }


def draw_stages(
    n_steps: Sequence[int], stage: int, uniform_prob: float, seed: int, epoch: int, stream: int = _TRAIN_STREAM
) -> list[int]:
    """Each example's training stage: ``stage``, or with probability ``uniform_prob`` a uniform draw from
    ``0..n_steps[i]``.

    The generator is seeded with ``(seed, epoch, stream)`` and makes the same draws for every example
    whatever ``uniform_prob`` is, so the result depends only on these and the data, not on the number of
    processes or workers.
    """
    if uniform_prob == 0.0:
        return [stage] * len(n_steps)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))
    counts = np.asarray(n_steps, dtype=np.int64)  # (N,)
    mixed = rng.random(len(counts)) < uniform_prob  # (N,)
    drawn = rng.integers(0, counts + 1)  # (N,), uniform in 0..n_steps per example
    return np.where(mixed, drawn, stage).tolist()


def training_view(
    tokenized: Sequence[TokenizedExample], stage: int, spec: CurriculumSpec, seed: int, epoch: int
) -> list[Features]:
    """The training sequences of one epoch at scheduled ``stage``, in data order (unshuffled)."""
    stages = draw_stages([e.n_steps for e in tokenized], stage, spec.uniform_prob, seed, epoch, _TRAIN_STREAM)
    return [training_features(e, s, spec) for e, s in zip(tokenized, stages)]


def validation_loss_view(
    tokenized: Sequence[TokenizedExample], stage: int, spec: CurriculumSpec, seed: int, epoch: int
) -> list[Features]:
    """The validation-loss sequences: the training view of the validation set.

    The original builds them with the same function and config as training, so ``uniform_prob`` mixes
    stages here too; that is kept. The draws use their own stream, independent of the training ones.
    """
    stages = draw_stages([e.n_steps for e in tokenized], stage, spec.uniform_prob, seed, epoch, _VALID_LOSS_STREAM)
    return [training_features(e, s, spec) for e, s in zip(tokenized, stages)]


def prompt_latent_count(n_steps: int, stage: int, spec: CurriculumSpec) -> int:
    """Latent tokens in a generation prompt at ``stage``: never more thoughts than steps, unless
    ``pad_latent_to_max``. Unlike training, ``no_cot`` is not consulted (the original's does not either;
    its prompts have no latent tokens because the stage is 0)."""
    cap = spec.max_latent_stage if spec.pad_latent_to_max else min(spec.max_latent_stage, n_steps)
    return min(cap, stage) * spec.c_thought


def prompt_features(example: TokenizedExample, stage: int, spec: CurriculumSpec) -> Features:
    """One generation prompt: the question and the latent block, ending after ``<|end-latent|>``."""
    return prompt_with_latents(example, prompt_latent_count(example.n_steps, stage, spec), spec)


def prompt_with_latents(example: TokenizedExample, n_latent: int, spec: CurriculumSpec) -> Features:
    """A generation prompt with exactly ``n_latent`` latent tokens, whatever the example's chain, laid out as
    every prompt is (the question, then ``<|start-latent|>``, the latent tokens, ``<|end-latent|>``; with
    ``n_latent = 0`` the two markers remain). The thinking-budget analysis and ``--num-thoughts`` use it."""
    tokens = [*example.question_ids, *_latent_block(spec, n_latent)]
    return {
        "input_ids": tokens,
        "idx": example.idx,
        "attention_mask": [1] * len(tokens),
        "position_ids": list(range(len(tokens))),
    }


def prompt_view(tokenized: Sequence[TokenizedExample], stage: int, spec: CurriculumSpec) -> list[Features]:
    """The generation prompts of the evaluation set at ``stage`` (the original's
    ``get_question_latent_dataset``)."""
    return [prompt_features(e, stage, spec) for e in tokenized]
