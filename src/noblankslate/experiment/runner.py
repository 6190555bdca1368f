"""Run Table 1's rows on one base config and task, for several seeds, and collect their results.

Each (row, seed) is an ordinary ``nbs train`` run in its own folder ``OUT/runs/{row}_seed{seed}``,
started as a separate process (or under ``torchrun`` with ``launcher``), up to ``parallel`` at a time.
When a run's process ends, its last epoch's per-item predictions and its metrics are copied into
``OUT/results/{row}_seed{seed}.json``. Started again, the experiment skips every (row, seed) that has a
result (refusing if that result was made with a different config) and starts the others, which resume
from their latest checkpoint as any ``nbs train`` does. Every config and both data files are checked
before the first process starts.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noblankslate.config import Config, flatten, load_config
from noblankslate.errors import NbsError
from noblankslate.experiment.rows import ROWS, Row
from noblankslate.files import write_text_atomic

RESULTS_DIR = "results"
RUNS_DIR = "runs"
LOGS_DIR = "logs"


class ExperimentError(NbsError, RuntimeError):
    """The experiment cannot go on (a row failed, or results on disk disagree with the config)."""

    label = "experiment error"
    exit_code = 1  # a run failed: the input may be fine


@dataclass(frozen=True)
class Job:
    """One training run of the experiment."""

    row: Row
    seed: int
    config: Config

    @property
    def name(self) -> str:
        return f"{self.row.name}_seed{self.seed}"


def job_overrides(row: Row, seed: int, out: Path) -> list[str]:
    """What the experiment sets on top of the user's config and overrides for one (row, seed)."""
    return [*row.overrides(), f"seed={seed}", f"name={row.name}_seed{seed}", f"save_path={out / RUNS_DIR}"]


def plan(config_path: str | Path, overrides: Sequence[str], rows: Sequence[Row], seeds: Sequence[int],
         out: str | Path) -> list[Job]:
    """Every (row, seed) job with its validated config, rows outer, seeds inner.

    Raises:
        ConfigError: a row's config is invalid (the message names the key).
    """
    out = Path(out)
    return [Job(row, seed, load_config(config_path, [*overrides, *job_overrides(row, seed, out)]))
            for row in rows for seed in seeds]


def check_data(jobs: Sequence[Job]) -> None:
    """Load and validate the data files once, before any compute (errors name file, record, field)."""
    from noblankslate.eval.setup import load_run_data

    seen = set()
    for job in jobs:
        key = (job.config.train_path, job.config.val_path)
        if key not in seen:
            seen.add(key)
            load_run_data(job.config)


def _comparable(config: Config) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict()))


def result_path(out: str | Path, job: Job) -> Path:
    return Path(out) / RESULTS_DIR / f"{job.name}.json"


def finished_result(out: str | Path, job: Job) -> dict[str, Any] | None:
    """The stored result of ``job``, or None if it has not finished.

    Raises:
        ExperimentError: the stored result was made with a different config (naming the keys).
    """
    path = result_path(out, job)
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    stored, wanted = flatten(result.get("config", {})), flatten(_comparable(job.config))
    # A key added to the config since the result was stored counts as its default value.
    default = flatten(_comparable(Config(coconut=True)))
    differing = sorted(k for k in set(stored) | set(wanted)
                       if stored.get(k, default.get(k)) != wanted.get(k, default.get(k)))
    if differing:
        raise ExperimentError(
            f"{path} was made with a different config ({', '.join(differing)} differ); use another --out, "
            f"or delete that file and the run folder {job.config.run_dir} to run the row again")
    return result


def earlier_results(config_path: str | Path, overrides: Sequence[str], out: str | Path, asked: set[str],
                    echo=print) -> dict[str, dict[str, Any]]:
    """Finished runs in ``out`` of (row, seed) pairs not asked for this time, made with the same config.

    So that the table of an experiment run in several invocations (``--rows coconut,no_cot`` today, the
    other rows tomorrow) holds every row done so far. A result made with another config (other overrides)
    is left out, and said so.
    """
    results: dict[str, dict[str, Any]] = {}
    for path in sorted((Path(out) / RESULTS_DIR).glob("*_seed*.json")):
        row_name, _, seed = path.stem.rpartition("_seed")
        if path.stem in asked or row_name not in ROWS or not seed.isdigit():
            continue
        job = plan(config_path, overrides, [ROWS[row_name]], [int(seed)], out)[0]
        try:
            result = finished_result(out, job)
        except ExperimentError:
            echo(f"{path.stem}: made with another config, left out of the table")
            continue
        if result is not None:
            results[path.stem] = result
    return results


def _last_epoch_records(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per epoch, the last one written (a resumed run may repeat an epoch's records)."""
    epochs: dict[int, dict[str, Any]] = {}
    for record in metrics:
        if record.get("event") == "epoch":
            epochs[record["epoch"]] = record
    return [epochs[e] for e in sorted(epochs)]


def collect_result(job: Job, wall_seconds: float) -> dict[str, Any]:
    """The result of a finished run: last epoch's per-item records, per-epoch accuracy, steps, time."""
    from noblankslate.data.schema import load_examples
    from noblankslate.train.loop import PREDICTIONS_FILE
    from noblankslate.train.track import read_metrics

    config = job.config
    steps_of = {example.idx: len(example.steps) for example in load_examples(config.val_path)}
    run_dir = config.run_dir
    predictions_file = run_dir / PREDICTIONS_FILE.format(epoch=config.num_epochs)
    if not predictions_file.is_file():
        raise ExperimentError(f"{job.name}: the run ended without {predictions_file}")
    items = []
    for line in predictions_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            items.append({"idx": r["idx"], "correct": bool(r["correct"]), "generated_tokens": r["generated_tokens"],
                          "forward_passes": r["forward_passes"], "reasoning_steps": steps_of[r["idx"]]})
    metrics = read_metrics(run_dir)
    epochs = _last_epoch_records(metrics)
    steps = max((r["step"] for r in metrics if r.get("event") == "step"), default=0)
    n = len(items)
    return {
        "row": job.row.name, "label": job.row.label, "seed": job.seed, "run_dir": str(run_dir),
        "accuracy": sum(i["correct"] for i in items) / n if n else float("nan"),
        "mean_generated_tokens": sum(i["generated_tokens"] for i in items) / n if n else float("nan"),
        "mean_forward_passes": sum(i["forward_passes"] for i in items) / n if n else float("nan"),
        "optimizer_steps": steps,
        "epochs": [{"epoch": r["epoch"], "stage": r["stage"], "accuracy": r["accuracy"], "train_loss": r["train_loss"],
                    "seconds": r["seconds"]} for r in epochs],
        "train_seconds": sum(r["seconds"] for r in epochs),
        "wall_seconds": wall_seconds,
        "items": items,
        "config": _comparable(config),
    }


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def default_launcher() -> list[str]:
    return [sys.executable, "-m", "noblankslate.cli"]


def _command(job: Job, config_path: str | Path, overrides: Sequence[str], out: Path, launcher: Sequence[str]) -> list[str]:
    return [*launcher, "train", str(config_path), *overrides, *job_overrides(job.row, job.seed, out)]


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    started: float
    log: Any


def run_jobs(jobs: Sequence[Job], config_path: str | Path, overrides: Sequence[str], out: str | Path, *,
             parallel: int = 1, threads: int | None = None, launcher: Sequence[str] | None = None,
             echo=print) -> dict[str, dict[str, Any]]:
    """Run every job that has no result yet, ``parallel`` at a time; return every job's result by name.

    Args:
        parallel: processes at once (one per core with ``threads=1`` on a CPU; 1 under torchrun).
        threads: ``OMP_NUM_THREADS`` of each process (None: leave the environment as it is).
        launcher: the command that ``train ...`` is appended to; default ``python -m noblankslate.cli``.
            For GPUs: ``torchrun --nproc_per_node 8 -m noblankslate.cli``.

    Raises:
        ExperimentError: after every other job has ended, if any job failed (naming its log).
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    out = Path(out)
    launcher = list(launcher or default_launcher())
    results: dict[str, dict[str, Any]] = {}
    pending: list[Job] = []
    for job in jobs:
        done = finished_result(out, job)
        if done is not None:
            results[job.name] = done
            echo(f"{job.name}: done before (accuracy {done['accuracy']:.4f}), skipped")
        else:
            pending.append(job)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: list[_Running] = []
    failures: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                log_path = out / LOGS_DIR / f"{job.name}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = log_path.open("a", encoding="utf-8")
                command = _command(job, config_path, overrides, out, launcher)
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                resuming = " (resuming its run folder)" if job.config.run_dir.is_dir() else ""
                echo(f"{job.name}: started{resuming}, log {log_path}")
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append(_Running(job, process, time.perf_counter(), log))
            time.sleep(0.2)
            for entry in [r for r in running if r.process.poll() is not None]:
                running.remove(entry)
                entry.log.close()
                seconds = time.perf_counter() - entry.started
                if entry.process.returncode != 0:
                    failures.append(f"{entry.job.name} exited with {entry.process.returncode} "
                                    f"(see {out / LOGS_DIR / (entry.job.name + '.log')})")
                    echo(f"{entry.job.name}: FAILED after {seconds:.0f} s")
                    continue
                result = collect_result(entry.job, seconds)
                _write_json(result_path(out, entry.job), result)
                results[entry.job.name] = result
                echo(f"{entry.job.name}: accuracy {result['accuracy']:.4f} after {result['optimizer_steps']} steps, "
                     f"{seconds / 60:.1f} min")
    finally:
        for entry in running:  # interrupted: stop the children, their checkpoints let them resume
            entry.process.terminate()
        for entry in running:
            try:
                entry.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                entry.process.kill()
            entry.log.close()
    if failures:
        raise ExperimentError("; ".join(failures))
    return results
