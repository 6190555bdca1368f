"""``nbs demo``: the whole pipeline at small scale on a CPU (data, Coconut curriculum, memory, table, plots)."""

from __future__ import annotations

import argparse
import os


def demo(out: str, config: str, train_examples: int | None, threads: int | None, overrides: list[str]) -> int:
    import torch

    from noblankslate.demo import run_demo, settings_with

    if not threads:
        # Two threads halve the time on two free cores, but collapse when another process is busy.
        threads = 2 if os.getloadavg()[0] < 0.7 else 1
        print(f"using {threads} CPU thread(s) (load average {os.getloadavg()[0]:.1f}; --threads to choose)")
    torch.set_num_threads(threads)
    run_demo(out, config, settings_with(train_examples=train_examples), overrides)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the built-in CPU demo end to end",
        description="Generate small ProsQA-style data, train a small GPT-2 from scratch through the CoT stage and "
                    "the Coconut stages, build the No Blank Slate memory, evaluate on a held-out split, print a "
                    "table and write plots (about 15 minutes on 2 CPU cores). See docs/demo.md.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config", default="args/demo.yaml", help="training config (default args/demo.yaml)")
    p.add_argument("--train-examples", type=int, help="training examples to generate (default in noblankslate.demo)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. num_epochs=4")
    p.set_defaults(handler=lambda a: demo(a.out, a.config, a.train_examples, a.threads, a.overrides))
