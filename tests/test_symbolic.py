"""ProsQA records written as symbols (noblankslate.data.symbolic): the same graph, the same question, in the
encoding where a fact's object is the token right after its subject."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from noblankslate.cli import main
from noblankslate.data.balanced import BalancedConfig, generate_balanced, shortcut_accuracies
from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
from noblankslate.data.symbolic import symbolic_example, symbolic_examples
from noblankslate.errors import InvalidValue

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prosqa_valid.json"


def read_back(record: dict) -> tuple[set[tuple[str, str]], list[str], str]:
    """The facts, the two options and the root of a symbolic question, parsed from its text alone."""
    facts, _, query = record["question"].partition(" [Q] ")
    options, _, root = query.partition(" [R] ")
    return {tuple(fact.split()) for fact in facts.split(" | ")}, options.split(), root


def sources() -> list[dict]:
    return (generate_balanced(40, seed=3, config=BalancedConfig(branches=(1, 3), distance=(1, 4)))
            + generate_prosqa(20, seed=4, config=ProsQAConfig.small()))


def test_the_question_holds_the_graph_and_the_steps_walk_it_to_the_answer():
    for original, record in zip(sources(), symbolic_examples(sources(), seed=0)):
        symbol = record["idx_to_symbol"]
        facts, options, root = read_back(record)
        assert facts == {(symbol[a], symbol[b]) for a, b in original["edges"]}
        assert len(record["question"].split(" | ")) == len(original["edges"])  # each fact once
        assert sorted(options) == sorted([symbol[original["target"]], symbol[original["neg_target"]]])
        assert root == symbol[original["root"]]
        steps = [tuple(step.split()) for step in record["steps"]]
        assert all(step in facts for step in steps) and all(step.startswith(" ") for step in record["steps"])
        walk = [root] + [obj for _, obj in steps]
        assert [subject for subject, _ in steps] == walk[:-1]  # each step starts where the last one ended
        assert len(steps) == len(original["steps"]) and record["answer"] == walk[-1] == symbol[original["target"]]
        assert len(set(symbol)) == len(symbol) and all(0 <= int(s) < 32 for s in symbol)
        assert {k: original[k] for k in ("edges", "root", "target", "neg_target")} == \
            {k: record[k] for k in ("edges", "root", "target", "neg_target")}


def test_node_steps_walk_the_same_path_one_node_per_step():
    """With ``steps="nodes"`` each step is the node the path reaches, every one a child of the node before
    (the root for the first); everything else is what the fact steps' file has, draw for draw."""
    for facts, nodes in zip(symbolic_examples(sources(), seed=0), symbolic_examples(sources(), seed=0, steps="nodes")):
        assert {k: v for k, v in facts.items() if k != "steps"} == {k: v for k, v in nodes.items() if k != "steps"}
        edges, _, root = read_back(nodes)
        walk = [root] + [step.strip() for step in nodes["steps"]]
        assert all(step.startswith(" ") and len(step.split()) == 1 for step in nodes["steps"])
        assert all((a, b) in edges for a, b in zip(walk, walk[1:])) and walk[-1] == nodes["answer"]
        assert [step.split()[1] for step in facts["steps"]] == walk[1:]
    with pytest.raises(InvalidValue, match=r"steps: 'edges' is not one of facts, nodes"):
        symbolic_examples(sources(), seed=0, steps="edges")


def test_the_published_validation_set_converts():
    records = json.loads(PUBLISHED.read_text())[:50]
    for original, record in zip(records, symbolic_examples(records, seed=0)):
        assert read_back(record)[2] == record["idx_to_symbol"][original["root"]]
        assert record["answer"] == record["idx_to_symbol"][original["target"]]


def test_one_symbol_one_token_the_same_in_question_steps_and_answer():
    """With the word-level tokenizer every symbol is one token, a fact's object right after its subject, and
    a node is the same token in the question, in a step and in the answer, as the collator tokenizes them."""
    from noblankslate.data.schema import Example
    from noblankslate.data.tokenize import full_text, tokenize_examples
    from noblankslate.model.tokenizer import build_word_tokenizer

    record = symbolic_examples(generate_balanced(1, seed=5, config=BalancedConfig(branches=(2, 2), distance=(3, 3))), 0)[0]
    example = Example(0, record["question"], record["answer"], tuple(record["steps"]))
    tokenizer = build_word_tokenizer([full_text(example)])
    pieces = [tokenizer.decode([t]).strip() for t in tokenizer(record["question"]).input_ids]
    facts = record["question"].split(" [Q] ")[0].split(" | ")
    assert pieces[: 3 * len(facts) - 1] == " | ".join(facts).split()
    [tokens] = tokenize_examples([example], tokenizer)
    question = set(tokens.question_ids)
    assert all(step[0] in question and step[1] in question for step in tokens.step_ids)  # the nodes as the question writes them
    assert tokens.answer_ids[1] == tokens.step_ids[-1][1]  # "###", then the target as the last step names it


def test_the_same_seed_gives_the_same_file_and_ids_carry_nothing():
    assert symbolic_examples(sources(), seed=1) == symbolic_examples(sources(), seed=1)
    assert symbolic_examples(sources(), seed=1) != symbolic_examples(sources(), seed=2)
    # In ProsQA node ids are a topological order; the symbols are drawn at random, so "the option with the
    # larger symbol" is a coin flip.
    records = symbolic_examples(generate_balanced(2000, seed=6, config=BalancedConfig(branches=(2, 2), distance=(1, 3))), 0)
    larger = sum(int(r["idx_to_symbol"][r["target"]]) > int(r["idx_to_symbol"][r["neg_target"]]) for r in records)
    assert abs(larger / len(records) - 0.5) < 0.04
    assert shortcut_accuracies(records)["best_one_hop"]["accuracy"] < 0.54  # the graph, and so its balance, is kept


def test_bad_records_are_clear_errors():
    good = generate_balanced(1, seed=7, config=BalancedConfig(branches=(2, 2), distance=(2, 2)))[0]
    rng = random.Random(0)
    with pytest.raises(InvalidValue, match=r"f.json, record 3: no field 'edges'"):
        symbolic_example({k: v for k, v in good.items() if k != "edges"}, rng, where="f.json, record 3")
    with pytest.raises(InvalidValue, match=r"field 'idx_to_symbol': 10 nodes, more than the 8 symbols"):
        symbolic_example(good, rng, symbols=8)
    with pytest.raises(InvalidValue, match=r"field 'steps', step 1: 'Every X is a Y.' is not a fact of this graph"):
        symbolic_example({**good, "steps": [good["steps"][0], "Every X is a Y."]}, rng)
    with pytest.raises(InvalidValue, match=r"field 'steps', step 0: .* does not continue the path"):
        symbolic_example({**good, "steps": good["steps"][::-1]}, rng)
    with pytest.raises(InvalidValue, match=r"field 'steps': the path ends at node"):
        symbolic_example({**good, "steps": good["steps"][:1]}, rng)


def test_the_command_writes_the_file_and_keeps_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    source = tmp_path / "in.json"
    source.write_text(json.dumps(sources()))
    out = tmp_path / "out.json"
    assert main(["data", "symbolic", str(source), str(out), "--seed", "1"]) == 0
    assert json.loads(out.read_text()) == symbolic_examples(sources(), seed=1)
    assert capsys.readouterr().out == f"{out}: 60 records of {source} as symbols (seed 1, 32 symbols, steps as facts)\n"
    nodes = tmp_path / "nodes.json"
    assert main(["data", "symbolic", str(source), str(nodes), "--seed", "1", "--steps", "nodes"]) == 0
    assert json.loads(nodes.read_text()) == symbolic_examples(sources(), seed=1, steps="nodes")
    assert "steps as nodes" in capsys.readouterr().out
    assert main(["data", "symbolic", str(source), str(source)]) != 0
    assert "refusing to overwrite the input file" in capsys.readouterr().err
