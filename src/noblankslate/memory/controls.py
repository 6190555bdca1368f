"""Controls for the memory's effect: what a nudge does when the memory carries nothing about the problem.

Each control is evaluated on the same items as the real memory. If the real memory and the controls
change the answers equally, the nudge's effect is not the retrieved content; if even full replacement of
the thoughts changes nothing, the model does not use its thoughts, which bounds what any nudge can do.

* :func:`random_memory`: entries with random keys and random trajectories of the same per-step norms;
* :class:`ShuffledNeighbours`: every question nudged toward another question's neighbours;
* :func:`full_replacement`: alpha 1 at full confidence and no norm matching, so a hit's thoughts are
  replaced by the neighbours' thoughts.

A model trained with ``training.memory_in_training`` reads the first two through its learned gate
(:class:`GatedShuffledNeighbours`, or :class:`~noblankslate.memory.gate.GatedMemoryController` on the
random memory), so the control differs from the real memory in the content alone; full replacement is
by definition no gate's choice and stays the fixed nudge at alpha 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import Tensor

from noblankslate.config import NudgeConfig, RetrievalConfig
from noblankslate.memory.calibration import make_calibrator
from noblankslate.memory.controller import MemoryController, MemoryParts
from noblankslate.memory.gate import GatedMemoryController, MemoryGate
from noblankslate.memory.store import LatentMemory


def random_memory(parts: MemoryParts, seed: int = 0) -> MemoryParts:
    """The same entries (ids' count, metadata, dims, metric) with random keys and trajectories whose
    every stored step has the norm of the real one; the key map and calibration are kept."""
    rng = np.random.default_rng(seed)
    real = parts.store
    ids = real.ids
    keys = rng.normal(size=(len(ids), real.key_dim)).astype(np.float32)
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    keys *= np.linalg.norm(real.keys(ids), axis=1, keepdims=True)
    values = real.values(ids).astype(np.float32)  # (N, T, V)
    noise = rng.normal(size=values.shape).astype(np.float32)
    noise *= np.linalg.norm(values, axis=-1, keepdims=True) / np.maximum(np.linalg.norm(noise, axis=-1, keepdims=True), 1e-12)
    store = LatentMemory(key_dim=real.key_dim, steps=real.steps, value_dim=real.value_dim, metric=real.metric,
                         fingerprint=real.fingerprint, value_dtype="float32")
    if len(ids):
        store.add(keys, noise, [real.metadata_of(int(i)) for i in ids])
    return dataclasses.replace(parts, store=store)


class ShuffledNeighbours(MemoryController):
    """The real memory, but row b is nudged toward the neighbours of row ``perm[b]`` of the same batch
    (a fixed-seed derangement), so the nudges have the real memory's statistics and none of its content."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._rng = np.random.default_rng(seed)

    def _retrieve(self, anchors: Tensor) -> None:
        super()._retrieve(anchors)
        b = anchors.shape[0]
        if b < 2:
            return
        perm = (np.arange(b) + 1 + self._rng.integers(b - 1)) % b  # a cyclic shift: no row keeps its own
        index = perm.tolist()
        self._targets = self._targets[index]
        self._valid = self._valid[index]
        self._neighbor_exit = self._neighbor_exit[index]


class GatedShuffledNeighbours(ShuffledNeighbours, GatedMemoryController):
    """:class:`ShuffledNeighbours` read through a learned gate: row b's gate mixes its thought with the
    targets of row ``perm[b]`` (its own confidence, as the fixed control keeps its own alpha)."""


def shuffled_neighbours(parts: MemoryParts, retrieval: RetrievalConfig, nudge: NudgeConfig, gate: MemoryGate | None,
                        seed: int = 0) -> ShuffledNeighbours:
    """The shuffled-neighbours control without exit, through ``gate`` if the model has one, else the fixed nudge."""
    if gate is not None:
        return GatedShuffledNeighbours(parts, retrieval, nudge, gate, exit_enabled=False, seed=seed)
    return ShuffledNeighbours(parts, retrieval, nudge, exit_enabled=False, seed=seed)


def full_replacement(parts: MemoryParts, nudge: NudgeConfig) -> tuple[MemoryParts, NudgeConfig]:
    """Parts and nudge settings under which a hit's thought is replaced by its neighbours' (alpha 1)."""
    confident = make_calibrator("none").fit(np.zeros(0), np.zeros(0))  # confidence 1 for every hit
    return (dataclasses.replace(parts, confidence=confident),
            dataclasses.replace(nudge, alpha_max=1.0, match_norm=False, clip_radius=None, exit_threshold=None))
