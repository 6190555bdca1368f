"""``nbs demo``: the whole pipeline at small scale on a CPU (data, Coconut curriculum, memory, table, plots)."""

from __future__ import annotations

import argparse
import os
import time


def free_cores(seconds: float = 0.5) -> float:
    """Cores idle right now, from /proc/stat over a short interval (the load average lags by a minute,
    so it still counts the pip install that ran just before ``make demo``)."""

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    try:
        idle_before, total_before = snapshot()
        time.sleep(seconds)
        idle_after, total_after = snapshot()
    except (OSError, ValueError, IndexError):
        return max((os.cpu_count() or 1) - os.getloadavg()[0], 0.0)
    return (os.cpu_count() or 1) * (idle_after - idle_before) / max(total_after - total_before, 1)


def demo(out: str, config: str, train_examples: int | None, threads: int | None, overrides: list[str]) -> int:
    import torch

    from noblankslate.demo import run_demo, settings_with

    if not threads:
        # One thread per free core: two threads halve the time on two free cores, but collapse when
        # another process keeps a core busy (docs/demo.md).
        free = free_cores()
        threads = max(1, min(os.cpu_count() or 1, int(free + 0.5)))
        print(f"using {threads} CPU thread(s) ({free:.1f} cores free just now; --threads to choose)")
    torch.set_num_threads(threads)
    run_demo(out, config, settings_with(train_examples=train_examples), overrides)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the built-in CPU demo end to end",
        description="Generate small ProsQA-style data, train a small GPT-2 from scratch through the CoT stage and "
                    "the Coconut stages, build the No Blank Slate memory, evaluate on a held-out split, print a "
                    "table and write plots (about 7 minutes on 2 idle CPU cores of an AVX2 EPYC, 3-4 on an AVX-512 Xeon). See docs/demo.md.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config", default="args/demo.yaml", help="training config (default args/demo.yaml)")
    p.add_argument("--train-examples", type=int, help="training examples to generate (default in noblankslate.demo)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. num_epochs=4")
    p.set_defaults(handler=lambda a: demo(a.out, a.config, a.train_examples, a.threads, a.overrides))
