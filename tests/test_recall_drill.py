"""tools/recall_drill.py: the drill's data and the baselines its probe prints beside the model's score.

The baselines matter: without replacement a model that names any object not yet listed scores well late in
an answer, so the probe's score means nothing without them (docs/table1.md, P19).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "recall_drill.py"
_spec = importlib.util.spec_from_file_location("recall_drill", _TOOL)
recall_drill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recall_drill)

QUESTION = "Every wumpus is a zumpus. Every rumpus is a yumpus. Tom is a wumpus. Is Tom a zumpus or yumpus?"


def words_of(text: str) -> list[str]:
    """One word per token, as the word-level tokenizer splits (punctuation apart)."""
    return re.findall(r"\w+|[^\w\s]", text)


def test_lookups_score_both_strategies_exactly():
    prefix = words_of(QUESTION + "\n###")
    answer = words_of("Every wumpus is a zumpus. Tom is a wumpus. Every rumpus is a yumpus.")
    found = recall_drill.lookups(prefix + answer, len(prefix), QUESTION)
    assert [(f.kind, f.index) for f in found] == [("every", 0), ("person", 1), ("every", 2)]
    assert [(prefix + answer)[f.position] for f in found] == ["zumpus", "wumpus", "yumpus"]
    # objects of the question: zumpus, yumpus, wumpus; elimination picks among those not yet listed
    assert [f.elimination for f in found] == pytest.approx([1 / 3, 1 / 2, 1.0])
    assert [f.any_object for f in found] == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_a_repeated_fact_gives_elimination_nothing():
    prefix = words_of(QUESTION + "\n###")
    answer = words_of("Every wumpus is a zumpus. Every wumpus is a zumpus.")
    found = recall_drill.lookups(prefix + answer, len(prefix), QUESTION)
    assert [f.elimination for f in found] == pytest.approx([1 / 3, 0.0])


@pytest.mark.parametrize("with_replacement", [False, True])
def test_drill_answers_list_facts_of_the_question(tmp_path, with_replacement):
    records = [{"question": QUESTION, "steps": ["Tom is a wumpus."], "answer": "Tom is a zumpus."}] * 30
    source, out = tmp_path / "source.json", tmp_path / "drill.json"
    source.write_text(json.dumps(records))
    assert recall_drill.make_drill(str(source), str(out), seed=0, with_replacement=with_replacement) == 30
    facts = Counter(["Every wumpus is a zumpus.", "Every rumpus is a yumpus.", "Tom is a wumpus."])
    answers = [Counter(f.strip() for f in recall_drill.FACT.findall(r["answer"])) for r in json.loads(out.read_text())]
    assert all(sum(a.values()) == 3 and set(a) <= set(facts) for a in answers)
    assert all(not r["steps"] for r in json.loads(out.read_text()))
    if with_replacement:
        assert any(a != facts for a in answers)  # some answer repeats a fact (all 30 being permutations: (6/27)^30, 2.5e-20)
    else:
        assert all(a == facts for a in answers)


def test_several_sources_are_mixed_reproducibly(tmp_path):
    easy = {"question": "Tom is a wumpus. Sam is a yumpus. Is Tom a wumpus or yumpus?", "steps": [], "answer": "x"}
    paths = [tmp_path / "task.json", tmp_path / "easy.json"]
    paths[0].write_text(json.dumps([{"question": QUESTION, "steps": [], "answer": "x"}] * 20))
    paths[1].write_text(json.dumps([easy] * 20))
    questions = []
    for name in ("a.json", "b.json"):
        assert recall_drill.make_drill([str(p) for p in paths], str(tmp_path / name), seed=3) == 40
        questions.append([r["question"] for r in json.loads((tmp_path / name).read_text())])
    assert questions[0] == questions[1]  # the same seed, the same file
    assert Counter(questions[0]) == Counter({QUESTION: 20, easy["question"]: 20})
    assert questions[0] != sorted(questions[0]) and questions[0] != sorted(questions[0], reverse=True)  # mixed


def test_lookups_find_the_objects_in_the_word_tokenizers_tokens():
    """The probe splits text the way the runs' word-level tokenizer does: one decoded word per token."""
    from noblankslate.model.tokenizer import build_word_tokenizer

    answer = "Every wumpus is a zumpus. Tom is a wumpus. Every rumpus is a yumpus."
    prefix = QUESTION + "\n### "
    tokenizer = build_word_tokenizer([QUESTION, "### " + answer])
    ids = tokenizer(prefix + answer).input_ids
    words = [tokenizer.decode([t]).strip() for t in ids]
    found = recall_drill.lookups(words, len(tokenizer(prefix).input_ids), QUESTION)
    assert [(f.kind, words[f.position]) for f in found] == [("every", "zumpus"), ("person", "wumpus"), ("every", "yumpus")]


def test_attention_profile_tells_a_lookup_head_from_heads_that_only_find_objects():
    """Three second-layer heads at every lookup's query: one looks up the right fact's object, one looks at
    the objects of both "Every" facts alike (it knows the kind of object, not which one: P28), one at every
    object. Only the first has ``right`` above ``same_kind``."""
    prefix = words_of(QUESTION + "\n###")
    words = prefix + words_of("Every wumpus is a zumpus. Tom is a wumpus. Every rumpus is a yumpus.")
    start, length = len(prefix), len(words)
    objects = {"wumpus": words.index("zumpus"), "rumpus": words.index("yumpus"), "Tom": len(words_of("Every wumpus is a zumpus. Every rumpus is a yumpus. Tom is a"))}
    assert [words[p] for p in objects.values()] == ["zumpus", "yumpus", "wumpus"]
    weights = torch.zeros(2, 3, length, length)
    weights[..., 0] = 1.0  # by default every query looks at the first token
    for query in range(2, length):  # layer 0, head 0: two tokens back
        weights[0, 0, query] = 0.0
        weights[0, 0, query, query - 2] = 1.0
    queries = [i - 1 for i in range(start, length) if words[i - 1] == "a" and words[i - 4] == "Every"]
    for query in queries:
        weights[1, :, query] = 0.0
        weights[1, 0, query, objects[words[query - 2]]] = 1.0  # a lookup head: the right fact's object
        weights[1, 1, query, list(objects.values())] = 1 / 3  # finds objects, any of them
        weights[1, 2, query, [objects["wumpus"], objects["rumpus"]]] = 1 / 2  # finds the "Every" facts' objects
    found = recall_drill.attention_profile(weights, words, start, QUESTION)
    assert int(found["lookups"]) == 2 and int(found["positions"]) == length - start
    assert found["offset"][0, 0].tolist() == [0.0, length - start, 0.0, 0.0, 0.0, 0.0]
    assert found["offset"][1, 0].sum() == 0.0  # the default (first token) is never 1..6 back of an answer position
    by_head = {key: [round(x, 6) for x in found[key][1].tolist()] for key in ("right", "same_kind", "other_kind")}
    assert by_head == {"right": [2.0, 0.666667, 1.0], "same_kind": [0.0, 0.666667, 1.0], "other_kind": [0.0, 0.666667, 0.0]}


def test_an_empty_drill_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(SystemExit, match="empty.json: no records to probe"):
        list(recall_drill._sequences(tokenizer=None, data=str(empty), limit=100))


def test_attention_without_a_lookup_to_compare_is_a_clear_error(tmp_path, monkeypatch):
    """A drill file whose answers have no "Every X is a" lookup (only person facts) cannot be profiled."""
    data = tmp_path / "people.json"
    data.write_text(json.dumps([{"question": "Tom is a wumpus. Is Tom a wumpus or zumpus?", "steps": [],
                                 "answer": "Tom is a wumpus."}]))

    class Model:
        def set_attn_implementation(self, name):
            pass

        def __call__(self, input_ids, output_attentions):
            length = input_ids.shape[1]
            return type("Out", (), {"attentions": (torch.full((1, 1, length, length), 1 / length),)})

    class Tokenizer:
        def __call__(self, text, return_tensors=None):
            ids = torch.arange(len(words_of(text)))[None]
            self.words = words_of(text)
            return type("Enc", (), {"input_ids": ids if return_tensors else ids[0].tolist()})

        def decode(self, ids):
            return self.words[ids[0]]

    monkeypatch.setattr(recall_drill, "_load", lambda checkpoint: (Model(), Tokenizer()))
    with pytest.raises(SystemExit, match="people.json: no 'Every X is a' lookup"):
        recall_drill.attention("unused", str(data), limit=10)


SYMBOLIC = "3 7 | 0 3 | 1 9 | 0 5 [Q] 7 9 [R] 0"


def test_symbolic_drill_lists_the_facts_with_replacement(tmp_path):
    source = tmp_path / "symbolic.json"
    source.write_text(json.dumps([{"question": SYMBOLIC, "steps": [" 3", " 7"], "answer": "7"}]))
    out = tmp_path / "drill.json"
    assert recall_drill.make_drill(str(source), str(out), seed=0) == 1
    [record] = json.loads(out.read_text())
    facts = record["answer"].split(" | ")
    assert record["steps"] == [] and len(facts) == 4 and set(facts) <= {"3 7", "0 3", "1 9", "0 5"}


def test_symbolic_lookups_score_objects_whose_subject_has_one_child():
    """'0' has two children (3 and 5): two right answers, not scored; '3' and '1' have one."""
    prefix = SYMBOLIC.split() + ["###"]
    words = prefix + "0 3 | 3 7 | 1 9 | 3 7".split()
    found = recall_drill.symbolic_lookups(words, len(prefix), SYMBOLIC)
    assert [(words[f.position - 1], words[f.position], f.index) for f in found] == [("3", "7", 1), ("1", "9", 2), ("3", "7", 3)]
    assert all(f.any_object == pytest.approx(1 / 4) for f in found)  # nodes 0 1 3 5 7 9, minus the two people
