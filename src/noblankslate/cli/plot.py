"""``nbs plot RUN_DIR``: loss and accuracy per epoch with the stage boundaries marked (PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path


def plot(run_dir: str, out: str | None) -> int:
    from noblankslate.eval.plots import plot_run
    from noblankslate.train.track import read_metrics

    records = read_metrics(run_dir)
    path = plot_run(records, out or Path(run_dir) / "curves.png", title=Path(run_dir).name)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="draw loss and accuracy per epoch of a run (PNG)",
                              description="Read RUN_DIR/metrics.jsonl and draw training/validation loss and "
                                          "accuracy per epoch, stage switches marked, into RUN_DIR/curves.png.")
    p.add_argument("run_dir", help="the run folder (save_path/name)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(handler=lambda a: plot(a.run_dir, a.out))
