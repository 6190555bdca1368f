"""Data statistics: exact values on hand-made data, a brute-force oracle for path counting, and the published
ProsQA figures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from noblankslate.data.graph_stats import prosqa_graph_stats, shortest_paths
from noblankslate.data.schema import DataError
from noblankslate.data.stats import dataset_stats, format_table, load_token_counter

RECORDS = [
    {"question": "a b c", "answer": "x", "steps": ["s1 s2", "s3"]},
    {"question": "d e", "answer": "y z", "steps": [""]},
    {"question": "f", "answer": "w", "steps": ["t", "u", "v"]},
]

# Graph 1: people Alex, Bob and Eve (in-degree 0); Alex reaches c by two shortest paths of length 2.
# Graph 2: the target is not reachable from the root.
GRAPHS = [
    {
        "question": "one two three four",
        "answer": "Alex is a c.",
        "steps": ["Alex is a a.", "Every a is a c."],
        "idx_to_symbol": ["Alex", "Bob", "Eve", "a", "b", "c", "d"],
        "edges": [[0, 3], [0, 4], [2, 4], [3, 5], [4, 5], [5, 6], [1, 6]],
        "root": 0,
        "target": 5,
        "neg_target": 6,
    },
    {
        "question": "q r",
        "answer": "P is a y.",
        "steps": ["P is a y."],
        "idx_to_symbol": ["P", "Q", "x", "y"],
        "edges": [[0, 2], [1, 3]],
        "root": 0,
        "target": 3,
        "neg_target": 2,
    },
]


def test_dataset_stats_exact() -> None:
    assert dataset_stats(RECORDS) == {
        "examples": 3,
        "steps_mean": 2.0,
        "steps_hist": {"1": 1 / 3, "2": 1 / 3, "3": 1 / 3},
        "empty_steps": 1,
        "question_words": {"mean": 2.0, "min": 1, "max": 3},
        "answer_words": {"mean": 4 / 3, "min": 1, "max": 2},
        "step_words": {"mean": 1.0, "min": 0, "max": 2},
    }


def test_prosqa_graph_stats_exact() -> None:
    assert prosqa_graph_stats(GRAPHS) == {
        "graphs": 2,
        "nodes_mean": 5.5,
        "edges_mean": 4.5,
        "in_degree_hist": {"0": 1 / 7, "1": 3 / 7, "2": 3 / 7, "3": 0.0, "4": 0.0, "5": 0.0, "6+": 0.0},
        "in_degree_mean": 9 / 7,
        "people_hist": {"2": 0.5, "3": 0.5, "4": 0.0, "5": 0.0, "6+": 0.0},
        "distance_hist": {"2": 0.5, "unreachable": 0.5},
        "distance_mean": 2.0,
        "shortest_paths_hist": {"1": 0.0, "2": 1.0, "3": 0.0, "4": 0.0, "5+": 0.0},
        "shortest_paths_mean": 2.0,
        "question_words_mean": 3.0,
    }
    # A record with the graph keys gets the graph statistics in dataset_stats too.
    assert dataset_stats(GRAPHS)["graph"]["nodes_mean"] == 5.5


def test_repeated_edges_count_once_and_few_people_get_their_own_bin() -> None:
    graph = {"question": "q", "idx_to_symbol": ["A", "b", "c"], "edges": [[0, 1], [0, 1], [1, 2], [0, 2]],
             "root": 0, "target": 2, "neg_target": 1}
    stats = prosqa_graph_stats([graph])
    assert stats["people_hist"] == {"<2": 1.0, "2": 0.0, "3": 0.0, "4": 0.0, "5": 0.0, "6+": 0.0}
    assert stats["in_degree_hist"]["2"] == 1.0  # node 2 has parents 0 and 1
    assert (stats["distance_hist"], stats["shortest_paths_mean"]) == ({"1": 1.0}, 1.0)


def _brute_force(n: int, edges: list[list[int]], source: int, target: int) -> tuple[int | None, int]:
    """Every path from source to target, enumerated: (shortest length, how many have it)."""
    children: dict[int, set[int]] = {v: set() for v in range(n)}
    for a, b in edges:
        children[a].add(b)
    lengths: list[int] = []

    def walk(node: int, length: int) -> None:
        if node == target:
            lengths.append(length)
            return
        for child in children[node]:
            walk(child, length + 1)

    walk(source, 0)
    if not lengths:
        return None, 0
    return min(lengths), lengths.count(min(lengths))


def test_shortest_paths_against_enumerating_every_path() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 9)
        edges = [[a, b] for a in range(n) for b in range(a + 1, n) if rng.random() < 0.4]
        source, target = rng.randrange(n), rng.randrange(n)
        assert shortest_paths(n, edges, source, target) == _brute_force(n, edges, source, target)


def test_published_prosqa_valid_figures(shared_data: Path) -> None:
    records = json.loads((shared_data / "prosqa_valid.json").read_text())
    stats = prosqa_graph_stats(records)
    # The figures of ../shared/design/prosqa-generator.md (measured on valid + test), within rounding.
    assert stats["nodes_mean"] == pytest.approx(22.8, abs=0.05)
    assert stats["edges_mean"] == pytest.approx(36.0, abs=0.3)
    published = {"3": 0.40, "4": 0.44, "5": 0.13, "6": 0.02}
    assert stats["distance_hist"].keys() == published.keys()
    for distance, fraction in published.items():
        assert stats["distance_hist"][distance] == pytest.approx(fraction, abs=0.015)
    assert stats["shortest_paths_mean"] == pytest.approx(1.6, abs=0.05)
    assert stats["distance_mean"] == pytest.approx(3.77, abs=0.03)
    assert stats["in_degree_mean"] == pytest.approx(1.73, abs=0.02)
    assert {k: round(v * 100, 1) for k, v in stats["in_degree_hist"].items()} == {
        "0": 2.5, "1": 47.9, "2": 30.4, "3": 13.6, "4": 4.1, "5": 1.3, "6+": 0.3
    }
    for people, fraction in {"2": 0.58, "3": 0.32, "4": 0.085, "5": 0.02}.items():
        assert stats["people_hist"][people] == pytest.approx(fraction, abs=0.025)
    assert stats["question_words_mean"] == pytest.approx(179, abs=2)
    # And the exact values of this file, for generators to compare against.
    assert (stats["graphs"], stats["nodes_mean"], stats["edges_mean"]) == (300, 22.82, 36.26)
    assert {k: round(v * 300) for k, v in stats["distance_hist"].items()} == {"3": 124, "4": 133, "5": 36, "6": 7}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda g: g.pop("edges"), "f.json: record 1, field 'edges': missing"),
        (lambda g: g["edges"].append([0, 9]), "f.json: record 1, field 'edges[2]': node id out of range 0..3: [0, 9]"),
        (lambda g: g["edges"].append([0]), "f.json: record 1, field 'edges[2]': expected [a, b] with int node ids"),
        (lambda g: g.update(root="0"), "f.json: record 1, field 'root': expected an int node id, got str"),
        (lambda g: g.update(target=4), "f.json: record 1, field 'target': node id 4 out of range 0..3"),
        (lambda g: g.update(idx_to_symbol="PQxy"), "f.json: record 1, field 'idx_to_symbol': expected a list of strings"),
    ],
)
def test_malformed_graphs_are_reported_with_record_and_field(edit, expected: str) -> None:
    graphs = json.loads(json.dumps(GRAPHS))
    edit(graphs[1])
    with pytest.raises(DataError) as error:
        prosqa_graph_stats(graphs, source="f.json")
    assert str(error.value).startswith(expected), str(error.value)


def test_format_table_side_by_side() -> None:
    a = dataset_stats(RECORDS[:1])
    b = dataset_stats(GRAPHS[1:])
    table = format_table([("a.json", a), ("b.json", b)])
    lines = table.splitlines()
    assert lines[:6] == [
        "                                 a.json  b.json",
        "examples                              1       1",
        "steps per example: mean            2.00    1.00",
        "steps per example",
        "  1                                0.0%  100.0%",
        "  2                              100.0%    0.0%",
    ]
    # b has a graph and a does not: a's cells there are "-".
    assert "  graphs                              -       1" in lines
    # No reachable target: the means are unknown, not 0.
    assert lines[lines.index("  root -> target distance") + 2].split() == ["root", "->", "target", "distance:", "mean", "-", "-"]
    assert lines[lines.index("  root -> target distance") + 1].split() == ["unreachable", "-", "100.0%"]
    assert all(len(line) <= len(lines[0]) for line in lines)


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_token_lengths_with_a_local_tokenizer(word_tokenizer_dir: Path) -> None:
    count = load_token_counter(word_tokenizer_dir)
    assert count(["a b c", "a", ""]) == [3, 1, 0]
    stats = dataset_stats(RECORDS, count)
    assert stats["question_tokens"] == {"mean": 2.0, "min": 1, "max": 3}
    assert stats["step_tokens"] == stats["step_words"]


def test_gpt2_vocab_and_merges_folder(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "\u0120": 3, "\u0120b": 4}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n\u0120 b\n")
    count = load_token_counter(tmp_path)
    assert count(["ab", "ab b", "a"]) == [1, 2, 1]


def test_tokenizer_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer folder not found"):
        load_token_counter(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer could be loaded"):
        load_token_counter(tmp_path)
