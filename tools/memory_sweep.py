"""Choose the memory's settings on a tuning split, then report them and the controls on validation.

    python tools/memory_sweep.py CONFIG --checkpoint RUN/checkpoint_N [--tune 300] [--alphas 0 0.1 0.3 0.5]
        [--thresholds off 0.9 0.95 0.99] [--metrics probe stability neighbors] [--temperatures 1 0.05]
        [--max-loss 0.005] [--out sweep.json] [--memory-path P] [key=value ...]

1. ``--tune`` examples are drawn (seeded) from the memory's training data (``retrieval.build_from`` or
   ``train_path``) and held out of the memory, which is built once from the rest with the checkpoint's
   model. With ``--tune-path FILE`` the tuning split is that file instead (questions the model never
   trained on, checked to share none with the training, build, calibration or validation data), and the
   memory is built from all of its data. Training examples are answered better than new questions (the
   chain model: 99.7% against 95.4%), so a threshold chosen on them exits too eagerly on new ones.
2. Every setting (alpha_max x temperature x exit metric x threshold) is evaluated on the tuning split,
   paired with the plain model there. The chosen setting has the fewest mean forward passes among those
   whose tuning accuracy is at least the plain model's minus ``--max-loss`` (ties: higher accuracy); if
   no exit qualifies, the best-accuracy setting without exit.
3. On ``val_path`` only the chosen setting is evaluated (never chosen there), with the paired statistics,
   the exit probe's calibration, and three controls at the chosen alpha: a memory of random entries with
   the real norms, shuffled neighbours, and full replacement (alpha 1, no norm matching).

A checkpoint trained with ``training.memory_in_training`` has a learned gate saved beside it
(``memory_gate.safetensors``): the memory is then read through that gate, as in training and in the run's
own evaluation. The gate sets each thought's step itself, so ``--alphas`` does not apply and is not swept
(the output says so: ``nudge``); only the exit settings (and temperatures) are, and the random-entries and
shuffled-neighbours controls go through the gate too (full replacement is alpha 1 by definition, the
fixed nudge). Every result records which nudge it used (``nudge.kind``: "gate" or "fixed").

Every printed row says which split its numbers come from. The sweep's memory is written beside ``--out``
(``OUT_memory/index.bin``; ``--memory-path`` to choose), never at the run's ``index.path``, whose memory
(built by the run's last epoch) it would replace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from noblankslate.config import load_config
from noblankslate.data.curriculum import prompt_view
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.data.schema import load_examples
from noblankslate.data.tokenize import tokenize_examples
from noblankslate.eval.setup import RunSetup, check_held_apart, setup_run
from noblankslate.memory.builder import build_memory, saved_key_head
from noblankslate.memory.controls import (
    full_replacement,
    random_memory,
    shuffled_neighbours,
)
from noblankslate.memory.evaluation import exit_calibration
from noblankslate.memory.gate import (
    NUDGE_FIXED,
    NUDGE_GATE,
    memory_controller,
    nudge_kind,
    saved_gate,
)
from noblankslate.memory.metrics import retrieval_metrics
from noblankslate.model.checkpoint_files import evaluated_position
from noblankslate.runtime import distributed_context, print0


_ROUNDING = 1e-9
"""Far below one item's share of any split, far above a float's error on an accuracy difference."""


def choose(results: list[dict], max_loss: float) -> dict:
    """The setting with the fewest passes within ``max_loss`` of the plain accuracy (see the module doc).

    "Within" includes the bound: 5 of 1,000 answers lost is a loss of 0.005, although 0.959 - 0.964 is
    -0.0050000000000000044 in floating point, hence the rounding allowance.
    """
    allowed = [r for r in results if r["setting"]["exit_threshold"] is not None
               and r["accuracy"]["difference"] >= -max_loss - _ROUNDING]
    if allowed:
        return min(allowed, key=lambda r: (r["exit"]["mean_forward_passes_with_exit"], -r["accuracy"]["with_retrieval"]))
    no_exit = [r for r in results if r["setting"]["exit_threshold"] is None]
    return max(no_exit, key=lambda r: r["accuracy"]["with_retrieval"])


def _line(split: str, name: str, m: dict) -> str:
    a, e, p = m["accuracy"], m["exit"], m["paired"]["memory_vs_off"]
    low, high = p["ci95"]
    return (f"{split:<6} {name:<34} {a['without_retrieval']:>7.4f} {a['with_retrieval']:>7.4f} "
            f"{100 * a['difference']:>+6.1f} [{100 * low:+5.1f},{100 * high:+5.1f}] {p['only_first']:>4}/{p['only_second']:<4} "
            f"{p['p_value']:>7.3g} {e['mean_forward_passes_without_exit']:>7.2f} {e['mean_forward_passes_with_exit']:>7.2f} "
            f"{e['false_exits']:>5} {m['calibration']['ece']:>6.3f}")


def _carved_tuning(count: int, setup: RunSetup) -> tuple[list, list, RunSetup]:
    """``count`` examples drawn (seeded) from the memory's data, and the setup that builds from the rest."""
    order = np.random.default_rng(setup.config.seed + 7).permutation(len(setup.memory_examples))
    if count >= len(order):
        raise SystemExit(f"--tune {count} leaves no example to build the memory from ({len(order)} in all)")
    tune_rows, build_rows = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    build_setup = dataclasses.replace(setup, memory_examples=[setup.memory_examples[i] for i in build_rows],
                                      memory_tokens=[setup.memory_tokens[i] for i in build_rows])
    return [setup.memory_examples[i] for i in tune_rows], [setup.memory_tokens[i] for i in tune_rows], build_setup


def _tuning_file(path: str, setup: RunSetup) -> tuple[list, list, RunSetup]:
    """The examples of ``path`` (checked to be new: no question shared with the run's other data)."""
    config = setup.config
    examples = load_examples(path)
    check_held_apart(path, examples, [
        (config.train_path, setup.train), (config.retrieval.build_from or config.train_path, setup.memory_examples),
        (config.retrieval.calibrate_from, setup.calibration_examples), (config.val_path, setup.val)], what="--tune-path")
    return examples, tokenize_examples(examples, setup.tokenizer, separator=config.step_separator), setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True, help="the trained model (a checkpoint folder)")
    parser.add_argument("--tune", type=int, default=300, help="tuning examples held out of the memory's data")
    parser.add_argument("--tune-path", help="tune on this file (new questions) instead of held-out training examples")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5],
                        help="alpha_max values of the fixed nudge (not used with a checkpoint's learned gate)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--thresholds", nargs="+", default=["off", "0.9", "0.95", "0.99"])
    parser.add_argument("--metrics", nargs="+", default=["probe"], choices=["probe", "stability", "neighbors"])
    parser.add_argument("--max-loss", type=float, default=0.005, help="accuracy an exit may lose on the tuning split")
    parser.add_argument("--out", help="write every result (tuning and validation) here (JSON)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--memory-path", help="where the sweep's memory is written (default: beside --out, "
                        "OUT_memory/index.bin, or a temporary folder); never the run's own index.path")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # options may come before or after the overrides
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(args.config, [*args.overrides, f"load_model_path={args.checkpoint}", "only_eval=true",
                                       "retrieval.enabled=true"])
    # The sweep's memory has a file of its own: written at the run's index.path, it would replace the memory
    # the run's last epoch built, and two sweeps of one run at once would clean up each other's files.
    scratch = tempfile.TemporaryDirectory(prefix="memory-sweep-") if not (args.memory_path or args.out) else None
    memory_path = args.memory_path or (str(Path(args.out).with_suffix("")) + "_memory/index.bin" if args.out
                                       else str(Path(scratch.name) / "index.bin"))
    config = dataclasses.replace(config, index=dataclasses.replace(config.index, path=memory_path))
    with distributed_context() as context:
        setup = setup_run(config)
        position = evaluated_position(args.checkpoint, config)
        stage = position.stage
        print0(f"evaluating at stage {stage} (from {position.source})")
        model = setup.model.to(context.device)
        gate = saved_gate(args.checkpoint, config, model.base_causallm.config.hidden_size, context.device)
        if gate is not None:
            nudge_note = {"kind": NUDGE_GATE, "alpha_max": "not swept: the checkpoint's learned gate sets each "
                          "thought's step (--alphas does not apply); only the exit settings are swept"}
        else:
            nudge_note = {"kind": NUDGE_FIXED, "alpha_max": f"swept over {args.alphas}"}
        print0(f"nudge: {nudge_note['kind']} ({nudge_note['alpha_max']})")
        if args.tune_path:
            tune, tune_tokens, build_setup = _tuning_file(args.tune_path, setup)
            tune_note = f"{len(tune)} new questions from {args.tune_path} for tuning"
        else:
            tune, tune_tokens, build_setup = _carved_tuning(args.tune, setup)
            tune_note = f"{len(tune)} training examples held out for tuning"
        started = time.perf_counter()
        built = build_memory(model, build_setup, context, key_head=saved_key_head(config))
        print0(f"memory: {len(built.parts.store)} entries from {built.report['examples']} training examples "
               f"({time.perf_counter() - started:.0f} s; calibrated on {built.report['calibrated_on']}); {tune_note}")

        def evaluator(examples, tokens):
            prompts = prompt_view(tokens, stage, setup.spec)

            def run(controller=None, features=None, keep_thoughts=False):
                began = time.perf_counter()
                result = evaluate_generation(model, setup.tokenizer, examples, features or prompts, setup.collate,
                                             batch_size=config.batch_size_eval or config.batch_size_training,
                                             max_new_tokens=config.resolved_max_new_tokens, context=context,
                                             controller=controller, keep_thoughts=keep_thoughts,
                                             step_separator=config.step_separator)
                return result, time.perf_counter() - began
            return run

        def compare(run, off, parts, retrieval, nudge, gate):
            """The memory without and with the exit, through ``gate`` (None: the fixed nudge)."""
            controller = memory_controller(parts, retrieval, nudge, gate, exit_enabled=False)
            full, full_seconds = run(controller)
            on, on_seconds = (full, full_seconds) if nudge.exit_threshold is None else \
                run(memory_controller(parts, retrieval, nudge, gate))
            m = retrieval_metrics(off[0], full, on, parts.store.stats(),
                                  {"off": off[1], "full": full_seconds, "on": on_seconds}, 0, stage)
            m["nudge"]["kind"] = nudge_kind(controller)
            return m

        results = []
        tune_run = evaluator(tune, tune_tokens)
        tune_off = tune_run()
        for temperature in args.temperatures:
            retrieval = dataclasses.replace(config.retrieval, temperature=temperature)
            for alpha in args.alphas if gate is None else [None]:  # None: the gate's own steps
                for metric in args.metrics:
                    for threshold in args.thresholds:
                        if threshold == "off" and metric != args.metrics[0]:
                            continue
                        nudge = dataclasses.replace(config.nudge, alpha_max=config.nudge.alpha_max if alpha is None
                                                    else alpha, exit_metric=metric,
                                                    exit_threshold=None if threshold == "off" else float(threshold))
                        m = compare(tune_run, tune_off, built.parts, retrieval, nudge, gate)
                        m["split"] = "tune"
                        m["setting"] = {"alpha_max": alpha, "temperature": temperature, "exit_metric": metric,
                                        "exit_threshold": nudge.exit_threshold}
                        results.append(m)
        chosen = choose(results, args.max_loss)
        setting = chosen["setting"]
        retrieval = dataclasses.replace(config.retrieval, temperature=setting["temperature"])
        nudge = dataclasses.replace(config.nudge, alpha_max=config.nudge.alpha_max if setting["alpha_max"] is None
                                    else setting["alpha_max"], exit_metric=setting["exit_metric"],
                                    exit_threshold=setting["exit_threshold"])

        val_run = evaluator(setup.val, setup.val_tokens)
        val_off = val_run()
        report = {"chosen": compare(val_run, val_off, built.parts, retrieval, nudge, gate)}
        plain_nudge = dataclasses.replace(nudge, exit_threshold=None)
        report["control: random entries"] = compare(val_run, val_off, random_memory(built.parts, seed=config.seed),
                                                    retrieval, plain_nudge, gate)
        shuffled = shuffled_neighbours(built.parts, retrieval, plain_nudge, gate, seed=config.seed)
        shuffled_eval, shuffled_seconds = val_run(shuffled)
        report["control: shuffled neighbours"] = retrieval_metrics(
            val_off[0], shuffled_eval, shuffled_eval, built.parts.store.stats(),
            {"off": val_off[1], "full": shuffled_seconds, "on": shuffled_seconds}, 0, stage)
        report["control: shuffled neighbours"]["nudge"]["kind"] = nudge_kind(shuffled)
        replaced_parts, replaced_nudge = full_replacement(built.parts, nudge)  # alpha 1: no gate's choice
        report["control: full replacement"] = compare(val_run, val_off, replaced_parts, retrieval, replaced_nudge, None)
        for m in report.values():
            m["split"] = "valid"

        def generate_val(features, controller=None, keep_thoughts=False):
            return val_run(controller, features, keep_thoughts)[0]

        calibration = exit_calibration(model, setup, built.parts, stage, generate_val)
    if not context.is_main:
        return 0
    header = (f"{'split':<6} {'setting':<34} {'acc off':>7} {'acc on':>7} {'diff [95% CI]':>20} {'b/c':>9} "
              f"{'McNemar':>7} {'passes':>7} {'w/ exit':>7} {'false':>5} {'ECE':>6}")
    print(header)
    for m in results:
        s = m["setting"]
        name = ((f"a={s['alpha_max']:g}" if s["alpha_max"] is not None else "gate") + f" T={s['temperature']:g} "
                + (f"{s['exit_metric']}>={s['exit_threshold']:g}" if s["exit_threshold"] is not None else "no exit"))
        print(_line("tune", name + (" <- chosen" if m is chosen else ""), m))
    for name, m in report.items():
        print(_line("valid", name, m))
    if calibration.get("available"):
        print(f"valid  exit probe calibration: ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f} "
              f"({calibration['samples']} item x thought samples)")
        for t in calibration["by_thought"]:
            top = [b for b in t["reliability"] if b["lower"] >= 0.9 and b["count"]]
            top_count = sum(b["count"] for b in top)
            top_right = sum(b["count"] * b["accuracy"] for b in top)
            print(f"valid    exit after thought {t['thought']}: mean score {t['mean_score']:.3f}, right "
                  f"{t['event_rate']:.3f}, ECE {t['ece']:.3f}; score >= 0.9: {top_count} samples, "
                  + (f"{top_right / top_count:.3f} right" if top_count else "none"))
    print("acc off / on: plain model / with the memory on the same items; diff = on - off; b/c = items right only "
          "with / only without the memory; ECE: retrieval confidence vs right without the memory.")
    print(f"nudge: {nudge_note['kind']} ({nudge_note['alpha_max']})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"nudge": nudge_note, "tuning": results, "chosen_setting": setting, "validation": report,
                       "exit_calibration": calibration, "tune_examples": len(tune),
                       "tune_source": args.tune_path or "held-out training examples",
                       "calibrated_on": built.report["calibrated_on"], "memory_build": built.report,
                       "memory_path": memory_path if scratch is None else None}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
