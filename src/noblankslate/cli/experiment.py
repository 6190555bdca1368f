"""``nbs experiment CONFIG``: every row of Table 1 on one base config, for several seeds, with a paired table."""

from __future__ import annotations

import argparse
import os
import shlex


def experiment(config: str, overrides: list[str], rows: str | None, seeds: str, out: str | None,
               parallel: int | None, threads: int | None, launcher: str | None) -> int:
    from noblankslate.experiment import parse_rows, parse_seeds, run_experiment

    chosen_rows = parse_rows(rows)
    chosen_seeds = parse_seeds(seeds)
    if launcher is not None:
        # One multi-GPU run at a time unless told otherwise; threads stay the launcher's business.
        parallel = parallel or 1
    elif threads is None:
        threads = 1
    if parallel is None:
        parallel = max(1, (os.cpu_count() or 1) // (threads or 1))
    out = out or os.path.join("runs", "experiment-" + os.path.splitext(os.path.basename(config))[0])
    outputs = run_experiment(config, chosen_rows, chosen_seeds, out, overrides=overrides, parallel=parallel,
                             threads=threads, launcher=shlex.split(launcher) if launcher else None)
    print()
    print(outputs.markdown.read_text(encoding="utf-8"))
    print(f"table: {outputs.markdown}, {outputs.json}; figure: {outputs.figure}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment", help="train every row of Table 1 on one config, several seeds, paired table",
        description="Train the rows of the paper's Table 1 (no_cot, cot, coconut, no_curriculum, no_thoughts, "
                    "pause_as_thought, pause_token) on one base config: same data, epochs and batch size, so "
                    "equal optimizer steps. Each (row, seed) is an nbs train run in OUT/runs; finished ones are "
                    "skipped when the command runs again, interrupted ones resume. Writes OUT/table.md, "
                    "OUT/table.json (mean +- std over seeds, tokens, forward passes, paired McNemar of every row "
                    "against Coconut) and OUT/table.png. See docs/table1.md.",
    )
    p.add_argument("config", help="base YAML config (its method flags are replaced per row)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every row, e.g. num_epochs=4")
    p.add_argument("--rows", help="comma-separated rows (default: all seven)")
    p.add_argument("--seeds", default="0", help="model seeds, e.g. 0,1 or 0-2 (default 0)")
    p.add_argument("--out", help="experiment folder (default runs/experiment-CONFIGNAME)")
    p.add_argument("--parallel", type=int, help="runs at once (default: cores / threads on a CPU, 1 with --launcher)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default 1 without --launcher)")
    p.add_argument("--launcher", help='command each run is started with, e.g. "torchrun --nproc_per_node 8 -m '
                                      'noblankslate.cli" (default: this Python, one process per run)')
    p.set_defaults(handler=lambda a: experiment(a.config, a.overrides, a.rows, a.seeds, a.out, a.parallel, a.threads,
                                                a.launcher))
