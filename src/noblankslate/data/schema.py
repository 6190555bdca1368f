"""The Coconut data format: a JSON list of ``{"question": str, "answer": str, "steps": [str, ...]}``.

Extra keys (ProsQA's graph, for example) are kept on the example but unused by training. Every record
is validated; a bad one is reported with the file, the record index and the field, and nothing is
skipped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noblankslate.errors import NbsError

REQUIRED_FIELDS = ("question", "answer", "steps")


@dataclass(frozen=True)
class Example:
    """One data point. ``idx`` is its position in the file (the original's ``idx``)."""

    idx: int
    question: str
    answer: str
    steps: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RecordProblem:
    """A problem with one record: where it is and what is wrong."""

    path: str
    index: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.path
        if self.index is not None:
            where += f": record {self.index}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class DataError(NbsError, ValueError):
    """A data file is unreadable or has bad records; ``problems`` lists every one found."""

    label = "data error"

    def __init__(self, problems: list[RecordProblem], shown: int = 10):
        self.problems = problems
        lines = [str(p) for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"... and {len(problems) - shown} more bad records")
        super().__init__("\n".join(lines))


def _record_problems(path: str, index: int, record: Any) -> list[RecordProblem]:
    if not isinstance(record, dict):
        return [RecordProblem(path, index, None, f"expected an object, got {type(record).__name__}")]
    problems = []
    for name in REQUIRED_FIELDS:
        if name not in record:
            problems.append(RecordProblem(path, index, name, "missing"))
    for name in ("question", "answer"):
        if name in record and not isinstance(record[name], str):
            problems.append(RecordProblem(path, index, name, f"expected a string, got {type(record[name]).__name__}"))
    if "question" in record and isinstance(record["question"], str) and not record["question"].strip():
        problems.append(RecordProblem(path, index, "question", "empty"))
    steps = record.get("steps")
    if "steps" in record:
        if not isinstance(steps, list):
            problems.append(RecordProblem(path, index, "steps", f"expected a list of strings, got {type(steps).__name__}"))
        else:
            for j, step in enumerate(steps):
                if not isinstance(step, str):
                    problems.append(
                        RecordProblem(path, index, f"steps[{j}]", f"expected a string, got {type(step).__name__}")
                    )
    return problems


def read_records(path: str | Path) -> list[Any]:
    """Read the raw JSON list of a data file, with a clear error for a missing or malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError([RecordProblem(str(path), None, None, "file not found")]) from None
    except UnicodeDecodeError as error:
        raise DataError([RecordProblem(str(path), None, None, f"not UTF-8 text ({error.reason} at byte {error.start})")]) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        message = f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        raise DataError([RecordProblem(str(path), None, None, message)]) from None
    if not isinstance(records, list):
        raise DataError([RecordProblem(str(path), None, None, f"expected a JSON list of records, got {type(records).__name__}")])
    return records


def check_records(records: list[Any], path: str | Path) -> list[RecordProblem]:
    """Every problem of every record (empty when the file is good); a file without records is a problem,
    as it is for training (``load_examples``), so ``nbs data check`` and ``nbs train`` agree."""
    if not records:
        return [RecordProblem(str(path), None, None, "no records")]
    problems: list[RecordProblem] = []
    for index, record in enumerate(records):
        problems.extend(_record_problems(str(path), index, record))
    return problems


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Load and validate a data file.

    Args:
        path: a JSON file in the Coconut format.
        limit: keep only the first ``limit`` records (validation still covers only those).

    Raises:
        DataError: naming the file, record index and field of every bad record.
    """
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    problems = check_records(records, path)
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([RecordProblem(str(path), None, None, "no records")])
    return [
        Example(
            idx=i,
            question=r["question"],
            answer=r["answer"],
            steps=tuple(r["steps"]),
            extra={k: v for k, v in r.items() if k not in REQUIRED_FIELDS},
        )
        for i, r in enumerate(records)
    ]
