"""Answer and chain-of-thought extraction, as the original scores them.

The original decodes question + output and takes the text after the last ``#`` (commas removed) as the
answer, and the lines after the question up to the first ``#`` as the chain of thought. Here only the
generated text is parsed, which gives the same result for the one-line questions of every data set of
the paper, and two deliberate differences, both documented in docs/training.md:

* an output with no ``#`` has no answer and counts as wrong (the original compared the whole
  question-plus-output text, which cannot match in practice, but could for a question ending in ``#``);
* a multi-line question does not shift the chain of thought (the original dropped only the first line).
"""

from __future__ import annotations


def normalize_answer(answer: str) -> str:
    """The reference answer as compared: commas removed, surrounding white space stripped."""
    return answer.replace(",", "").strip()


def extract_answer(generated: str) -> str | None:
    """The text after the last ``#`` of the generated text, commas removed; None without a ``#``."""
    if "#" not in generated:
        return None
    return normalize_answer(generated.split("#")[-1])


def extract_cot(generated: str) -> str:
    """The generated reasoning: everything before the first ``#``, stripped."""
    return generated.split("#")[0].strip()


def reference_cot(steps: tuple[str, ...] | list[str]) -> str:
    """The reference chain of thought: the steps joined by newlines (as the original)."""
    return "\n".join(steps)
