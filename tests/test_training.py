"""The training loop end to end on tiny runs: resume after a kill, accumulation, methods, eval-only."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CPU, tiny_config
from safetensors.torch import load_file

from noblankslate.config import config_from_dict
from noblankslate.train.loop import Trainer, train
from noblankslate.train.track import read_metrics

ROOT = Path(__file__).resolve().parents[1]
def final_weights(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"checkpoint_{epoch}" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_data):
    """SIGKILL a real run as soon as its first checkpoint appears; started again it must reach exactly
    the weights of a run that was never interrupted (dropout on, so RNG state must be restored too)."""
    raw = tiny_config(tmp_path, tiny_data, num_epochs=4)
    train(config_from_dict({**raw, "name": "straight"}), CPU)

    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump({**raw, "name": "killed"}))
    run_dir = tmp_path / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "run.py"), str(config_path)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint_1").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "checkpoint_4").exists(), "the run finished before it could be killed"

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_same_weights(final_weights(run_dir, 4), final_weights(tmp_path / "runs" / "straight", 4))
    # metrics.jsonl holds each step and epoch once, with the uninterrupted run's values
    from noblankslate.train.track import read_metrics

    def steps_and_epochs(folder):
        records = read_metrics(folder)
        return ([(r["step"], r["train_loss"]) for r in records if r["event"] == "step"],
                [r["epoch"] for r in records if r["event"] == "epoch"])
    assert steps_and_epochs(run_dir) == steps_and_epochs(tmp_path / "runs" / "straight")


def _step_gradients(raw: dict) -> list[dict[str, torch.Tensor]]:
    """Run one epoch and record the gradient the optimizer sees at every step."""
    trainer = Trainer(config_from_dict(raw), CPU)
    recorded = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        recorded.append({n: p.grad.clone() for n, p in trainer.parallel.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.run()
    return recorded


def test_gradient_accumulation_equals_the_large_batch(tmp_path, tiny_data):
    """Batch 4 x 2 accumulation steps (with a partial last group: 44 examples) gives, step by step, the
    gradient of batch 8: the same examples per step, every labelled token weighted equally."""
    examples = json.loads(tiny_data[0].read_text())[:44]
    (tmp_path / "train44.json").write_text(json.dumps(examples))
    base = tiny_config(tmp_path, tiny_data, num_epochs=1, train_path=str(tmp_path / "train44.json"))
    base["model_config"]["dropout"] = 0.0
    large = _step_gradients({**base, "name": "large", "batch_size_training": 8})
    accum = _step_gradients({**base, "name": "accum", "batch_size_training": 4, "gradient_accumulation_steps": 2})
    assert len(large) == len(accum) == 6
    for step, (a, b) in enumerate(zip(accum, large)):
        for name in b:
            scale = float(b[name].abs().max()) or 1.0
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5 * scale, msg=f"step {step}: {name}")


@pytest.mark.parametrize(
    "method, expect",
    [
        ({"coconut": True}, {"stages": [0, 1], "thoughts": True}),
        ({"coconut": True, "no_curriculum": True}, {"stages": [3, 3], "thoughts": True}),
        ({"coconut": True, "pause_as_thought": True}, {"stages": [0, 1], "thoughts": False}),
        ({"coconut": False, "pause_token": True}, {"stages": [3, 3], "thoughts": False}),
        ({"coconut": False, "cot": True}, {"stages": [0, 0], "thoughts": False}),
        ({"coconut": False, "no_cot": True}, {"stages": [0, 0], "thoughts": False}),
        ({"coconut": False, "no_thoughts": True}, {"stages": [0, 1], "thoughts": False}),
    ],
    ids=["coconut", "no_curriculum", "pause_as_thought", "pause_token", "cot", "no_cot", "no_thoughts"],
)
def test_every_method_trains_and_evaluates(tmp_path, tiny_data, method, expect):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=2, **method)
    results = train(config_from_dict(raw), CPU)
    assert [r.stage for r in results] == expect["stages"]
    for r in results:
        e = r.evaluation
        assert e.total == 12 and r.train_loss == r.train_loss  # every example scored once, loss not NaN
        # per example: thoughts + 1 prompt pass + one pass per further token (one fewer when the row hit
        # max_new_tokens instead of eos), so the mean surplus lies in [-1, 0]
        thoughts = min(r.stage, raw["max_latent_stage"]) if expect["thoughts"] else 0
        surplus = (e.forward_passes - e.total * (thoughts + 1) - e.generated_tokens) / e.total
        assert -1.0 <= surplus <= 0.0
    records = read_metrics(tmp_path / "runs" / "tiny")
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    predictions = (tmp_path / "runs" / "tiny" / "predictions_epoch_2.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["idx"] for line in predictions) == list(range(12))


def test_only_eval_reproduces_the_checkpoint_accuracy(tmp_path, tiny_data):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=2)
    trained = train(config_from_dict(raw), CPU)
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint_2"
    evaluated = train(config_from_dict({**raw, "name": "eval", "only_eval": True, "resume": 1,
                                        "load_model_path": str(checkpoint)}), CPU)
    assert len(evaluated) == 1 and evaluated[0].stage == trained[-1].stage
    assert [p["output"] for p in evaluated[0].evaluation.predictions] == [p["output"] for p in trained[-1].evaluation.predictions]
    assert not (tmp_path / "runs" / "eval" / "checkpoint_2").exists()


def test_debug_writes_nothing(tmp_path, tiny_data):
    train(config_from_dict(tiny_config(tmp_path, tiny_data, num_epochs=1, debug=True)), CPU)
    assert not (tmp_path / "runs").exists()


def test_bad_data_stops_before_any_model_is_built(tmp_path, tiny_data):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "a", "steps": ["s"]}, {"question": "q", "steps": "s"}]))
    from noblankslate.data.schema import DataError

    with pytest.raises(DataError, match=r"bad.json: record 1, field 'answer': missing"):
        train(config_from_dict(tiny_config(tmp_path, tiny_data, train_path=str(bad))), CPU)


def test_lr_schedule_factors():
    from noblankslate.train.loop import lr_factor

    assert [lr_factor(s, 100, "constant", 10) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, "cosine", 10) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warmup
    assert lr_factor(10, 100, "cosine", 10) == 1.0 and lr_factor(55, 100, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine", 10) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_is_applied_per_step(tmp_path, tiny_data):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=2, lr_schedule="cosine", warmup_steps=2)
    train(config_from_dict(raw), CPU)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "runs" / "tiny") if r["event"] == "step"]
    assert len(lrs) == 12  # 48 examples / batch 8 x 2 epochs = the schedule's total
    assert lrs[:2] == [pytest.approx(5e-4), pytest.approx(1e-3)]
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_the_optimizer_is_renewed_only_when_the_training_data_changes(tmp_path, tiny_data, monkeypatch):
    from noblankslate.train import loop

    renewed = []
    original = loop.Trainer._new_optimizer

    def counting(self):
        renewed.append(getattr(self, "_epoch_marker", None))
        return original(self)

    monkeypatch.setattr(loop.Trainer, "_new_optimizer", counting)
    monkeypatch.setattr(loop.Trainer, "train_epoch", lambda self, epoch, stage: setattr(self, "_epoch_marker", epoch + 1) or 0.0)
    raw = tiny_config(tmp_path, tiny_data, num_epochs=5, max_latent_stage=1, reset_optimizer=True)
    loop.Trainer(config_from_dict(raw), CPU).run()
    # stages 0, 1, 2, 3, 4; the data's stages 0, 1, 2, 2, 2: renewed before epochs 2 and 3 only (plus the first)
    assert renewed == [None, 1, 2]


def test_a_diverging_run_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, capsys):
    import yaml

    from noblankslate.cli import main
    from noblankslate.train.checkpoint import latest_checkpoint, load_checkpoint

    raw = tiny_config(tmp_path, tiny_data, num_epochs=3)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config_file), "num_epochs=1"]) == 0  # one good epoch first
    # then the same run, resumed with an lr that blows up: it must stop, exit 1, and save nothing
    assert main(["train", str(config_file), "lr=1e12"]) == 2  # a changed lr on resume is refused...
    assert "lr: 0.001 -> 1000000000000.0" in capsys.readouterr().err
    assert main(["train", str(config_file), "lr=1e12", "allow_config_change=true"]) == 1  # ...unless allowed
    err = capsys.readouterr().err
    assert "training stopped: epoch 2, step" in err and "the loss is" in err and "checkpoint_1" in err
    run_dir = tmp_path / "runs" / "tiny"
    assert latest_checkpoint(run_dir).name == "checkpoint_1"
    assert all(torch.isfinite(t).all() for t in load_checkpoint(run_dir / "checkpoint_1").model_state.values())
    assert main(["train", str(config_file), "lr=.inf"]) == 2
    assert "lr must be a finite number" in capsys.readouterr().err


def test_a_resumed_run_drops_the_records_of_the_work_it_redoes(tmp_path, tiny_data, capsys):
    from noblankslate.train.track import read_metrics

    raw = tiny_config(tmp_path, tiny_data, num_epochs=2)
    train(config_from_dict(raw), CPU)
    run_dir = tmp_path / "runs" / "tiny"
    steps_before = [r["step"] for r in read_metrics(run_dir) if r["event"] == "step"]
    # what a run killed during epoch 3 leaves behind: steps and an epoch record its checkpoint does not hold
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "step", "epoch": 3, "step": steps_before[-1] + 1, "train_loss": 9.0}) + "\n")
        f.write(json.dumps({"event": "epoch", "epoch": 3, "accuracy": 0.0}) + "\n")
    train(config_from_dict({**raw, "num_epochs": 3}), CPU)
    assert "dropped 2 records logged after checkpoint_2" in capsys.readouterr().out
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and 9.0 not in [r["train_loss"] for r in records if r["event"] == "step"]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3]


def test_refusals_before_compute(tmp_path, tiny_data, capsys):
    import shutil

    import yaml

    from noblankslate.cli import main

    copy = tmp_path / "copy_of_train.json"
    shutil.copy(tiny_data[0], copy)
    raw = tiny_config(tmp_path, tiny_data, num_epochs=1, val_path=str(copy))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config_file)]) == 2
    assert "holds the same data as train_path" in capsys.readouterr().err
    assert main(["train", str(config_file), f"val_path={tiny_data[1]}", "c_thought=0"]) == 2
    assert "coconut with c_thought: 0 adds no thoughts" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny").exists() or not list((tmp_path / "runs" / "tiny").glob("checkpoint_*"))


def test_a_record_too_long_for_the_model_is_named_before_any_step(tmp_path, tiny_data, capsys):
    import yaml

    from noblankslate.cli import main

    records = json.loads(tiny_data[0].read_text())
    records[7]["question"] = " ".join(["Every wumpus is a yumpus."] * 300)
    long_train = tmp_path / "long.json"
    long_train.write_text(json.dumps(records))
    raw = tiny_config(tmp_path, tiny_data, num_epochs=1, train_path=str(long_train))
    raw["model_config"]["max_positions"] = 128
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert f"{long_train}: record 7:" in err and "exceed the model's 128 positions" in err
    assert not (tmp_path / "runs" / "tiny" / "checkpoint_1").exists()


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_bit_exact(tmp_path, tiny_data, monkeypatch):
    from noblankslate.train import loop
    from noblankslate.train.checkpoint import latest_checkpoint
    from noblankslate.train.track import read_metrics

    raw = tiny_config(tmp_path, tiny_data, num_epochs=3)  # dropout on: the RNG state must be restored too
    train(config_from_dict({**raw, "name": "straight"}), CPU)

    original = loop.Trainer._forward_sum

    def signal_at_step_9(self, batch):  # a real SIGTERM in the middle of epoch 2 (6 steps per epoch)
        if self.global_step == 8 and not self.stop_requested:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(loop.Trainer, "_forward_sum", signal_at_step_9)
    with pytest.raises(loop.TrainingInterrupted, match=r"in epoch 2 after step 3 of 6; resume point .*checkpoint_1_step_3"):
        train(config_from_dict(raw), CPU)
    run_dir = tmp_path / "runs" / "tiny"
    assert latest_checkpoint(run_dir).name == "checkpoint_1_step_3"
    monkeypatch.setattr(loop.Trainer, "_forward_sum", original)
    train(config_from_dict(raw), CPU)  # resumes mid-epoch
    assert_same_weights(final_weights(run_dir, 3), final_weights(tmp_path / "runs" / "straight", 3))
    assert not (run_dir / "checkpoint_1_step_3").exists()  # superseded by checkpoint_2
    steps = lambda d: [(r["step"], r["train_loss"]) for r in read_metrics(d) if r["event"] == "step"]
    assert steps(run_dir) == steps(tmp_path / "runs" / "straight")
    epochs = lambda d: [(r["epoch"], r["train_loss"]) for r in read_metrics(d) if r["event"] == "epoch"]
    assert epochs(run_dir) == epochs(tmp_path / "runs" / "straight")


def test_save_every_steps_writes_mid_epoch_checkpoints(tmp_path, tiny_data):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=1, save_every_steps=4)
    trainer = Trainer(config_from_dict(raw), CPU)
    seen = []
    save = trainer._save
    trainer._save = lambda epoch, stage, step_in_epoch=0, epoch_loss=None: (seen.append(step_in_epoch),
                                                                           save(epoch, stage, step_in_epoch, epoch_loss))
    trainer.run()
    assert seen == [4, 0]  # after step 4 of 6, then the epoch's own
    assert [p.name for p in sorted((tmp_path / "runs" / "tiny").glob("checkpoint_*"))] == ["checkpoint_1"]


@pytest.mark.slow
def test_sigterm_to_the_command_stops_with_one_line_and_exit_130(tmp_path, tiny_data):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=60)
    config_path = tmp_path / "long.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), str(config_path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and '"epoch": 2' in metrics.read_text():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("training interrupted") and "run the same command again to resume" in last
    assert "Traceback" not in err


def test_resuming_with_a_different_config_lists_the_changes_and_refuses_unsafe_ones(tmp_path, tiny_data, capsys):
    import yaml

    from noblankslate.cli import main

    raw = tiny_config(tmp_path, tiny_data, num_epochs=1)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config_file)]) == 0
    assert main(["train", str(config_file), "num_epochs=2", "max_new_tokens=7"]) == 0  # safe with a constant lr
    assert "config changes: max_new_tokens: 6 -> 7, num_epochs: 1 -> 2" in capsys.readouterr().out
    assert main(["train", str(config_file), "num_epochs=3", "lr_schedule=cosine", "max_new_tokens=7"]) == 2
    err = capsys.readouterr().err
    assert "lr_schedule, num_epochs would change what the run trains" in err and "allow_config_change=true" in err


def test_bf16_weights_cast_the_whole_model_as_the_original_and_resume(tmp_path, tiny_data):
    """``bf16_weights``: parameters, gradients and optimizer state in bfloat16; checkpoints hold bfloat16;
    a run resumed from epoch 1 reaches the uninterrupted run's weights."""
    raw = tiny_config(tmp_path, tiny_data, num_epochs=2, bf16_weights=True, dropout=0.0,
                      model_config={"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.0})
    raw.pop("dropout")
    trainer = Trainer(config_from_dict({**raw, "name": "straight"}), CPU)
    assert {p.dtype for p in trainer.parallel.model.parameters()} == {torch.bfloat16}
    trainer.run()
    assert {s.dtype for state in trainer.optimizer.state.values() for s in state.values() if s.numel() > 1} == {torch.bfloat16}
    straight = load_file(tmp_path / "runs" / "straight" / "checkpoint_2" / "model.safetensors")
    assert {t.dtype for t in straight.values()} == {torch.bfloat16}

    train(config_from_dict({**raw, "name": "resumed", "num_epochs": 1}), CPU)
    train(config_from_dict({**raw, "name": "resumed", "allow_config_change": True}), CPU)
    resumed = load_file(tmp_path / "runs" / "resumed" / "checkpoint_2" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
