"""One tiny trained run shared by the inference and export tests (imported, not collected)."""

from __future__ import annotations

import json
from pathlib import Path

from noblankslate.config import config_from_dict
from noblankslate.train.loop import train
from run_helpers import CPU, tiny_config

_RUNS: dict[tuple, Path] = {}


def trained_run(tmp_path_factory, data: tuple[Path, Path], arch: str = "gpt2") -> Path:
    """A 6-epoch Coconut run (2 epochs per stage, 2 thoughts at the end) that has learnt the answer format
    ("### X is a Y."), trained once per test session and data set (about a second)."""
    key = (*(str(p) for p in data), arch)
    if key not in _RUNS:
        folder = tmp_path_factory.mktemp("trained")
        raw = tiny_config(folder, data, num_epochs=6, epochs_per_stage=2, lr=1e-2, max_new_tokens=8,
                          model_config={"arch": arch, "n_layer": 1, "n_embd": 32, "n_head": 2, "dropout": 0.0})
        train(config_from_dict(raw), CPU)
        _RUNS[key] = folder / "runs" / "tiny"
    return _RUNS[key]


def questions(path: Path) -> list[str]:
    return [record["question"] for record in json.loads(path.read_text())]


def predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
