"""Training checkpoints: one folder per saved epoch, written atomically, resumable exactly.

Layout of ``run_dir = save_path / name``::

    checkpoint_{epoch}/
        model.safetensors   model state dict; tied weights stored once, restored under both names
        optimizer.pt        optimizer.state_dict() (torch.save; read back with weights_only=True)
        rng.pt              python, numpy, torch and CUDA RNG states, as tensors, ints and lists
        state.json          epoch and the loop's counters (stage, global step, best accuracy, wall time)
        config.yaml         the resolved run config
        tokenizer/          the tokenizer with its latent tokens, when one is given
        COMPLETE            written last: the size of every file above

A checkpoint is first written to a hidden sibling ``.checkpoint_{epoch}.tmp-*``, flushed to disk, and
only then renamed to ``checkpoint_{epoch}``, so a crash mid-save leaves the last good checkpoint as it
was and never a half-written folder under a checkpoint name. Leftover temporary folders are ignored and
removed by the next save. Only one process (rank 0) may save into a run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from noblankslate.config import Config
from noblankslate.model.checkpoint_files import (  # re-exported: the reading side lives below train/
    CHECKPOINT_NAME as _CHECKPOINT_NAME,
    COMPLETE_FILE,
    CONFIG_FILE,
    STATE_FILE,
    CheckpointError,
    is_complete as _is_complete,
    latest_checkpoint as latest_checkpoint,
    list_checkpoints,
    sha256_file as _sha256,
    verify_checkpoint_files,
)
from noblankslate.model.weights import MODEL_FILE, WeightsError, read_state_dict, save_state_dict

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1

_LEFTOVER_NAME = re.compile(r"\.(checkpoint_\d+(?:_step_\d+)?)\.(tmp|old)-.+")


@dataclass(frozen=True)
class TrainState:
    """The loop's counters saved in every checkpoint (``state.json``'s ``train_state``), typed.

    Attributes:
        epoch: epochs finished (the number in an epoch checkpoint's name).
        stage: the curriculum stage of the last epoch trained.
        global_step: optimizer steps taken so far (the lr schedule is a function of it).
        best_accuracy: best validation accuracy so far (``save_only_improve`` compares against it).
        step_in_epoch: for a mid-epoch checkpoint, the steps of epoch ``epoch + 1`` already done; 0 otherwise.
        epoch_loss: for a mid-epoch checkpoint, the per-step losses of those steps (the epoch's mean loss
            continues from them); None otherwise.
        training_memory: with ``training.memory_in_training``, the fingerprint of the memory the next epoch
            reads (a resumed run reloads that memory); None otherwise.
    """

    epoch: int
    stage: int
    global_step: int
    best_accuracy: float = 0.0
    step_in_epoch: int = 0
    epoch_loss: list[float] | None = None
    training_memory: str | None = None

    def to_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        if not self.step_in_epoch:  # an epoch checkpoint: as before mid-epoch checkpoints existed
            del state["step_in_epoch"], state["epoch_loss"]
        if self.training_memory is None:
            del state["training_memory"]
        return state

    @classmethod
    def from_dict(cls, raw: Any, where: Path) -> TrainState:
        """Read a saved ``train_state``; a missing or mistyped field is a CheckpointError naming it."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: train_state is {type(raw).__name__}, expected an object")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{where}: train_state has unknown fields {unknown} (written by a newer version?)")
        kinds = {"epoch": int, "stage": int, "global_step": int, "best_accuracy": (int, float), "step_in_epoch": int}
        for name in ("epoch", "stage", "global_step"):
            if name not in raw:
                raise CheckpointError(f"{where}: train_state lacks {name!r}")
        for name, kind in kinds.items():
            if name in raw and (not isinstance(raw[name], kind) or isinstance(raw[name], bool)):
                raise CheckpointError(f"{where}: train_state.{name} is {raw[name]!r}, expected {getattr(kind, '__name__', 'a number')}")
        if not isinstance(raw.get("training_memory", ""), str) and raw.get("training_memory") is not None:
            raise CheckpointError(f"{where}: train_state.training_memory must be a fingerprint string or null")
        loss = raw.get("epoch_loss")
        if loss is not None and not (isinstance(loss, list) and all(isinstance(v, (int, float)) for v in loss)):
            raise CheckpointError(f"{where}: train_state.epoch_loss must be a list of numbers or null")
        return cls(**{**raw, "best_accuracy": float(raw.get("best_accuracy", 0.0))})


@dataclass
class CheckpointData:
    """Everything :func:`save_checkpoint` wrote, read back on the CPU.

    Attributes:
        path: the checkpoint folder.
        epoch: the epoch in its name.
        model_state: state dict (tied weights are one tensor under both names, as ``state_dict()`` gives).
        optimizer_state: ``optimizer.state_dict()``, or None when none was saved.
        rng_state: for :func:`restore_rng_state`, or None when none was saved.
        train_state: the loop's counters as saved (typed).
        config: the resolved config as a plain mapping (``config_from_dict`` turns it back into a Config).
        tokenizer_dir: the saved tokenizer's folder, or None.
    """

    path: Path
    epoch: int
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    rng_state: dict[str, Any] | None
    train_state: TrainState
    config: dict[str, Any]
    tokenizer_dir: Path | None = None
    extra_states: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def capture_rng_state() -> dict[str, Any]:
    """The state of every RNG training draws from, in a form ``torch.load(weights_only=True)`` reads.

    Python's state is a tuple of ints, numpy's holds a uint32 array (stored as an int64 tensor, since
    weights_only refuses numpy objects). The state is this process's only; under DDP/FSDP each rank has
    its own.
    """
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every RNG back to a state from :func:`capture_rng_state`.

    CUDA states are restored for the devices both the saved and the current process have; a different
    device count is logged, since the extra devices' draws cannot be reproduced.
    """
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
         numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    saved_cuda = list(state.get("cuda", []))
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved_cuda) != available:
        logger.warning("RNG state saved with %d CUDA devices, restoring on %d", len(saved_cuda), available)
    for device, cuda_state in enumerate(saved_cuda[:available]):
        torch.cuda.set_rng_state(cuda_state, device)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so a rename cannot outlive its contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_file(Path(folder, name))
        _fsync_dir(Path(folder))


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != COMPLETE_FILE
    }


def _file_digests(root: Path, names: list[str]) -> dict[str, str]:
    return {name: _sha256(root / name) for name in names}


def _clean_leftovers(run_dir: Path) -> None:
    """Remove what an interrupted save left behind.

    ``.tmp-`` folders are unfinished saves. An ``.old-`` folder is a replaced checkpoint: it is deleted
    when its replacement is in place, and renamed back when the save died between the two renames.
    """
    for path in sorted(run_dir.iterdir()):
        match = _LEFTOVER_NAME.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        target = run_dir / match.group(1)
        if match.group(2) == "old" and not target.exists() and _is_complete(path):
            logger.warning("restoring %s from %s (a replacing save was interrupted)", target, path)
            os.rename(path, target)
        elif match.group(2) == "tmp" or _is_complete(target):
            logger.info("removing leftover %s", path)
            shutil.rmtree(path)


def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    """The folder name of a checkpoint after ``epoch`` epochs and ``step_in_epoch`` steps of the next."""
    return f"checkpoint_{epoch}" if step_in_epoch == 0 else f"checkpoint_{epoch}_step_{step_in_epoch}"


def save_checkpoint(
    run_dir: str | Path,
    epoch: int,
    *,
    step_in_epoch: int = 0,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any] | None,
    rng_state: dict[str, Any] | None,
    train_state: TrainState,
    config: Config,
    tokenizer: PreTrainedTokenizerBase | None = None,
    extra_states: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """Write ``run_dir/checkpoint_{epoch}`` atomically (see the module docstring).

    An existing ``checkpoint_{epoch}`` (a re-run) is replaced: it is renamed aside, the new one renamed
    in, then the old one deleted. Call on one process only, with full (gathered) state dicts.

    Args:
        run_dir: the run folder (``config.run_dir``); created if needed.
        epoch: number in the folder name.
        model_state: ``model.state_dict()`` (Coconut wrapper or causal LM).
        optimizer_state: ``optimizer.state_dict()``, or None to save none.
        rng_state: from :func:`capture_rng_state`, or None to save none.
        train_state: the loop's counters (:class:`TrainState`).
        config: the resolved run config.
        tokenizer: saved to ``tokenizer/`` when given.
        extra_states: more tensors saved beside the model as ``{name}.safetensors`` (e.g. the memory's
            contrastive projection heads), so the model file keeps the original's keys.

    Returns:
        The checkpoint folder.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    try:
        state_text = json.dumps({"format_version": FORMAT_VERSION, "epoch": epoch, "train_state": train_state.to_dict()},
                                indent=2, sort_keys=True)
    except TypeError as error:
        raise CheckpointError(f"train_state is not JSON-serialisable: {error}") from None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(run_dir)

    final = run_dir / checkpoint_name(epoch, step_in_epoch)
    tmp = run_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0o700 mode would outlive the rename and hide the checkpoint from others
    aside: Path | None = None
    try:
        save_state_dict(model_state, tmp / MODEL_FILE)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if rng_state is not None:
            torch.save(rng_state, tmp / RNG_FILE)
        config.save(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        for name, tensors in (extra_states or {}).items():
            if not re.fullmatch(r"[a-z_]+", name) or name == MODEL_FILE.split(".")[0]:
                raise CheckpointError(f"extra state name {name!r}: use lower-case letters and '_', not 'model'")
            save_state_dict(tensors, tmp / f"{name}.safetensors")
        (tmp / STATE_FILE).write_text(state_text, encoding="utf-8")
        sizes = _file_sizes(tmp)
        complete = {"format_version": FORMAT_VERSION, "epoch": epoch, "files": sizes,
                    "sha256": _file_digests(tmp, list(sizes))}
        (tmp / COMPLETE_FILE).write_text(json.dumps(complete, indent=2), encoding="utf-8")
        _fsync_tree(tmp)

        if final.exists() and not final.is_dir():
            raise CheckpointError(f"{final} is not a checkpoint folder but has a checkpoint's name; move it away")
        if final.exists():
            aside = run_dir / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not final.exists():
            os.rename(aside, final)  # the replacement failed: put the previous checkpoint back
        raise
    if aside is not None:
        shutil.rmtree(aside)
    if step_in_epoch == 0:  # the epoch is done: its mid-epoch checkpoints are superseded
        for index, path in list_checkpoints(run_dir, with_steps=True):
            if index[0] == epoch - 1 and index[1] > 0:
                shutil.rmtree(path)
    logger.info("saved %s", final)
    return final


def check_run_folder(run_dir: str | Path) -> None:
    """Refuse, before any compute, a run folder where a checkpoint could not be saved: something named like
    a checkpoint that is not a folder (a save would move it aside and fail to clean it up).

    Raises:
        CheckpointError: naming the path.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: the run folder is a file")
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.iterdir()):
        if _CHECKPOINT_NAME.fullmatch(path.name) and not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder but has a checkpoint's name; move it out of "
                                  f"{run_dir} (a checkpoint of that epoch would replace it)")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read (damaged?): {error}") from None


def load_checkpoint(path: str | Path) -> CheckpointData:
    """Read a checkpoint folder written by :func:`save_checkpoint`, on the CPU.

    Raises:
        CheckpointError: naming the folder when it is missing or incomplete, or the file that is missing,
            of the wrong size (truncated) or unreadable.
    """
    path = Path(path)
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    sizes = verify_checkpoint_files(path)["files"]

    try:
        model_state = read_state_dict(path / MODEL_FILE)
    except WeightsError as error:
        raise CheckpointError(str(error)) from None
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path}: cannot parse {STATE_FILE} or {CONFIG_FILE}: {error}") from None
    epoch = state.get("epoch")
    if match is not None and epoch != int(match.group(1)):
        raise CheckpointError(f"{path}: {STATE_FILE} says epoch {epoch}, the folder name {match.group(1)}")
    tokenizer_dir = path / TOKENIZER_DIR
    extra = {}
    for name in sizes:
        if name.endswith(".safetensors") and name != MODEL_FILE:
            try:
                extra[name.removesuffix(".safetensors")] = read_state_dict(path / name)
            except WeightsError as error:
                raise CheckpointError(str(error)) from None
    return CheckpointData(
        path=path,
        epoch=epoch,
        model_state=model_state,
        optimizer_state=_torch_load(path / OPTIMIZER_FILE) if OPTIMIZER_FILE in sizes else None,
        rng_state=_torch_load(path / RNG_FILE) if RNG_FILE in sizes else None,
        train_state=TrainState.from_dict(state.get("train_state"), path / STATE_FILE),
        config=config,
        tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
        extra_states=extra,
    )
