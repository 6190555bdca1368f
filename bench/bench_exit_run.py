"""What an early exit saves in wall-clock on a trained run: its held-out generation, plain, with the memory
and with the memory and the exit, the three interleaved in every repeat.

    python bench/bench_exit_run.py RUN/config.yaml --checkpoint RUN/checkpoint_N --memory INDEX \\
        [--batches 1 32 100] [--repeats 5] [--threads 2] nudge.exit_threshold=0.9 [key=value ...]

``--memory`` is a memory built from this checkpoint (for example the one a sweep wrote beside its output,
``OUT_memory/index.bin``; its model fingerprint is checked). The exit's settings are the config's
(``nudge.exit_threshold``, ``nudge.exit_metric``; give them as overrides). bench/bench_exit.py measures the
mechanism with a scripted controller; this measures the memory's own controller on real prompts, where the
share of rows that stop is the probe's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from noblankslate.config import load_config
from noblankslate.data.curriculum import prompt_view
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.eval.setup import setup_run
from noblankslate.memory.builder import load_memory, model_fingerprint
from noblankslate.memory.gate import memory_controller
from noblankslate.model.checkpoint_files import evaluated_position
from noblankslate.runtime import distributed_context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--memory", required=True, help="a memory built from this checkpoint (index path)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config, [*args.overrides, f"load_model_path={args.checkpoint}", "only_eval=true",
                                       "retrieval.enabled=true"])
    if config.nudge.exit_threshold is None:
        raise SystemExit("give the exit's setting, e.g. nudge.exit_threshold=0.9")
    with distributed_context() as context:
        setup = setup_run(config)
        stage = evaluated_position(args.checkpoint, config).stage
        model = setup.model.to(context.device).eval()
        parts = load_memory(args.memory, model_fingerprint(model))
        prompts = prompt_view(setup.val_tokens, stage, setup.spec)
        print(f"{len(prompts)} held-out items, stage {stage}, {args.threads} thread(s), exit: {config.nudge.exit_metric} "
              f">= {config.nudge.exit_threshold}, alpha_max {config.nudge.alpha_max}; medians of {args.repeats} "
              "interleaved repeats (the first round warms up)")
        print(f"{'batch':>6} {'plain':>9} {'memory':>9} {'+ exit':>9} {'exit saves':>11} {'thoughts':>9} {'with exit':>10}")
        for batch in args.batches:
            times: dict[str, list[float]] = {"plain": [], "memory": [], "exit": []}
            thoughts = {}
            for repeat in range(args.repeats + 1):
                for name in times:
                    controller = None if name == "plain" else memory_controller(
                        parts, config.retrieval, config.nudge, None, exit_enabled=name == "exit")
                    started = time.perf_counter()
                    result = evaluate_generation(model, setup.tokenizer, setup.val, prompts, setup.collate,
                                                 batch_size=batch, max_new_tokens=config.resolved_max_new_tokens,
                                                 context=context, controller=controller,
                                                 step_separator=config.step_separator)
                    if repeat:
                        times[name].append(time.perf_counter() - started)
                    thoughts[name] = statistics.mean(p["thoughts_used"] for p in result.predictions)
            t = {name: statistics.median(v) for name, v in times.items()}
            print(f"{batch:>6} {t['plain']:>8.3f}s {t['memory']:>8.3f}s {t['exit']:>8.3f}s "
                  f"{100 * (1 - t['exit'] / t['memory']):>+10.1f}% {thoughts['memory']:>9.2f} {thoughts['exit']:>10.2f}")
    print("exit saves: 1 - (memory + exit) / memory, the same controller with its exit off and on.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
