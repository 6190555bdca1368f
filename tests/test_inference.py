"""load(), nbs generate and nbs eval on a tiny trained run: the same prompts and answers as training's
evaluation, pass@k and majority vote, and a clear error for each kind of bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CPU, predictions, questions, trained_run

from noblankslate.cli import main
from noblankslate.inference import InferenceError, load
from noblankslate.inference.evaluation import SamplingOptions, evaluate_file
from noblankslate.inference.sampling import majority_vote, mean_pass_at_k, pass_at_k
from noblankslate.model.checkpoint_files import CheckpointError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data) -> Path:
    return trained_run(tmp_path_factory, tiny_data)


@pytest.fixture(scope="module")
def thinking(run_dir):
    return load(run_dir)


def nbs(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pass_at_k_matches_a_hand_computed_example():
    # n = 5 samples, c = 2 correct: pass@k = 1 - C(3, k) / C(5, k)
    assert [pass_at_k(5, 2, k) for k in range(1, 6)] == pytest.approx([1 - 3 / 5, 1 - 3 / 10, 1 - 1 / 10, 1.0, 1.0])
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # two questions, 3 samples each, 1 and 0 correct: pass@1 = (1/3 + 0) / 2, pass@2 = (2/3 + 0) / 2, pass@3 = 1/2
    assert mean_pass_at_k([1, 0], 3) == pytest.approx({1: 1 / 6, 2: 1 / 3, 3: 1 / 2})
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_majority_vote_counts_answers_and_breaks_ties_by_first_sample():
    assert majority_vote(["a", "b", "b", None]) == "b"
    assert majority_vote(["c", "a", "a", "c"]) == "c"
    assert majority_vote([None, None, "a"]) is None


def test_load_takes_the_latest_checkpoint_and_needs_no_config(run_dir, thinking):
    assert thinking.source == run_dir / "checkpoint_6"
    assert (thinking.method, thinking.stage, thinking.num_thoughts, thinking.epoch) == ("coconut", 2, 2, 6)
    assert load(run_dir / "checkpoint_2").num_thoughts == 0  # stage 0: markers only
    prompt = thinking.prompt_ids([5, 6, 7])
    ids = thinking.spec
    assert prompt == [5, 6, 7, ids.start_id, ids.latent_id, ids.latent_id, ids.end_id]
    assert thinking.prompt_ids([5], num_thoughts=0) == [5, ids.start_id, ids.end_id]


def test_answers_equal_the_training_runs_evaluation(run_dir, thinking, tiny_data):
    """answer() builds the prompts evaluation builds, so it reproduces the run's own predictions."""
    recorded = predictions(run_dir / "predictions_epoch_6.jsonl")
    answers = thinking.answer(questions(tiny_data[1]), batch_size=5)
    assert [a.output for a in answers] == [r["output"] for r in recorded]
    assert [a.forward_passes for a in answers] == [r["forward_passes"] for r in recorded]
    assert all(a.thoughts == 2 for a in answers)
    assert any(a.answer is not None for a in answers)  # it has learnt the answer format


def test_decoded_thoughts_are_the_lm_head_of_the_fed_thoughts(thinking, tiny_data):
    question = questions(tiny_data[1])[0]
    answer = thinking.answer(question, top_tokens=3)[0]
    ids = torch.tensor([thinking.prompt_ids(thinking.tokenizer(question + "\n")["input_ids"])])
    embeds = thinking.model(ids, torch.ones_like(ids)).inputs_embeds  # thoughts filled in at the latent columns
    latent = (ids[0] == thinking.spec.latent_id).nonzero()[:, 0]
    probs = thinking.model.lm_head(embeds[0, latent]).softmax(-1)  # (2, V)
    top = probs.topk(3, dim=-1)
    expected = [[(thinking.tokenizer.decode([i]), p) for i, p in zip(row_ids, row_p)]
                for row_ids, row_p in zip(top.indices.tolist(), top.values.tolist())]
    assert [[t for t, _ in thought] for thought in answer.thought_tokens] == [[t for t, _ in th] for th in expected]
    assert [p for thought in answer.thought_tokens for _, p in thought] == pytest.approx(
        [p for th in expected for _, p in th], abs=1e-5)


def test_nbs_generate_reads_questions_from_flags_files_and_stdin(capsys, monkeypatch, run_dir, thinking, tiny_data, tmp_path):
    qs = questions(tiny_data[1])[:3]
    expected = [a.to_dict() for a in thinking.answer(qs)]
    code, out, _ = nbs(capsys, "generate", run_dir, "-q", qs[0], "-q", qs[1], "-q", qs[2], "--json")
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == expected
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in qs))
    code, out, _ = nbs(capsys, "generate", run_dir, "--file", tmp_path / "q.jsonl", "--json", "--batch-size", "2")
    assert [json.loads(line) for line in out.splitlines()] == expected
    code, out, _ = nbs(capsys, "generate", run_dir, "--file", tiny_data[1], "--json")  # a Coconut data file
    assert [json.loads(line) for line in out.splitlines()][:3] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(qs) + "\n"))
    code, out, _ = nbs(capsys, "generate", run_dir, "--json")
    assert [json.loads(line) for line in out.splitlines()] == expected
    code, out, _ = nbs(capsys, "generate", run_dir, "-q", qs[0], "--thoughts-decoded", "2", "--num-thoughts", "1")
    assert code == 0 and "thought 1: " in out and "thought 2: " not in out and "(1 thought, " in out
    assert f"answer: {thinking.answer(qs[0], 1)[0].answer}" in out


def test_nbs_eval_reproduces_the_runs_accuracy_and_predictions(capsys, run_dir, tiny_data, tmp_path):
    out_file = tmp_path / "p.jsonl"
    code, out, _ = nbs(capsys, "eval", run_dir, "--data", tiny_data[1], "--predictions", out_file, "--json")
    summary = json.loads(out)
    epoch = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "epoch"][-1]
    assert code == 0 and summary["total"] == 12
    assert summary["accuracy"] == epoch["accuracy"] and summary["mean_forward_passes"] == epoch["mean_forward_passes"]
    recorded = predictions(run_dir / "predictions_epoch_6.jsonl")
    assert [r["output"] for r in predictions(out_file)] == [r["output"] for r in recorded]


def test_eval_scores_against_the_file_and_with_other_thought_counts(thinking, tiny_data, tmp_path):
    """A file whose reference answers are the model's own greedy answers for half the records scores 0.5."""
    records = json.loads(tiny_data[1].read_text())
    greedy = thinking.answer([r["question"] for r in records])
    for i, (record, answer) in enumerate(zip(records, greedy)):
        if i % 2 == 0:
            record["answer"] = answer.answer
    (tmp_path / "half.json").write_text(json.dumps(records))
    report = evaluate_file(thinking, tmp_path / "half.json", CPU)
    assert report.accuracy == 0.5 and report.total == 12
    none = evaluate_file(thinking, tmp_path / "half.json", CPU, num_thoughts=0)
    assert none.mean_forward_passes < report.mean_forward_passes
    assert all(r["thoughts_used"] == 0 for r in none.predictions)
    assert [r["output"] for r in none.predictions] == [a.output for a in thinking.answer([r["question"] for r in records], 0)]


def test_sampled_eval_reports_pass_at_k_and_majority_vote_from_its_samples(thinking, tiny_data, tmp_path):
    records = json.loads(tiny_data[1].read_text())
    greedy = thinking.answer([r["question"] for r in records])
    for record, answer in zip(records, greedy):
        record["answer"] = answer.answer  # greedy scores 1.0; samples at temperature 0.4 sometimes differ
    (tmp_path / "own.json").write_text(json.dumps(records))
    options = SamplingOptions(temperature=0.4, num_samples=4, seed=3)
    report = evaluate_file(thinking, tmp_path / "own.json", CPU, sample=options)
    again = evaluate_file(thinking, tmp_path / "own.json", CPU, sample=options)
    other = evaluate_file(thinking, tmp_path / "own.json", CPU, sample=SamplingOptions(temperature=0.4, num_samples=4, seed=4))
    assert [r["output"] for r in report.predictions] == [r["output"] for r in again.predictions]
    assert [r["output"] for r in report.predictions] != [r["output"] for r in other.predictions]
    by_question: dict[int, list[dict]] = {}
    for r in report.predictions:
        by_question.setdefault(r["idx"], []).append(r)
    assert sorted(by_question) == list(range(12)) and all(len(g) == 4 for g in by_question.values())
    assert [r["sample"] for r in by_question[0]] == [0, 1, 2, 3]
    counts = [sum(r["correct"] for r in g) for g in by_question.values()]
    assert 0 < sum(counts) < 48  # some samples right, some wrong: the scores below are not trivial
    assert report.pass_at_k == pytest.approx(mean_pass_at_k(counts, 4))
    assert report.pass_at_k[1] == pytest.approx(report.accuracy)
    majority = sum(majority_vote([r["prediction"] for r in g]) == records[idx]["answer"] for idx, g in by_question.items())
    assert report.majority_accuracy == pytest.approx(majority / 12)
    cold = evaluate_file(thinking, tmp_path / "own.json", CPU, sample=SamplingOptions(temperature=1e-6, num_samples=2))
    assert cold.accuracy == 1.0 and cold.pass_at_k == {1: 1.0, 2: 1.0}  # temperature -> 0 is greedy


def test_bad_input_gives_one_clear_line(capsys, run_dir, tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = nbs(capsys, "generate", tmp_path / "empty", "-q", "x")
    assert code == 2 and err.startswith("checkpoint error:") and "not a run folder, checkpoint or exported model" in err
    code, _, err = nbs(capsys, "generate", tmp_path / "missing", "-q", "x")
    assert code == 2 and "no such run folder" in err

    records = json.loads(tiny_data[1].read_text())
    del records[1]["answer"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    code, _, err = nbs(capsys, "eval", tmp_path / "empty", "--data", tmp_path / "bad.json")  # data checked first
    assert code == 2 and f"data error: {tmp_path / 'bad.json'}: record 1, field 'answer': missing" in err

    code, _, err = nbs(capsys, "eval", run_dir, "--data", tiny_data[1], "--temperature", "0.5", "--num-samples", "3")
    assert code == 2 and err.strip() == ("usage error: --temperature, --num-samples apply only with --sample "
                                         "(greedy decoding is the default)")
    code, _, err = nbs(capsys, "eval", run_dir, "--data", tiny_data[1], "--sample", "--temperature", "0")
    assert code == 2 and "temperature must be > 0" in err
    code, _, err = nbs(capsys, "generate", run_dir / "checkpoint_6" / "model.safetensors", "-q", "x")
    assert code == 2 and "need the run config" in err


def test_damaged_or_incomplete_checkpoints_are_refused(run_dir, tmp_path):
    copy = tmp_path / "checkpoint_6"
    shutil.copytree(run_dir / "checkpoint_6", copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: its SHA-256 differs"):
        load(copy)
    (copy / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load(copy)
    with pytest.raises(CheckpointError, match=r"checkpoint folders \(checkpoint_6\) are incomplete"):
        load(tmp_path)


def test_thought_counts_a_method_has_no_place_for_are_refused(thinking):
    from dataclasses import replace

    cot = replace(thinking, spec=replace(thinking.spec, use_markers=False, latent_slots=False), variant="cot", method="cot")
    with pytest.raises(InferenceError, match="num_thoughts=2: a cot model was trained without latent tokens"):
        cot.answer("q", num_thoughts=2)
    with pytest.raises(InferenceError, match="question 1 is empty"):
        thinking.answer(["a question", " "])


def test_a_checkpoint_whose_config_names_no_known_method_is_refused(capsys, run_dir, tiny_data, tmp_path):
    import hashlib

    copy = tmp_path / "checkpoint_6"
    shutil.copytree(run_dir / "checkpoint_6", copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("coconut: true", "coconut: false"))
    marker = json.loads((copy / "COMPLETE").read_text())  # a consistent marker: only the method is wrong
    marker["files"]["config.yaml"] = config.stat().st_size
    marker["sha256"]["config.yaml"] = hashlib.sha256(config.read_bytes()).hexdigest()
    (copy / "COMPLETE").write_text(json.dumps(marker))
    code, _, err = nbs(capsys, "eval", copy, "--data", tiny_data[1])
    assert code == 2 and err.startswith(f"config error: {config}: no method chosen: set exactly one of coconut, cot")


@pytest.mark.parametrize("method", [{"cot": True}, {"no_cot": True}, {"no_thoughts": True}, {"pause_token": True},
                                    {"coconut": True, "pause_as_thought": True}],
                         ids=["cot", "no_cot", "no_thoughts", "pause_token", "pause_as_thought"])
def test_every_methods_checkpoint_reproduces_its_runs_evaluation(tmp_path, tiny_data, method):
    from helpers import tiny_config

    from noblankslate.config import config_from_dict
    from noblankslate.train.loop import train

    raw = {**tiny_config(tmp_path, tiny_data, num_epochs=2), "coconut": False, **method}
    train(config_from_dict(raw), CPU)
    run = tmp_path / "runs" / "tiny"
    thinking = load(run)
    report = evaluate_file(thinking, tiny_data[1], CPU)
    assert [r["output"] for r in report.predictions] == [r["output"] for r in predictions(run / "predictions_epoch_2.jsonl")]
    export = tmp_path / "export"
    main(["export", str(run), str(export)])
    assert [a.output for a in load(export).answer(questions(tiny_data[1]))] == [
        a.output for a in thinking.answer(questions(tiny_data[1]))]
