"""Checkpoints: exact round trips, resumable optimizer and RNG, atomic saves, numeric ordering."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2, wrap
from safetensors import safe_open

from noblankslate.config import Config, config_from_dict
from noblankslate.model import weights
from noblankslate.model.tokenizer import build_word_tokenizer
from noblankslate.model.weights import load_into
from noblankslate.train import checkpoint as ckpt
from noblankslate.train.checkpoint import (
    CheckpointError,
    TrainState,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

CONFIG = Config(coconut=True, name="unit", lr=3e-4)


def batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return [torch.randint(0, 60, (2, 8), generator=generator) for _ in range(n)]


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[torch.Tensor]) -> None:
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save(run_dir, epoch, model=None, **overrides):
    model = model if model is not None else tiny_gpt2()
    kwargs = dict(model_state=model.state_dict(), optimizer_state=None, rng_state=None,
                  train_state=TrainState(epoch=epoch, stage=epoch, global_step=0), config=CONFIG)
    kwargs.update(overrides)
    return save_checkpoint(run_dir, epoch, **kwargs)


def test_round_trip_and_resumed_optimizer_matches_uninterrupted_run(tmp_path):
    data = batches(4)
    model = tiny_gpt2(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer, data[:2])
    train_state = TrainState(epoch=2, stage=1, global_step=2, best_accuracy=0.5)
    folder = save_checkpoint(tmp_path, 2, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                             rng_state=capture_rng_state(), train_state=train_state, config=CONFIG)
    assert folder == tmp_path / "checkpoint_2"

    data_back = load_checkpoint(folder)
    assert data_back.epoch == 2 and data_back.train_state == train_state
    assert config_from_dict(data_back.config) == CONFIG
    assert data_back.model_state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(data_back.model_state[key], value), key

    train_steps(model, optimizer, data[2:])  # the uninterrupted run
    resumed = tiny_gpt2(seed=2)
    load_into(resumed, data_back.model_state, into="causallm")
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=5.0)  # hyperparameters come from the state
    resumed_optimizer.load_state_dict(data_back.optimizer_state)
    train_steps(resumed, resumed_optimizer, data[2:])
    for (name, want), got in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(got, want), name


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    trained = wrap(tiny_gpt2(seed=1))
    folder = save(tmp_path, 1, trained)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    assert "base_causallm.transformer.wte.weight" in stored and "base_causallm.lm_head.weight" not in stored

    state = load_checkpoint(folder).model_state
    assert state["base_causallm.lm_head.weight"] is state["base_causallm.transformer.wte.weight"]
    fresh = wrap(tiny_gpt2(seed=2))
    fresh.load_state_dict(state, strict=True)  # the state dict has every key model.state_dict() has
    base = fresh.base_causallm
    assert base.lm_head.weight is base.transformer.wte.weight
    assert torch.equal(base.lm_head.weight, trained.base_causallm.transformer.wte.weight)


def test_views_of_one_storage_are_copied_not_aliased(tmp_path):
    storage = torch.arange(12.0)
    weights.save_state_dict({"a": storage[:6].view(2, 3), "b": storage[6:].view(2, 3), "c": storage[:6].view(2, 3)},
                            tmp_path / "m.safetensors")
    state = weights.read_state_dict(tmp_path / "m.safetensors")
    assert torch.equal(state["b"], torch.arange(6.0, 12.0).view(2, 3))
    assert state["c"] is state["a"]


def test_config_and_tokenizer_are_saved(tmp_path):
    tokenizer = build_word_tokenizer(["one two three"])
    folder = save(tmp_path, 1, tokenizer=tokenizer)
    data = load_checkpoint(folder)
    assert data.config["lr"] == 3e-4 and data.config["coconut"] is True
    assert data.tokenizer_dir == folder / "tokenizer" and (folder / "tokenizer" / "tokenizer.json").is_file()
    assert data.optimizer_state is None and data.rng_state is None


def test_rng_restore_reproduces_draws():
    def draw():
        return torch.rand(4), [random.random() for _ in range(3)], np.random.rand(3), random.gauss(0, 1)

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    random.gauss(0, 1), np.random.randn()  # leave a cached gaussian in both states
    state = capture_rng_state()
    first = draw()
    restore_rng_state(state)
    second = draw()
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and first[3] == second[3]
    assert np.array_equal(first[2], second[2])


def test_rng_state_survives_the_checkpoint(tmp_path):
    model = tiny_gpt2()  # seeds torch itself, so built first
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    state = capture_rng_state()
    folder = save(tmp_path, 1, model, rng_state=state)
    expected = (torch.randn(3), random.random(), np.random.randn(2))
    restore_rng_state(load_checkpoint(folder).rng_state)  # read with weights_only=True
    assert torch.equal(torch.randn(3), expected[0]) and random.random() == expected[1]
    assert np.array_equal(np.random.randn(2), expected[2])


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    good = save(tmp_path, 1, tiny_gpt2(seed=1))

    def crash(state_dict, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_state_dict", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1"]
    state = load_checkpoint(good).model_state
    assert torch.equal(state["transformer.wte.weight"], tiny_gpt2(seed=1).transformer.wte.weight)


def test_failed_replacement_of_same_epoch_keeps_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_gpt2(seed=1)
    save(tmp_path, 3, old)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # after moving the old checkpoint aside, before moving the new one in
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        save(tmp_path, 3, tiny_gpt2(seed=2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_3"]
    state = load_checkpoint(tmp_path / "checkpoint_3").model_state
    assert torch.equal(state["transformer.wte.weight"], old.transformer.wte.weight)


def test_rerun_replaces_checkpoint(tmp_path):
    save(tmp_path, 3, tiny_gpt2(seed=1))
    new = tiny_gpt2(seed=2)
    save(tmp_path, 3, new, train_state=TrainState(epoch=3, stage=9, global_step=1))
    data = load_checkpoint(tmp_path / "checkpoint_3")
    assert data.train_state == TrainState(epoch=3, stage=9, global_step=1)
    assert torch.equal(data.model_state["transformer.wte.weight"], new.transformer.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_3"]


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    save(tmp_path, 1)
    half = tmp_path / ".checkpoint_2.tmp-abcd"  # a process killed mid-save leaves this
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    incomplete = tmp_path / "checkpoint_5"  # no COMPLETE marker: not a checkpoint
    incomplete.mkdir()
    aside = tmp_path / ".checkpoint_4.old-1234"  # killed between the two renames of a replacing save
    real = save(tmp_path / "other", 4)
    os.rename(real, aside)

    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_1"
    save(tmp_path, 2)
    assert not half.exists() and not aside.exists()
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [1, 2, 4]  # checkpoint_4 put back
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_4"


def test_latest_is_numeric_and_skips_other_names(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for epoch in (2, 9, 10):
        save(tmp_path, epoch)
    (tmp_path / "checkpoint_11").mkdir()
    (tmp_path / "checkpoint_final").mkdir()
    (tmp_path / "checkpoint_12.bak").mkdir()
    (tmp_path / "checkpoint_13").write_text("not a folder")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_10"


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    folder = save(tmp_path, 1)
    model_file = folder / "model.safetensors"
    content = model_file.read_bytes()

    model_file.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, \d+ when saved \(truncated"):
        load_checkpoint(folder)

    model_file.write_bytes(b"\xff" * len(content))  # same size, garbage: caught by the recorded digest
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its SHA-256 differs"):
        load_checkpoint(folder)

    model_file.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(folder)

    (folder / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "checkpoint_7")


def test_train_state_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save(tmp_path, 1, train_state=TrainState(epoch=1, stage=0, global_step=0, epoch_loss=[object()], step_in_epoch=1))
    assert not any(tmp_path.iterdir())


def test_state_json_records_epoch_and_the_typed_train_state(tmp_path):
    folder = save(tmp_path, 6, train_state=TrainState(epoch=6, stage=2, global_step=60))
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 6
    assert state["train_state"] == {"epoch": 6, "stage": 2, "global_step": 60, "best_accuracy": 0.0}
    mid = TrainState(epoch=6, stage=2, global_step=63, step_in_epoch=3, epoch_loss=[1.0, 0.5, 0.25])
    assert TrainState.from_dict(mid.to_dict(), folder) == mid


@pytest.mark.parametrize(("raw", "message"), [
    ({"stage": 1, "global_step": 2}, "train_state lacks 'epoch'"),
    ({"epoch": 1, "stage": "one", "global_step": 2}, "train_state.stage is 'one', expected int"),
    ({"epoch": 1, "stage": 1, "global_step": 2, "wall": 3}, "unknown fields \\['wall'\\]"),
    ({"epoch": 1, "stage": 1, "global_step": 2, "epoch_loss": "x"}, "epoch_loss must be a list"),
    ([1, 2], "train_state is list"),
])
def test_a_bad_train_state_names_the_field(tmp_path, raw, message):
    with pytest.raises(CheckpointError, match=message):
        TrainState.from_dict(raw, tmp_path / "state.json")


def test_extra_states_round_trip_beside_the_model(tmp_path):
    from noblankslate.config import Config

    heads = {"key.weight": torch.randn(4, 8), "key.bias": torch.randn(4)}
    save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, optimizer_state=None, rng_state=None,
                    train_state=TrainState(epoch=1, stage=0, global_step=0), config=Config(coconut=True), extra_states={"nudge_heads": heads})
    data = load_checkpoint(tmp_path / "checkpoint_1")
    assert set(data.model_state) == {"w"}
    assert torch.equal(data.extra_states["nudge_heads"]["key.weight"], heads["key.weight"])
    with pytest.raises(CheckpointError, match="extra state name"):
        save_checkpoint(tmp_path, 2, model_state={"w": torch.ones(2)}, optimizer_state=None, rng_state=None,
                        train_state=TrainState(epoch=1, stage=0, global_step=0), config=Config(coconut=True), extra_states={"model": heads})


def test_a_flipped_byte_of_the_same_size_is_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    save_checkpoint(tmp_path, 1, model_state=model.state_dict(), optimizer_state=None, rng_state=None,
                    train_state=TrainState(epoch=1, stage=0, global_step=0), config=Config(coconut=True))
    weights = tmp_path / "checkpoint_1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes: same size, different weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: its SHA-256 differs"):
        load_checkpoint(tmp_path / "checkpoint_1")


def test_saved_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        model = torch.nn.Linear(4, 3)
        save_checkpoint(tmp_path, 1, model_state=model.state_dict(), optimizer_state=None, rng_state=None,
                        train_state=TrainState(epoch=1, stage=0, global_step=0), config=Config(coconut=True))
    finally:
        os.umask(old)
    for path in (tmp_path / "checkpoint_1").rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_stray_file_with_a_checkpoints_name_is_refused_before_any_work(tmp_path, tiny_data, capsys):
    import yaml
    from helpers import tiny_config

    from noblankslate.cli import main

    raw = tiny_config(tmp_path, tiny_data, num_epochs=2)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_2").write_text("notes")
    assert main(["train", str(config_file)]) == 2
    assert "checkpoint_2 is not a checkpoint folder" in capsys.readouterr().err
    assert not (run_dir / "checkpoint_1").exists() and (run_dir / "checkpoint_2").read_text() == "notes"
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        save_checkpoint(run_dir, 2, model_state={"w": torch.ones(1)}, optimizer_state=None, rng_state=None,
                        train_state=TrainState(epoch=1, stage=0, global_step=0), config=Config(coconut=True))
    assert (run_dir / "checkpoint_2").read_text() == "notes"


def test_a_checkpoints_stage_comes_from_the_state_else_from_the_schedule_of_the_epoch_it_ends():
    """One reader for analysis and inference: the recorded stage wins; an older state.json without it gets
    the stage of the epoch it ends (epoch checkpoint) or is in (mid-epoch checkpoint)."""
    from noblankslate.config import Config
    from noblankslate.model.checkpoint_files import checkpoint_position

    config = Config(coconut=True, epochs_per_stage=2, max_latent_stage=3, num_epochs=10)
    assert checkpoint_position({"epoch": 4, "train_state": {"stage": 1}}, config)[1] == 1
    assert checkpoint_position({"epoch": 4, "train_state": {}}, config)[1] == 1  # ends epoch 4 (index 3): stage 1
    assert checkpoint_position({"epoch": 4, "train_state": {"step_in_epoch": 5}}, config)[1] == 2  # inside epoch 5
    assert checkpoint_position({"epoch": 9}, config)[1] == 4  # past max_latent_stage


def test_every_evaluating_entry_point_reads_a_weights_paths_stage_by_one_rule(tmp_path):
    """state.json first, then an original-code ``checkpoint_E`` name, then the config's last scheduled
    epoch (final stage for Coconut, stage 0 for CoT); a damaged state.json is a named error."""
    from noblankslate.config import Config
    from noblankslate.model.checkpoint_files import CheckpointError, EvaluatedPosition, evaluated_position

    coconut = Config(coconut=True, epochs_per_stage=2, max_latent_stage=3, num_epochs=10)
    folder = tmp_path / "checkpoint_3"
    folder.mkdir()
    (folder / "state.json").write_text('{"epoch": 3, "train_state": {"stage": 1}}')
    assert evaluated_position(folder, coconut) == EvaluatedPosition(3, 1, str(folder / "state.json"))
    original = tmp_path / "checkpoint_5"
    original.write_bytes(b"weights")
    position = evaluated_position(original, coconut)
    assert (position.epoch, position.stage, position.source) == (5, 2, "the name checkpoint_5")
    exported = tmp_path / "model.safetensors"
    exported.write_bytes(b"weights")
    assert (evaluated_position(exported, coconut).epoch, evaluated_position(exported, coconut).stage) == (None, 4)
    assert evaluated_position(exported, Config(cot=True, num_epochs=10)).stage == 0
    (folder / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint_3/state.json: cannot parse"):
        evaluated_position(folder, coconut)
