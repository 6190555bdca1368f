"""nbs analyze: budget curve, decoded thoughts, latent search and interventions on tiny models whose
behaviour is known by construction."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import CPU, tiny_config

from noblankslate.analysis.budget import budget_curve
from noblankslate.analysis.interventions import derangement, interventions
from noblankslate.analysis.run import analyze, analyze_subject, side_by_side
from noblankslate.analysis.search import (
    heights,
    hop_sets,
    latent_search,
    leads_to,
    name_tokens,
    node_groups,
)
from noblankslate.analysis.subject import Subject, generate
from noblankslate.analysis.thoughts import decoded_thoughts
from noblankslate.cli import main
from noblankslate.config import config_from_dict
from noblankslate.data.curriculum import (
    prompt_features,
    prompt_latent_count,
    prompt_view,
    prompt_with_latents,
)
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.eval.setup import setup_run
from noblankslate.model.coconut import Coconut
from noblankslate.train.checkpoint import TrainState, save_checkpoint

PEOPLE = ["Tom", "Sam", "Rex", "Eva", "Max", "Fae"]
CONCEPTS = ["wumpus", "rempus", "gorpus", "zumpus", "lempus", "impus", "yumpus", "jompus"]


def fixed_length_records(n: int, offset: int) -> list[dict]:
    """Two-hop questions whose every name is one word-level token, so all questions have one length
    (the masking oracles below cut by column)."""
    records = []
    for k in range(n):
        m = k + offset
        person = PEOPLE[m % len(PEOPLE)]
        a, b, c, d = (CONCEPTS[(m + s) % len(CONCEPTS)] for s in (0, 1 + m % 3, 5, 6 + m % 2))
        records.append({
            "question": f"{person} is a {a}. Every {a} is a {b}. {person} is a {c}. Is {person} a {b} or {d}?",
            "steps": [f"{person} is a {a}.", f"Every {a} is a {b}."], "answer": f"{person} is a {b}.",
            "idx_to_symbol": [person, a, b, c, d], "edges": [[0, 1], [1, 2], [0, 3]], "root": 0, "target": 2,
            "neg_target": 4,
        })
    return records


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analysis")
    train, val = folder / "train.json", folder / "valid.json"
    train.write_text(json.dumps(fixed_length_records(24, 0)))
    val.write_text(json.dumps(fixed_length_records(10, 100)))
    raw = tiny_config(folder, (train, val), max_new_tokens=5, batch_size_eval=4,
                      model_config={"arch": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0})
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def setup(run_config):
    return setup_run(run_config)


def subject_of(setup, model=None, **changes) -> Subject:
    torch.manual_seed(0)
    subject = Subject(model=(model or setup.model).eval(), tokenizer=setup.tokenizer, examples=setup.val,
                      tokens=setup.val_tokens, spec=setup.spec, collate=setup.collate,
                      stage=setup.config.max_latent_stage + 1, method="coconut", batch_size=3, max_new_tokens=5)
    return replace(subject, **changes)


class AnswerIsTheText:
    """The run's tokenizer, with every generated text read as an answer ("#" + text), so that a tiny
    untrained model, which never writes "###", still has answers that can flip."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def batch_decode(self, sequences, **kwargs):
        return ["#" + text for text in self.tokenizer.batch_decode(sequences, **kwargs)]

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def cut_model(setup, mode: str, thoughts: int = 2) -> Coconut:
    """A random model of the run's shape whose attention is cut by column, so the thoughts' role is known.

    ``ignore``: no position after the first latent column sees a latent column, so the thoughts cannot
    reach the answer, which still reads the question. ``copy``: no position from the first latent column on
    sees the question or ``<|start-latent|>``, so the question reaches the answer only through thought 1
    (the hidden state at ``<|start-latent|>``), as in Coconut's bottleneck taken literally.
    """
    config = copy.deepcopy(setup.model.base_causallm.config)
    config.initializer_range = 0.3  # large random weights: the answer varies with what it reads
    torch.manual_seed(0)
    base = type(setup.model.base_causallm)(config)
    model = Coconut(base, setup.model.latent_token_id, setup.model.start_latent_id, setup.model.end_latent_id,
                    setup.model.eos_token_id).eval()
    body = base.base_model
    original = body.forward
    start = {}

    @functools.wraps(original)
    def forward(*args, inputs_embeds, attention_mask, **kwargs):
        first = attention_mask.shape[1] - inputs_embeds.shape[1]  # column of the first query
        if first == 0:  # the prefix pass: its length is the first latent column
            start["column"] = inputs_embeds.shape[1]
        else:
            attention_mask = attention_mask.clone()
            s = start["column"]
            if mode == "ignore":
                attention_mask[:, s : s + thoughts] = 0
            else:
                attention_mask[:, :s] = 0
        return original(*args, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    body.forward = forward
    return model


def test_prompts_with_j_latent_tokens_are_the_curriculum_prompts(setup):
    spec = setup.spec
    for tokens in setup.val_tokens:
        for stage in range(spec.max_latent_stage + 2):
            count = prompt_latent_count(tokens.n_steps, stage, spec)
            assert prompt_with_latents(tokens, count, spec) == prompt_features(tokens, stage, spec)
        empty = prompt_with_latents(tokens, 0, spec)["input_ids"]
        assert empty == [*tokens.question_ids, spec.start_id, spec.end_id]
        assert prompt_with_latents(tokens, 5, spec)["input_ids"].count(spec.latent_id) == 5


def test_budget_at_T_is_the_ordinary_evaluation(setup):
    subject = subject_of(setup)
    # the ordinary evaluation as the training loop runs it: all prompts at once, its own batch size
    loop = evaluate_generation(subject.model, setup.tokenizer, setup.val, prompt_view(setup.val_tokens, subject.stage, setup.spec),
                               setup.collate, batch_size=7, max_new_tokens=5, context=CPU).predictions
    ordinary = generate(subject, subject.ordinary_prompts())
    assert [r["output"] for r in ordinary] == [r["output"] for r in sorted(loop, key=lambda r: r["idx"])]
    curve = budget_curve(subject, ordinary, extra=2)
    assert curve["T"] == 2 and curve["T_per_item_uniform"] and curve["j_T_matches_ordinary"] is True
    assert [b["j"] for b in curve["budgets"]] == [0, 1, 2, 3, 4]
    at_T = curve["budgets"][2]
    assert at_T["accuracy"] == sum(r["correct"] for r in ordinary) / len(ordinary)
    assert at_T["mean_forward_passes"] == sum(r["forward_passes"] for r in ordinary) / len(ordinary)
    assert at_T["vs_ordinary"]["only_first"] == at_T["vs_ordinary"]["only_second"] == 0
    assert [item["predictions_at"][2] for item in curve["items"]] == [r["prediction"] for r in ordinary]
    # forward passes as alone: the prompt pass after j thoughts, j thought passes, one per further token
    for b in curve["budgets"]:
        assert b["mean_forward_passes"] == pytest.approx(b["j"] + b["mean_generated_tokens"] + 1, abs=1.0)


def test_budget_stops_where_the_positions_run_out(setup):
    subject = subject_of(setup)
    longest_at_3 = max(len(prompt_with_latents(t, 3, setup.spec)["input_ids"]) for t in setup.val_tokens)
    config = subject.model.base_causallm.config
    saved = config.n_positions
    try:
        config.n_positions = longest_at_3 + subject.max_new_tokens  # j = 3 fits, j = 4 does not
        curve = budget_curve(subject, generate(subject, subject.ordinary_prompts()), extra=2)
    finally:
        config.n_positions = saved
    assert [b["j"] for b in curve["budgets"]] == [0, 1, 2, 3]
    message = (f"j=4: a prompt of {longest_at_3 + 1} tokens + max_new_tokens 5 exceeds the "
               f"model's {longest_at_3 + 5} positions")
    assert curve["skipped"] == [message]


def test_exit_oracle_counts_items_right_before_T(setup):
    subject = subject_of(setup)
    ordinary = generate(subject, subject.ordinary_prompts())
    curve = budget_curve(subject, ordinary, extra=0)
    expected = sum(any(item["correct_at"][:2]) for item in curve["items"]) / len(curve["items"])
    assert curve["exit_oracle"]["share_right_before_T"] == expected


HAND_GRAPH = (8, [[0, 1], [0, 2], [1, 3], [2, 3], [3, 5], [1, 5], [6, 7]])


def test_frontier_grouping_on_a_hand_made_graph():
    n, edges = HAND_GRAPH  # 5 is 2 hops from the root 0 (via 1) and 3 hops (via 1 or 2, then 3)
    assert hop_sets(n, edges, 0, 3) == [{0}, {1, 2}, {3, 5}, {5}]
    assert node_groups(n, edges, 0, 1) == {"frontier": {1, 2}, "earlier": {0}, "later": {3, 5}, "unreachable": {4, 6, 7}}
    assert node_groups(n, edges, 0, 2) == {"frontier": {3, 5}, "earlier": {0, 1, 2}, "later": set(), "unreachable": {4, 6, 7}}
    assert node_groups(n, edges, 0, 3) == {"frontier": {5}, "earlier": {0, 1, 2, 3}, "later": set(), "unreachable": {4, 6, 7}}
    assert leads_to(n, edges, 5) == {0, 1, 2, 3, 5}
    shortest, longest = heights(n, edges)
    assert shortest == [2, 1, 2, 1, 0, 0, 1, 0]
    assert longest == [3, 2, 2, 1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="cycle"):
        heights(3, [[0, 1], [1, 2], [2, 0]])


def test_latent_search_masses_are_the_lm_head_probabilities(setup):
    subject = subject_of(setup)
    base = generate(subject, subject.ordinary_prompts(), keep_thoughts=True)
    search = latent_search(subject.model, setup.tokenizer, setup.val, base)
    assert search["items_with_graph"] == len(setup.val) and search["items_with_shared_name_tokens"] == 0
    example, record = setup.val[0], base[0]
    names = example.extra["idx_to_symbol"]
    with torch.no_grad():
        probs = torch.softmax(subject.model.lm_head(torch.from_numpy(record["thoughts"])), dim=-1)  # (T, V)
    value = [[float(sum(probs[t, tok] for tok in name_tokens(setup.tokenizer, name))) for name in names] for t in range(2)]
    # the graph 0->1->2, 0->3: thought 1's frontier is {1, 3}, thought 2's is {2}; node 4 is unreachable
    steps = search["items"][0]["steps"]
    assert steps[0]["mass"]["frontier"] == pytest.approx(value[0][1] + value[0][3])
    assert steps[0]["mass"]["later"] == pytest.approx(value[0][2])
    assert steps[1]["mass"]["earlier"] == pytest.approx(value[1][0] + value[1][1] + value[1][3])
    assert steps[1]["mass"]["unreachable"] == pytest.approx(value[1][4])
    assert steps[1]["target_value"] == pytest.approx(value[1][2])
    frontier = {node["name"]: node for node in steps[0]["frontier"]}
    assert frontier[names[1]]["leads_to_target"] and not frontier[names[3]]["leads_to_target"]
    assert frontier[names[1]]["height"] == 1 and frontier[names[3]]["height"] == 0
    assert len(name_tokens(setup.tokenizer, names[1])) == 2  # " wumpus" and "wumpus" are both words


def test_decoded_thoughts_top_tokens_and_norms(setup):
    subject = subject_of(setup)
    base = generate(subject, subject.ordinary_prompts(), keep_thoughts=True)
    decoded = decoded_thoughts(subject.model, setup.tokenizer, base, k=3)
    thought = torch.from_numpy(base[1]["thoughts"][1])
    with torch.no_grad():
        p, ids = torch.softmax(subject.model.lm_head(thought), -1).topk(3)
    second = decoded["items"][1]["thoughts"][1]
    assert second["t"] == 2 and second["norm"] == pytest.approx(float(thought.norm()), rel=1e-5)
    assert [token for token, _ in second["top"]] == [setup.tokenizer.decode([i]) for i in ids.tolist()]
    assert [q for _, q in second["top"]] == pytest.approx(p.tolist(), rel=1e-5)
    assert [s["t"] for s in decoded["per_step"]] == [1, 2]


def test_a_model_that_cannot_see_its_thoughts_never_flips(setup):
    subject = subject_of(setup, model=cut_model(setup, "ignore"), tokenizer=AnswerIsTheText(setup.tokenizer))
    base = generate(subject, subject.ordinary_prompts(), keep_thoughts=True)
    assert len({r["prediction"] for r in base}) > 3  # answers differ by question: pairing errors would show
    result = interventions(subject, base, scales=(0.5, 4.0), seed=1)
    assert {r["name"] for r in result["runs"]} == {"noise_0.5", "noise_4", "swap", "mean", "zero_1", "zero_2"}
    assert all(r["flips"] == 0 and r["flip_rate"] == 0.0 for r in result["runs"])


def test_a_model_that_reads_only_its_thoughts_flips_as_predicted(setup):
    subject = subject_of(setup, model=cut_model(setup, "copy"), tokenizer=AnswerIsTheText(setup.tokenizer))
    base = generate(subject, subject.ordinary_prompts(), keep_thoughts=True)
    answers = [r["prediction"] for r in base]
    assert len(set(answers)) > 3
    result = interventions(subject, base, scales=(4.0,), seed=1)
    runs = {r["name"]: r for r in result["runs"]}
    by_name = {name: [item[name] for item in result["items"]] for name in runs}
    partner = derangement(len(base), 1).tolist()
    # swapped thoughts: the answer is exactly the partner's (the question is out of reach)
    assert by_name["swap"] == [answers[p] for p in partner]
    assert runs["swap"]["flips"] == sum(answers[p] != a for p, a in zip(partner, answers)) > 0
    # the same thoughts for every item (the mean, or zero first thought): one answer for all
    assert len(set(by_name["mean"])) == 1 and len(set(by_name["zero_1"])) == 1
    assert runs["mean"]["flips"] > 0 and runs["zero_1"]["flips"] > 0 and runs["noise_4"]["flips"] > 0


def test_parts_that_do_not_apply_are_skipped_and_the_others_run(setup, tmp_path):
    pause = Coconut(setup.model.base_causallm, setup.model.latent_token_id, setup.model.start_latent_id,
                    setup.model.end_latent_id, setup.model.eos_token_id, feed_thoughts=False)
    report = analyze_subject(subject_of(setup, model=pause, method="pause_as_thought"), tmp_path / "pause",
                             scales=(1.0,), echo=lambda line: None)
    assert "budget" in report and set(report["skipped"]) == {"decoded", "search", "interventions"}
    assert "method pause_as_thought feeds no continuous thoughts" in report["skipped"]["interventions"]
    cot = analyze_subject(subject_of(setup, spec=replace(setup.spec, use_markers=False, latent_slots=False), stage=0, method="cot"),
                          tmp_path / "cot", echo=lambda line: None)
    assert cot["skipped"]["budget"].startswith("method cot puts no latent tokens in its prompts")
    bare = [replace(e, extra={}) for e in setup.val]
    lines = []
    full = analyze_subject(subject_of(setup, examples=bare), tmp_path / "full", scales=(1.0,), show=2,
                           echo=lines.append)
    assert set(full["skipped"]) == {"search"} and "idx_to_symbol, edges, root, target" in full["skipped"]["search"]
    assert {"budget", "decoded", "interventions"} <= set(full)
    written = json.loads((tmp_path / "full" / "analysis.json").read_text())
    assert written["ordinary"] == full["ordinary"]
    assert sorted(Path(p).name for p in full["figures"]) == ["analysis_budget.png", "analysis_interventions.png",
                                                            "analysis_norms.png"]
    assert any(line.startswith("skipped search: ") for line in lines)
    tables = (tmp_path / "full" / "analysis.md").read_text()
    assert "| j | accuracy |" in tables and "| swap |" in tables and "Skipped search: " in tables
    assert sum(line.startswith("--- item") for line in lines) == 2 and any("thought 2 |h|=" in l for l in lines)
    table = side_by_side([full, report, cot]).splitlines()
    assert table[2].startswith("| coconut |") and table[4].startswith("| cot |") and "| - |" in table[4]


@pytest.mark.slow
def test_nbs_analyze_on_a_saved_checkpoint(setup, run_config, tmp_path, capsys):
    config = replace(run_config, save_path=str(tmp_path / "runs"))
    save_checkpoint(config.run_dir, 3, model_state=setup.model.state_dict(), optimizer_state=None, rng_state=None,
                    train_state=TrainState(epoch=3, stage=3, global_step=0), config=config, tokenizer=setup.tokenizer)
    config_file = tmp_path / "config.yaml"
    config.save(config_file)
    out = tmp_path / "out"
    assert main(["analyze", str(config_file), "--out", str(out), "--limit", "4", "--show", "1"]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["checkpoint"].endswith("checkpoint_3") and report["items"] == 4 and report["stage"] == 3
    assert {"budget", "decoded", "search", "interventions"} <= set(report)
    for name in ("analysis_budget.png", "analysis_search_mass.png", "analysis_search_value.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "coconut at stage 3: 4 items" in printed and "--- item 0" in printed
    assert main(["analyze", str(config_file), "--limit", "2", "--beside", str(out / "analysis.json")]) == 0
    default_out = Path(config.run_dir) / "analysis_checkpoint_3"
    table = (default_out / "side_by_side.md").read_text().splitlines()
    assert len(table) == 4 and all(line.startswith("| coconut |") for line in table[2:])
    capsys.readouterr()
    assert main(["analyze", str(config_file), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert f"analysis error: {tmp_path / 'nowhere'}: not a checkpoint folder" in capsys.readouterr().err


def test_a_cot_checkpoint_gets_its_ordinary_evaluation_and_the_reasons_for_the_rest(run_config, tmp_path):
    config = replace(run_config, coconut=False, cot=True, save_path=str(tmp_path / "runs"))
    cot = setup_run(config)
    folder = save_checkpoint(config.run_dir, 1, model_state=cot.model.base_causallm.state_dict(), optimizer_state=None,
                             rng_state=None, train_state=TrainState(epoch=1, stage=0, global_step=0), config=config, tokenizer=cot.tokenizer)
    report = analyze(config, folder, out=tmp_path / "out", limit=3, echo=lambda line: None)
    assert report["method"] == "cot" and report["ordinary"]["n"] == 3 and report["ordinary"]["T"] == 0
    assert set(report["skipped"]) == {"budget", "decoded", "search", "interventions"}
    assert "feeds no continuous thoughts" in report["skipped"]["decoded"]
    assert report["figures"] == []


def test_nbs_analyze_without_a_checkpoint_says_what_to_pass(run_config, tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    replace(run_config, save_path=str(tmp_path / "empty")).save(config_file)
    assert main(["analyze", str(config_file)]) == 2
    assert "analysis error: nothing to analyse: pass --checkpoint" in capsys.readouterr().err
    assert main(["analyze", str(config_file), "--checkpoint", str(tmp_path), "--limit", "0"]) == 2
    assert "analysis error: --limit must be >= 1, got 0" in capsys.readouterr().err
