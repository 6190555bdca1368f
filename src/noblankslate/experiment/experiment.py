"""One experiment end to end: plan and check every run, run the missing ones, write the table."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from noblankslate.experiment.rows import ROWS, Row
from noblankslate.experiment.runner import check_data, earlier_results, plan, run_jobs
from noblankslate.experiment.table import build_table, format_markdown, plot_table


@dataclass(frozen=True)
class ExperimentOutputs:
    table: dict
    markdown: Path
    json: Path
    figure: Path


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), for writing next to timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_experiment(config_path: str | Path, rows: Sequence[Row], seeds: Sequence[int], out: str | Path, *,
                   overrides: Sequence[str] = (), parallel: int = 1, threads: int | None = None,
                   launcher: Sequence[str] | None = None, echo=print) -> ExperimentOutputs:
    """Train every (row, seed) not yet done, then write ``table.md``, ``table.json`` and ``table.png`` in ``out``.

    Every row's config and the data files are validated before the first run starts. The table holds the
    rows and seeds asked for and every other finished run in ``out`` made with the same config and
    overrides (earlier invocations' rows), in the paper's row order.
    """
    out = Path(out)
    started = time.perf_counter()
    jobs = plan(config_path, overrides, rows, seeds, out)
    check_data(jobs)
    echo(f"{len(jobs)} runs ({len(rows)} rows x {len(seeds)} seeds), {parallel} at a time, in {out}")
    results = run_jobs(jobs, config_path, overrides, out, parallel=parallel, threads=threads, launcher=launcher, echo=echo)
    results.update(earlier_results(config_path, overrides, out, {job.name for job in jobs}, echo=echo))
    table_rows = [row for row in ROWS.values() if any(r["row"] == row.name for r in results.values())]
    table_seeds = sorted({r["seed"] for r in results.values()})
    table = build_table(results, table_rows, table_seeds)
    table.update(config=str(config_path), overrides=list(overrides), cpu=cpu_name(), parallel=parallel,
                 threads=threads, wall_seconds_this_call=time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "table.md"
    markdown.write_text(format_markdown(table) + "\n", encoding="utf-8")
    json_path = out / "table.json"
    json_path.write_text(json.dumps(table, indent=1), encoding="utf-8")
    figure = plot_table(table, out / "table.png")
    return ExperimentOutputs(table, markdown, json_path, figure)
