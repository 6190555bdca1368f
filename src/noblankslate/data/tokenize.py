"""Tokenize a data set once, in parts, exactly as Coconut's ``get_dataset``.

Question, each step and the answer are tokenized separately so the curriculum can drop steps and splice
latent tokens by list slicing, without re-tokenizing every epoch:

    question: encode(question + "\\n", add_special_tokens=True)
    step:     encode(step + "\\n", add_special_tokens=False)
    answer:   encode("### " + answer, add_special_tokens=False) + [eos]

The newline is the run's ``step_separator``; with ``""`` question and steps are tokenized as they are
(for steps that begin with a space, such as ``nbs data symbolic``'s " 25").

That is only correct when tokenizing the parts gives the tokens of the whole text, so (like the
original) every example is checked (the original checked the first) and a
:class:`TokenizationMismatchError` is raised otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from noblankslate.data.schema import Example
from noblankslate.errors import NbsError


class TokenizationMismatchError(NbsError, ValueError):
    """Tokenizing an example's parts separately gives other tokens than tokenizing the whole text."""

    label = "data error"


@dataclass(frozen=True)
class TokenizedExample:
    """One example's token ids, per part (the original's ``*_tokenized`` columns)."""

    idx: int
    question_ids: tuple[int, ...]
    step_ids: tuple[tuple[int, ...], ...]
    answer_ids: tuple[int, ...]

    @property
    def n_steps(self) -> int:
        return len(self.step_ids)

    def full_ids(self) -> list[int]:
        """Question, every step and the answer: the stage-0 CoT sequence without markers."""
        return [*self.question_ids, *itertools.chain.from_iterable(self.step_ids), *self.answer_ids]


def full_text(example: Example, separator: str = "\n") -> str:
    """The whole example as one string, as the parts are tokenized (question, steps, answer, each
    but the answer ending with ``separator``, a newline by default).

    The original writes ``question + "\\n" + "\\n".join(steps) + "\\n### " + answer``, which is the same
    string except for an example without steps, where it has one newline too many (and fails its check).
    """
    return example.question + separator + "".join(step + separator for step in example.steps) + "### " + example.answer


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def check_tokenization(example: Example, tokenized: TokenizedExample, tokenizer: PreTrainedTokenizerBase,
                       separator: str = "\n") -> None:
    """Raise :class:`TokenizationMismatchError` unless the parts concatenate to the whole text's tokens."""
    expected = tokenizer.encode(full_text(example, separator), add_special_tokens=True) + [tokenizer.eos_token_id]
    got = tokenized.full_ids()
    if got == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise TokenizationMismatchError(
        f"tokenizer {name!r} splits example {example.idx} differently when its question, steps and answer "
        f"are tokenized separately (as Coconut does) than as one text; first difference at token {at}: "
        f"parts give {tokenizer.convert_ids_to_tokens(got[at:at + 5])}, "
        f"whole text gives {tokenizer.convert_ids_to_tokens(expected[at:at + 5])}. "
        "Coconut needs pieces that never cross a part boundary (the step_separator after the question and "
        "each step, a newline by default): remove whitespace before those newlines in the data, start every "
        "step with a space when step_separator is \"\", or use another tokenizer."
    )


def tokenize_examples(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, n_check: int | None = None,
    separator: str = "\n",
) -> list[TokenizedExample]:
    """Tokenize every example in parts, with one batched tokenizer call per kind of part.

    Args:
        examples: the loaded data set.
        tokenizer: the run's tokenizer (with an eos token).
        n_check: how many leading examples to check against the whole-text tokenization; None (the
            default) checks every one, in one more batched tokenizer call. The original checked only the
            first, so a bad record later in the file went through.
        separator: the run's ``step_separator``, after the question and each step.

    Returns:
        One :class:`TokenizedExample` per example, in order.

    Raises:
        TokenizationMismatchError: the parts do not concatenate to the whole text's tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; Coconut ends every answer with eos")
    eos = tokenizer.eos_token_id
    questions = _encode_batch(tokenizer, [e.question + separator for e in examples], add_special_tokens=True)
    flat_steps = _encode_batch(tokenizer, [s + separator for e in examples for s in e.steps], add_special_tokens=False)
    answers = _encode_batch(tokenizer, ["### " + e.answer for e in examples], add_special_tokens=False)

    result = []
    steps_iter = iter(flat_steps)
    for example, question, answer in zip(examples, questions, answers):
        steps = tuple(tuple(next(steps_iter)) for _ in example.steps)
        result.append(TokenizedExample(example.idx, tuple(question), steps, (*answer, eos)))
    checked = list(examples[:n_check]) if n_check is not None else list(examples)
    wholes = _encode_batch(tokenizer, [full_text(e, separator) for e in checked], add_special_tokens=True)
    bad = [i for i, (whole, tokenized) in enumerate(zip(wholes, result)) if whole + [eos] != tokenized.full_ids()]
    if bad:
        try:
            check_tokenization(checked[bad[0]], result[bad[0]], tokenizer, separator)
        except TokenizationMismatchError as error:
            more = f" ({len(bad) - 1} more records are split differently too)" if len(bad) > 1 else ""
            raise TokenizationMismatchError(f"{error}{more}") from None
    return result
