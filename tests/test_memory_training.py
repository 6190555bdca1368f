"""training.memory_in_training: the gate starts as no memory, a row never reads its own example, dropout 1
is memory off, the gate learns, is saved and resumes exactly (after an epoch and mid-epoch), evaluation
computes what training does, ``nbs memory build --evaluate`` and the sweep read a checkpoint through its
gate, and two DDP or FSDP processes train the gate as one."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    CPU,
    MODEL_FACTORIES,
    memory_metrics_without_timings,
    ragged_batch,
    run_script,
    tiny_config,
    wrap,
)
from test_generate import pad, prompt

from noblankslate.config import (
    ConfigError,
    NudgeConfig,
    RetrievalConfig,
    config_from_dict,
)
from noblankslate.eval.setup import setup_run
from noblankslate.memory.builder import model_fingerprint
from noblankslate.memory.calibration import make_calibrator
from noblankslate.memory.controller import MemoryParts
from noblankslate.memory.gate import GATE_STATE, GatedMemoryController, MemoryGate
from noblankslate.memory.store import LatentMemory
from noblankslate.train.checkpoint import latest_checkpoint, load_checkpoint
from noblankslate.train.loop import train
from noblankslate.train.track import read_metrics

SHAPES = [(5, 3, 4), (7, 2, 3), (4, 3, 5), (6, 1, 2)]  # (question, thoughts, answer tokens) per row
RETRIEVAL = RetrievalConfig(k=2, sim_threshold=-1.0, temperature=0.5)


def random_parts(dim: int = 32, steps: int = 3, entries: int = 10, seed: int = 0) -> MemoryParts:
    """Entries with random keys and trajectories; entry i is example 100 + i."""
    rng = np.random.default_rng(seed)
    store = LatentMemory(key_dim=dim, steps=steps, value_dim=dim, metric="cosine", fingerprint="test", value_dtype="float32")
    store.add(rng.normal(size=(entries, dim)).astype(np.float32), rng.normal(size=(entries, steps, dim)).astype(np.float32),
              [{"example": 100 + i, "thoughts": steps, "exit_step": steps} for i in range(entries)])
    confidence = make_calibrator("platt").fit(np.linspace(-1, 1, 20), np.arange(20) % 3 > 0)
    return MemoryParts(store=store, key_map=lambda x: x, value_inverse=lambda x: x, confidence=confidence)


@pytest.fixture(scope="module")
def model():
    return wrap(MODEL_FACTORIES["gpt2"]())


def test_the_gate_at_initialisation_leaves_loss_and_logits_exactly_as_without_memory(model):
    batch = ragged_batch(3, SHAPES)
    gate = MemoryGate(32, 3)
    controller = GatedMemoryController(random_parts(), RETRIEVAL, NudgeConfig(), gate, exit_enabled=False)
    plain = model(**batch)
    gated = model(**batch, controller=controller)
    assert torch.equal(gated.logits, plain.logits) and torch.equal(gated.loss, plain.loss)
    assert controller.record.nudges.tolist() == [3, 2, 3, 1]  # the memory was read at every thought
    with torch.no_grad():
        gate.amplitude.fill_(0.5)  # the same memory with an open gate changes the logits
    assert not torch.allclose(model(**batch, controller=controller).logits, plain.logits, atol=1e-4)


def test_the_gate_gets_the_lm_gradient_from_zero_and_mixes_toward_the_target(model):
    batch = ragged_batch(4, SHAPES)
    gate = MemoryGate(32, 3)
    parts = random_parts()
    model(**batch, controller=GatedMemoryController(parts, RETRIEVAL, NudgeConfig(), gate)).loss.backward()
    assert (gate.amplitude.grad != 0).all()  # every step: tanh'(0) = 1
    assert (gate.weight.grad == 0).all() and gate.bias.grad == 0  # behind tanh(0) = 0 until the amplitude moves
    # an open gate: the first fed thought is h + g (v - h), h the plain model's, v the neighbours' thought
    with torch.no_grad():
        gate.amplitude.fill_(1.5)
        gate.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        gate.bias.fill_(0.4)
    controller = GatedMemoryController(parts, RETRIEVAL, NudgeConfig(), gate)
    start = int((batch["input_ids"][0] == 63).nonzero()[0])  # the first latent column (rows are aligned)
    with torch.no_grad():
        fed = model(**batch, controller=controller).inputs_embeds[:, start]
        h = model(**batch).inputs_embeds[:, start]  # (B, D)
        v, c = controller._targets[:, 0], controller._confidence
        g = np.tanh(1.5) * torch.sigmoid(torch.cat([h, v, c[:, None]], dim=1) @ gate.weight + 0.4)  # (B,)
    torch.testing.assert_close(fed, h + g[:, None] * (v - h), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fed, h, atol=1e-3)
    np.testing.assert_allclose(controller.record.alpha[0], controller._gate_sum[0] / 3, rtol=1e-6)  # the mean gate


def test_a_row_never_reads_its_own_example():
    parts = random_parts(entries=10)
    keys = parts.store.keys(parts.store.ids)  # each query is exactly an entry's key: its own entry is the best
    controller = GatedMemoryController(parts, RetrievalConfig(k=3, sim_threshold=-1.0), NudgeConfig(), MemoryGate(32, 3))
    controller._retrieve(torch.as_tensor(keys))
    own_ids = parts.store.ids
    assert (controller.record.neighbor_ids[:, 0] == own_ids).all()  # without exclusion it finds itself
    examples = np.array([parts.store.metadata_of(int(i))["example"] for i in own_ids])
    expected = parts.store.search(keys, 4)[1][:, 1:]  # the next three, in order
    controller.for_batch(examples, None)._retrieve(torch.as_tensor(keys))
    assert (controller.record.neighbor_ids != own_ids[:, None]).all()
    assert (controller.record.neighbor_ids == expected).all()  # still k neighbours, in similarity order
    # rows whose example is not in the memory keep their k best
    controller.for_batch(examples + 1000, None)._retrieve(torch.as_tensor(keys))
    assert (controller.record.neighbor_ids == parts.store.search(keys, 3)[1]).all()


def test_evaluation_feeds_exactly_what_the_training_forward_feeds(model):
    """One gate, one hook: generation with the gated controller feeds the thoughts the training forward
    computes for the same prompts."""
    gate = MemoryGate(32, 3)
    with torch.no_grad():
        gate.amplitude.copy_(torch.tensor([0.8, -0.5, 0.3]))
        gate.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    parts = random_parts()
    rng = random.Random(2)
    rows = [prompt(rng, q, n) for q, n in ((5, 3), (7, 2), (4, 3))]
    out = model.generate(*pad(rows, "left"), max_new_tokens=2, return_thoughts=True,
                         controller=GatedMemoryController(parts, RETRIEVAL, NudgeConfig(), gate, exit_enabled=False))
    for b, row in enumerate(rows):
        ids = torch.tensor([row])
        forward = model(ids, torch.ones_like(ids), controller=GatedMemoryController(parts, RETRIEVAL, NudgeConfig(), gate))
        start = row.index(63)
        n = row.count(63)
        torch.testing.assert_close(out.thoughts[b, :n], forward.inputs_embeds[0, start : start + n], rtol=1e-5, atol=1e-5)


def run_config(tmp_path, tiny_data, name, **training):
    return tiny_config(tmp_path, tiny_data, name=name, num_epochs=3, index={"path": str(tmp_path / name / "index.bin")},
                       retrieval={"enabled": True, "correct_only": False, "key_dim": 8, "build_limit": 24},
                       training=training)


def test_memory_dropout_one_trains_exactly_as_without_the_option(tmp_path, tiny_data):
    off = train(config_from_dict(run_config(tmp_path, tiny_data, "off")), CPU)
    dropped = train(config_from_dict(run_config(tmp_path, tiny_data, "dropped", memory_in_training=True,
                                                memory_dropout=1.0)), CPU)
    for a, b in zip(off, dropped):
        assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
        assert [p["output"] for p in a.evaluation.predictions] == [p["output"] for p in b.evaluation.predictions]
    a, b = (load_checkpoint(tmp_path / "runs" / name / "checkpoint_3") for name in ("off", "dropped"))
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    assert all(torch.count_nonzero(v) == 0 for v in b.extra_states[GATE_STATE].values())  # it never saw a memory
    assert all(r.get("memory_rows", 0.0) == 0.0 for r in read_metrics(tmp_path / "runs" / "dropped") if r["event"] == "step")


def test_the_gate_learns_is_saved_and_resumes_bit_exact(tmp_path, tiny_data, monkeypatch):
    raw = run_config(tmp_path, tiny_data, "straight", memory_in_training=True, memory_dropout=0.25)
    searches = []  # (row examples, their neighbours' examples) of every training batch
    original = GatedMemoryController._retrieve

    def watched(self, anchors):
        original(self, anchors)
        if not self.count_retrievals:  # the training controller
            ids = self.record.neighbor_ids
            rows = np.searchsorted(self._ids, np.maximum(ids, 0))
            searches.append((self.exclude_examples, np.where(ids >= 0, self._entry_example[rows], -1)))

    monkeypatch.setattr(GatedMemoryController, "_retrieve", watched)
    straight = train(config_from_dict(raw), CPU)
    monkeypatch.undo()
    assert len(searches) == 2 * 6  # two latent epochs of 48 / 8 batches, one search each
    assert all(examples is not None and (neighbours != examples[:, None]).all() for examples, neighbours in searches)
    # half the training examples are in the memory (build_limit 24), so without the exclusion some would match
    assert sum(int((neighbours >= 0).sum()) for _, neighbours in searches) > 0
    run_dir = tmp_path / "runs" / "straight"
    steps = [r for r in read_metrics(run_dir) if r["event"] == "step"]
    assert all("memory_rows" not in r for r in steps if r["stage"] == 0)  # no thoughts, no memory
    latent = [r["memory_rows"] for r in steps if r["stage"] > 0]
    assert latent and 0.5 < np.mean(latent) < 0.95  # about 3 of 4 rows read it (dropout 0.25, every row a hit)
    final = load_checkpoint(run_dir / "checkpoint_3")
    gate = final.extra_states[GATE_STATE]
    assert (gate["amplitude"] != 0).all() and torch.count_nonzero(gate["weight"]) > 0 and gate["bias"] != 0
    # the memory read in epoch 3 was built by the model of epoch 2
    epoch_two = load_checkpoint(run_dir / "checkpoint_2")
    model_two = setup_run(config_from_dict(raw), weights_from=run_dir / "checkpoint_2").model
    assert epoch_two.train_state.training_memory == model_fingerprint(model_two)
    # evaluation used the learned gate: the memory runs record its mean value as their alpha
    metrics = json.loads((run_dir / "retrieval_metrics_epoch_3.json").read_text())
    assert metrics["paired"]["memory_vs_off"]["n"] == 12
    # the same run interrupted after epoch 2 and resumed reaches exactly the same weights and gate
    short = {**raw, "name": "resumed", "num_epochs": 2}
    train(config_from_dict(short), CPU)
    resumed = train(config_from_dict({**short, "num_epochs": 3}), CPU)
    assert resumed[-1].train_loss == straight[-1].train_loss
    other = load_checkpoint(tmp_path / "runs" / "resumed" / "checkpoint_3")
    for key in gate:
        assert torch.equal(other.extra_states[GATE_STATE][key], gate[key]), key
    for key in final.model_state:
        assert torch.equal(final.model_state[key], other.model_state[key]), key
    # ...and the option changes training (the memory is read): not the run without it
    off = train(config_from_dict(run_config(tmp_path, tiny_data, "plain")), CPU)
    assert off[1].train_loss != straight[1].train_loss
    # the comparison tool reproduces the run's own paired numbers (same memory, same gate) and pairs the runs
    out = tmp_path / "compare.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "memory_training_compare.py"
    done = subprocess.run([sys.executable, str(tool), str(run_dir), str(tmp_path / "runs" / "plain"), "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    own = rows["trained with memory: with vs without its memory"]
    assert own["n"] == 12 and own["first_correct"] == round(12 * metrics["accuracy"]["with_nudge_only"])
    assert own["second_correct"] == round(12 * metrics["accuracy"]["without_retrieval"])
    assert own == metrics["paired"]["nudge_only_vs_off"]
    plain = rows["without memory: trained with vs trained without"]
    assert plain["second_correct"] == off[-1].evaluation.correct and len(rows) == 5
    # a run trained with retrieval off (no memory examples loaded, no memory saved) compares too: its
    # memory is built with its checkpoint's model, the same memory its training would have built
    plain_config = tmp_path / "runs" / "plain" / "config.yaml"
    saved = yaml.safe_load(plain_config.read_text())
    saved["retrieval"]["enabled"] = False
    plain_config.write_text(yaml.safe_dump(saved))
    for stale in (tmp_path / "plain").glob("index.bin*"):
        stale.unlink()
    again_out = tmp_path / "compare_again.json"
    done = subprocess.run([sys.executable, str(tool), str(run_dir), str(tmp_path / "runs" / "plain"), "--threads", "1",
                           "--out", str(again_out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rebuilding the memory" in done.stdout
    assert json.loads(again_out.read_text()) == rows
    # an evaluation-only run of the checkpoint loads its gate and evaluates as the training run did
    evaluated = train(config_from_dict({**raw, "name": "evaluated", "only_eval": True, "resume": 2,
                                        "load_model_path": str(run_dir / "checkpoint_3")}), CPU)
    again = json.loads(json.dumps(evaluated[0].retrieval))
    assert again["paired"] == metrics["paired"] and again["nudge"] == metrics["nudge"] and again["nudge"]["mean_alpha"] != 0


@pytest.mark.parametrize("overrides, message", [
    ({"training": {"memory_dropout": 1.5}}, r"training\.memory_dropout must be in \[0, 1\], got 1\.5"),
    ({"training": {"memory_in_training": True}}, r"training\.memory_in_training .* set retrieval\.enabled: true"),
    ({"coconut": False, "cot": True, "retrieval": {"enabled": True}, "training": {"memory_in_training": True}},
     r"training\.memory_in_training .* needs coconut: true .* \(this run is cot\)"),
    ({"pause_as_thought": True, "retrieval": {"enabled": True}, "training": {"memory_in_training": True}},
     r"this run is coconut with pause_as_thought"),
])
def test_the_option_is_checked_with_the_key_named(tmp_path, tiny_data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tiny_config(tmp_path, tiny_data, **overrides))


def _two_process_run(tmp_path: Path, parallel: str, **keys) -> tuple[dict, Path]:
    """Generated ProsQA data and a tiny Coconut config for the torchrun tests, plus ``keys``; (config, its YAML)."""
    import yaml

    from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa

    tasks = ProsQAConfig.small(concepts=(3, 4), distance=(2, 2))
    (tmp_path / "train.json").write_text(json.dumps(generate_prosqa(48, seed=0, config=tasks)))
    (tmp_path / "valid.json").write_text(json.dumps(generate_prosqa(13, seed=1, config=tasks)))
    raw = {
        "save_path": str(tmp_path / "runs"), "coconut": True, "c_thought": 1, "epochs_per_stage": 1,
        "max_latent_stage": 2, "pad_latent_to_max": True, "train_path": str(tmp_path / "train.json"),
        "val_path": str(tmp_path / "valid.json"), "lr": 1e-3, "max_new_tokens": 6,
        "parallel": parallel, "model_config": {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, **keys,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_gate_as_one(tmp_path, parallel):
    """DDP or FSDP (gloo, torchrun): the gate sits outside the wrapper, so its gradients are averaged
    explicitly; with no dropout, two ranks of 4 rows train model and gate as one process with batches of 8.
    The two-process run stops after epoch 2 and resumes (the optimizer state holds the gate's, which FSDP
    must name), and the memory it reads is the one a single process finds for the same weights."""

    raw, path = _two_process_run(
        tmp_path, parallel, num_epochs=3,
        retrieval={"enabled": True, "correct_only": False, "sim_threshold": -1.0, "key_dim": 8},
        training={"memory_in_training": True, "memory_dropout": 0.0})
    two = ("name=two", "batch_size_training=4", f"index.path={tmp_path / 'two' / 'index.bin'}")
    run_script(path, *two, "num_epochs=2", processes=2)
    run_script(path, *two, processes=2)  # resumes from checkpoint_2
    run_script(path, "name=one", "batch_size_training=8", f"index.path={tmp_path / 'one' / 'index.bin'}")
    steps = {name: [r for r in read_metrics(tmp_path / "runs" / name) if r["event"] == "step"] for name in ("one", "two")}
    assert len(steps["two"]) == len(steps["one"]) == 18
    assert [r["train_loss"] for r in steps["two"]] == pytest.approx([r["train_loss"] for r in steps["one"]], rel=1e-5)
    assert all(r["memory_rows"] == 1.0 for name in ("one", "two") for r in steps[name] if r["stage"] > 0)
    gates = {name: load_checkpoint(tmp_path / "runs" / name / "checkpoint_3").extra_states[GATE_STATE] for name in ("one", "two")}
    assert (gates["one"]["amplitude"] != 0).all()
    for key in gates["one"]:
        torch.testing.assert_close(gates["two"][key], gates["one"][key], rtol=1e-4, atol=1e-6)
    # the memory epoch 3 read was built by the two processes' epoch-2 model: its fingerprint is that model's
    two_dir = tmp_path / "runs" / "two"
    model_two = setup_run(config_from_dict({**raw, "parallel": "auto"}), weights_from=two_dir / "checkpoint_2").model
    assert load_checkpoint(two_dir / "checkpoint_2").train_state.training_memory == model_fingerprint(model_two)
    metrics = {name: json.loads((tmp_path / "runs" / name / "retrieval_metrics_epoch_3.json").read_text())
               for name in ("one", "two")}
    assert metrics["two"]["nudge"]["kind"] == "gate" and metrics["two"]["items"] == 13
    assert metrics["two"]["nudge"]["mean_alpha"] == pytest.approx(metrics["one"]["nudge"]["mean_alpha"], rel=1e-3)


def test_a_mid_epoch_resume_is_bit_exact_with_the_memory_file_and_says_it_is_not_without(tmp_path, tiny_data,
                                                                                       monkeypatch, capsys):
    """A run killed after a ``save_every_steps`` checkpoint in a latent epoch resumes from it. With the memory
    file at ``index.path`` (the one the interrupted epoch was reading) it ends with the weights and gate of
    the run that was never stopped; with the file gone the memory is rebuilt by the resumed model, which
    is not the one that built it, and the run says so (docs/memory.md, Resume)."""
    from noblankslate.train import loop

    raw = {**run_config(tmp_path, tiny_data, "straight", memory_in_training=True, memory_dropout=0.25),
           "save_every_steps": 3}
    train(config_from_dict(raw), CPU)
    straight = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoint_3")
    original = loop.Trainer._forward_sum

    class Killed(Exception):
        pass

    def killed_in_step_11(self, batch):  # epoch 2 (stage 1, reading the memory), after checkpoint_1_step_3
        if self.global_step == 10:
            raise Killed
        return original(self, batch)

    finals = {}
    for name in ("kept", "lost"):
        config = config_from_dict({**raw, "name": name, "index": {"path": str(tmp_path / name / "index.bin")}})
        run_dir = tmp_path / "runs" / name
        monkeypatch.setattr(loop.Trainer, "_forward_sum", killed_in_step_11)
        with pytest.raises(Killed):
            train(config, CPU)
        monkeypatch.setattr(loop.Trainer, "_forward_sum", original)
        assert latest_checkpoint(run_dir).name == "checkpoint_1_step_3"
        assert load_checkpoint(run_dir / "checkpoint_1_step_3").train_state.training_memory is not None
        if name == "lost":
            shutil.rmtree(tmp_path / name)  # the memory files
        capsys.readouterr()
        train(config, CPU)
        out = capsys.readouterr().out
        finals[name] = final = load_checkpoint(run_dir / "checkpoint_3")
        if name == "kept":
            for key in straight.model_state:
                assert torch.equal(final.model_state[key], straight.model_state[key]), key
            for key, value in straight.extra_states[GATE_STATE].items():
                assert torch.equal(final.extra_states[GATE_STATE][key], value), key
            assert "is not at" not in out
        else:
            assert "the memory its run was reading is not at" in out
            assert "not exact: the resumed model is not the one that built it" in out
    assert (straight.extra_states[GATE_STATE]["amplitude"] != 0).all()
    # the rebuilt memory is another one: what the gate learned from it differs
    assert not torch.equal(finals["lost"].extra_states[GATE_STATE]["amplitude"], straight.extra_states[GATE_STATE]["amplitude"])


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, tiny_data):
    """A 3-epoch run trained with the option (its gate saved with every checkpoint) and its config file."""
    folder = tmp_path_factory.mktemp("gated")
    raw = run_config(folder, tiny_data, "gated", memory_in_training=True, memory_dropout=0.25)
    train(config_from_dict(raw), CPU)
    config_file = folder / "gated.yaml"
    config_file.write_text(json.dumps(raw))  # JSON is YAML
    return folder / "runs" / "gated", config_file


def test_memory_build_evaluates_a_gated_checkpoint_through_its_gate_as_training_did(gated_run, tmp_path, capsys):
    from noblankslate.cli import main

    run_dir, config_file = gated_run
    out = tmp_path / "metrics.json"
    assert main(["memory", "build", "--evaluate", "--metrics-out", str(out), str(config_file),
                 f"load_model_path={run_dir / 'checkpoint_3'}", f"index.path={tmp_path / 'built' / 'index.bin'}"]) == 0
    assert "nudge: gate" in capsys.readouterr().out
    built = json.loads(out.read_text())
    trained = json.loads((run_dir / "retrieval_metrics_epoch_3.json").read_text())
    assert built["nudge"]["kind"] == trained["nudge"]["kind"] == "gate"
    assert (built["epoch"], built["stage"], built["items"]) == (3, 2, 12)  # at the checkpoint's stage
    # the same memory, read the same way: every number but the clock's is the training run's
    assert memory_metrics_without_timings(built) == memory_metrics_without_timings(trained)
    assert built["nudge"]["mean_alpha"] != 0  # the gate's mean (the fixed nudge's would be alpha_max x confidence)


def test_memory_build_evaluates_a_checkpoint_without_a_gate_with_the_fixed_nudge(tmp_path, tiny_data, capsys):
    from noblankslate.cli import main

    raw = run_config(tmp_path, tiny_data, "plain")
    train(config_from_dict({**raw, "num_epochs": 2}), CPU)
    run_dir = tmp_path / "runs" / "plain"
    config_file = tmp_path / "plain.yaml"
    config_file.write_text(json.dumps(raw))
    out = tmp_path / "metrics.json"
    assert main(["memory", "build", "--evaluate", "--metrics-out", str(out), str(config_file),
                 f"load_model_path={run_dir / 'checkpoint_2'}", f"index.path={tmp_path / 'built' / 'index.bin'}"]) == 0
    assert "nudge: fixed" in capsys.readouterr().out
    built = json.loads(out.read_text())
    trained = json.loads((run_dir / "retrieval_metrics_epoch_2.json").read_text())
    assert built["nudge"]["kind"] == "fixed" and (built["epoch"], built["stage"]) == (2, 1)
    assert memory_metrics_without_timings(built) == memory_metrics_without_timings(trained)
    # without --evaluate it only builds, as before; --metrics-out alone is refused
    assert main(["memory", "build", str(config_file), f"load_model_path={run_dir / 'checkpoint_2'}",
                 f"index.path={tmp_path / 'again' / 'index.bin'}"]) == 0
    assert '"nudge"' not in capsys.readouterr().out
    assert main(["memory", "build", "--metrics-out", str(out), str(config_file),
                 f"load_model_path={run_dir / 'checkpoint_2'}"]) == 2
    assert "--metrics-out needs --evaluate" in capsys.readouterr().err


def test_a_gate_of_another_shape_is_refused_naming_the_file(tmp_path):
    from noblankslate.memory.gate import GateFileError, saved_gate
    from noblankslate.model.weights import save_state_dict

    save_state_dict(MemoryGate(32, 3).state_dict(), tmp_path / f"{GATE_STATE}.safetensors")
    config = config_from_dict(tiny_config(tmp_path, (tmp_path / "t.json", tmp_path / "v.json")))  # 2 thought steps
    assert saved_gate(tmp_path).steps == 3
    assert saved_gate(tmp_path / "elsewhere") is None
    with pytest.raises(GateFileError, match=r"memory_gate\.safetensors: a gate for thoughts of size 32 and 3 thought"):
        saved_gate(tmp_path, config, 32)
    with pytest.raises(GateFileError, match=r"this run has size 64 and 2"):
        saved_gate(tmp_path, config, 64)


@pytest.mark.slow
def test_the_sweep_reads_a_gated_checkpoint_through_its_gate_and_sweeps_only_the_exit(gated_run, tmp_path):
    run_dir, config_file = gated_run
    out = tmp_path / "sweep.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "memory_sweep.py"
    done = subprocess.run([sys.executable, str(tool), str(config_file), f"index.path={tmp_path / 'sweep' / 'index.bin'}",
                           "--checkpoint", str(run_dir / "checkpoint_3"), "--tune", "12", "--alphas", "0", "0.5",
                           "--thresholds", "off", "0.5", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["nudge"]["kind"] == "gate" and "not swept" in result["nudge"]["alpha_max"]
    assert len(result["tuning"]) == 2  # no exit and probe >= 0.5, once: the two alphas do not apply
    assert all(m["setting"]["alpha_max"] is None and m["nudge"]["kind"] == "gate" for m in result["tuning"])
    kinds = {name: m["nudge"]["kind"] for name, m in result["validation"].items()}
    assert kinds == {"chosen": "gate", "control: random entries": "gate", "control: shuffled neighbours": "gate",
                     "control: full replacement": "fixed"}
    assert "nudge: gate" in done.stdout and "\ntune   gate T=1" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_resume_a_contrastive_run_exactly(tmp_path, parallel):
    """DDP or FSDP with ``training.nudge_contrastive``: every rank's buffer holds the same trajectories (the
    whole global batch's), so the one buffer a checkpoint saves is every rank's, and a two-process run
    stopped after epoch 3 and resumed ends where the uninterrupted two-process run ends."""
    _, path = _two_process_run(
        tmp_path, parallel, num_epochs=4, batch_size_training=4,
        retrieval={"enabled": True, "correct_only": False, "key_dim": 6},
        training={"nudge_contrastive": True, "nudge_buffer_batch": 4, "retrieval_buffer_limit": 16})
    run_script(path, "name=straight", f"index.path={tmp_path / 'straight.bin'}", processes=2)
    resumed = ("name=resumed", f"index.path={tmp_path / 'resumed.bin'}")
    run_script(path, *resumed, "num_epochs=3", processes=2)
    run_script(path, *resumed, processes=2)  # resumes from checkpoint_3, whose buffer holds negatives
    steps = {name: [r for r in read_metrics(tmp_path / "runs" / name) if r["event"] == "step"]
             for name in ("straight", "resumed")}
    assert len(steps["straight"]) == len(steps["resumed"]) == 24
    assert all(r["contrastive_loss"] > 0 for r in steps["straight"] if r["stage"] >= 2)
    assert [r["train_loss"] for r in steps["resumed"]] == [r["train_loss"] for r in steps["straight"]]
    assert ([r.get("contrastive_loss") for r in steps["resumed"]]
            == [r.get("contrastive_loss") for r in steps["straight"]])
    a, b = (load_checkpoint(tmp_path / "runs" / name / "checkpoint_4") for name in ("straight", "resumed"))
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
