"""Descriptive statistics of a Coconut data file, to compare data sets side by side.

Counts, the number of steps per example, and the lengths of questions, answers and steps in words (and in
tokens when a tokenizer is given); for ProsQA files the graph statistics of
:func:`noblankslate.data.graph_stats.prosqa_graph_stats`. Histograms are ``{bin label: fraction}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from noblankslate.data.graph_stats import bin_order, has_graph, prosqa_graph_stats
from noblankslate.errors import InputError

TokenCounter = Callable[[list[str]], list[int]]


def _summary(lengths: Sequence[int]) -> dict[str, float]:
    if not lengths:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths)}


def _words(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


def dataset_stats(
    records: list[dict[str, Any]], count_tokens: TokenCounter | None = None, source: str = "records"
) -> dict[str, Any]:
    """Statistics of validated Coconut records.

    Args:
        records: dicts with ``question``, ``answer`` and ``steps`` (check them with
            :func:`noblankslate.data.schema.check_records` first).
        count_tokens: texts -> token counts (see :func:`load_token_counter`); adds ``*_tokens`` entries.
        source: the file name used in error messages.

    Returns:
        ``examples``; ``steps_mean`` and ``steps_hist`` (steps per example, one bin per value seen);
        ``empty_steps`` (examples with an empty step string, which Coconut's GSM8K rule gives to
        questions without a calculator annotation); ``question_words``, ``answer_words`` and
        ``step_words`` (each ``{"mean", "min", "max"}``, steps counted one by one); the same in tokens
        when ``count_tokens`` is given; and ``graph`` (:func:`prosqa_graph_stats`) when every record has
        the ProsQA graph keys.
    """
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    steps = [step for r in records for step in r["steps"]]
    n_steps = Counter(str(len(r["steps"])) for r in records)
    stats: dict[str, Any] = {
        "examples": len(records),
        "steps_mean": sum(len(r["steps"]) for r in records) / len(records) if records else 0.0,
        "steps_hist": {k: n_steps[k] / len(records) for k in sorted(n_steps, key=bin_order)},
        "empty_steps": sum(1 for r in records if any(not s.strip() for s in r["steps"])),
        "question_words": _summary(_words(questions)),
        "answer_words": _summary(_words(answers)),
        "step_words": _summary(_words(steps)),
    }
    if count_tokens is not None:
        stats["question_tokens"] = _summary(count_tokens(questions))
        stats["answer_tokens"] = _summary(count_tokens(answers))
        stats["step_tokens"] = _summary(count_tokens(steps))
    if records and all(has_graph(r) for r in records):
        stats["graph"] = prosqa_graph_stats(records, source)
    return stats


def load_token_counter(path: str | Path) -> TokenCounter:
    """A token counter from a local tokenizer folder, never the network.

    ``path`` is a folder that ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``
    loads (a saved tokenizer or model folder: ``tokenizer.json`` or ``tokenizer_config.json`` ...), or a
    folder holding only GPT-2's ``vocab.json`` and ``merges.txt``. Texts are encoded without special tokens,
    so the counts are the lengths the texts add to a training sequence.

    Raises:
        ValueError: the folder is missing or holds no loadable tokenizer.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: tokenizer folder not found")
    from transformers import AutoTokenizer, GPT2Tokenizer

    has_config = any((path / name).exists() for name in ("tokenizer_config.json", "config.json", "tokenizer.json"))
    try:
        if not has_config and (path / "vocab.json").exists() and (path / "merges.txt").exists():
            # AutoTokenizer cannot tell the class of a bare vocab.json + merges.txt folder.
            tokenizer = GPT2Tokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{path}: no tokenizer could be loaded from this folder ({error})") from None

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    return count


def _fill_bins(columns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every histogram the bins of the same histogram in every column (missing ones at 0)."""
    filled = [dict(c) for c in columns]
    keys = {k for c in columns for k, v in c.items() if isinstance(v, dict)}
    for key in keys:
        holders = [c for c in filled if c.get(key) is not None]
        if key == "graph":
            for c, graph in zip(holders, _fill_bins([c[key] for c in holders]), strict=True):
                c[key] = graph
        elif key.endswith("_hist"):
            bins = sorted({b for c in holders for b in c[key]}, key=bin_order)
            for c in holders:
                c[key] = {b: c[key].get(b, 0.0) for b in bins}
    return filled


LABELS = {
    "examples": "examples",
    "steps_mean": "steps per example: mean",
    "steps_hist": "steps per example",
    "empty_steps": "examples with an empty step",
    "question_words": "question words",
    "answer_words": "answer words",
    "step_words": "step words",
    "question_tokens": "question tokens",
    "answer_tokens": "answer tokens",
    "step_tokens": "step tokens",
    "graphs": "graphs",
    "nodes_mean": "nodes: mean",
    "edges_mean": "edges: mean",
    "in_degree_hist": "in-degree (nodes id >= 2)",
    "in_degree_mean": "in-degree: mean",
    "people_hist": "people per graph",
    "distance_hist": "root -> target distance",
    "distance_mean": "root -> target distance: mean",
    "shortest_paths_hist": "shortest root -> target paths",
    "shortest_paths_mean": "shortest paths: mean",
    "question_words_mean": "question words: mean",
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _rows(stats: dict[str, Any], prefix: str = "", indent: str = "") -> list[tuple[str, str, str | None]]:
    """``(row id, label, cell)`` for every statistic; the cell is None for a section heading."""
    rows: list[tuple[str, str, str | None]] = []
    for key, value in stats.items():
        row_id, label = prefix + key, indent + LABELS.get(key, key)
        if key == "graph":
            rows.append((row_id, label, None))
            rows.extend(_rows(value, prefix=row_id + ".", indent=indent + "  "))
        elif key.endswith("_hist"):
            rows.append((row_id, label, None))
            rows.extend((f"{row_id}.{b}", f"{indent}  {b}", f"{fraction * 100:.1f}%") for b, fraction in value.items())
        elif isinstance(value, dict):
            rows.extend((f"{row_id}.{part}", f"{label}: {part}", _cell(value[part])) for part in ("mean", "min", "max"))
        else:
            rows.append((row_id, label, _cell(value)))
    return rows


def format_table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    """Stats of one or more files as a plain text table, one column per file, histogram bins in percent.

    Rows missing from a column (no tokenizer, no graph) show ``-``.
    """
    filled = _fill_bins([stats for _, stats in columns])
    per_column = [_rows(stats) for stats in filled]
    # Rows in the order of the first column; rows only another column has go after their predecessor there.
    order: list[str] = []
    labels: dict[str, str] = {}
    headings: set[str] = set()
    for rows in per_column:
        previous: str | None = None
        for row_id, label, cell in rows:
            if row_id not in labels:
                order.insert(order.index(previous) + 1 if previous is not None else 0, row_id)
                labels[row_id] = label
            if cell is None:
                headings.add(row_id)
            previous = row_id
    cells = [{row_id: cell for row_id, _, cell in rows} for rows in per_column]
    table = [["", *(name for name, _ in columns)]]
    for row_id in order:
        if row_id in headings:
            table.append([labels[row_id], *([""] * len(columns))])
        else:
            table.append([labels[row_id], *(c.get(row_id) or "-" for c in cells)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]).rstrip())
    return "\n".join(lines)
