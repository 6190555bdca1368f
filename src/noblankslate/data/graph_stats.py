"""Statistics of ProsQA graphs, to compare generated data with the published sets.

A ProsQA record carries its graph: ``idx_to_symbol`` (node id -> name), ``edges`` (``[a, b]``: "a is a
b"), and the node ids ``root``, ``target`` and ``neg_target``. The figures here are the ones given in
``../shared/design/prosqa-generator.md`` for the published validation set (mean nodes 22.8, mean edges 36.0,
shortest root -> target distance {3: 40%, 4: 44%, 5: 13%, 6: 2%}, 1.6 distinct shortest paths on average),
so a generator is judged by running the same function on its output and on ``prosqa_valid.json``.

Histograms are ``{bin label: fraction}`` with string labels (``"6+"`` collects the tail), so that they
survive a JSON round trip unchanged.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from noblankslate.data.schema import DataError, RecordProblem

GRAPH_KEYS = ("idx_to_symbol", "edges", "root", "target", "neg_target")
IN_DEGREE_BINS = ("0", "1", "2", "3", "4", "5", "6+")
PEOPLE_BINS = ("2", "3", "4", "5", "6+")
SHORTEST_PATHS_BINS = ("1", "2", "3", "4", "5+")
UNREACHABLE = "unreachable"


def has_graph(record: Any) -> bool:
    """Whether a record has every ProsQA graph key."""
    return isinstance(record, dict) and all(key in record for key in GRAPH_KEYS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _graph_problems(source: str, index: int, record: Any) -> list[RecordProblem]:
    if not isinstance(record, dict):
        return [RecordProblem(source, index, None, f"expected an object, got {type(record).__name__}")]
    missing = [RecordProblem(source, index, key, "missing") for key in GRAPH_KEYS if key not in record]
    if missing:
        return missing
    problems = []
    symbols = record["idx_to_symbol"]
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
        return [RecordProblem(source, index, "idx_to_symbol", "expected a list of strings")]
    n = len(symbols)
    edges = record["edges"]
    if not isinstance(edges, list):
        problems.append(RecordProblem(source, index, "edges", f"expected a list of [a, b], got {type(edges).__name__}"))
    else:
        for j, edge in enumerate(edges):
            if not (isinstance(edge, list) and len(edge) == 2 and all(_is_int(v) for v in edge)):
                message = f"expected [a, b] with int node ids, got {edge!r}"
            elif not all(0 <= v < n for v in edge):
                message = f"node id out of range 0..{n - 1}: {edge!r}"
            else:
                continue
            problems.append(RecordProblem(source, index, f"edges[{j}]", message))
    for key in ("root", "target", "neg_target"):
        value = record[key]
        if not _is_int(value):
            problems.append(RecordProblem(source, index, key, f"expected an int node id, got {type(value).__name__}"))
        elif not 0 <= value < n:
            problems.append(RecordProblem(source, index, key, f"node id {value} out of range 0..{n - 1}"))
    return problems


def validate_graphs(records: list[Any], source: str = "records") -> None:
    """Raise :class:`DataError` listing every malformed graph (record index and field)."""
    problems = [p for i, r in enumerate(records) for p in _graph_problems(source, i, r)]
    if problems:
        raise DataError(problems)


def shortest_paths(n_nodes: int, edges: list[list[int]], source: int, target: int) -> tuple[int | None, int]:
    """Shortest distance (in edges) from ``source`` to ``target`` and the number of distinct shortest paths.

    Breadth-first search that carries path counts: a node's count is the sum of the counts of its parents
    one level closer. Repeated edges count once.

    Returns:
        ``(distance, paths)``; ``(None, 0)`` when ``target`` is unreachable.
    """
    children: list[set[int]] = [set() for _ in range(n_nodes)]
    for a, b in edges:
        children[a].add(b)
    distance: list[int | None] = [None] * n_nodes
    paths = [0] * n_nodes
    distance[source], paths[source] = 0, 1
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for child in children[node]:
            if distance[child] is None:
                distance[child] = distance[node] + 1
                queue.append(child)
            if distance[child] == distance[node] + 1:
                paths[child] += paths[node]
    return distance[target], paths[target]


def _capped(value: int, last: int) -> str:
    return f"{last}+" if value >= last else str(value)


def _fractions(counts: Counter[str], bins: tuple[str, ...] = ()) -> dict[str, float]:
    """Counts -> fractions over the fixed ``bins`` (always present) plus any other bin seen, in bin order."""
    total = sum(counts.values())
    labels = list(bins) + sorted((k for k in counts if k not in bins), key=bin_order)
    return {label: (counts[label] / total if total else 0.0) for label in sorted(labels, key=bin_order)}


def bin_order(label: str) -> tuple[float, str]:
    """Sort key for histogram labels: ``"<2"`` first, then numbers, ``"6+"`` after 6, anything else last."""
    if label.startswith("<") and label[1:].isdigit():
        return (int(label[1:]) - 0.5, label)
    if label.isdigit():
        return (float(label), label)
    if label.endswith("+") and label[:-1].isdigit():
        return (int(label[:-1]) + 0.25, label)
    return (float("inf"), label)


def _mean(values: list[float]) -> float | None:
    """None for no values, so that "no reachable target" never reads as a mean of 0."""
    return sum(values) / len(values) if values else None


def prosqa_graph_stats(records: list[dict[str, Any]], source: str = "records") -> dict[str, Any]:
    """Graph statistics of ProsQA records.

    Args:
        records: dicts with the ProsQA graph keys (``idx_to_symbol``, ``edges``, ``root``, ``target``,
            ``neg_target``) and a ``question``.
        source: the file name used in error messages.

    Returns:
        ``graphs`` (count); ``nodes_mean`` and ``edges_mean``; ``in_degree_hist`` (nodes with id >= 2, bins
        0..5 and 6+) and ``in_degree_mean``; ``people_hist`` (people = nodes with in-degree 0, bins 2..5 and
        6+, plus ``"<2"`` if any graph has fewer); ``distance_hist`` (shortest root -> target distance, one
        bin per value seen, plus ``"unreachable"`` if any) and ``distance_mean`` (over reachable targets);
        ``shortest_paths_hist`` (bins 1..4 and 5+) and ``shortest_paths_mean`` (distinct shortest root ->
        target paths, over reachable targets; None when no target is reachable); ``question_words_mean``.

    Raises:
        DataError: naming the record index and field of every malformed graph.
    """
    if not records:
        raise DataError([RecordProblem(source, None, None, "no records")])
    validate_graphs(records, source)
    in_degrees: Counter[str] = Counter()
    in_degree_values: list[int] = []
    people: Counter[str] = Counter()
    distances: Counter[str] = Counter()
    distance_values: list[int] = []
    path_counts: Counter[str] = Counter()
    path_values: list[int] = []
    for record in records:
        n = len(record["idx_to_symbol"])
        distinct_edges = sorted({(a, b) for a, b in record["edges"]})
        in_degree = [0] * n
        for _, b in distinct_edges:
            in_degree[b] += 1
        for degree in in_degree[2:]:
            in_degrees[_capped(degree, 6)] += 1
            in_degree_values.append(degree)
        n_people = sum(1 for degree in in_degree if degree == 0)
        people["<2" if n_people < 2 else _capped(n_people, 6)] += 1
        distance, paths = shortest_paths(n, [list(e) for e in distinct_edges], record["root"], record["target"])
        if distance is None:
            distances[UNREACHABLE] += 1
            continue
        distances[str(distance)] += 1
        distance_values.append(distance)
        path_counts[_capped(paths, 5)] += 1
        path_values.append(paths)
    return {
        "graphs": len(records),
        "nodes_mean": _mean([len(r["idx_to_symbol"]) for r in records]),
        "edges_mean": _mean([len(r["edges"]) for r in records]),
        "in_degree_hist": _fractions(in_degrees, IN_DEGREE_BINS),
        "in_degree_mean": _mean(in_degree_values),
        "people_hist": _fractions(people, PEOPLE_BINS),
        "distance_hist": _fractions(distances),
        "distance_mean": _mean(distance_values),
        "shortest_paths_hist": _fractions(path_counts, SHORTEST_PATHS_BINS),
        "shortest_paths_mean": _mean(path_values),
        "question_words_mean": _mean([len(str(r.get("question", "")).split()) for r in records]),
    }
