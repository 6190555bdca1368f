"""Two CPU processes (gloo, torchrun) against one process with the same global batch.

Tolerance: per-step training losses within 1e-5 relative. The loss of a step weights every labelled
token of the global batch equally, so the split over ranks changes only the float summation order.
Evaluation must score each validation example exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_script

from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
from noblankslate.train.track import read_metrics


def _step_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run_dir) if r["event"] == "step"]


def _epochs(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["event"] == "epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    config = ProsQAConfig.small(concepts=(3, 4), distance=(2, 2))
    train = generate_prosqa(48, seed=0, config=config)
    valid = generate_prosqa(13, seed=1, config=config)  # odd: ranks get 7 and 6 examples
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "valid.json").write_text(json.dumps(valid))
    raw = {
        "save_path": str(tmp_path / "runs"), "coconut": True, "c_thought": 1, "epochs_per_stage": 1,
        "max_latent_stage": 2, "pad_latent_to_max": True, "train_path": str(tmp_path / "train.json"),
        "val_path": str(tmp_path / "valid.json"), "num_epochs": 2, "lr": 1e-3, "max_new_tokens": 6,
        "parallel": parallel, "model_config": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_script(path, "name=two", "batch_size_training=4", processes=2)
    run_script(path, "name=one", "batch_size_training=8")

    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    losses_one, losses_two = _step_losses(one), _step_losses(two)
    assert len(losses_one) == len(losses_two) == 12
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    for epoch_one, epoch_two in zip(_epochs(one), _epochs(two)):
        assert epoch_two["total"] == epoch_one["total"] == 13
        assert epoch_two["val_loss"] == pytest.approx(epoch_one["val_loss"], rel=1e-5)
    predictions = (two / "predictions_epoch_2.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["idx"] for line in predictions) == list(range(13))
    assert (two / "checkpoint_2" / "model.safetensors").is_file()
