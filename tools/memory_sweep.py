"""Sweep the memory's settings on a trained model: paired accuracy, forward passes, false exits, ECE, Brier.

    python tools/memory_sweep.py CONFIG --checkpoint RUN/checkpoint_N [--alphas 0 0.1 0.3 0.5]
        [--thresholds off 0.9 0.95 0.99] [--metrics probe stability neighbors] [--out sweep.json] [key=value ...]

The memory is built once from the training data (``retrieval.build_from`` or ``train_path``) with the
checkpoint's model; every setting is then evaluated on ``val_path`` at the final stage, paired with the
same items' plain evaluation (retrieval off). For each setting: accuracy off/on and flips, mean forward
passes without and with exit, false exits, and the ECE and Brier score of the retrieval confidence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from noblankslate.config import load_config
from noblankslate.data.curriculum import prompt_view
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.eval.setup import setup_run
from noblankslate.memory.builder import build_memory, saved_key_head
from noblankslate.memory.controller import MemoryController
from noblankslate.memory.metrics import retrieval_metrics
from noblankslate.train.distributed import distributed_context, print0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True, help="the trained model (a checkpoint folder)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    parser.add_argument("--thresholds", nargs="+", default=["off", "0.9", "0.95", "0.99"])
    parser.add_argument("--metrics", nargs="+", default=["probe"], choices=["probe", "stability", "neighbors"])
    parser.add_argument("--out", help="write every setting's full metrics here (JSON)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(args.config, [*args.overrides, f"load_model_path={args.checkpoint}", "only_eval=true",
                                       "retrieval.enabled=true"])
    rows, everything = [], []
    with distributed_context() as context:
        setup = setup_run(config)
        stage = config.max_latent_stage + 1
        model = setup.model.to(context.device)
        started = time.perf_counter()
        built = build_memory(model, setup, context, key_head=saved_key_head(config))
        print0(f"memory: {len(built.parts.store)} entries from {built.report['examples']} training examples "
               f"({time.perf_counter() - started:.0f} s); build report {json.dumps(built.report)}")
        prompts = prompt_view(setup.val_tokens, stage, setup.spec)

        def evaluate(controller=None):
            began = time.perf_counter()
            result = evaluate_generation(model, setup.tokenizer, setup.val, prompts, setup.collate,
                                         batch_size=config.batch_size_eval or config.batch_size_training,
                                         max_new_tokens=config.resolved_max_new_tokens, context=context,
                                         controller=controller)
            return result, time.perf_counter() - began

        off, off_seconds = evaluate()
        for alpha in args.alphas:
            nudge = dataclasses.replace(config.nudge, alpha_max=alpha, exit_threshold=None)
            full, full_seconds = evaluate(MemoryController(built.parts, config.retrieval, nudge))
            for metric in args.metrics:
                for threshold in args.thresholds:
                    if threshold == "off" and metric != args.metrics[0]:
                        continue
                    exit_threshold = None if threshold == "off" else float(threshold)
                    setting = dataclasses.replace(nudge, exit_threshold=exit_threshold, exit_metric=metric)
                    if exit_threshold is None:
                        on, on_seconds = full, full_seconds
                    else:
                        on, on_seconds = evaluate(MemoryController(built.parts, config.retrieval, setting))
                    m = retrieval_metrics(off, full, on, built.parts.store.stats(),
                                          {"off": off_seconds, "full": full_seconds, "on": on_seconds}, 0, stage)
                    m["setting"] = {"alpha_max": alpha, "exit_threshold": exit_threshold, "exit_metric": metric}
                    everything.append(m)
                    rows.append((alpha, metric if exit_threshold is not None else "-", threshold, m))
    if not context.is_main:
        return 0
    header = (f"{'alpha':>6} {'exit':>10} {'thr':>5} {'acc off':>8} {'acc on':>7} {'w>r':>4} {'r>w':>4} "
              f"{'passes':>7} {'w/ exit':>8} {'saved':>6} {'false ex':>8} {'ECE':>6} {'Brier':>6}")
    print(header)
    for alpha, metric, threshold, m in rows:
        a, e, c = m["accuracy"], m["exit"], m["calibration"]
        print(f"{alpha:>6.2f} {metric:>10} {threshold:>5} {a['without_retrieval']:>8.4f} {a['with_retrieval']:>7.4f} "
              f"{a['flips_wrong_to_right']:>4} {a['flips_right_to_wrong']:>4} {e['mean_forward_passes_without_exit']:>7.2f} "
              f"{e['mean_forward_passes_with_exit']:>8.2f} {100 * (1 - e['mean_forward_passes_with_exit'] / e['mean_forward_passes_without_retrieval']):>5.1f}% "
              f"{e['false_exits']:>8} {c['ece']:>6.3f} {c['brier']:>6.3f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(everything, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
