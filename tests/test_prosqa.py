"""The ProsQA generator and checker, against the published validation set."""

from __future__ import annotations

import copy
import json

import pytest

from noblankslate.cli import main
from noblankslate.data.graph_stats import prosqa_graph_stats
from noblankslate.data.prosqa import (
    CONCEPTS,
    PEOPLE,
    ProsQAConfig,
    check_prosqa_example,
    generate_prosqa,
)
from noblankslate.data.schema import load_examples


@pytest.fixture(scope="module")
def published(shared_data) -> list[dict]:
    return json.loads((shared_data / "prosqa_valid.json").read_text())


@pytest.fixture(scope="module")
def generated() -> list[dict]:
    return generate_prosqa(2500, seed=0)


def render(names: list[str], edges: list[list[int]], root: int, target: int, neg: int, path: list[int]) -> dict:
    """A well-formed example from a hand-made graph (facts in edge order), for breaking one thing at a time."""
    people = {v for v in range(len(names)) if all(b != v for _, b in edges)}

    def fact(a: int, b: int) -> str:
        return f"{names[a]} is a {names[b]}." if a in people else f"Every {names[a]} is a {names[b]}."

    return {
        "question": " ".join(fact(a, b) for a, b in edges) + f" Is {names[root]} a {names[target]} or {names[neg]}?",
        "answer": f"{names[root]} is a {names[target]}.",
        "steps": [fact(a, b) for a, b in zip(path, path[1:])],
        "idx_to_symbol": names,
        "edges": edges,
        "root": root,
        "target": target,
        "neg_target": neg,
    }


# Tom (root): Tom -> a -> b -> c (target, depth 3), Tom -> d (leaf); Sam: Sam -> e -> f (neg_target).
NAMES = ["Tom", "Sam", "bompus", "dumpus", "gorpus", "impus", "lempus", "numpus"]
EDGES = [[0, 2], [2, 3], [3, 4], [0, 5], [1, 6], [6, 7]]


def good() -> dict:
    return render(list(NAMES), copy.deepcopy(EDGES), 0, 4, 7, [0, 2, 3, 4])


def test_hand_made_example_is_valid():
    assert check_prosqa_example(good()) == []


def test_published_examples_all_pass(published):
    assert len(published) == 300
    failures = {i: check_prosqa_example(ex) for i, ex in enumerate(published)}
    assert {i: p for i, p in failures.items() if p} == {}


@pytest.mark.parametrize("seed", range(12))
def test_generated_examples_pass(seed):
    for ex in generate_prosqa(60, seed=seed):
        assert check_prosqa_example(ex) == [], ex


def test_small_graphs_pass_with_their_distance_range():
    examples = generate_prosqa(300, seed=1, config=ProsQAConfig.small())
    assert all(check_prosqa_example(ex, min_distance=2, max_distance=3) == [] for ex in examples)
    assert {len(ex["steps"]) for ex in examples} == {2, 3}
    assert max(len(ex["idx_to_symbol"]) for ex in examples) < 17
    assert check_prosqa_example(next(ex for ex in examples if len(ex["steps"]) == 2)) != []


def test_generated_fields_and_names(generated):
    for ex in generated[:200]:
        n = len(ex["idx_to_symbol"])
        has_parent = {b for _, b in ex["edges"]}
        assert all((name in PEOPLE) == (v not in has_parent) for v, name in enumerate(ex["idx_to_symbol"]))
        assert all(name in PEOPLE or name in CONCEPTS for name in ex["idx_to_symbol"])
        assert ex["question"].count("?") == 1 and ex["answer"].endswith(f" is a {ex['idx_to_symbol'][ex['target']]}.")
        assert 2 <= n <= 2 + 4 + 25


def test_statistics_match_published(published, generated):
    gen, pub = prosqa_graph_stats(generated), prosqa_graph_stats(published)
    assert abs(gen["nodes_mean"] - pub["nodes_mean"]) <= 0.5
    assert abs(gen["edges_mean"] - pub["edges_mean"]) <= 1.5
    for hist in ("distance_hist", "in_degree_hist", "people_hist"):
        for label in set(gen[hist]) | set(pub[hist]):
            assert abs(gen[hist].get(label, 0) - pub[hist].get(label, 0)) <= 0.05, (hist, label)
    assert abs(gen["shortest_paths_mean"] - pub["shortest_paths_mean"]) <= 0.15
    assert abs(gen["question_words_mean"] - pub["question_words_mean"]) <= 5


def test_same_seed_same_examples_other_seed_other_examples():
    assert generate_prosqa(40, seed=7) == generate_prosqa(40, seed=7)
    assert generate_prosqa(40, seed=7) != generate_prosqa(40, seed=8)


def test_excluded_questions_are_never_generated():
    first = generate_prosqa(5, seed=3)
    again = generate_prosqa(5, seed=3, exclude_questions={first[0]["question"], first[2]["question"]})
    assert len(again) == 5
    assert {ex["question"] for ex in again}.isdisjoint({first[0]["question"], first[2]["question"]})
    assert again[0] == first[1]  # the excluded draw is skipped, the stream goes on


def test_questions_are_distinct(generated):
    assert len({ex["question"] for ex in generated}) == len(generated)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_distance"):
        ProsQAConfig(min_distance=4, max_distance=3)
    with pytest.raises(ValueError, match="concept_weights"):
        ProsQAConfig(concept_weights={40: 1.0})
    with pytest.raises(ValueError, match="recency"):
        ProsQAConfig(recency=0.0)
    with pytest.raises(ValueError, match="concept count"):
        ProsQAConfig().with_ranges(concepts=(9, 6))
    with pytest.raises(ValueError, match="num"):
        generate_prosqa(-1, seed=0)


def test_unreachable_distance_fails_clearly():
    config = ProsQAConfig(concept_weights={3: 1.0}, min_distance=6, max_distance=6, max_tries=50)
    with pytest.raises(RuntimeError, match="widen the ranges"):
        generate_prosqa(1, seed=0, config=config)


def _problems(ex: dict, **kwargs) -> str:
    return "\n".join(check_prosqa_example(ex, **kwargs))


def test_check_catches_non_topological_ids():
    # Swap the ids of b and c: the edge b -> c now goes from 4 to 3.
    names = list(NAMES)
    names[3], names[4] = names[4], names[3]
    ex = render(names, [[0, 2], [4, 3], [2, 4], [0, 5], [1, 6], [6, 7]], 0, 3, 7, [0, 2, 4, 3])
    assert check_prosqa_example(ex) == ["edge with a >= b: node ids are not a topological order"]


def test_check_catches_duplicate_and_unsorted_edges():
    duplicate = render(list(NAMES), EDGES + [[6, 7]], 0, 4, 7, [0, 2, 3, 4])
    assert check_prosqa_example(duplicate) == ["duplicate edges"]
    unsorted = render(list(NAMES), EDGES[::-1], 0, 4, 7, [0, 2, 3, 4])
    assert check_prosqa_example(unsorted) == ["edges are not sorted by destination"]


def test_check_catches_bad_names():
    names = list(NAMES)
    names[7] = names[5]
    assert "repeated names" in _problems(render(names, EDGES, 0, 4, 7, [0, 2, 3, 4]))
    names = list(NAMES)
    names[1] = "rompus"
    assert "in-degree 0 is not named after a person" in _problems(render(names, EDGES, 0, 4, 7, [0, 2, 3, 4]))
    names = list(NAMES)
    names[5] = "Alex"
    assert "not named after a concept" in _problems(render(names, EDGES, 0, 4, 7, [0, 2, 3, 4]))


def test_check_catches_people_rules():
    # Node 1 gets a parent, so it is no longer a person.
    ex = render(list(NAMES), [[0, 1]] + EDGES, 0, 4, 7, [0, 2, 3, 4])
    assert "nodes 0 and 1 are not both people" in _problems(ex)
    # A distractor person with no children.
    ex = render(list(NAMES) + ["Alex"], EDGES, 0, 4, 7, [0, 2, 3, 4])
    assert "a person has no children" in _problems(ex)


def test_check_catches_bad_root():
    ex = good()
    ex["root"] = 2
    assert check_prosqa_example(ex) == ["root 2 is not 0 or 1"]


def test_check_catches_target_rules():
    ex = render(list(NAMES), EDGES, 0, 3, 7, [0, 2, 3])
    assert "target is not a leaf reachable only from the root" in _problems(ex, min_distance=1)
    ex = render(list(NAMES), EDGES, 0, 5, 7, [0, 5])
    assert "deepest root-exclusive leaf is at 3" in _problems(ex, min_distance=1)
    # A target also reachable from the other person is not exclusive.
    ex = render(list(NAMES), EDGES + [[1, 4]], 0, 4, 7, [0, 2, 3, 4])
    assert "target is not a leaf reachable only from the root" in _problems(ex)


def test_check_catches_neg_target_rules():
    ex = render(list(NAMES), EDGES, 0, 4, 5, [0, 2, 3, 4])
    assert "neg_target is not a leaf reachable only from the other person" in _problems(ex)
    ex = render(list(NAMES), EDGES, 0, 4, 6, [0, 2, 3, 4])
    assert "neg_target is not a leaf reachable only from the other person" in _problems(ex)


def test_check_catches_other_side_deeper():
    names = NAMES + ["rompus", "terpus", "wumpus"]
    edges = EDGES + [[7, 8], [8, 9], [9, 10]]
    ex = render(names, edges, 0, 4, 10, [0, 2, 3, 4])
    assert check_prosqa_example(ex) == ["the other person's deepest exclusive leaf is deeper than the target"]


def test_check_catches_distance_out_of_range():
    assert "distance 3 is not in [4, 6]" in _problems(good(), min_distance=4)
    assert "distance 3 is not in [1, 2]" in _problems(good(), min_distance=1, max_distance=2)


def test_check_catches_bad_question_text():
    ex = good()
    ex["question"] = ex["question"].replace(" Is Tom a", " Is Tom an")
    assert "does not end with" in _problems(ex)
    ex = good()
    ex["question"] = ex["question"].replace(" Is Tom a", " Is Sam a")
    assert "does not name the root" in _problems(ex)
    ex = good()
    ex["question"] = ex["question"].replace("or numpus?", "or impus?")
    assert "does not name target and neg_target" in _problems(ex)
    for broken in (
        good()["question"].replace("Every bompus is a dumpus. ", ""),  # a fact missing
        good()["question"].replace("Tom is a bompus.", "Every Tom is a bompus."),  # wrong form for a person
        good()["question"].replace("Every dumpus is a gorpus.", "Every dumpus is an gorpus."),
        good()["question"].replace(". ", ".  ", 1),  # double space
    ):
        ex = good()
        ex["question"] = broken
        assert "one fact per edge" in _problems(ex), broken


def test_check_catches_bad_answer():
    ex = good()
    ex["answer"] = "Tom is a numpus."
    assert "answer is not" in _problems(ex)


def test_check_catches_bad_steps():
    ex = good()
    ex["steps"] = ex["steps"][:-1]
    assert "2 steps, but the shortest root -> target distance is 3" in _problems(ex)
    ex = good()
    ex["steps"][0] = "Every Tom is a bompus."
    assert "step 0 is not" in _problems(ex)
    ex = good()
    ex["steps"][1] = "Every impus is a dumpus."
    assert "step 1 is not" in _problems(ex)
    # A path through a sentence that is not a fact of the question.
    ex = good()
    ex["steps"][1] = "Every bompus is a impus."
    assert "step 1 ('Every bompus is a impus.') is not a fact of the question" in _problems(ex)
    # A shortest-length path that ends somewhere else.
    ex = render(NAMES + ["rompus"], EDGES + [[3, 8]], 0, 4, 7, [0, 2, 3, 8])
    assert check_prosqa_example(ex) == ["steps do not end at the target"]


def test_check_reports_malformed_records():
    assert check_prosqa_example([]) == ["expected a dict, got list"]
    ex = good()
    del ex["edges"]
    assert check_prosqa_example(ex) == ["missing field 'edges'"]
    ex = good()
    ex["edges"][0] = [0, 99]
    assert "is not a pair of node ids" in _problems(ex)


def test_cli_writes_same_file_for_same_seed_and_excludes_published(tmp_path, shared_data, published):
    valid = str(shared_data / "prosqa_valid.json")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for out in (first, second):
        assert main(["data", "prosqa", "--num", "300", "--seed", "5", "--out", str(out), "--exclude", valid]) == 0
    assert first.read_bytes() == second.read_bytes()
    records = json.loads(first.read_text())
    assert len(load_examples(first)) == 300
    assert {r["question"] for r in records}.isdisjoint({r["question"] for r in published})
    assert all(check_prosqa_example(r) == [] for r in records)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_small_graphs_and_ranges(tmp_path):
    out = tmp_path / "small.json"
    assert main(["data", "prosqa", "--num", "50", "--seed", "1", "--out", str(out), "--small",
                 "--distance", "2-2"]) == 0
    records = json.loads(out.read_text())
    assert all(check_prosqa_example(r, min_distance=2, max_distance=2) == [] for r in records)
    with pytest.raises(SystemExit):
        main(["data", "prosqa", "--num", "5", "--out", str(out), "--concepts", "9-6"])


def test_cli_refuses_to_overwrite_an_excluded_file(tmp_path, capsys):
    source = tmp_path / "valid.json"
    source.write_text(json.dumps([good()]))
    assert main(["data", "prosqa", "--num", "3", "--out", str(source), "--exclude", str(source)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert json.loads(source.read_text()) == [good()]
