"""Building the memory from training data with the current model, saving and loading it.

Build (``nbs memory build CONFIG``, and after every training epoch when ``retrieval.enabled``):

1. generate every build example at the final stage (all thoughts), keeping its thoughts: the anchor
   (the first thought, the hidden state at ``<|start-latent|>``) and the trajectory;
2. generate it again with j = 1 .. n-1 thoughts (``<|end-latent|>`` after j thoughts), which tells how
   few thoughts it needed and gives the exit probe its labels (thought j, read before it is fed, is
   labelled with whether the answer after thoughts 1..j is right);
3. split off ``retrieval.calibration_fraction`` of the examples (seeded); on the rest fit the key map
   (PCA to ``key_dim``, or the contrastive key head), the value compression (PCA to ``value_dim``) and the
   probe, and store the correctly answered ones; on the held-out part fit the confidence calibration
   (best similarity -> right answer) and the probe's calibration. With ``retrieval.calibrate_from``, its
   examples (new to the model) are generated the same way and both calibrations are fitted on them
   instead, and no build example is held out.

Generation is sharded over ranks like evaluation; the main rank fits and writes, the others wait and
then load what it wrote, so every rank uses the same memory. The memory is never built from the data
being evaluated: the caller passes training data.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noblankslate.config import Config, ConfigError
from noblankslate.data.curriculum import prompt_view
from noblankslate.eval.evaluate import evaluate_generation
from noblankslate.eval.setup import RunSetup
from noblankslate.files import atomic_write
from noblankslate.memory.calibration import Calibrator, make_calibrator
from noblankslate.memory.controller import MemoryParts
from noblankslate.memory.probe import ExitProbe, fit_exit_probe
from noblankslate.memory.projection import FORMAT_NAME as PROJECTION_FORMAT
from noblankslate.memory.projection import PCAProjection
from noblankslate.memory.store import LatentMemory, MemoryFileError
from noblankslate.model.coconut import Coconut
from noblankslate.runtime import DistributedContext

KEY_MAP_SUFFIX = ".keymap.npz"
VALUE_MAP_SUFFIX = ".valuemap.npz"


@dataclass
class LinearKeyMap:
    """A learned key head ``x @ weight.T + bias`` (from contrastive training), as numpy."""

    weight: np.ndarray  # (key_dim, D)
    bias: np.ndarray  # (key_dim,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


HEADS_FILE = "nudge_heads.safetensors"


def saved_key_head(config) -> LinearKeyMap | None:
    """The learned key head saved with ``config.load_model_path`` (runs trained with
    ``training.nudge_contrastive``), for the entry points that build a memory without training.

    Raises:
        ValueError: contrastive training is on but the checkpoint holds no heads.
    """
    if not config.training.nudge_contrastive:
        return None
    path = Path(config.load_model_path or "") / HEADS_FILE
    if not path.is_file():
        raise ConfigError(f"training.nudge_contrastive is on but {path} does not exist: the key head would be random")
    from noblankslate.model.weights import read_state_dict

    state = read_state_dict(path)
    return LinearKeyMap(state["key.weight"].float().numpy(), state["key.bias"].float().numpy())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's weights: a memory is only valid for the model whose thoughts it holds.

    The hash runs over ``state_dict()`` by name. A model sharded by FSDP (``fully_shard``) is read
    without ``state_dict()``, whose FSDP hook would register the sharded parameters again in the middle of
    :meth:`~noblankslate.train.parallel.ParallelModel.gathered` (generation then fails on them): the same
    names and tensors are walked module by module (parameters, persistent buffers), and every shard (a
    DTensor) is gathered, so every rank must call this, and the fingerprint is that of the full weights,
    the same as the unsharded model's (tested).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = isinstance(model, FSDPModule)
    state = _module_tensors(model) if sharded else model.state_dict()
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state.items()):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        elif sharded:  # FSDP frees a gathered parameter's storage by resizing it, which a numpy view would forbid
            tensor = tensor.detach().clone()
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _module_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``state_dict()`` holds (parameters and persistent buffers, a shared module under each of its
    names), read from the modules as they are registered now, without the state-dict hooks."""
    found = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        head = f"{prefix}." if prefix else ""
        for name, parameter in module.named_parameters(recurse=False, remove_duplicate=False):
            found[head + name] = parameter
        for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
            if name not in module._non_persistent_buffers_set:
                found[head + name] = buffer
    return found


def with_thoughts(features: dict[str, Any], count: int, latent_id: int) -> dict[str, Any]:
    """A prompt with only its first ``count`` latent tokens (``<|end-latent|>`` right after them)."""
    ids = features["input_ids"]
    keep, seen = [], 0
    for token in ids:
        if token == latent_id:
            seen += 1
            if seen > count:
                continue
        keep.append(token)
    return {**features, "input_ids": keep, "attention_mask": [1] * len(keep), "position_ids": list(range(len(keep)))}


@dataclass
class BuildResult:
    parts: MemoryParts
    report: dict[str, Any]


LINEAR_MAP_FORMAT = "noblankslate-linear-map"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_map(path: Path, mapping: Any) -> str:
    """Write a key or value map; returns the file's SHA-256 (recorded in the memory's meta).

    A PCA (or identity) map is written in :class:`PCAProjection`'s own file format, the one format for
    PCA maps in the project; a learned key head as an .npz of its weight and bias with a format tag.
    """
    if isinstance(mapping, LinearKeyMap):
        with atomic_write(path, "wb", durable=True) as f:
            np.savez(f, format=np.array(LINEAR_MAP_FORMAT), version=np.array(1), weight=mapping.weight,
                     bias=mapping.bias)
    else:
        mapping.save(path)
    return _sha256(path)


def _load_map(path: Path, sha256: str) -> Any:
    if not path.is_file():
        raise MemoryFileError(f"{path}: missing (it belongs to the memory beside it)")
    if _sha256(path) != sha256:
        raise MemoryFileError(f"{path}: does not match the checksum recorded in the memory (damaged or from another build)")
    with np.load(path, allow_pickle=False) as data:
        kind = str(data["format"]) if "format" in data.files else None
        if kind == LINEAR_MAP_FORMAT:
            return LinearKeyMap(data["weight"], data["bias"])
    if kind != PROJECTION_FORMAT:
        raise MemoryFileError(f"{path}: not a map this version writes (format {kind!r}); rebuild the memory "
                              "with nbs memory build")
    return PCAProjection.load(path)


def save_memory(path: str | Path, store: LatentMemory, key_map: Any, value_map: PCAProjection,
                confidence: Calibrator, probe: ExitProbe | None, report: dict[str, Any]) -> None:
    """Maps first, then the store, whose meta file (written last) records the maps' checksums."""
    path = Path(path)
    store.info = {
        "key_map_sha256": _save_map(path.with_name(path.name + KEY_MAP_SUFFIX), key_map),
        "value_map_sha256": _save_map(path.with_name(path.name + VALUE_MAP_SUFFIX), value_map),
        "confidence": confidence.to_dict(),
        "probe": probe.to_dict() if probe is not None else None,
        "build": report,
    }
    store.save(path)


def load_memory(path: str | Path, fingerprint: str | None = None) -> MemoryParts:
    """Load a memory and its maps; every disagreement is a :class:`MemoryFileError` naming the file."""
    path = Path(path)
    store = LatentMemory.load(path, expected_fingerprint=fingerprint)
    info = store.info
    for key in ("key_map_sha256", "value_map_sha256", "confidence"):
        if key not in info:
            raise MemoryFileError(f"{path}: the memory's metadata lacks '{key}' (not written by nbs memory build)")
    key_map = _load_map(path.with_name(path.name + KEY_MAP_SUFFIX), info["key_map_sha256"])
    value_map = _load_map(path.with_name(path.name + VALUE_MAP_SUFFIX), info["value_map_sha256"])
    probe = ExitProbe.from_dict(info["probe"]) if info.get("probe") else None
    return MemoryParts(store=store, key_map=_as_function(key_map), value_inverse=value_map.inverse_transform,
                       confidence=Calibrator.from_dict(info["confidence"]), probe=probe)


def _as_function(key_map: Any):
    return key_map if isinstance(key_map, LinearKeyMap) else key_map.transform


@dataclass
class Answered:
    """A set of examples generated with all their thoughts and with fewer: what the fits read."""

    by_idx: dict[int, dict]
    """example idx -> its full-length prediction (with ``thoughts``, (n, D), and ``correct``)"""
    correct_at: dict[int, list[bool]]
    """example idx -> [right with 1, 2, ..., n thoughts] (the last entry is the full-length answer)"""
    answers_at: dict[int, list[str]] | None = None
    """example idx -> [the predicted answer with 1, 2, ..., n thoughts], when generated (:meth:`of`)"""

    @staticmethod
    def of(full: list[dict], shorter: list[list[dict]]) -> Answered:
        by_idx = {r["idx"]: r for r in full}
        shorter_by_idx = [{p["idx"]: p for p in preds} for preds in shorter]  # j = 1..T-1

        def at(i: int, key: str) -> list:
            return [per_j[i][key] for per_j in shorter_by_idx][: len(by_idx[i]["thoughts"]) - 1] + [by_idx[i][key]]
        return Answered(by_idx, {i: at(i, "correct") for i in by_idx}, {i: at(i, "prediction") for i in by_idx})

    def thoughts(self, i: int) -> np.ndarray:
        return self.by_idx[i]["thoughts"]  # (n, D)

    def exit_step(self, i: int) -> int:
        """The fewest thoughts (>= 1) after which the answer is right; n if none."""
        return next((j + 1 for j, ok in enumerate(self.correct_at[i]) if ok), len(self.thoughts(i)))

    def probe_samples(self, indices: list[int]) -> tuple[list[np.ndarray], list[float], list[int]]:
        """Thought j of each example, labelled with whether the answer is right if it is the last, and j."""
        features, labels, steps = [], [], []
        for i in indices:
            for j, thought in enumerate(self.thoughts(i)):
                features.append(thought)
                labels.append(float(self.correct_at[i][j]))
                steps.append(j)
        return features, labels, steps


def answer_with_fewer_thoughts(model: Coconut, setup: RunSetup, examples: list, prompts: list[dict],
                               context: DistributedContext, *, batch_size: int, lockstep: bool = False,
                               most: int | None = None) -> Answered:
    """Every prompt generated with all its thoughts (keeping them) and with 1 .. ``most`` - 1 of them (``most``:
    the largest latent count of ``prompts``): what the exit probe's samples and labels are read from."""
    config = setup.config
    if most is None:
        most = max((f["input_ids"].count(setup.spec.latent_id) for f in prompts), default=0)
    generate = lambda features, keep: evaluate_generation(
        model, setup.tokenizer, examples, features, setup.collate, batch_size=batch_size,
        max_new_tokens=config.resolved_max_new_tokens, context=context, lockstep=lockstep, keep_thoughts=keep,
        step_separator=config.step_separator)
    full = generate(prompts, True).predictions
    shorter = [generate([with_thoughts(f, j, setup.spec.latent_id) for f in prompts], False).predictions
               for j in range(1, most)]
    return Answered.of(full, shorter)


def build_selection(setup: RunSetup) -> list:
    """The tokenized memory examples a build generates: ``retrieval.build_limit`` of them drawn with the
    run's seed (all when unset), in their file order."""
    order = np.random.default_rng(setup.config.seed).permutation(len(setup.memory_tokens))
    if setup.config.retrieval.build_limit is not None:
        order = order[: setup.config.retrieval.build_limit]
    return [setup.memory_tokens[i] for i in sorted(order)]


def build_memory(
    model: Coconut,
    setup: RunSetup,
    context: DistributedContext,
    *,
    lockstep: bool = False,
    epoch: int = 0,
    key_head: LinearKeyMap | None = None,
) -> BuildResult:
    """Build the memory from the run's memory examples (training data), save it at ``config.index.path``,
    load it back.

    Args:
        model: the unwrapped Coconut model (all ranks call this; generation is sharded).
        setup: the run (config, tokenizer, curriculum spec, collator, ``memory_examples`` and their tokens).
        key_head: a learned key map (contrastive training); otherwise PCA to ``retrieval.key_dim``.
    """
    config, spec = setup.config, setup.spec
    examples = setup.memory_examples
    started = time.perf_counter()
    retrieval = config.retrieval
    path = Path(config.index.path)
    stage = config.max_latent_stage + 1
    chosen = build_selection(setup)
    if not chosen:
        raise ConfigError("the memory has no examples to be built from: retrieval.enabled is false (so none were "
                          "loaded), or retrieval.build_from / train_path is empty")
    prompts = prompt_view(chosen, stage, spec)
    max_thoughts = max(f["input_ids"].count(spec.latent_id) for f in prompts)
    if max_thoughts == 0:
        raise ConfigError("the memory stores thought trajectories, but the final stage has no thoughts "
                         "(max_latent_stage * c_thought is 0)")
    answered = lambda examples_, prompts_: answer_with_fewer_thoughts(
        model, setup, examples_, prompts_, context, batch_size=retrieval.build_batch_size, lockstep=lockstep,
        most=max_thoughts)
    build = answered(examples, prompts)
    calibration = None
    if setup.calibration_tokens:  # retrieval.calibrate_from: examples new to the model
        calibration = answered(setup.calibration_examples, prompt_view(setup.calibration_tokens, stage, spec))

    fingerprint = model_fingerprint(model)
    if context.is_main:
        _fit_and_save(build, calibration, max_thoughts, config, fingerprint, epoch, key_head, path,
                      hidden_size=model.base_causallm.config.hidden_size)
    context.barrier()
    parts = load_memory(path, fingerprint)
    report = parts.store.info.get("build", {})
    report = {**report, "seconds": time.perf_counter() - started}
    return BuildResult(parts=parts, report=report)


def _fit_and_save(build: Answered, calibration: Answered | None, steps: int, config: Config, fingerprint: str,
                  epoch: int, key_head: LinearKeyMap | None, path: Path, hidden_size: int) -> dict[str, Any]:
    """Fit the maps, the store, the confidence and the probe; write them at ``path``.

    ``calibration`` (``retrieval.calibrate_from``) holds examples new to the model; without it the
    calibrations are fitted on a held-out part of the build examples.
    """
    retrieval, nudge = config.retrieval, config.nudge
    indices = sorted(build.by_idx)
    held_out: set[int] = set()
    if calibration is None and len(indices) > 1:
        rng = np.random.default_rng(config.seed + 1)
        held_out = set(rng.choice(indices, size=max(1, int(round(len(indices) * retrieval.calibration_fraction))),
                                  replace=False).tolist())
    fit_indices = [i for i in indices if i not in held_out]
    calibration_set = calibration if calibration is not None else build
    calibration_indices = sorted(calibration.by_idx) if calibration is not None else sorted(held_out)
    thoughts_of, exit_step = build.thoughts, build.exit_step

    anchors = np.stack([thoughts_of(i)[0] for i in fit_indices])  # (N, D)
    if key_head is not None:
        key_map: Any = key_head
    else:
        # Keys are centred on the build set's mean anchor (PCA centres too): raw anchors are all alike.
        reduced = retrieval.key_dim if retrieval.key_dim and retrieval.key_dim < hidden_size else None
        key_map = PCAProjection.fit(anchors, reduced) if reduced else PCAProjection.centering(anchors)
    key_fn = _as_function(key_map)
    all_thoughts = np.concatenate([thoughts_of(i) for i in fit_indices])  # (sum n, D)
    value_dim = retrieval.value_dim if retrieval.value_dim and retrieval.value_dim < hidden_size else None
    value_map = PCAProjection.fit(all_thoughts, value_dim)

    def keys_of(indices_: list[int], answered: Answered = build) -> np.ndarray:
        keys = key_fn(np.stack([answered.thoughts(i)[0] for i in indices_]))
        if retrieval.normalize_keys:
            keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        return keys.astype(np.float32)

    stored = [i for i in fit_indices if build.by_idx[i]["correct"] or not retrieval.correct_only]
    value_size = value_map.transform(all_thoughts[:1]).shape[1]
    store = LatentMemory(key_dim=keys_of(fit_indices[:1]).shape[1], steps=steps, value_dim=value_size,
                         metric=retrieval.metric, fingerprint=fingerprint)
    if stored:
        values = np.zeros((len(stored), steps, value_size), dtype=np.float32)
        for row, i in enumerate(stored):
            trajectory = thoughts_of(i)
            values[row, : len(trajectory)] = value_map.transform(trajectory)
        metadata = [{"example": int(i), "correct": bool(build.by_idx[i]["correct"]), "exit_step": exit_step(i),
                     "thoughts": int(len(thoughts_of(i))), "added_epoch": int(epoch), "retrieved": 0} for i in stored]
        store.add(keys_of(stored), values, metadata, dedup_threshold=retrieval.dedup_threshold)

    confidence = make_calibrator(nudge.calibration)
    if calibration_indices and len(store):
        sims, ids = store.search(keys_of(calibration_indices, calibration_set), 1)
        best = sims[:, 0]
        finite = np.isfinite(best)
        confidence.fit(best[finite], np.array([calibration_set.by_idx[i]["correct"]
                                               for i in calibration_indices])[finite])
    else:
        confidence.fit(np.zeros(0), np.zeros(0))

    probe = None
    features, labels, _ = build.probe_samples(fit_indices)
    held_features, held_labels, held_steps = calibration_set.probe_samples(calibration_indices)
    if features and held_features:
        probe = fit_exit_probe(np.stack(features), np.array(labels), np.stack(held_features), np.array(held_labels),
                               calibration="platt" if nudge.calibration == "none" else nudge.calibration,
                               held_out_steps=np.array(held_steps) if nudge.probe_calibration == "per_thought" else None)

    report = {
        "epoch": int(epoch), "examples": len(indices), "held_out": len(held_out),
        "calibrated_on": (f"retrieval.calibrate_from ({len(calibration_indices)} examples)" if calibration is not None
                          else f"held-out build examples ({len(calibration_indices)})"),
        "calibration_accuracy": (float(np.mean([calibration_set.by_idx[i]["correct"] for i in calibration_indices]))
                                 if calibration_indices else None),
        "fit_accuracy": float(np.mean([build.by_idx[i]["correct"] for i in fit_indices])) if fit_indices else 0.0,
        "entries": len(store), "skipped_duplicates": len(stored) - len(store), "steps": steps,
        "key_dim": store.key_dim, "value_dim": store.value_dim,
        "value_retained_variance": float(value_map.retained_variance),
        "mean_exit_step": float(np.mean([exit_step(i) for i in indices])),
    }
    save_memory(path, store, key_map, value_map, confidence, probe, report)
    return report
