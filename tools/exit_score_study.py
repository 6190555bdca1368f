"""Which exit score finds the room the oracle shows? Variants of the exit probe, tuned and reported apart.

    python tools/exit_score_study.py CONFIG --checkpoint RUN/checkpoint_N --tune-path TUNE \\
        retrieval.calibrate_from=CALIB [--max-loss 0.005] [--out study.json] [--threads N] [key=value ...]

The memory's exit probe reads a thought and predicts "the answer is right if thinking ends here"; on the
chain task (docs/memory.md) it saves 9-30% of the thought passes within half a point, where an oracle that
stops every item at its first right thought count saves about 60%. This asks whether another probe of the
same kind would find more. Every split is generated once with 1, 2, ..., T thoughts (memory off, the
probe's own samples): the run's build examples (as ``nbs memory build`` draws them), the examples of
``retrieval.calibrate_from`` (new questions), the tuning file (new questions) and ``val_path``. Then each
variant is fitted, its threshold chosen on the tuning file by the sweep's rule (the fewest thoughts whose
accuracy is at least the plain model's minus ``--max-loss``; none qualifies: no exit), and reported on
``val_path`` only, paired with the plain model. The variants:

- label: ``right`` (the package's probe: the answer after j + 1 thoughts is right) or ``agree`` (it is the
  answer all T thoughts give: an exit that keeps the full computation's answer, and needs no gold answer);
- features: ``thought`` (the package's), ``thought+step`` (also the change from the previous thought and
  the thought's index, one-hot), ``thought+readout`` (also the LM head's top probability, its log and the
  entropy at the thought: a thought names the next node, or the answer marker once the answer is out);
- fitted on: ``build`` (the package's: weights on the build examples, calibration on ``calibrate_from``),
  ``calibration`` (weights and calibration both on ``calibrate_from``, cross-fitted over 5 folds of items)
  or ``both`` (weights on the two, the calibration on the folds' held-out logits).

Beside each chosen threshold the output gives the best the variant could do with its threshold picked on
validation itself, which is an upper bound for any tuning rule and not a result, and the oracle's saving.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noblankslate.config import load_config
from noblankslate.data.curriculum import prompt_view
from noblankslate.data.schema import load_examples
from noblankslate.data.tokenize import tokenize_examples
from noblankslate.eval.metrics import brier_score, expected_calibration_error
from noblankslate.eval.paired import paired_comparison
from noblankslate.eval.setup import check_held_apart, setup_run
from noblankslate.memory.builder import Answered, answer_with_fewer_thoughts, build_selection
from noblankslate.memory.calibration import make_calibrator
from noblankslate.memory.evaluation import exit_step, threshold_curve
from noblankslate.memory.probe import ExitProbe, fit_exit_probe
from noblankslate.model.checkpoint_files import evaluated_position
from noblankslate.runtime import distributed_context

LABELS = ("right", "agree")
FEATURES = ("thought", "thought+step", "thought+readout")
FITS = ("build", "calibration", "both")
TUNING_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
BOUND_GRID = tuple(float(t) for t in np.round(np.linspace(0.5, 0.995, 100), 4))
FOLDS = 5
_ROUNDING = 1e-9  # as the sweep's rule: a loss of exactly --max-loss is allowed


@dataclasses.dataclass
class Split:
    """One split's items: each one's thoughts (n, D), right-after-j and answer-after-j for j = 1..n."""

    thoughts: list[np.ndarray]
    right: list[list[bool]]
    answers: list[list[str]]

    @staticmethod
    def of(answered: Answered) -> Split:
        ids = [i for i in sorted(answered.by_idx) if len(answered.thoughts(i))]
        return Split([np.asarray(answered.thoughts(i), dtype=np.float32) for i in ids],
                     [list(map(bool, answered.correct_at[i])) for i in ids], [answered.answers_at[i] for i in ids])

    def labels(self, label: str) -> list[list[bool]]:
        if label == "right":
            return self.right
        return [[answer == answers[-1] for answer in answers] for answers in self.answers]

    def plain(self) -> list[bool]:
        return [right[-1] for right in self.right]


def features_of(thoughts: np.ndarray, kind: str, readout: Any = None) -> np.ndarray:
    """(n, D) thoughts of one item -> (n, F) probe features of kind ``kind`` (see the module doc)."""
    parts = [thoughts]
    if kind == "thought+step":
        previous = np.concatenate([thoughts[:1], thoughts[:-1]])
        parts += [thoughts - previous, np.eye(len(thoughts), dtype=np.float32)]
    elif kind == "thought+readout":
        parts.append(readout(thoughts))
    return np.concatenate(parts, axis=1)


def stacked(split: Split, kind: str, label: str, readout: Any, items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples of ``items`` (all by default): features, labels and each sample's item."""
    chosen = range(len(split.thoughts)) if items is None else items
    labels = split.labels(label)
    x = [features_of(split.thoughts[i], kind, readout) for i in chosen]
    y = [np.asarray(labels[i], dtype=np.float32) for i in chosen]
    owner = [np.full(len(labels[i]), i) for i in chosen]
    return np.concatenate(x), np.concatenate(y), np.concatenate(owner)


def cross_fitted(x: np.ndarray, y: np.ndarray, owner: np.ndarray, extra: tuple[np.ndarray, np.ndarray] | None,
                 seed: int) -> ExitProbe:
    """Weights on every sample (and ``extra``); the calibration on out-of-fold logits, folds of whole items
    (an item's thoughts are alike, so splitting them between folds would leak)."""
    items = np.unique(owner)
    fold_of = dict(zip(np.random.default_rng(seed).permutation(items).tolist(), np.arange(len(items)) % FOLDS))
    fold = np.array([fold_of[int(i)] for i in owner])
    held_logits = np.zeros(len(y), dtype=np.float32)
    for k in range(FOLDS):
        inside, outside = fold != k, fold == k
        fit_x, fit_y = x[inside], y[inside]
        if extra is not None:
            fit_x, fit_y = np.concatenate([extra[0], fit_x]), np.concatenate([extra[1], fit_y])
        probe = fit_exit_probe(fit_x, fit_y, x[outside], y[outside], "platt")
        held_logits[outside] = probe.logit(torch.as_tensor(x[outside])).numpy()
    all_x, all_y = (x, y) if extra is None else (np.concatenate([extra[0], x]), np.concatenate([extra[1], y]))
    probe = fit_exit_probe(all_x, all_y, x, y, "platt")
    probe.calibrator = make_calibrator("platt").fit(held_logits, y)
    return probe


def choose_threshold(curve: list[dict[str, Any]], max_loss: float) -> float | None:
    """The sweep's rule on a threshold curve: the fewest thoughts within ``max_loss`` of the fixed-length
    point (ties: the higher accuracy); None when no threshold qualifies (no exit)."""
    plain = next(p for p in curve if p["threshold"] is None)["accuracy"]
    allowed = [p for p in curve if p["threshold"] is not None and p["accuracy"] >= plain - max_loss - _ROUNDING]
    if not allowed:
        return None
    return min(allowed, key=lambda p: (p["mean_thoughts"], -p["accuracy"]))["threshold"]


def oracle_thoughts(split: Split) -> float:
    """Mean thoughts when every item stops at its first right count (all of them when none is right)."""
    return float(np.mean([next((j + 1 for j, ok in enumerate(right) if ok), len(right)) for right in split.right]))


def study(splits: dict[str, Split], readout: Any, max_loss: float, seed: int) -> list[dict[str, Any]]:
    """Every variant, fitted, tuned on ``splits["tune"]`` and reported on ``splits["valid"]``."""
    tune, valid = splits["tune"], splits["valid"]
    thoughts = float(np.mean([len(r) for r in valid.right]))
    results = []
    for label in LABELS:
        for kind in FEATURES:
            build_x, build_y, _ = stacked(splits["build"], kind, label, readout)
            calib_x, calib_y, calib_owner = stacked(splits["calibration"], kind, label, readout)
            for fit in FITS:
                if fit == "build":
                    probe = fit_exit_probe(build_x, build_y, calib_x, calib_y, "platt")
                else:
                    probe = cross_fitted(calib_x, calib_y, calib_owner, (build_x, build_y) if fit == "both" else None, seed)

                def scores(split: Split) -> list[np.ndarray]:
                    return [probe.probability(torch.as_tensor(features_of(t, kind, readout)), 0).numpy() for t in split.thoughts]
                tune_items = list(zip(scores(tune), tune.right))
                valid_scores = scores(valid)
                valid_items = list(zip(valid_scores, valid.right))
                threshold = choose_threshold(threshold_curve(tune_items, TUNING_GRID), max_loss)
                stops = [exit_step(s, threshold) for s in valid_scores]
                with_exit = [right[stop] for stop, right in zip(stops, valid.right)]
                paired = paired_comparison(with_exit, valid.plain())
                bound_curve = threshold_curve(valid_items, BOUND_GRID)
                bound = min((p["mean_thoughts"] for p in bound_curve
                             if p["accuracy"] >= bound_curve[-1]["accuracy"] - max_loss - _ROUNDING), default=thoughts)
                events = np.concatenate([np.asarray(e, dtype=float) for e in valid.labels(label)])
                flat = np.concatenate(valid_scores)
                results.append({
                    "label": label, "features": kind, "fitted_on": fit,
                    "chosen_on": "tune", "threshold": threshold,
                    "valid": {"paired_vs_plain": paired.to_dict(), "mean_thoughts": float(np.mean(stops)) + 1,
                              "thought_passes_saved": 1 - (float(np.mean(stops)) + 1) / thoughts,
                              "ece": expected_calibration_error(flat, events), "brier": brier_score(flat, events),
                              "event": "right if thinking ends here" if label == "right" else
                                       "the answer all thoughts give, if thinking ends here"},
                    "valid_bound": {"what": "the fewest thoughts within --max-loss with the threshold picked on "
                                            "validation itself: an upper bound for any tuning rule, not a result",
                                    "thought_passes_saved": 1 - bound / thoughts},
                })
    return results


def _readout(model: torch.nn.Module):
    """Thoughts (n, D) -> (n, 3): the LM head's top probability, its log and the entropy, at each thought."""
    head = model.lm_head

    def readout(thoughts: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            log_p = torch.log_softmax(head(torch.as_tensor(thoughts)).float(), dim=-1)
        top = log_p.max(dim=-1).values
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        return torch.stack([top.exp(), top, entropy], dim=1).numpy()
    return readout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True, help="the trained model (a checkpoint folder)")
    parser.add_argument("--tune-path", required=True, help="questions the model never trained on, for the thresholds")
    parser.add_argument("--max-loss", type=float, default=0.005, help="accuracy an exit may lose on the tuning split")
    parser.add_argument("--out", help="write every variant's numbers here (JSON)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch-size", type=int, default=64, help="generation batch size")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, [*args.overrides, f"load_model_path={args.checkpoint}", "only_eval=true",
                                       "retrieval.enabled=true"])
    if not config.retrieval.calibrate_from:
        raise SystemExit("set retrieval.calibrate_from=FILE (new questions): the probes are calibrated on it")
    with distributed_context() as context:
        setup = setup_run(config)
        stage = evaluated_position(args.checkpoint, config).stage
        model = setup.model.to(context.device).eval()
        tune = load_examples(args.tune_path)
        check_held_apart(args.tune_path, tune, [
            (config.train_path, setup.train), (config.retrieval.calibrate_from, setup.calibration_examples),
            (config.val_path, setup.val)], what="--tune-path")
        sources = {
            "build": (setup.memory_examples, build_selection(setup)),
            "calibration": (setup.calibration_examples, setup.calibration_tokens),
            "tune": (tune, tokenize_examples(tune, setup.tokenizer, separator=config.step_separator)),
            "valid": (setup.val, setup.val_tokens),
        }
        splits = {name: Split.of(answer_with_fewer_thoughts(model, setup, examples, prompt_view(tokens, stage, setup.spec),
                                                            context, batch_size=args.batch_size))
                  for name, (examples, tokens) in sources.items()}
        if not context.is_main:
            return 0
        results = study(splits, _readout(model), args.max_loss, config.seed)
    valid = splits["valid"]
    thoughts = float(np.mean([len(r) for r in valid.right]))
    oracle = 1 - oracle_thoughts(valid) / thoughts
    plain = float(np.mean(valid.plain()))
    print(f"valid: {len(valid.right)} items, plain {100 * plain:.1f}% with {thoughts:.2f} thoughts; the oracle saves "
          f"{100 * oracle:.1f}% of the thought passes. Thresholds chosen on {len(splits['tune'].right)} tuning questions "
          f"(within {100 * args.max_loss:.1f} points); 'bound' is picked on valid itself (not a result).")
    print(f"{'label':<6} {'features':<16} {'fitted on':<12} {'threshold':>9} {'diff':>6} {'95% CI':>14} {'b/c':>7} "
          f"{'p':>7} {'saved':>6} {'bound':>6} {'ECE':>6}")
    for r in results:
        v, p = r["valid"], r["valid"]["paired_vs_plain"]
        low, high = p["ci95"]
        print(f"{r['label']:<6} {r['features']:<16} {r['fitted_on']:<12} {str(r['threshold']):>9} "
              f"{100 * p['difference']:>+6.1f} [{100 * low:+5.1f},{100 * high:+5.1f}] {p['only_first']:>3}/{p['only_second']:<3} "
              f"{p['p_value']:>7.3g} {100 * v['thought_passes_saved']:>5.1f}% {100 * r['valid_bound']['thought_passes_saved']:>5.1f}% "
              f"{v['ece']:>6.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "checkpoint": args.checkpoint, "tune_path": args.tune_path, "max_loss": args.max_loss,
            "items": {name: len(s.right) for name, s in splits.items()}, "valid_plain_accuracy": plain,
            "valid_mean_thoughts": thoughts, "oracle_thought_passes_saved": oracle, "variants": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
