"""nbs experiment: every Table 1 row runs, the table has the right shape, reruns skip, errors are clear."""

import json

import pytest
import yaml

from noblankslate.cli import main
from noblankslate.data.balanced import BalancedConfig, generate_balanced
from noblankslate.eval.paired import mcnemar_exact_p, paired_comparison
from noblankslate.experiment import (
    ROWS,
    ExperimentError,
    parse_rows,
    parse_seeds,
    run_experiment,
)


def test_mcnemar_on_known_tables():
    # b=10, c=2: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(6, 0) == pytest.approx(2 / 64)


def test_paired_comparison_counts_and_interval():
    first = [True] * 6 + [False] * 2 + [True] * 2
    second = [False] * 6 + [True] * 2 + [True] * 2
    c = paired_comparison(first, second)
    assert (c.n, c.only_first, c.only_second, c.first_correct, c.second_correct) == (10, 6, 2, 8, 4)
    assert c.difference == pytest.approx(0.4)
    se = ((6 + 2 - 4 ** 2 / 10) ** 0.5) / 10
    assert c.ci95 == pytest.approx((0.4 - 1.96 * se, 0.4 + 1.96 * se))
    assert c.p_value == pytest.approx(mcnemar_exact_p(6, 2))
    with pytest.raises(ValueError, match="same items"):
        paired_comparison([True], [True, False])


def test_row_and_seed_parsing():
    assert [r.name for r in parse_rows(None)] == list(ROWS)
    assert [r.name for r in parse_rows("coconut,no_cot")] == ["coconut", "no_cot"]
    with pytest.raises(ValueError, match="unknown row 'cocunut'.*no_cot, cot, coconut"):
        parse_rows("cocunut")
    assert parse_seeds("0-2") == [0, 1, 2] and parse_seeds("3,1") == [3, 1]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("a")


def test_every_row_sets_exactly_one_method():
    from noblankslate.config import config_from_dict

    for row in ROWS.values():
        raw = {"coconut": True, "max_latent_stage": 2}
        for text in row.overrides():
            key, value = text.split("=")
            raw[key] = value == "true"
        assert config_from_dict(raw).variant == {"no_curriculum": "coconut_no_curriculum"}.get(row.name, row.name)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    task = BalancedConfig(branches=(1, 2), distance=(1, 2))
    train = generate_balanced(32, seed=0, config=task)
    valid = generate_balanced(8, seed=1, config=task, exclude_questions={e["question"] for e in train})
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "valid.json").write_text(json.dumps(valid))
    config = {
        "coconut": True, "c_thought": 1, "epochs_per_stage": 1, "max_latent_stage": 1, "num_epochs": 2,
        "batch_size_training": 8, "lr": 1e-3, "max_new_tokens": 12, "train_path": str(folder / "train.json"),
        "val_path": str(folder / "valid.json"),
        "model_config": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "max_positions": 128},
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    out = folder / "out"
    messages = []
    outputs = run_experiment(path, parse_rows(None), [0], out, parallel=2, threads=1, echo=messages.append)
    return path, out, outputs, messages


@pytest.mark.slow
def test_every_row_runs_and_the_table_has_one_row_per_method(tiny_experiment):
    _, out, outputs, messages = tiny_experiment
    table = json.loads((out / "table.json").read_text())
    assert [r["row"] for r in table["rows"]] == list(ROWS)
    assert table["equal_optimizer_steps"] and table["optimizer_steps"] == [8]  # 32 examples / 8, 2 epochs
    for row in table["rows"]:
        assert set(row) >= {"label", "accuracy_mean", "accuracy_std", "accuracy", "mean_generated_tokens",
                            "mean_forward_passes", "optimizer_steps", "paper_prosqa_gpt2"}
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0
        if row["row"] == "coconut":
            assert "coconut_vs_row" not in row
        else:
            pooled = row["coconut_vs_row"]["pooled"]
            assert pooled["n"] == 8 and 0.0 <= pooled["p_value"] <= 1.0
    by_row = {r["row"]: r for r in table["rows"]}
    assert set(by_row["coconut"]["accuracy_by_steps"]) == {"1", "2"}  # the tiny task has 1-2 hops
    assert "Accuracy by the question's number of reasoning steps" in outputs.markdown.read_text()
    # Thoughts cost forward passes; answer-only rows make none beyond their tokens.
    assert by_row["coconut"]["mean_forward_passes"] > by_row["no_cot"]["mean_forward_passes"] - 1e-9
    markdown = outputs.markdown.read_text()
    main_table = markdown.split("\n\n")[0]
    lines = [line for line in main_table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(ROWS)  # the header and one line per row
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "McNemar" in markdown and "(reference)" in markdown
    assert outputs.figure.stat().st_size > 0
    assert sum("started" in m for m in messages) == len(ROWS)


@pytest.mark.slow
def test_a_rerun_skips_finished_rows_and_resumes_unfinished_ones(tiny_experiment):
    path, out, _, _ = tiny_experiment
    before = json.loads((out / "results" / "cot_seed0.json").read_text())
    (out / "results" / "cot_seed0.json").unlink()  # as if the experiment was killed after the run's last epoch
    messages = []
    again = run_experiment(path, parse_rows("no_cot,cot,coconut"), [0], out, parallel=2, threads=1, echo=messages.append)
    assert sum("skipped" in m for m in messages) == 2
    assert any(m.startswith("cot_seed0: started (resuming") for m in messages)
    after = json.loads((out / "results" / "cot_seed0.json").read_text())
    assert after["items"] == before["items"] and after["accuracy"] == before["accuracy"]
    # the table still holds the four rows this call did not ask for, finished by the first call
    assert [r["row"] for r in again.table["rows"]] == list(ROWS)
    assert "| Coconut w/o thought |" in again.markdown.read_text()


@pytest.mark.slow
def test_the_table_leaves_out_earlier_runs_made_with_another_config(tiny_experiment):
    path, out, _, _ = tiny_experiment
    stored = out / "results" / "pause_token_seed0.json"
    original = stored.read_text()
    changed = json.loads(original)
    changed["config"]["lr"] = 5e-4
    stored.write_text(json.dumps(changed))
    try:
        messages = []
        again = run_experiment(path, parse_rows("coconut"), [0], out, echo=messages.append)
    finally:
        stored.write_text(original)
    assert "pause_token_seed0: made with another config, left out of the table" in messages
    assert [r["row"] for r in again.table["rows"]] == [name for name in ROWS if name != "pause_token"]


def test_results_made_with_another_config_are_not_reused(tiny_experiment):
    path, out, _, _ = tiny_experiment
    with pytest.raises(ExperimentError, match="different config.*lr"):
        run_experiment(path, parse_rows("coconut"), [0], out, overrides=["lr=2e-3"], echo=lambda m: None)


def test_a_key_added_to_the_config_later_does_not_invalidate_results(tiny_experiment):
    path, out, _, _ = tiny_experiment
    result_file = out / "results" / "no_cot_seed0.json"
    stored = json.loads(result_file.read_text())
    del stored["config"]["retrieval"]["temperature"]  # as written before the key existed, at its default
    result_file.write_text(json.dumps(stored))
    messages = []
    run_experiment(path, parse_rows("no_cot"), [0], out, echo=messages.append)
    assert messages[-1].startswith("no_cot_seed0: done before")
    stored["config"]["retrieval"]["k"] = 9
    result_file.write_text(json.dumps(stored))
    with pytest.raises(ExperimentError, match=r"retrieval\.k differ"):
        run_experiment(path, parse_rows("no_cot"), [0], out, echo=lambda m: None)


def test_cli_errors(tiny_experiment, capsys, tmp_path):
    path, _, _, _ = tiny_experiment
    assert main(["experiment", str(path), "--rows", "coconut,pause", "--out", str(tmp_path)]) == 2
    assert "unknown row 'pause'" in capsys.readouterr().err
    assert main(["experiment", str(path), "lr=fast", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "lr" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("valid.json", "missing.json"))
    assert main(["experiment", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "x" / "runs").exists()  # nothing started
