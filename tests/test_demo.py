"""The demo pipeline end to end on a tiny setting: data, curriculum, memory at the end, table, plots."""

from __future__ import annotations

import json

import pytest
import yaml

from noblankslate.demo import DemoData, run_demo


def test_demo_pipeline_writes_its_table_and_plots(tmp_path, capsys):
    config = {
        "name": "demo", "coconut": True, "c_thought": 1, "epochs_per_stage": 1, "max_latent_stage": 1,
        "pad_latent_to_max": True, "batch_size_training": 8, "num_epochs": 2, "lr": 1e-3, "max_new_tokens": 6,
        "model_config": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
        "retrieval": {"enabled": True, "correct_only": False, "key_dim": 8},
        "nudge": {"exit_threshold": 0.5, "exit_metric": "stability"},
    }
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    rows = run_demo(tmp_path / "out", tmp_path / "demo.yaml", DemoData(train_examples=40, valid_examples=10))
    assert [row["method"] for row in rows] == ["stage 0 = written chain (epoch 1)", "Coconut (stage 1, epoch 2)",
                                               "Coconut + memory (nudge)", "Coconut + memory (nudge + exit)",
                                               "control: thoughts replaced (alpha 1)"]
    for row in rows[2:]:  # each memory row paired with Coconut on the same 10 items
        paired = row["paired_vs_coconut"]
        assert paired["difference"] == (paired["only_first"] - paired["only_second"]) / 10
        assert row["accuracy"] - rows[1]["accuracy"] == pytest.approx(paired["difference"])
    run_dir = tmp_path / "out" / "demo"
    assert json.loads((tmp_path / "out" / "demo_table.json").read_text()) == rows
    assert (run_dir / "curves.png").is_file() and (run_dir / "retrieval.png").is_file()
    assert not (run_dir / "retrieval_metrics_epoch_1.json").exists()  # the memory only after the last epoch
    assert (run_dir / "retrieval_metrics_epoch_2.json").is_file()
    train = json.loads((tmp_path / "out" / "data" / "train.json").read_text())
    valid = json.loads((tmp_path / "out" / "data" / "valid.json").read_text())
    assert len(train) == 40 and len(valid) == 10
    assert not {e["question"] for e in train} & {e["question"] for e in valid}
    out = capsys.readouterr().out
    assert "Coconut + memory (nudge + exit)" in out and "demo finished" in out
    assert "vs Coconut: b/c, p" in out and "control: thoughts replaced (alpha 1)" in out
