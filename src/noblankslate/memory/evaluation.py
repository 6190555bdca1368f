"""The memory's evaluation of one model: build, the paired runs, the exit score's calibration, the metrics.

One plain function, called by the training loop at one point of each epoch (and usable by any entry
point that has a model and its run setup): it rebuilds the memory from the training data, generates the
validation set with the memory (nudge only, then nudge and exit), paired with the plain run the caller
already made, runs the control that says whether the model uses its thoughts at all (every hit's thoughts
replaced by its neighbours'), and measures how well the thresholded exit score predicts its event on
validation. It returns the metrics (also written as ``retrieval_metrics_epoch_{E}.json`` when asked) and its timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noblankslate.data.curriculum import prompt_view
from noblankslate.eval.evaluate import GenerationEval, evaluate_generation
from noblankslate.eval.metrics import (
    brier_score,
    expected_calibration_error,
    reliability_table,
)
from noblankslate.eval.paired import paired_comparison
from noblankslate.eval.setup import RunSetup
from noblankslate.files import write_text_atomic
from noblankslate.memory.builder import LinearKeyMap, build_memory, with_thoughts
from noblankslate.memory.controller import MemoryParts
from noblankslate.memory.controls import full_replacement
from noblankslate.memory.gate import MemoryGate, memory_controller, nudge_kind
from noblankslate.memory.metrics import METRICS_FILE, retrieval_metrics
from noblankslate.model.coconut import Coconut
from noblankslate.runtime import DistributedContext


def exit_calibration(model: Coconut, setup: RunSetup, parts: MemoryParts, stage: int,
                     generate: Callable[..., GenerationEval]) -> dict[str, Any]:
    """ECE, Brier and reliability of the exit probe on validation, against the event it predicts.

    The probe scores thought j (as fed without the memory) with the probability that the answer is right
    if thinking ends after it, i.e. after j + 1 thoughts. Here every validation item is generated with
    1, 2, ..., T thoughts (memory off), and each (thought j, right after j + 1 thoughts) pair of every
    item is one sample: the same event the probe was fitted to on the build split.
    """
    if parts.probe is None:
        return {"metric": "probe", "available": False}
    spec = setup.spec
    prompts = prompt_view(setup.val_tokens, stage, spec)
    full = generate(prompts, keep_thoughts=True).predictions  # every thought, memory off
    # From the prompts, which every rank has (the predictions are gathered on the main rank only): every rank
    # must make the same generate calls, or their collectives deadlock.
    most = max((f["input_ids"].count(spec.latent_id) for f in prompts), default=0)
    right_after = {j: {r["idx"]: r["correct"] for r in generate([with_thoughts(f, j, spec.latent_id) for f in prompts]).predictions}
                   for j in range(1, most)}
    scores, events = [], []
    per_item = []  # (scores of thoughts 0..n-1, right after 1..n thoughts)
    for record in full:
        thoughts = torch.as_tensor(record["thoughts"])  # (n, D)
        if len(thoughts) == 0:
            continue
        probability = parts.probe.probability(thoughts, torch.arange(len(thoughts))).float().cpu().numpy()  # (n,)
        right = [bool(record["correct"]) if j + 1 == len(thoughts) else bool(right_after[j + 1][record["idx"]])
                 for j in range(len(thoughts))]
        scores += probability.tolist()
        events += right
        per_item.append((probability, right))
    if not scores:
        return {"metric": "probe", "available": False}
    scores_np, events_np = np.array(scores), np.array(events)
    return {"metric": "probe", "available": True, "samples": len(scores),
            "event": "right after thinking ends at the scored thought (memory off)",
            "ece": expected_calibration_error(scores_np, events_np), "brier": brier_score(scores_np, events_np),
            "reliability": reliability_table(scores_np, events_np), "threshold_curve": threshold_curve(per_item),
            "by_thought": calibration_by_thought(per_item)}


def calibration_by_thought(per_item: list[tuple[np.ndarray, list[bool]]]) -> list[dict[str, Any]]:
    """The exit score's calibration at each thought separately (thought j + 1: exit after it).

    The pooled ECE averages over thoughts, so a score can be calibrated overall and still be overconfident
    at the one thought where a high threshold makes rows stop: each thought's own ECE and reliability show
    it. An item with fewer thoughts adds nothing past its last.
    """
    most = max((len(right) for _, right in per_item), default=0)
    out = []
    for j in range(most):
        scores = np.array([float(score[j]) for score, right in per_item if j < len(right)])
        events = np.array([bool(right[j]) for _, right in per_item if j < len(right)])
        out.append({"thought": j + 1, "samples": len(scores), "mean_score": float(scores.mean()),
                    "event_rate": float(events.mean()), "ece": expected_calibration_error(scores, events),
                    "reliability": reliability_table(scores, events)})
    return out


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def exit_step(score: np.ndarray, threshold: float | None) -> int:
    """The index of the thought after which a row stops: the first (before the last) whose score reaches
    ``threshold``, else the last; None never stops early."""
    last = len(score) - 1
    return next((j for j in range(last) if threshold is not None and score[j] >= threshold), last)


def threshold_curve(per_item: list[tuple[np.ndarray, list[bool]]],
                    thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, Any]]:
    """Accuracy and thoughts used as the exit threshold moves, from each item's per-thought probe scores
    and its correctness after each number of thoughts (the probe's exit on the plain model, memory off).

    The last point (threshold None) is fixed-length Coconut: every thought is used.
    """
    curve = []
    for threshold in (*thresholds, None):
        stops = [exit_step(score, threshold) for score, _ in per_item]
        right = [correct[stop] for stop, (_, correct) in zip(stops, per_item)]
        curve.append({"threshold": threshold, "accuracy": float(np.mean(right)),
                      "mean_thoughts": float(np.mean(stops)) + 1,
                      "exit_rate": float(np.mean([stop + 1 < len(c) for stop, (_, c) in zip(stops, per_item)]))})
    return curve


def replacement_control(off: GenerationEval, replaced: GenerationEval) -> dict[str, Any]:
    """The plain run against the run whose every hit had its thoughts replaced by its neighbours', paired."""
    plain = {r["idx"]: r for r in off.predictions}
    other = {r["idx"]: r for r in replaced.predictions}
    items = sorted(plain)
    paired = (paired_comparison([bool(other[i]["correct"]) for i in items], [bool(plain[i]["correct"]) for i in items])
              if items else None)
    return {"what": "every hit's thoughts replaced by its neighbours' mean (alpha 1, no norm matching); few "
                    "changed answers mean the model hardly uses its thoughts, which bounds what any nudge can do",
            "accuracy": paired.first_correct / paired.n if paired else 0.0,
            "mean_generated_tokens": float(np.mean([other[i]["generated_tokens"] for i in items])) if items else 0.0,
            "mean_forward_passes": float(np.mean([other[i]["forward_passes"] for i in items])) if items else 0.0,
            "changed_answers": sum(other[i]["prediction"] != plain[i]["prediction"] for i in items),
            "paired_vs_off": paired.to_dict() if paired else None}


def evaluate_memory(model: Coconut, setup: RunSetup, context: DistributedContext, *, epoch: int, stage: int,
                    off: GenerationEval, off_seconds: float, lockstep: bool = False,
                    key_head: LinearKeyMap | None = None, metrics_dir: str | Path | None = None,
                    generate: Callable[..., GenerationEval] | None = None,
                    gate: MemoryGate | None = None,
                    on_built: Callable[[MemoryParts], None] | None = None,
                    ) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Build the memory with ``model`` and evaluate with it, paired with the plain run ``off``.

    Args:
        model: the unwrapped (gathered) model; every rank calls this.
        epoch: 1-based, for the file name and the entries' ``added_epoch``.
        off, off_seconds: the plain evaluation of this model on the validation set and its time.
        metrics_dir: where to write ``retrieval_metrics_epoch_{E}.json`` (None: not written).
        generate: ``generate(prompts, controller=None, keep_thoughts=False)`` -> GenerationEval; the
            default evaluates ``setup.val`` with the config's batch size and token budget.
        gate: the learned gate of a model trained with ``training.memory_in_training`` (its own, or the one
            saved beside its checkpoint): the two memory runs read the memory through it, as the model
            learned to; None: the fixed nudge of the config's ``nudge`` settings. The metrics record which
            (``nudge.kind``: "gate" or "fixed").
        on_built: called with the memory once built (the training loop reads it in the next epoch).

    Returns:
        The metrics (None on ranks other than the main one) and the seconds of each part.
    """
    config = setup.config
    if generate is None:
        def generate(prompts, controller=None, keep_thoughts=False):
            return evaluate_generation(model, setup.tokenizer, setup.val, prompts, setup.collate,
                                       batch_size=config.batch_size_eval or config.batch_size_training,
                                       max_new_tokens=config.resolved_max_new_tokens, context=context,
                                       lockstep=lockstep, controller=controller, keep_thoughts=keep_thoughts,
                                       step_separator=config.step_separator)
    built = build_memory(model, setup, context, lockstep=lockstep, epoch=epoch, key_head=key_head)
    if on_built is not None:
        on_built(built.parts)
    prompts = prompt_view(setup.val_tokens, stage, setup.spec)
    seconds = {"off": off_seconds, "build": built.report.get("seconds", 0.0)}
    evaluations = {}
    kind = None
    for name, exit_enabled in (("full", False), ("on", True)):
        controller = memory_controller(built.parts, config.retrieval, config.nudge, gate, exit_enabled=exit_enabled)
        kind = nudge_kind(controller)
        started = time.perf_counter()
        evaluations[name] = generate(prompts, controller=controller)
        seconds[name] = time.perf_counter() - started
        if name == "on":
            seconds["memory"] = controller.seconds
    # The control: a model whose answers survive losing its own thoughts gives a nudge nothing to change.
    replaced_parts, replaced_nudge = full_replacement(built.parts, config.nudge)  # alpha 1: no gate's choice
    control = memory_controller(replaced_parts, config.retrieval, replaced_nudge, None, exit_enabled=False)
    control.count_retrievals = False  # the entries' `retrieved` counters count the memory's real use only
    started = time.perf_counter()
    replaced = generate(prompts, controller=control)
    seconds["control"] = time.perf_counter() - started
    started = time.perf_counter()
    exit_scores = exit_calibration(model, setup, built.parts, stage, generate) if config.nudge.exit_metric == "probe" \
        else {"metric": config.nudge.exit_metric, "available": False,
              "why": "only the probe's score is a probability; the training-free scores have no calibration"}
    seconds["exit_calibration"] = time.perf_counter() - started
    if not context.is_main:
        return None, seconds
    if not config.debug:
        # the entries' `retrieved` counters (hits in both memory runs; with several processes, the main
        # process's share of the items) are kept with the memory
        built.parts.store.save(config.index.path)
    metrics = retrieval_metrics(off, evaluations["full"], evaluations["on"],
                                {**built.parts.store.stats(), "path": config.index.path, "build": built.report},
                                seconds, epoch, stage)
    metrics["nudge"]["kind"] = kind
    metrics["exit_calibration"] = exit_scores
    metrics["control_full_replacement"] = replacement_control(off, replaced)
    if metrics_dir is not None and not config.debug:
        path = Path(metrics_dir) / METRICS_FILE.format(epoch=epoch)
        write_text_atomic(path, json.dumps(metrics, indent=1))
    return metrics, seconds
