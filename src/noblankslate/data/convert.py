"""Converters from the raw GSM8K and ProntoQA files to the Coconut JSON format.

Each converter reproduces Coconut's own preprocessing rule exactly (the outputs match the published
files byte for byte, see ``../shared/data/SOURCES.md``), and rejects input that the rule would have
mangled or crashed on, with an error naming the file, the line or record, and the field.

- GSM8K, Internalize-CoT text form: one ``question||<<eq>> <<eq>> #### answer`` per line ->
  ``{"question", "steps": the space-separated equations, "answer"}``. The question is kept as is (not
  stripped); a line without equations gets ``steps == [""]``, as in Coconut.
- GSM8K, original jsonl (``{"question", "answer"}`` with ``<<a*b=c>>`` calculator annotations and a
  final ``#### N``): first put in the Internalize-CoT form (annotations joined by single spaces, then
  `` #### N``), then converted as above.
- ProntoQA generator output: question = question + " " + query; steps = the chain of thought joined in
  pairs of sentences; split 9000 / 200 / rest in file order.

Outputs are written with ``json.dump(data, f)`` defaults (``", "`` and ``": "`` separators, ASCII
escapes, no trailing newline), since that is what makes them identical to the published files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noblankslate.errors import NbsError
from noblankslate.files import atomic_write

Record = dict[str, Any]

ICOT_QUESTION_SEP = "||"
ICOT_ANSWER_SEP = "####"
ANNOTATION = re.compile(r"<<.*?>>")

PRONTOQA_TRAIN_SIZE = 9000
PRONTOQA_VALID_SIZE = 200
PRONTOQA_FIELDS = {"question": str, "query": str, "chain_of_thought": list, "answer": str}


@dataclass(eq=False)
class ConversionError(NbsError, ValueError):
    """Malformed converter input: which file, where in it (line or record), which field, and what is wrong."""

    label = "conversion error"

    path: str
    where: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        text = self.path
        if self.where is not None:
            text += f": {self.where}"
        if self.field is not None:
            text += f", field '{self.field}'"
        return f"{text}: {self.message}"


def _read_text(path: Path) -> str:
    try:
        # Universal newlines, as the original ``open(...).readlines()``.
        with path.open(encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConversionError(str(path), None, None, "file not found") from None
    except IsADirectoryError:
        raise ConversionError(str(path), None, None, "is a directory, expected a file") from None
    except UnicodeDecodeError as error:
        raise ConversionError(str(path), None, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def _numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number from 1, line without its newline)``; a final newline does not make an empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return enumerate(lines, start=1)


def parse_icot_line(line: str, path: str = "<string>", where: str | None = None) -> Record:
    """One Internalize-CoT line -> ``{"question", "steps", "answer"}`` with Coconut's rule.

    Coconut splits on ``"||"`` and on ``"##"``; the checks below make sure that such a split means what it
    should (one question, one chain of equations, one answer), so the result equals Coconut's on every
    line accepted.

    Raises:
        ConversionError: naming ``path``, ``where`` (a line) and the field at fault.
    """
    parts = line.split(ICOT_QUESTION_SEP)
    if len(parts) != 2:
        found = "no" if len(parts) == 1 else str(len(parts) - 1)
        raise ConversionError(path, where, None, f"expected one '||' between question and equations, found {found}")
    question, rest = parts
    if not question.strip():
        raise ConversionError(path, where, "question", "empty")
    chain_answer = rest.split(ICOT_ANSWER_SEP)
    if len(chain_answer) != 2:
        found = "no" if len(chain_answer) == 1 else str(len(chain_answer) - 1)
        raise ConversionError(path, where, "answer", f"expected one '####' before the answer, found {found}")
    chain, answer = chain_answer
    if "##" in chain:
        raise ConversionError(path, where, "steps", "contains '##', which Coconut's rule splits on")
    if "##" in answer:
        raise ConversionError(path, where, "answer", "contains '##', which Coconut's rule splits on")
    answer = answer.strip()
    if not answer:
        raise ConversionError(path, where, "answer", "empty")
    return {"question": question, "steps": chain.strip().split(" "), "answer": answer}


def gsm_icot_to_records(text: str, path: str = "<string>") -> list[Record]:
    """All lines of an Internalize-CoT GSM8K file -> Coconut records, in order."""
    records = []
    for number, line in _numbered_lines(text):
        if not line.strip():
            raise ConversionError(path, f"line {number}", None, "empty line")
        records.append(parse_icot_line(line.rstrip("\r"), path, f"line {number}"))
    if not records:
        raise ConversionError(path, None, None, "no lines")
    return records


def gsm8k_to_icot_line(question: str, answer: str, path: str = "<string>", where: str | None = None) -> str:
    """An original GSM8K example -> its Internalize-CoT line ``question||<<eq>> <<eq>> #### N``.

    The published Internalize-CoT valid/test files are exactly this for the original GSM8K questions.
    """
    if "\n" in question or "\r" in question:
        raise ConversionError(path, where, "question", "contains a line break, which the one-line form cannot hold")
    if ICOT_QUESTION_SEP in question:
        message = "contains '||', the question separator of the Internalize-CoT form"
        raise ConversionError(path, where, "question", message)
    pieces = answer.split(ICOT_ANSWER_SEP)
    if len(pieces) != 2:
        found = "no" if len(pieces) == 1 else str(len(pieces) - 1)
        raise ConversionError(path, where, "answer", f"expected one '#### N' final answer, found {found}")
    reasoning, final = pieces
    final = final.strip()
    if not final:
        raise ConversionError(path, where, "answer", "empty final answer after '####'")
    annotations = ANNOTATION.findall(reasoning)
    for annotation in annotations:
        if " " in annotation or "##" in annotation or ICOT_QUESTION_SEP in annotation:
            raise ConversionError(path, where, "answer", f"annotation {annotation!r} contains a space, '##' or '||'")
    return f"{question}{ICOT_QUESTION_SEP}{' '.join(annotations)} {ICOT_ANSWER_SEP} {final}"


def normalize_question(question: str) -> str:
    """Whitespace-collapsed question, so that the same question matches across files that re-spaced it."""
    return " ".join(question.split())


def gsm_jsonl_to_records(
    text: str, path: str = "<string>", exclude_questions: Iterable[str] = ()
) -> tuple[list[Record], int]:
    """Original GSM8K jsonl -> Coconut records, leaving out the questions in ``exclude_questions``.

    Questions are compared after :func:`normalize_question` (the published files agree exactly, but this
    costs nothing and survives re-spacing).

    Returns:
        The records, and how many input examples were excluded.
    """
    excluded = {normalize_question(q) for q in exclude_questions}
    records = []
    n_excluded = 0
    for number, line in _numbered_lines(text):
        where = f"line {number}"
        if not line.strip():
            raise ConversionError(path, where, None, "empty line")
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConversionError(path, where, None, f"not valid JSON: {error.msg} at column {error.colno}") from None
        if not isinstance(example, dict):
            raise ConversionError(path, where, None, f"expected an object, got {type(example).__name__}")
        for name in ("question", "answer"):
            if name not in example:
                raise ConversionError(path, where, name, "missing")
            if not isinstance(example[name], str):
                raise ConversionError(path, where, name, f"expected a string, got {type(example[name]).__name__}")
        icot = gsm8k_to_icot_line(example["question"], example["answer"], path, where)
        if normalize_question(example["question"]) in excluded:
            n_excluded += 1
            continue
        records.append(parse_icot_line(icot, path, where))
    if not records and not n_excluded:
        raise ConversionError(path, None, None, "no lines")
    return records, n_excluded


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def prontoqa_to_records(raw: Any, path: str = "<string>") -> list[Record]:
    """ProntoQA generator output ``{"exampleN": {"test_example": {...}}}`` -> Coconut records, in file order."""
    if not isinstance(raw, dict):
        raise ConversionError(path, None, None, f"expected a JSON object of examples, got {type(raw).__name__}")
    records = []
    for key, value in raw.items():
        where = f"record {key!r}"
        if not isinstance(value, dict) or "test_example" not in value:
            raise ConversionError(path, where, "test_example", "missing")
        example = value["test_example"]
        if not isinstance(example, dict):
            raise ConversionError(path, where, "test_example", f"expected an object, got {type(example).__name__}")
        for name, kind in PRONTOQA_FIELDS.items():
            if name not in example:
                raise ConversionError(path, where, f"test_example.{name}", "missing")
            if not isinstance(example[name], kind):
                raise ConversionError(
                    path, where, f"test_example.{name}", f"expected {kind.__name__}, got {type(example[name]).__name__}"
                )
        chain = example["chain_of_thought"]
        for j, sentence in enumerate(chain):
            if not isinstance(sentence, str):
                message = f"expected a string, got {type(sentence).__name__}"
                raise ConversionError(path, where, f"test_example.chain_of_thought[{j}]", message)
        if not chain:
            raise ConversionError(path, where, "test_example.chain_of_thought", "empty")
        records.append(
            {
                "question": example["question"] + " " + example["query"],
                # A step is a pair of sentences: the known fact about the entity, then the rule applied to it.
                "steps": [" ".join(chain[i : i + 2]) for i in range(0, len(chain), 2)],
                "answer": example["answer"],
            }
        )
    if not records:
        raise ConversionError(path, None, None, "no examples")
    return records


def split_prontoqa(
    records: list[Record], train_size: int = PRONTOQA_TRAIN_SIZE, valid_size: int = PRONTOQA_VALID_SIZE
) -> dict[str, list[Record]]:
    """Coconut's split, in file order: the first ``train_size``, the next ``valid_size``, the rest (maybe empty)."""
    if train_size < 0 or valid_size < 0:
        raise ValueError("split sizes must be >= 0")
    return {
        "train": records[:train_size],
        "valid": records[train_size : train_size + valid_size],
        "test": records[train_size + valid_size :],
    }


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_json_atomic(data: Any, path: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Write ``json.dump(data, f)`` to ``path`` through a temp file and ``os.replace``.

    A crash mid-write never leaves a half-written file, and an output that names one of the ``inputs``
    is refused, so a converter can never destroy its source.
    """
    path = Path(path)
    for source in inputs:
        source = Path(source)
        if _same_file(path, source) or path.resolve() == source.resolve():
            raise ConversionError(str(path), None, None, f"refusing to overwrite the input file {source}")
    if path.is_dir():
        raise ConversionError(str(path), None, None, "is a directory, expected an output file name")
    with atomic_write(path) as f:
        json.dump(data, f)


def convert_gsm_icot_file(in_path: str | Path, out_path: str | Path) -> int:
    """Internalize-CoT text file -> Coconut JSON file. Returns the number of records written."""
    in_path = Path(in_path)
    records = gsm_icot_to_records(_read_text(in_path), str(in_path))
    write_json_atomic(records, out_path, inputs=[in_path])
    return len(records)


def read_questions(path: str | Path) -> list[str]:
    """The questions of a Coconut JSON file (validated), for excluding them from another set."""
    from noblankslate.data.schema import load_examples

    return [example.question for example in load_examples(path)]


def convert_gsm_jsonl_file(
    in_path: str | Path, out_path: str | Path, exclude_questions_of: str | Path | None = None
) -> tuple[int, int]:
    """Original GSM8K jsonl -> Coconut JSON file, minus the questions of another Coconut JSON file.

    Returns:
        ``(records written, examples excluded)``.
    """
    in_path = Path(in_path)
    inputs = [in_path]
    exclude: list[str] = []
    if exclude_questions_of is not None:
        exclude = read_questions(exclude_questions_of)
        inputs.append(Path(exclude_questions_of))
    records, n_excluded = gsm_jsonl_to_records(_read_text(in_path), str(in_path), exclude)
    write_json_atomic(records, out_path, inputs=inputs)
    return len(records), n_excluded


def read_prontoqa(path: str | Path) -> list[Record]:
    """Read and convert a ProntoQA generator output file (every example, before splitting)."""
    path = Path(path)
    text = _read_text(path)
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        message = f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        raise ConversionError(str(path), None, None, message) from None
    except ValueError as error:
        raise ConversionError(str(path), None, None, str(error)) from None
    return prontoqa_to_records(raw, str(path))


def convert_prontoqa_file(
    in_path: str | Path,
    out_dir: str | Path,
    prefix: str = "prontoqa",
    train_size: int = PRONTOQA_TRAIN_SIZE,
    valid_size: int = PRONTOQA_VALID_SIZE,
) -> dict[str, tuple[Path, int]]:
    """ProntoQA generator output -> ``{out_dir}/{prefix}_{train,valid,test}.json``.

    All three files are written even when a split is empty (``[]``), as Coconut's script did, so that
    a later step never reads a stale file from an earlier run.

    Returns:
        Split name -> (the path written, its number of records), in the order train, valid, test.
    """
    in_path = Path(in_path)
    splits = split_prontoqa(read_prontoqa(in_path), train_size, valid_size)
    out_dir = Path(out_dir)
    written = {}
    for name, records in splits.items():
        out_path = out_dir / f"{prefix}_{name}.json"
        write_json_atomic(records, out_path, inputs=[in_path])
        written[name] = (out_path, len(records))
    return written
