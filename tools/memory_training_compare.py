"""Paired comparison of a run trained with ``training.memory_in_training`` and the same run trained without it.

    python tools/memory_training_compare.py RUN_WITH RUN_WITHOUT [--out compare.json] [--threads 1]

Each run folder's latest checkpoint is evaluated on its ``val_path`` (the same items for both runs) at the
checkpoint's stage, with and without the memory that run's last epoch built (``index.path``; rebuilt with
the checkpoint's model if it is not there). The run with the option reads its memory through the gate it
learned; the run without it through the fixed nudge of its ``nudge`` settings. The exit is off throughout:
this is about accuracy. Every comparison is paired on the same items: discordant pairs, exact McNemar
p-value, 95% interval of the accuracy difference (``noblankslate.eval.paired``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from noblankslate.config import load_config
from noblankslate.data.curriculum import prompt_view, scheduled_stage
from noblankslate.eval.evaluate import GenerationEval, evaluate_generation
from noblankslate.eval.paired import paired_comparison
from noblankslate.eval.setup import setup_run
from noblankslate.memory.builder import (
    build_memory,
    load_memory,
    model_fingerprint,
    saved_key_head,
)
from noblankslate.memory.gate import memory_controller, nudge_kind, saved_gate
from noblankslate.memory.store import MemoryFileError
from noblankslate.runtime import DistributedContext, distributed_context
from noblankslate.train.checkpoint import latest_checkpoint, load_checkpoint


def evaluate_run(run_dir: Path, context: DistributedContext) -> dict[str, GenerationEval]:
    """The run's latest checkpoint on validation, without and with its memory."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SystemExit(f"{run_dir}: no complete checkpoint")
    epoch = load_checkpoint(checkpoint).epoch
    # retrieval.enabled: a run trained without the memory (retrieval off) is compared with the memory the
    # checkpoint's model builds, so its memory examples must be loaded
    config = load_config(run_dir / "config.yaml", [f"load_model_path={checkpoint}", "only_eval=true",
                                                   "retrieval.enabled=true"])
    setup = setup_run(config)
    model = setup.model.to(context.device)
    try:
        parts = load_memory(config.index.path, model_fingerprint(model))
    except MemoryFileError as error:
        print(f"{run_dir}: rebuilding the memory ({error})", flush=True)
        parts = build_memory(model, setup, context, epoch=epoch, key_head=saved_key_head(config)).parts
    gate = saved_gate(checkpoint, config, model.base_causallm.config.hidden_size, context.device)
    if config.training.memory_in_training and gate is None:
        raise SystemExit(f"{checkpoint}: trained with training.memory_in_training but holds no memory gate")
    nudge = dataclasses.replace(config.nudge, exit_threshold=None)
    controller = memory_controller(parts, config.retrieval, nudge, gate, exit_enabled=False)
    prompts = prompt_view(setup.val_tokens, scheduled_stage(config, epoch - 1), setup.spec)

    def generate(controller=None) -> GenerationEval:
        return evaluate_generation(model, setup.tokenizer, setup.val, prompts, setup.collate,
                                   batch_size=config.batch_size_eval or config.batch_size_training,
                                   max_new_tokens=config.resolved_max_new_tokens, context=context, controller=controller,
                                   step_separator=config.step_separator)

    print(f"{run_dir}: {checkpoint.name}, {len(parts.store)} memory entries, "
          f"nudge: {nudge_kind(controller)}", flush=True)
    return {"without memory": generate(), "with memory": generate(controller)}


def correct(evaluation: GenerationEval) -> list[bool]:
    return [bool(p["correct"]) for p in sorted(evaluation.predictions, key=lambda p: p["idx"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_with", type=Path, help="run folder trained with training.memory_in_training")
    parser.add_argument("run_without", type=Path, help="the same run trained without it")
    parser.add_argument("--out", type=Path, help="write the comparisons here (JSON)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with distributed_context() as context:
        trained = evaluate_run(args.run_with, context)
        plain = evaluate_run(args.run_without, context)
    rows = {
        "trained with memory: with vs without its memory": (trained["with memory"], trained["without memory"]),
        "with memory (trained with) vs without memory (trained without)": (trained["with memory"], plain["without memory"]),
        "with memory (trained with, gate) vs with memory (trained without, nudge)": (trained["with memory"], plain["with memory"]),
        "without memory: trained with vs trained without": (trained["without memory"], plain["without memory"]),
        "trained without: with vs without its memory (nudge)": (plain["with memory"], plain["without memory"]),
    }
    results = {}
    print(f"\n{'comparison (first vs second)':<76}{'n':>5}{'first':>8}{'second':>8}{'b/c':>9}{'diff':>8}  {'95% CI':<16}{'McNemar p':>10}")
    for name, (first, second) in rows.items():
        paired = paired_comparison(correct(first), correct(second))
        results[name] = paired.to_dict()
        low, high = paired.ci95
        print(f"{name:<76}{paired.n:>5}{paired.first_correct / paired.n:>8.4f}{paired.second_correct / paired.n:>8.4f}"
              f"{f'{paired.only_first}/{paired.only_second}':>9}{100 * paired.difference:>+7.1f}  "
              f"[{100 * low:+5.1f}, {100 * high:+5.1f}]{paired.p_value:>10.3g}")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
