"""The memory's controls: random entries with the real norms, shuffled neighbours, full replacement."""

import numpy as np
import torch

from noblankslate.config import NudgeConfig, RetrievalConfig
from noblankslate.memory.calibration import make_calibrator
from noblankslate.memory.controller import MemoryController, MemoryParts
from noblankslate.memory.controls import (
    ShuffledNeighbours,
    full_replacement,
    random_memory,
)
from noblankslate.memory.store import LatentMemory


def _parts(n=6, dim=8, steps=2, seed=0):
    rng = np.random.default_rng(seed)
    store = LatentMemory(key_dim=dim, steps=steps, value_dim=dim, metric="cosine", fingerprint="t", value_dtype="float32")
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    store.add(keys / np.linalg.norm(keys, axis=1, keepdims=True), rng.normal(size=(n, steps, dim)).astype(np.float32) * 3,
              [{"thoughts": steps, "exit_step": steps, "example": i} for i in range(n)])
    confidence = make_calibrator("platt").fit(np.array([0.1, 0.9, 0.2, 0.8]), np.array([0, 1, 0, 1]))
    return MemoryParts(store=store, key_map=lambda x: x, value_inverse=lambda x: x, confidence=confidence), keys


def test_random_memory_keeps_entries_and_norms_not_content():
    parts, _ = _parts()
    fake = random_memory(parts, seed=1)
    real, other = parts.store, fake.store
    assert len(other) == len(real) and other.steps == real.steps and other.metric == real.metric
    np.testing.assert_allclose(np.linalg.norm(other.values(other.ids), axis=-1),
                               np.linalg.norm(real.values(real.ids), axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(other.keys(other.ids), axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(other.keys(other.ids), real.keys(real.ids))
    assert [other.metadata_of(int(i))["example"] for i in other.ids] == list(range(6))


def test_shuffled_neighbours_nudge_toward_another_rows_targets():
    parts, keys = _parts()
    retrieval, nudge = RetrievalConfig(k=2, sim_threshold=-1.0), NudgeConfig(alpha_max=0.5)
    anchors = torch.as_tensor(keys[:4])  # each anchor's best neighbour is its own entry
    real = MemoryController(parts, retrieval, nudge)
    real._retrieve(anchors)
    shuffled = ShuffledNeighbours(parts, retrieval, nudge, seed=3)
    shuffled._retrieve(anchors)
    targets, moved = real._targets.numpy(), shuffled._targets.numpy()
    assert sorted(map(tuple, moved[:, 0].round(5))) == sorted(map(tuple, targets[:, 0].round(5)))  # a permutation
    assert all(not np.allclose(moved[b], targets[b]) for b in range(4))  # no row keeps its own
    torch.testing.assert_close(shuffled._confidence, real._confidence)  # the same statistics otherwise


def test_full_replacement_feeds_the_neighbours_thought():
    parts, keys = _parts()
    replaced_parts, nudge = full_replacement(parts, NudgeConfig(alpha_max=0.3, match_norm=True, exit_threshold=0.9))
    assert (nudge.alpha_max, nudge.match_norm, nudge.exit_threshold) == (1.0, False, None)
    controller = MemoryController(replaced_parts, RetrievalConfig(k=1, sim_threshold=-1.0), nudge)
    anchors = torch.as_tensor(keys[:3])
    fed, last = controller(0, anchors, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(fed, controller._targets[:, 0])
    assert not last.any()
