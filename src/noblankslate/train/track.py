"""Run tracking: ``metrics.jsonl`` always, wandb when installed and wanted (offline unless told).

Only the main rank writes. wandb is never required: without the package, or with ``WANDB_MODE=disabled``,
only the JSONL file is written. Without a login wandb runs offline (``WANDB_MODE`` defaults to
``offline``; set it to ``online`` to sync).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from noblankslate.config import Config
from noblankslate.errors import InputError
from noblankslate.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """Append one JSON object per event to ``run_dir/metrics.jsonl`` and mirror it to wandb."""

    def __init__(self, run_dir: Path, config: Config, active: bool):
        self.path = run_dir / METRICS_FILE
        self.active = active
        self.wandb_run = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            return
        self.wandb_run = wandb.init(project=config.project, name=config.name, dir=str(run_dir), mode=mode,
                                    config=config.to_dict(), resume="allow")

    def forget_after(self, epoch: int, step: int) -> int:
        """Drop the records of work a resumed run will redo: steps after ``step`` and epoch-level records
        after ``epoch`` (a run killed mid-epoch logged steps its checkpoint does not hold). The file is
        rewritten atomically. Returns the number of records dropped."""
        if not self.active or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            later = record.get("step", 0) > step if record.get("event") == "step" else record.get("epoch", 0) > epoch
            if later:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept), durable=True)
        return dropped

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (a clear error if there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise InputError(f"{path}: no metrics (is {run_dir} a run folder?)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: line {number} is not JSON ({error.msg})") from None
    return records
