"""Answer and chain-of-thought extraction, as the original scores them.

The original decodes question + output and takes the text after the last ``#`` (commas removed) as the
answer, and the lines after the question up to the first ``#`` as the chain of thought. Here only the
generated text is parsed, which gives the same result for the one-line questions of every data set of
the paper, and two deliberate differences, both documented in docs/training.md:

* an output with no ``#`` has no answer and counts as wrong (the original compared the whole
  question-plus-output text, which cannot match in practice, but could for a question ending in ``#``);
* a multi-line question does not shift the chain of thought (the original dropped only the first line).

The chain of thought is compared line by line with the white space around each line stripped, on both
sides: identical to the original for the paper's data, whose steps have none, and right for steps that
begin with a space (``nbs data symbolic`` writes " 7", so that the node is the question's token), which
the original could never match, since it strips the generated text.
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


def extract_cot(generated: str, separator: str = "\n") -> str:
    """The generated reasoning: everything before the first ``#``, stripped, each line stripped.

    With ``separator=""`` (steps run together) there are no lines: the words, single-spaced."""
    chain = generated.split("#")[0]
    if not separator:
        return " ".join(chain.split())
    return "\n".join(line.strip() for line in chain.strip().split("\n"))


def reference_cot(steps: tuple[str, ...] | list[str], separator: str = "\n") -> str:
    """The reference chain of thought: the steps, each stripped, joined by newlines (as the original);
    with ``separator=""`` the words of the steps run together, single-spaced, as :func:`extract_cot`."""
    if not separator:
        return " ".join("".join(steps).split())
    return "\n".join(step.strip() for step in steps)
