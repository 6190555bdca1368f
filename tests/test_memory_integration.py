"""The memory with a model: retrieval off = plain Coconut, controller batched = alone, builder, metrics,
report, and the training loop's per-epoch files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from helpers import CPU, MODEL_FACTORIES, tiny_config, wrap
from test_generate import pad, prompt

from noblankslate.config import NudgeConfig, RetrievalConfig, config_from_dict
from noblankslate.eval.evaluate import GenerationEval
from noblankslate.eval.setup import load_memory_data
from noblankslate.memory.builder import load_memory
from noblankslate.memory.calibration import make_calibrator
from noblankslate.memory.controller import MemoryController, MemoryParts
from noblankslate.memory.metrics import retrieval_metrics
from noblankslate.memory.report import build_report, find_metrics, format_report
from noblankslate.memory.store import LatentMemory, MemoryFileError
from noblankslate.train.loop import train
from noblankslate.train.track import read_metrics

ROWS = [(7, 3), (12, 0), (4, 1), (9, 2), (5, 3), (6, 3)]


def synthetic_parts(model, rows, steps=3, seed=0) -> MemoryParts:
    """A memory whose entries are the model's own trajectories of random prompts (plus noise)."""
    rng = random.Random(seed)
    stored = [prompt(rng, 6, steps) for _ in range(12)]
    out = model.generate(*pad(stored, "left"), max_new_tokens=1, return_thoughts=True)
    thoughts = out.thoughts.numpy() + np.random.default_rng(seed).normal(0, 0.05, out.thoughts.shape).astype(np.float32)
    store = LatentMemory(key_dim=thoughts.shape[-1], steps=steps, value_dim=thoughts.shape[-1], metric="cosine",
                         fingerprint="test", value_dtype="float32")
    store.add(thoughts[:, 0], thoughts, [{"exit_step": 1 + i % steps, "thoughts": steps} for i in range(len(stored))])
    confidence = make_calibrator("platt").fit(np.linspace(0, 1, 20), np.arange(20) % 3 > 0)
    return MemoryParts(store=store, key_map=lambda x: x, value_inverse=lambda x: x, confidence=confidence)


@pytest.fixture(scope="module")
def model_and_rows():
    rng = random.Random(5)
    return wrap(MODEL_FACTORIES["llama"]()), [prompt(rng, q, n) for q, n in ROWS]


def test_zero_alpha_and_no_exit_is_plain_coconut(model_and_rows):
    model, rows = model_and_rows
    parts = synthetic_parts(model, rows)
    controller = MemoryController(parts, RetrievalConfig(sim_threshold=-1.0), NudgeConfig(alpha_max=0.0, exit_threshold=None))
    ids, mask = pad(rows, "right")
    plain, with_memory = model.generate(ids, mask, max_new_tokens=8), model.generate(ids, mask, max_new_tokens=8, controller=controller)
    assert with_memory.sequences() == plain.sequences()
    assert with_memory.forward_passes.tolist() == plain.forward_passes.tolist()
    assert controller.record.hit.all()  # it did search: every row had a neighbour


def test_the_controller_runs_its_numpy_products_on_one_blas_thread(model_and_rows):
    """Several OpenBLAS threads spin after each product on the cores torch needs next (docs/memory.md, Cost)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    model, rows = model_and_rows
    parts = synthetic_parts(model, rows)
    seen = []

    def watching(x):
        seen.append(blas_threads())
        return x

    parts.key_map = parts.value_inverse = watching
    controller = MemoryController(parts, RetrievalConfig(sim_threshold=-1.0), NudgeConfig(alpha_max=0.3))
    ids, mask = pad(rows, "right")
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core machine, whatever this one has
        outside = blas_threads()
        model.generate(ids, mask, max_new_tokens=2, controller=controller)
        after = blas_threads()
    assert outside and set(outside.values()) == {2}
    assert len(seen) == 2 and all(threads == {path: 1 for path in outside} for threads in seen)  # key map, values
    assert after == outside  # the limit holds only inside the controller


@pytest.mark.parametrize("metric, threshold", [("neighbors", 0.1), ("stability", 0.2)])
def test_memory_controller_batched_equals_each_row_alone(model_and_rows, metric, threshold):
    model, rows = model_and_rows
    parts = synthetic_parts(model, rows)
    settings = (RetrievalConfig(k=3, sim_threshold=-1.0), NudgeConfig(alpha_max=0.5, clip_radius=2.0, exit_threshold=threshold,
                                                                       exit_metric=metric, calibration="platt"))
    ids, mask = pad(rows, "left")
    batched = model.generate(ids, mask, max_new_tokens=8, controller=MemoryController(parts, *settings))
    assert (batched.thoughts_used < batched.latent_counts).any(), "some row should exit early"
    assert batched.sequences() != model.generate(ids, mask, max_new_tokens=8).sequences()
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=8, controller=MemoryController(parts, *settings))
        assert batched.sequences()[b] == alone.sequences()[0], f"row {b}"
        assert batched.thoughts_used[b] == alone.thoughts_used[0]
        assert batched.forward_passes[b] == alone.forward_passes[0]


def test_nudge_moves_toward_the_target_and_respects_clip_and_norm(model_and_rows):
    model, rows = model_and_rows
    parts = synthetic_parts(model, rows)
    controller = MemoryController(parts, RetrievalConfig(k=2, sim_threshold=-1.0),
                                  NudgeConfig(alpha_max=1.0, clip_radius=0.05, match_norm=True, calibration="none"))
    thought = torch.randn(len(rows), 32)
    controller._retrieve(thought)
    fed, last = controller(1, thought, torch.ones(len(rows), dtype=torch.bool))
    assert not last.any()
    torch.testing.assert_close(fed.norm(dim=-1), thought.norm(dim=-1))  # match_norm
    step = (fed - thought).norm(dim=-1)
    assert (step <= 0.05 * 1.5).all() and (step > 0).all()  # clipped before the norm rescale
    assert controller.record.clipped.sum() == len(rows)
    target = controller._targets[:, 1]
    assert ((fed - target).norm(dim=-1) < (thought - target).norm(dim=-1)).all()


def _eval(records):
    return GenerationEval(correct=0, cot_correct=0, total=len(records), generated_tokens=0, forward_passes=0, predictions=records)


def test_paired_metrics_count_flips_and_false_exits_exactly():
    def rec(i, correct, passes, used=3, memory=None):
        return {"idx": i, "correct": correct, "forward_passes": passes, "thoughts_used": used, "latent_count": 3,
                "memory": memory, "generated_tokens": passes - used - 1}
    mem = lambda hit, c: {"hit": hit, "best_similarity": 0.9 if hit else float("nan"), "confidence": c, "alpha": 0.3 * c,
                          "mean_nudge_norm": 0.5 if hit else 0.0, "nudged_steps": 3 if hit else 0, "clipped_steps": 1 if hit else 0}
    off = _eval([rec(0, True, 10), rec(1, False, 10), rec(2, True, 10), rec(3, False, 10)])
    full = _eval([rec(0, True, 10), rec(1, True, 10), rec(2, True, 10), rec(3, False, 10)])
    on = _eval([rec(0, False, 8, 1, mem(True, 0.8)), rec(1, True, 10, 3, mem(True, 0.9)),
                rec(2, True, 9, 2, mem(True, 0.7)), rec(3, False, 10, 3, mem(False, 0.0))])
    m = retrieval_metrics(off, full, on, {"entries": 5}, {"off": 1.0, "full": 1.1, "on": 1.2, "memory": 0.4}, 1, 2)
    assert m["accuracy"]["without_retrieval"] == 0.5 and m["accuracy"]["with_retrieval"] == 0.5
    assert (m["accuracy"]["flips_wrong_to_right"], m["accuracy"]["flips_right_to_wrong"]) == (1, 1)
    assert m["retrieval"]["hit_rate"] == 0.75
    assert m["retrieval"]["best_similarity_quantiles"]["50"] == pytest.approx(0.9)
    assert m["exit"]["exit_rate"] == 0.5 and m["exit"]["false_exits"] == 1  # row 0 exited and lost its answer
    assert m["exit"]["mean_forward_passes_with_exit"] == 9.25 and m["exit"]["compute_saved"] == pytest.approx(0.075)
    assert m["runs"]["on"] == {"accuracy": 0.5, "mean_generated_tokens": 6.0, "mean_forward_passes": 9.25, "mean_thoughts": 2.25}
    assert m["nudge"]["clip_rate"] == pytest.approx(3 / 9)
    # scored against what the confidence predicts: right with the memory off (off = right, wrong, right, wrong)
    assert m["calibration"]["brier"] == pytest.approx(((0.8 - 1) ** 2 + (0.9 - 0) ** 2 + (0.7 - 1) ** 2 + 0) / 4)
    assert m["time"]["memory_overhead_per_example"] == pytest.approx(0.1)
    # memory on vs off: item 1 only with, item 0 only without (b = c = 1: p = 1)
    paired = m["paired"]["memory_vs_off"]
    assert (paired["only_first"], paired["only_second"], paired["p_value"], paired["difference"]) == (1, 1, 1.0, 0.0)
    assert (m["paired"]["exit_vs_no_exit"]["only_first"], m["paired"]["exit_vs_no_exit"]["only_second"]) == (0, 1)
    assert m["exit"]["wall_clock_saved"] == pytest.approx(1 - 1.2 / 1.1)
    with pytest.raises(ValueError, match="same items"):
        retrieval_metrics(off, full, _eval(on.predictions[:3]), {}, {}, 1, 2)


def test_the_replacement_control_counts_changed_answers_and_pairs_with_the_plain_run():
    from noblankslate.memory.evaluation import replacement_control

    rec = lambda i, correct, prediction: {"idx": i, "correct": correct, "prediction": prediction,
                                          "generated_tokens": len(prediction), "forward_passes": 9 + i}
    off = _eval([rec(0, True, "a"), rec(1, False, "b"), rec(2, True, "c"), rec(3, False, "d")])
    # item 0 lost, item 1 gained, item 3 wrong in another way, item 2 unchanged; listed out of order
    replaced = _eval([rec(3, False, "e"), rec(1, True, "x"), rec(0, False, "y"), rec(2, True, "c")])
    control = replacement_control(off, replaced)
    assert control["changed_answers"] == 3 and control["accuracy"] == 0.5
    assert control["mean_forward_passes"] == 10.5 and control["mean_generated_tokens"] == 1.0
    paired = control["paired_vs_off"]
    assert (paired["only_first"], paired["only_second"], paired["n"]) == (1, 1, 4)


def test_training_with_retrieval_writes_metrics_and_rebuilds_the_index(tmp_path, tiny_data):
    index = tmp_path / "index" / "faiss_index.bin"
    raw = tiny_config(tmp_path, tiny_data, num_epochs=3, retrieval={"enabled": True, "correct_only": False, "key_dim": 8},
                      nudge={"exit_threshold": 0.5, "exit_metric": "probe", "calibration": "isotonic"},
                      index={"path": str(index)})
    results = train(config_from_dict(raw), CPU)
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "retrieval_metrics_epoch_1.json").exists()  # stage 0 has no thoughts to remember
    assert results[0].retrieval is None
    for epoch in (2, 3):
        m = json.loads((run_dir / f"retrieval_metrics_epoch_{epoch}.json").read_text())
        assert m["epoch"] == epoch and m["items"] == 12
        assert m["accuracy"]["without_retrieval"] == results[epoch - 1].evaluation.accuracy
        assert set(m) >= {"accuracy", "retrieval", "nudge", "exit", "calibration", "index", "time", "paired"}
        # the thresholded score's calibration on validation: one sample per item and thought
        calibration = m["exit_calibration"]
        assert calibration["available"] and calibration["samples"] == 12 * (epoch - 1)  # 1 thought at stage 1, 2 at 2
        assert 0.0 <= calibration["ece"] <= 1.0 and 0.0 <= calibration["brier"] <= 1.0
        fixed = calibration["threshold_curve"][-1]  # every thought used: the plain evaluation itself
        assert fixed["threshold"] is None and fixed["exit_rate"] == 0.0 and fixed["mean_thoughts"] == epoch - 1
        assert fixed["accuracy"] == m["accuracy"]["without_retrieval"]
        by_thought = calibration["by_thought"]  # every item has every thought: 12 samples at each
        assert [t["thought"] for t in by_thought] == list(range(1, epoch)) and {t["samples"] for t in by_thought} == {12}
        assert by_thought[-1]["event_rate"] == m["accuracy"]["without_retrieval"]  # the last thought: the plain answer
        control = m["control_full_replacement"]  # paired with the same plain run
        assert control["paired_vs_off"]["n"] == 12
        assert control["paired_vs_off"]["second_correct"] / 12 == m["accuracy"]["without_retrieval"]
        assert 0 <= control["changed_answers"] <= 12
    parts = load_memory(index)
    assert parts.store.info["build"]["epoch"] == 3  # rebuilt at the end of the last epoch
    m3 = json.loads((run_dir / "retrieval_metrics_epoch_3.json").read_text())
    retrieved = sum(parts.store.metadata_of(int(i))["retrieved"] for i in parts.store.ids)
    assert retrieved > 0  # every hit of the two memory evaluations is counted on its entry
    assert retrieved <= 2 * m3["items"] * 4
    assert {m["added_epoch"] for m in (parts.store.metadata_of(int(i)) for i in parts.store.ids)} == {3}
    assert [r["epoch"] for r in read_metrics(run_dir) if r["event"] == "retrieval"] == [2, 3]
    with pytest.raises(MemoryFileError, match="fingerprint"):
        load_memory(index, fingerprint="another model")
    report = build_report(index)  # metrics are in the run folder, not next to the index
    assert report["epochs"] == [] and report["stats"]["entries"] == len(parts.store)
    report = build_report(index, run_dir)
    assert [e["epoch"] for e in report["epochs"]] == [2, 3] and "per epoch" in format_report(report)
    from noblankslate.memory.report import plot_report
    assert plot_report(report, tmp_path / "report.png").stat().st_size > 0
    assert find_metrics(index, None)[0] is None


def test_retrieval_disabled_is_exactly_plain_coconut(tmp_path, tiny_data):
    plain = train(config_from_dict(tiny_config(tmp_path, tiny_data, num_epochs=2, name="plain")), CPU)
    off = train(config_from_dict(tiny_config(tmp_path, tiny_data, num_epochs=2, name="off",
                                             retrieval={"enabled": False, "k": 9}, nudge={"alpha_max": 0.9})), CPU)
    for a, b in zip(plain, off):
        assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
        assert [p["output"] for p in a.evaluation.predictions] == [p["output"] for p in b.evaluation.predictions]
    assert not list((tmp_path / "runs" / "off").glob("retrieval_metrics_*"))


def test_the_memory_is_never_built_from_the_evaluated_data(tmp_path, tiny_data):
    config = config_from_dict(tiny_config(tmp_path, tiny_data, retrieval={"enabled": True, "build_from": str(tiny_data[1])}))
    with pytest.raises(ValueError, match="the data being evaluated"):
        load_memory_data(config, [])


def test_contrastive_training_logs_saves_resumes_exactly_and_keys_the_memory(tmp_path, tiny_data):
    index = tmp_path / "index.bin"
    raw = tiny_config(tmp_path, tiny_data, num_epochs=4, retrieval={"enabled": True, "correct_only": False, "key_dim": 6},
                      training={"nudge_contrastive": True, "nudge_buffer_batch": 4, "retrieval_buffer_limit": 16},
                      index={"path": str(index)})
    train(config_from_dict(raw), CPU)
    run_dir = tmp_path / "runs" / "tiny"
    steps = [r for r in read_metrics(run_dir) if r["event"] == "step"]
    # the trajectory excludes the anchor: stage 0 has no thoughts and stage 1 only the anchor
    assert all("contrastive_loss" not in r for r in steps if r["stage"] in (0, 1))
    assert all(r["contrastive_loss"] > 0 for r in steps if r["stage"] >= 2)
    from noblankslate.train.checkpoint import load_checkpoint

    heads = load_checkpoint(run_dir / "checkpoint_4").extra_states["nudge_heads"]
    assert heads["key.weight"].shape == (6, 32)
    parts = load_memory(index)
    assert parts.store.key_dim == 6
    anchor = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    expected = anchor @ heads["key.weight"].numpy().T + heads["key.bias"].numpy()
    np.testing.assert_allclose(parts.key_map(anchor), expected, rtol=1e-5, atol=1e-6)  # the learned key map
    # resumed after epoch 3 (its buffer holds negatives), the run reaches exactly the uninterrupted run's
    # weights, heads and buffer
    short = {**raw, "name": "resumed", "num_epochs": 3}
    train(config_from_dict(short), CPU)
    assert load_checkpoint(tmp_path / "runs" / "resumed" / "checkpoint_3").extra_states["nudge_buffer"]["items"].shape[0] > 0
    train(config_from_dict({**short, "num_epochs": 4}), CPU)
    a, b = load_checkpoint(run_dir / "checkpoint_4"), load_checkpoint(tmp_path / "runs" / "resumed" / "checkpoint_4")
    for name in ("nudge_heads", "nudge_buffer"):
        assert a.extra_states[name].keys() == b.extra_states[name].keys()
        for key in a.extra_states[name]:
            assert torch.equal(a.extra_states[name][key], b.extra_states[name][key]), (name, key)
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key


def test_targets_are_the_softmax_weighted_mean_of_the_hits():
    store = LatentMemory(key_dim=2, steps=1, value_dim=2, metric="ip", fingerprint="t", value_dtype="float32")
    store.add(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32),
              np.array([[[2.0, 0.0]], [[0.0, 4.0]]], dtype=np.float32), [{"thoughts": 1}, {"thoughts": 1}])
    parts = MemoryParts(store=store, key_map=lambda x: x, value_inverse=lambda x: x,
                        confidence=make_calibrator("none").fit(np.zeros(0), np.zeros(0)))
    controller = MemoryController(parts, RetrievalConfig(k=2, sim_threshold=0.1, metric="ip", normalize_keys=False),
                                  NudgeConfig(alpha_max=1.0, calibration="none", match_norm=False))
    # row 0: similarities 0.5 and 0.2 (both hits); row 1: 0.5 and 0.05 (one hit); row 2: no hit
    controller._retrieve(torch.tensor([[0.5, 0.2], [0.5, 0.05], [0.05, 0.05]]))
    w = np.exp([0.5, 0.2]) / np.exp([0.5, 0.2]).sum()
    expected = np.array([w[0] * np.array([2.0, 0.0]) + w[1] * np.array([0.0, 4.0]), [2.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(controller._targets[:, 0].numpy(), expected, rtol=1e-6)
    assert controller._valid[:, 0].tolist() == [True, True, False]
    assert controller.record.hit.tolist() == [True, True, False] and controller.record.confidence.tolist() == [1.0, 1.0, 0.0]
    # a temperature of 0.1 sharpens the weights: softmax([5, 2])
    sharp = MemoryController(parts, RetrievalConfig(k=2, sim_threshold=0.1, metric="ip", normalize_keys=False, temperature=0.1),
                             NudgeConfig(alpha_max=1.0, calibration="none", match_norm=False))
    sharp._retrieve(torch.tensor([[0.5, 0.2]]))
    w = np.exp([5.0, 2.0]) / np.exp([5.0, 2.0]).sum()
    np.testing.assert_allclose(sharp._targets[0, 0].numpy(), w[0] * np.array([2.0, 0.0]) + w[1] * np.array([0.0, 4.0]), rtol=1e-6)


def test_memory_build_command_and_the_shared_setup(tmp_path, tiny_data, capsys):
    from noblankslate.cli import main
    from noblankslate.eval.setup import setup_run

    raw = tiny_config(tmp_path, tiny_data, num_epochs=2)
    train(config_from_dict(raw), CPU)
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoint_2"
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps(raw))  # JSON is YAML
    index = tmp_path / "built" / "faiss_index.bin"
    assert main(["memory", "build", str(config_file), f"load_model_path={checkpoint}", f"index.path={index}",
                 "retrieval.correct_only=false"]) == 0
    assert "memory written to" in capsys.readouterr().out
    parts = load_memory(index)
    assert len(parts.store) > 0
    # the setup every entry point shares loads the checkpoint's weights and tokenizer
    setup = setup_run(config_from_dict({**raw, "load_model_path": str(checkpoint), "only_eval": True}))
    assert setup.train == [] and len(setup.val_tokens) == 12
    from noblankslate.memory.builder import model_fingerprint
    load_memory(index, fingerprint=model_fingerprint(setup.model))  # built from exactly these weights
    assert main(["memory", "build", str(config_file), f"load_model_path={checkpoint}", f"index.path={index}",
                 "training.nudge_contrastive=true"]) == 2
    assert "nudge_heads.safetensors does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_sweep_tunes_on_training_data_and_reports_controls_on_validation(tmp_path, tiny_data):
    import subprocess
    import sys
    from pathlib import Path

    raw = tiny_config(tmp_path, tiny_data, num_epochs=3, retrieval={"correct_only": False},
                      index={"path": str(tmp_path / "sweep" / "index.bin")})
    train(config_from_dict(raw), CPU)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps(raw))
    assert not (tmp_path / "sweep").exists()  # the run's index.path: this run trained without the memory
    out = tmp_path / "sweep.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "memory_sweep.py"
    done = subprocess.run([sys.executable, str(tool), str(config_file), "--checkpoint", str(tmp_path / "runs" / "tiny" / "checkpoint_3"),
                           "--tune", "12", "--alphas", "0", "0.5", "--thresholds", "off", "0.5", "--threads", "1",
                           "--out", str(out), "batch_size_eval=5"],  # an override after the options
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tune_examples"] == 12 and len(result["tuning"]) == 4
    assert all(m["split"] == "tune" and m["items"] == 12 for m in result["tuning"])
    assert set(result["validation"]) == {"chosen", "control: random entries", "control: shuffled neighbours",
                                         "control: full replacement"}
    assert all(m["split"] == "valid" and m["items"] == 12 for m in result["validation"].values())
    assert "<- chosen" in done.stdout and done.stdout.count("\nvalid ") >= 4
    assert result["tune_source"] == "held-out training examples"
    # the sweep's memory is its own file, beside --out: the run's index.path is not written
    assert result["memory_path"] == str(tmp_path / "sweep_memory" / "index.bin")
    assert (tmp_path / "sweep_memory" / "index.bin").is_file() and not (tmp_path / "sweep").exists()

    # tuned and calibrated on new questions (two files apart from train and valid), the memory built from all
    # of the training data; a tuning file that holds validation questions is refused before any build
    from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa

    seen = {e["question"] for path in tiny_data for e in json.loads(path.read_text())}
    fresh = generate_prosqa(16, seed=9, config=ProsQAConfig.small(concepts=(3, 4), distance=(2, 2)), exclude_questions=seen)
    (tmp_path / "tune.json").write_text(json.dumps(fresh[:10]))
    (tmp_path / "calib.json").write_text(json.dumps(fresh[10:]))
    base = [sys.executable, str(tool), str(config_file), "--checkpoint", str(tmp_path / "runs" / "tiny" / "checkpoint_3"),
            "--alphas", "0", "--thresholds", "off", "0.5", "--threads", "1", "--out", str(out),
            f"retrieval.calibrate_from={tmp_path / 'calib.json'}"]
    done = subprocess.run([*base, "--tune-path", str(tmp_path / "tune.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tune_examples"] == 10 and result["tune_source"] == str(tmp_path / "tune.json")
    assert result["calibrated_on"] == "retrieval.calibrate_from (6 examples)"
    assert all(m["items"] == 10 for m in result["tuning"]) and result["validation"]["chosen"]["items"] == 12
    assert result["memory_build"]["examples"] == 48 and result["memory_build"]["held_out"] == 0  # nothing carved out
    done = subprocess.run([*base, "--tune-path", str(tiny_data[1])], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "12 of its questions" in done.stderr and "--tune-path" in done.stderr

    # the exit-score study on the same model and files: every variant tuned on the tuning file, reported on valid
    study = Path(__file__).resolve().parents[1] / "tools" / "exit_score_study.py"
    study_out = tmp_path / "study.json"
    done = subprocess.run([sys.executable, str(study), str(config_file), "--checkpoint",
                           str(tmp_path / "runs" / "tiny" / "checkpoint_3"), "--tune-path", str(tmp_path / "tune.json"),
                           "--threads", "1", "--out", str(study_out), f"retrieval.calibrate_from={tmp_path / 'calib.json'}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(study_out.read_text())
    assert result["items"] == {"build": 48, "calibration": 6, "tune": 10, "valid": 12}
    assert len(result["variants"]) == 18 and {v["chosen_on"] for v in result["variants"]} == {"tune"}
    assert all(v["valid"]["paired_vs_plain"]["n"] == 12 for v in result["variants"])
    assert "the oracle saves" in done.stdout and done.stdout.count("\nright ") == 9


def test_threshold_curve_on_a_hand_made_case():
    from noblankslate.memory.evaluation import threshold_curve

    # item A: scores 0.95, 0.2, right after 1 thought: no, after 2: yes, after 3: yes
    # item B: scores 0.6, 0.97, right after 1: yes, after 2: yes, after 3: no
    items = [(np.array([0.95, 0.2, 0.1]), [False, True, True]), (np.array([0.6, 0.97, 0.0]), [True, True, False])]
    curve = {p["threshold"]: p for p in threshold_curve(items)}
    assert curve[None] == {"threshold": None, "accuracy": 0.5, "mean_thoughts": 3.0, "exit_rate": 0.0}
    assert curve[0.9] == {"threshold": 0.9, "accuracy": 0.5, "mean_thoughts": 1.5, "exit_rate": 1.0}  # A at 1, B at 2
    assert curve[0.5] == {"threshold": 0.5, "accuracy": 0.5, "mean_thoughts": 1.0, "exit_rate": 1.0}
    assert curve[0.99] == curve[None] | {"threshold": 0.99}


def test_calibration_by_thought_on_a_hand_made_case():
    from noblankslate.memory.evaluation import calibration_by_thought

    # the pooled score can look calibrated while one thought is badly overconfident: thought 2 here
    items = [(np.array([0.95, 0.95]), [True, False]), (np.array([0.05, 0.95]), [False, False]),
             (np.array([0.35]), [False])]  # an item with one thought adds nothing at thought 2
    first, second = calibration_by_thought(items)
    assert (first["thought"], first["samples"], second["thought"], second["samples"]) == (1, 3, 2, 2)
    assert first["event_rate"] == pytest.approx(1 / 3) and second["event_rate"] == 0.0
    assert first["mean_score"] == pytest.approx(0.45) and second["mean_score"] == pytest.approx(0.95)
    # thought 1: bins 0.0-0.1 (0.05, wrong), 0.3-0.4 (0.35, wrong), 0.9-1.0 (0.95, right): (0.05 + 0.35 + 0.05) / 3
    assert first["ece"] == pytest.approx(0.15)
    assert second["ece"] == pytest.approx(0.95)  # both at 0.95, both wrong
    top = second["reliability"][-1]
    assert top["count"] == 2 and top["accuracy"] == 0.0
    assert calibration_by_thought([]) == []
