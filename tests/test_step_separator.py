"""The chain layout of Zhu et al. 2025: step_separator: "" tokenizes the question and the steps with nothing
between them, so the symbolic node steps " 25", " 14" make the chain " 25 14", one token per node, and
latent_markers: false puts the thoughts right after the question. Every entry point (training's
evaluation, load().answer, nbs eval, export) then builds the prompts the run was evaluated on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CPU, predictions, questions, tiny_config

from noblankslate.cli import main
from noblankslate.config import ConfigError, config_from_dict
from noblankslate.data.balanced import BalancedConfig, generate_balanced
from noblankslate.data.schema import Example
from noblankslate.data.symbolic import symbolic_examples
from noblankslate.data.tokenize import TokenizationMismatchError, tokenize_examples
from noblankslate.eval.answers import extract_cot, reference_cot
from noblankslate.eval.setup import coconut_texts
from noblankslate.inference import load
from noblankslate.inference.evaluation import evaluate_file
from noblankslate.model.tokenizer import build_word_tokenizer
from noblankslate.train.loop import train

GRAPHS = BalancedConfig(branches=(2, 2), distance=(1, 3))


def node_records(num: int, seed: int) -> list[dict]:
    return symbolic_examples(generate_balanced(num, seed=seed, config=GRAPHS), seed=seed, steps="nodes")


def as_examples(records: list[dict]) -> list[Example]:
    return [Example(i, r["question"], r["answer"], tuple(r["steps"])) for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def node_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("nodes")
    (folder / "train.json").write_text(json.dumps(node_records(48, seed=0)))
    (folder / "valid.json").write_text(json.dumps(node_records(12, seed=1)))
    return folder / "train.json", folder / "valid.json"


def test_without_separators_every_node_is_one_token_and_the_parts_join_to_the_whole_text():
    records = node_records(30, seed=2)
    examples = as_examples(records)
    tokenizer = build_word_tokenizer(coconut_texts(examples, ""))
    newline = tokenizer.convert_tokens_to_ids("\u010a")
    joined = tokenize_examples(examples, tokenizer, separator="")  # checks parts against the whole text
    lined = tokenize_examples(examples, tokenizer)
    for record, tokens, with_lines in zip(records, joined, lined):
        assert newline not in tokens.full_ids()
        assert [tokenizer.decode(list(step)) for step in tokens.step_ids] == record["steps"]  # " 25": one token each
        assert tokenizer.decode([tokens.question_ids[-1]]) == " " + record["idx_to_symbol"][record["root"]]
        assert with_lines.question_ids == (*tokens.question_ids, newline)
        assert all(step == (*bare, newline) for step, bare in zip(with_lines.step_ids, tokens.step_ids))


def test_parts_that_would_run_into_each_other_are_a_clear_error():
    example = Example(4, "a 7", "5", ("5",))  # "a 7" + "5" is " 75" as one text, " 7" + "5" as parts
    tokenizer = build_word_tokenizer(["a 7 75 5 ### 5"])
    with pytest.raises(TokenizationMismatchError, match=r"example 4 .*step_separator"):
        tokenize_examples([example], tokenizer, separator="")


def test_the_chain_is_matched_word_by_word_without_lines():
    assert extract_cot(" 25 14 20### 20", "") == "25 14 20" == reference_cot([" 25", " 14", " 20"], "")
    assert extract_cot(" 25 14### 14", "") != reference_cot([" 25", " 14", " 20"], "")
    assert extract_cot(" 25  14 ### 14", "") == reference_cot([" 25", " 14"], "")
    # the default is the original's line-by-line match
    assert extract_cot("A is B.\nC is D.\n### D") == "A is B.\nC is D." == reference_cot(["A is B.", "C is D."])
    assert extract_cot("A is B. C is D.\n### D") != reference_cot(["A is B.", "C is D."])


def test_other_separators_are_refused_by_the_config(tmp_path: Path, node_data):
    with pytest.raises(ConfigError, match=r"step_separator must be one of '\\n', '', got ' '"):
        config_from_dict(tiny_config(tmp_path, node_data, step_separator=" "))


def test_a_run_without_separators_is_answered_and_exported_as_it_was_evaluated(tmp_path: Path, node_data):
    raw = tiny_config(tmp_path, node_data, num_epochs=2, coconut=False, cot=True, step_separator="", lr=1e-2,
                      max_new_tokens=10)
    train(config_from_dict(raw), CPU)
    run = tmp_path / "runs" / "tiny"
    recorded = predictions(run / "predictions_epoch_2.jsonl")
    steps = {i: r["steps"] for i, r in enumerate(json.loads(node_data[1].read_text()))}
    assert all(r["cot_correct"] == (extract_cot(r["output"], "") == reference_cot(steps[r["idx"]], ""))
               for r in recorded)

    thinking = load(run)
    assert thinking.step_separator == ""
    assert [a.output for a in thinking.answer(questions(node_data[1]))] == [r["output"] for r in recorded]
    report = evaluate_file(thinking, node_data[1], CPU)
    assert [(r["output"], r["cot_correct"]) for r in report.predictions] == [
        (r["output"], r["cot_correct"]) for r in recorded]

    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    exported = load(export)
    assert exported.step_separator == ""
    assert [a.output for a in exported.answer(questions(node_data[1]))] == [r["output"] for r in recorded]


def test_coconut_without_markers_is_answered_and_exported_with_its_thoughts(tmp_path: Path, node_data):
    raw = tiny_config(tmp_path, node_data, num_epochs=3, step_separator="", latent_markers=False, lr=1e-2,
                      max_new_tokens=10)
    train(config_from_dict(raw), CPU)
    run = tmp_path / "runs" / "tiny"
    recorded = predictions(run / "predictions_epoch_3.jsonl")
    thinking = load(run)
    ids = thinking.spec
    assert (ids.use_markers, ids.latent_slots, thinking.num_thoughts) == (False, True, 2)
    assert thinking.prompt_ids([5, 6]) == [5, 6, ids.latent_id, ids.latent_id]
    assert thinking.prompt_ids([5, 6], num_thoughts=0) == [5, 6]
    answers = thinking.answer(questions(node_data[1]))
    assert [a.output for a in answers] == [r["output"] for r in recorded]
    assert [a.thoughts for a in answers] == [r["thoughts_used"] for r in recorded]
    assert any(r["latent_count"] > 0 for r in recorded)

    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    exported = load(export)
    assert (exported.spec.use_markers, exported.spec.latent_slots) == (False, True)
    assert [a.output for a in exported.answer(questions(node_data[1]))] == [r["output"] for r in recorded]
    assert "one `<|latent|>`" in (export / "README.md").read_text() and "without markers" in (export / "README.md").read_text()
