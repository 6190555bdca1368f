"""What every entry point builds for a run: validated data, tokenizer, curriculum, collator and model.

Training, ``nbs memory build``, ``tools/memory_sweep.py`` and the demo all start here, so a run is set up
the same way whatever uses it, and nothing that only evaluates has to construct the trainer (which adds the
optimizer, resume and the epochs on top). Data files are loaded and validated before any model is built,
so a bad record stops the run with its file, index and field before compute is spent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from noblankslate.config import Config, ConfigError
from noblankslate.data.collator import LatentCollator
from noblankslate.data.curriculum import CurriculumSpec, prompt_features, training_features
from noblankslate.data.schema import DataError, Example, RecordProblem, load_examples
from noblankslate.data.tokenize import TokenizedExample, tokenize_examples
from noblankslate.model.build import build_model, build_tokenizer
from noblankslate.model.coconut import Coconut
from noblankslate.model.special_tokens import LatentTokenIds

DEBUG_TRAIN_LIMIT = 5000
DEBUG_VAL_LIMIT = 32


def coconut_texts(examples: Sequence[Example], separator: str = "\n") -> Iterator[str]:
    """The strings Coconut tokenizes (for building a word-level tokenizer from training data)."""
    for example in examples:
        yield example.question + separator
        yield from (step + separator for step in example.steps)
        yield "### " + example.answer


def load_run_data(config: Config) -> tuple[list[Example], list[Example]]:
    """Load and validate both files before any model is built (errors name file, record, field)."""
    if config.val_path is None:
        raise ConfigError("val_path is not set")
    val = load_examples(config.val_path, limit=DEBUG_VAL_LIMIT if config.debug else None)
    train: list[Example] = []
    if not config.only_eval:
        if config.train_path is None:
            raise ConfigError("train_path is not set (needed unless only_eval: true)")
        if _same_content(config.train_path, config.val_path):
            raise DataError([RecordProblem(str(config.val_path), None, None,
                                           f"holds the same data as train_path {config.train_path}: the evaluation "
                                           "would score the training examples; use a held-out file")])
        train = load_examples(config.train_path, limit=DEBUG_TRAIN_LIMIT if config.debug else None)
    return train, val


def _same_content(a: str | Path, b: str | Path) -> bool:
    """The same file, or two files with the same bytes."""
    a, b = Path(a), Path(b)
    if not (a.is_file() and b.is_file()):
        return False
    if a.resolve() == b.resolve():
        return True
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def load_memory_data(config: Config, train: list[Example]) -> list[Example]:
    """The examples the memory is built from: ``retrieval.build_from`` or the training set, never the
    evaluated file."""
    source = config.retrieval.build_from or config.train_path
    if source is None:
        raise ConfigError("retrieval.enabled needs training data to build the memory from (retrieval.build_from or train_path)")
    if Path(source).resolve() == Path(config.val_path).resolve():
        raise ConfigError(f"the memory would be built from {source}, the data being evaluated; use training data")
    if source == config.train_path and train:
        return train
    return load_examples(source, limit=DEBUG_TRAIN_LIMIT if config.debug else None)


def load_calibration_data(config: Config, train: list[Example], memory: list[Example],
                          val: list[Example]) -> list[Example]:
    """The examples the memory calibrates on when ``retrieval.calibrate_from`` is set (else none).

    They must be new to the model and to the memory, or the probabilities would be fitted on answers it
    learned (training data) or on questions that find themselves in the store, and they must not be the
    data being reported on.

    Raises:
        DataError: the file shares a question with the training, build or evaluated data (naming the file,
            the first records and how many there are).
    """
    source = config.retrieval.calibrate_from
    if source is None:
        return []
    examples = load_examples(source, limit=DEBUG_TRAIN_LIMIT if config.debug else None)
    others = [(config.train_path, train), (config.retrieval.build_from or config.train_path, memory),
              (config.val_path, val)]
    check_held_apart(source, examples, others, what="retrieval.calibrate_from")
    return examples


def check_held_apart(path: str | Path, examples: Sequence[Example],
                     others: Sequence[tuple[str | Path | None, Sequence[Example]]], what: str) -> None:
    """Raise a DataError naming ``path``'s records whose question also appears in one of ``others``."""
    problems = []
    for other_path, other in others:
        if other_path is None or not other:
            continue
        seen = {example.question for example in other}
        shared = [example for example in examples if example.question in seen]
        if shared:
            listed = ", ".join(str(example.idx) for example in shared[:5])
            problems.append(RecordProblem(str(path), shared[0].idx, "question",
                                          f"{len(shared)} of its questions (records {listed}"
                                          f"{', ...' if len(shared) > 5 else ''}) are also in {other_path}: {what} "
                                          "must hold questions the model and the memory have never seen"))
    if problems:
        raise DataError(problems)


def check_lengths(config: Config, spec: CurriculumSpec, limit: int,
                  files: list[tuple[str | None, list[Example], list[TokenizedExample]]]) -> None:
    """Every record's longest sequence at any stage (and, for generation, its longest prompt plus
    ``max_new_tokens``) must fit the model's ``limit`` positions; otherwise training would fail with an
    index error mid-epoch. Checked when the data is loaded, naming file, record and length.

    Raises:
        DataError: listing every record that does not fit.
    """
    stages = range(config.max_latent_stage + 2)
    budget = config.resolved_max_new_tokens
    problems = []
    for path, examples, tokens in files:
        for example, tokenized in zip(examples, tokens):
            longest = max(len(training_features(tokenized, stage, spec)["input_ids"]) for stage in stages)
            prompt = max(len(prompt_features(tokenized, stage, spec)["input_ids"]) for stage in stages) + budget
            if max(longest, prompt) > limit:
                what = (f"{longest} tokens at its longest stage" if longest > limit
                        else f"a prompt of {prompt - budget} tokens + max_new_tokens {budget}")
                problems.append(RecordProblem(str(path), example.idx, None,
                                              f"{what} exceed the model's {limit} positions (model_config.max_positions)"))
    if problems:
        raise DataError(problems)


@dataclass
class RunSetup:
    """One run's data and model, before any wrapping for distributed training."""

    config: Config
    train: list[Example]
    val: list[Example]
    train_tokens: list[TokenizedExample]
    val_tokens: list[TokenizedExample]
    memory_examples: list[Example]
    """What the memory is built from (empty unless ``retrieval.enabled``)."""
    memory_tokens: list[TokenizedExample]
    calibration_examples: list[Example]
    """What the memory calibrates on (``retrieval.calibrate_from``; empty when unset)."""
    calibration_tokens: list[TokenizedExample]
    tokenizer: PreTrainedTokenizerBase
    latent_ids: LatentTokenIds
    spec: CurriculumSpec
    collate: LatentCollator
    model: Coconut
    load_summary: str | None
    """What loading ``load_model_path`` (or the resume checkpoint) did, for the log."""


def setup_run(config: Config, weights_from: str | Path | None = None) -> RunSetup:
    """Load and check the data, then build tokenizer, curriculum spec, collator and model.

    Args:
        config: the validated run config.
        weights_from: a checkpoint to load instead of ``config.load_model_path`` (the trainer's resume
            point); its tokenizer is used too.
    """
    train, val = load_run_data(config)
    memory_examples = load_memory_data(config, train) if config.retrieval.enabled else []
    calibration_examples = load_calibration_data(config, train, memory_examples, val) if config.retrieval.enabled else []
    build_config = config if weights_from is None else replace(config, load_model_path=str(weights_from))
    separator = config.step_separator
    tokenizer = build_tokenizer(build_config, lambda: coconut_texts(train, separator))
    built = build_model(build_config, tokenizer)
    tokenizer = built.tokenizer
    train_tokens = tokenize_examples(train, tokenizer, separator=separator) if train else []
    memory_tokens = (train_tokens if memory_examples is train
                     else tokenize_examples(memory_examples, tokenizer, separator=separator) if memory_examples else [])
    val_tokens = tokenize_examples(val, tokenizer, separator=separator)
    calibration_tokens = tokenize_examples(calibration_examples, tokenizer, separator=separator) if calibration_examples else []
    spec = CurriculumSpec.from_config(config, built.latent_ids)
    limit = getattr(built.model.base_causallm.config, "n_positions", None)  # learned absolute positions
    if limit is not None:
        check_lengths(config, spec, limit, [(config.train_path, train, train_tokens), (config.val_path, val, val_tokens)])
    return RunSetup(
        config=config, train=train, val=val, train_tokens=train_tokens, val_tokens=val_tokens,
        memory_examples=memory_examples, memory_tokens=memory_tokens,
        calibration_examples=calibration_examples, calibration_tokens=calibration_tokens, tokenizer=tokenizer,
        latent_ids=built.latent_ids, spec=spec,
        collate=LatentCollator(pad_token_id=tokenizer.pad_token_id, latent_id=built.latent_ids.latent_id),
        model=built.model, load_summary=built.load_summary,
    )
