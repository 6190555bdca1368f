"""The checkpoint folder's names and its integrity check, for every layer that reads checkpoints.

``noblankslate.train.checkpoint`` writes checkpoint folders (and documents their layout); reading one back
for inference must not need the trainer, so the pure parts (the folder names, the ``COMPLETE`` marker's
size and SHA-256 check, finding a run's latest complete checkpoint) live here, below both.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noblankslate.data.curriculum import scheduled_stage
from noblankslate.errors import NbsError
from noblankslate.model.weights import MODEL_FILE

if TYPE_CHECKING:
    from noblankslate.config import Config

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
COMPLETE_FILE = "COMPLETE"

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)(?:_step_(\d+))?")
"""``checkpoint_{E}``: after epoch E; ``checkpoint_{E}_step_{k}``: E epochs and k steps of the next one."""


class CheckpointError(NbsError, RuntimeError):
    """A checkpoint is missing, incomplete or damaged; the message names the folder or file."""

    label = "checkpoint error"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(folder: Path) -> bool:
    """A folder with its ``COMPLETE`` marker (written last by a save)."""
    return folder.is_dir() and (folder / COMPLETE_FILE).is_file()


def verify_checkpoint_files(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder against its ``COMPLETE`` marker before anything is read from it.

    Every file the marker lists must exist with its recorded size and (for markers that record them)
    its SHA-256, and the model, state and config files must be listed.

    Returns:
        The parsed marker (``files``: sizes, ``sha256``: digests, ``epoch``).

    Raises:
        CheckpointError: naming the folder when it is missing or incomplete, or the file that is missing,
            of the wrong size (truncated) or changed.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_FILE} marker; the save was interrupted?)")
    try:
        complete = json.loads(marker.read_text(encoding="utf-8"))
        sizes = complete["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{marker}: damaged marker file: {error}") from None
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
        if name not in sizes:
            raise CheckpointError(f"{path}: checkpoint lists no {name}")
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {size} when saved (truncated or damaged)")
    # Same size is not same content: a flipped byte must not load silently (markers of older
    # checkpoints have no digests; those are checked by size only).
    for name, digest in (complete.get("sha256") or {}).items():
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path / name}: its SHA-256 differs from the one recorded when it was saved "
                                  "(the file was changed or damaged); use an earlier checkpoint")
    return complete


def list_checkpoints(run_dir: str | Path, with_steps: bool = False) -> list[tuple]:
    """Complete checkpoints of a run, oldest first (numeric: 9 before 10; ``checkpoint_2_step_5`` after
    ``checkpoint_2``). Items are (epoch, path), or ((epoch, step_in_epoch), path) with ``with_steps``;
    without it, mid-epoch checkpoints are left out."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match is not None and is_complete(path):
            index = (int(match.group(1)), int(match.group(2) or 0))
            if with_steps:
                found.append((index, path))
            elif index[1] == 0:
                found.append((index[0], path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-epoch complete checkpoint of a run, or None (temporary and incomplete folders are skipped)."""
    checkpoints = list_checkpoints(run_dir, with_steps=True)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_position(state: dict[str, Any], config: Config) -> tuple[int, int]:
    """(epochs done, stage) of a checkpoint from its parsed ``state.json``: the stage it recorded, or for
    older checkpoints the stage of the epoch it ends (or, mid-epoch, is in). Every entry point that
    evaluates a checkpoint at its own stage (inference, ``nbs memory build --evaluate``) reads it here, so
    they evaluate where training did."""
    train_state = state.get("train_state", {})
    epoch = int(state.get("epoch", 0))
    stage = train_state.get("stage")
    if stage is None:
        stage = scheduled_stage(config, max(epoch - 1, 0) if not train_state.get("step_in_epoch") else epoch)
    return epoch, int(stage)


@dataclass(frozen=True)
class EvaluatedPosition:
    """Where a weights path sits in its run's schedule: the stage every evaluating entry point uses."""

    epoch: int | None
    """Epochs done, or None where nothing says (a weights file without a checkpoint name)."""
    stage: int
    source: str
    """Where the stage was read, for reports: the ``state.json``, the file name, or the config."""


def evaluated_position(weights: str | Path, config: Config) -> EvaluatedPosition:
    """The one rule by which inference, analysis, ``nbs memory build`` and the memory sweep pick the stage
    to evaluate a checkpoint at, so that they all evaluate where training did:

    1. a checkpoint folder with a ``state.json``: the stage it recorded (:func:`checkpoint_position`);
    2. else a path named ``checkpoint_E`` (the original code's files): the stage of epoch E;
    3. else the stage of the config's last scheduled epoch (for a Coconut schedule that reaches it, the
       final stage; for CoT and No-CoT, stage 0).

    Raises:
        CheckpointError: a ``state.json`` that is not valid JSON.
    """
    path = Path(weights)
    state_file = path / STATE_FILE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise CheckpointError(f"{state_file}: cannot parse: {error}") from None
        epoch, stage = checkpoint_position(state, config)
        return EvaluatedPosition(epoch, stage, str(state_file))
    match = CHECKPOINT_NAME.fullmatch(path.stem if path.is_file() else path.name)
    if match is not None:
        epoch = int(match.group(1))
        return EvaluatedPosition(epoch, scheduled_stage(config, max(epoch - 1, 0)), f"the name {path.name}")
    return EvaluatedPosition(None, scheduled_stage(config, config.num_epochs - 1),
                             f"the config's last scheduled epoch ({config.num_epochs})")
