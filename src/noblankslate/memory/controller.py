"""Inference with the memory: one search per batch, a nudge at every latent step, early exit.

:class:`MemoryController` is a :class:`~noblankslate.model.coconut.ThoughtController`: generation
calls it with every thought before it is fed. At step 0 the thought is the anchor (the hidden state at
``<|start-latent|>``), so that call runs the batch's single FAISS search; every call then moves the
thoughts of rows with a hit toward the neighbours' thought of the same step and decides which rows stop.
It also records, per row, what it did, for the per-epoch retrieval metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from noblankslate.config import NudgeConfig, RetrievalConfig
from noblankslate.memory.calibration import Calibrator
from noblankslate.memory.probe import ExitProbe
from noblankslate.memory.store import LatentMemory

ArrayMap = Callable[[np.ndarray], np.ndarray]

_BLAS = ThreadpoolController()
"""numpy's BLAS, limited to one thread around the controller's products. They are tiny (a batch's keys,
its neighbours' thoughts), but on several threads OpenBLAS's workers spin after each call on the cores
torch's threads need for the next transformer pass: measured on a 2-core EPYC, generation at batch 32 took
3x the plain model's time with the memory on, and about the plain model's time on one BLAS thread
(docs/memory.md, Cost)."""


@dataclass
class MemoryParts:
    """Everything inference needs besides the model, as built by :mod:`noblankslate.memory.builder`.

    Attributes:
        store: keys, trajectories (T steps) and metadata (``thoughts`` = steps stored, ``exit_step``).
        key_map: anchor (N, D) -> key (N, key_dim).
        value_inverse: stored thought (N, value_dim) -> thought (N, D).
        confidence: calibrates the best similarity into P(right answer).
        probe: the learned exit probe (None if none was fitted).
    """

    store: LatentMemory
    key_map: ArrayMap
    value_inverse: ArrayMap
    confidence: Calibrator
    probe: ExitProbe | None = None


@dataclass
class BatchRecord:
    """Per-row record of one generated batch (numpy arrays of shape (B,))."""

    hit: np.ndarray
    best_similarity: np.ndarray
    confidence: np.ndarray
    alpha: np.ndarray
    nudge_norm_sum: np.ndarray
    nudges: np.ndarray
    clipped: np.ndarray
    neighbor_ids: np.ndarray  # (B, k), -1 where no hit

    def rows(self) -> list[dict]:
        """One JSON-ready dict per row."""
        out = []
        for b in range(len(self.hit)):
            n = int(self.nudges[b])
            out.append({
                "hit": bool(self.hit[b]), "best_similarity": float(self.best_similarity[b]),
                "confidence": float(self.confidence[b]), "alpha": float(self.alpha[b]),
                "mean_nudge_norm": float(self.nudge_norm_sum[b] / n) if n else 0.0, "nudged_steps": n,
                "clipped_steps": int(self.clipped[b]),
            })
        return out


def normalized(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class MemoryController:
    """Nudges thoughts toward retrieved trajectories and ends a row's thinking once its exit score for
    the current thought reaches ``exit_threshold`` (that thought is then its last).

    Args:
        parts: the memory and its fitted maps.
        retrieval: ``k``, ``sim_threshold``, ``normalize_keys``.
        nudge: ``alpha_max``, ``clip_radius``, ``match_norm``, ``exit_threshold``, ``exit_metric``.
        nudge_enabled / exit_enabled: switch either half off (metrics compare them separately).
    """

    def __init__(self, parts: MemoryParts, retrieval: RetrievalConfig, nudge: NudgeConfig,
                 nudge_enabled: bool = True, exit_enabled: bool = True):
        if exit_enabled and nudge.exit_threshold is not None and nudge.exit_metric == "probe" and parts.probe is None:
            raise ValueError("nudge.exit_metric 'probe' needs a memory built with an exit probe")
        self.parts = parts
        self.retrieval = retrieval
        self.nudge = nudge
        self.nudge_enabled = nudge_enabled and nudge.alpha_max > 0
        self.exit_enabled = exit_enabled and nudge.exit_threshold is not None
        self.record: BatchRecord | None = None
        self.exclude_examples: np.ndarray | None = None
        """(B,) the example index of each row of the next batch, whose own entry (metadata ``example``) is
        never its neighbour (training reads a memory built from its own data); None: nothing excluded."""
        self.count_retrievals = True
        """Count each hit on its entry's ``retrieved`` metadata."""
        self.seconds = 0.0
        """Time spent in the controller (search, nudge, exit scores), over all calls."""
        # per-entry metadata as arrays aligned with the store's ids, so a batch's lookups are vectorised
        store = parts.store
        self._ids = store.ids
        meta = [store.metadata_of(int(i)) for i in self._ids]
        self._entry_thoughts = np.array([m.get("thoughts", store.steps) for m in meta], dtype=np.int64)
        self._entry_exit = np.array([m.get("exit_step", store.steps) for m in meta], dtype=np.float64)
        self._entry_example = np.array([m.get("example", -1) for m in meta], dtype=np.int64)
        self._confidence: Tensor | None = None  # (B,)
        self._targets: Tensor | None = None  # (B, T, D) weighted neighbour thoughts
        self._valid: Tensor | None = None  # (B, T) whether any hit neighbour has that step
        self._alpha: Tensor | None = None  # (B,)
        self._neighbor_exit: Tensor | None = None  # (B,) weighted neighbours' exit step
        self._previous: Tensor | None = None  # (B, D) the previous raw thought (stability)

    def _retrieve(self, anchors: Tensor) -> None:
        """The batch's one search: targets, weights, confidence."""
        with _BLAS.limit(limits=1, user_api="blas"):
            self._search_and_gather(anchors)

    def _search_and_gather(self, anchors: Tensor) -> None:
        parts, device = self.parts, anchors.device
        keys = parts.key_map(anchors.detach().float().cpu().numpy())  # (B, key_dim)
        if self.retrieval.normalize_keys:
            keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        if self.exclude_examples is None:
            sims, ids = parts.store.search(keys, self.retrieval.k)  # (B, k)
        else:
            sims, ids = self._without_own_entries(*parts.store.search(keys, self.retrieval.k + 1), self.exclude_examples)
        hits = (ids >= 0) & (sims >= self.retrieval.sim_threshold)  # (B, k)
        if self.count_retrievals:
            parts.store.update_metadata(np.where(hits, ids, -1), "retrieved", lambda n: n + 1, default=0)
        best = np.where(ids[:, 0] >= 0, sims[:, 0], -np.inf)
        any_hit = hits.any(axis=1)
        confidence = np.where(any_hit, parts.confidence(np.where(np.isfinite(best), best, np.nan)), 0.0)

        # softmax over the hits' similarities / temperature; rows without a hit get all-zero weights. With
        # temperature 1, cosines of 0.99 and 0.96 weigh almost the same; a low temperature separates them.
        scaled = sims / self.retrieval.temperature
        top = np.where(any_hit, np.max(np.where(hits, scaled, -np.inf), axis=1), 0.0)[:, None]  # (B, 1)
        weights = np.where(hits, np.exp(np.where(hits, scaled, 0.0) - top), 0.0)
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30)  # (B, k)

        steps = parts.store.steps
        values = parts.store.values(np.where(hits, ids, -1))  # (B, k, T, V)
        b, k = ids.shape
        thoughts = parts.value_inverse(values.reshape(b * k * steps, -1)).reshape(b, k, steps, -1)  # (B, k, T, D)
        rows = np.clip(np.searchsorted(self._ids, ids), 0, max(len(self._ids) - 1, 0))  # (B, k)
        lengths = np.where(hits, self._entry_thoughts[rows] if len(self._ids) else 0, 0)
        exit_steps = np.where(hits, self._entry_exit[rows] if len(self._ids) else 0.0, 0.0)
        step_valid = hits[:, :, None] & (np.arange(steps)[None, None, :] < lengths[:, :, None])  # (B, k, T)
        step_weights = weights[:, :, None] * step_valid  # (B, k, T)
        norm = step_weights.sum(axis=1)  # (B, T)
        targets = np.einsum("bkt,bktd->btd", step_weights, thoughts) / np.maximum(norm, 1e-30)[:, :, None]

        self._targets = torch.as_tensor(targets, dtype=torch.float32, device=device)
        self._valid = torch.as_tensor(norm > 0, device=device)
        self._alpha = torch.as_tensor(self.nudge.alpha_max * confidence, dtype=torch.float32, device=device)
        self._neighbor_exit = torch.as_tensor((weights * exit_steps).sum(axis=1), dtype=torch.float32, device=device)
        self._confidence = torch.as_tensor(confidence, dtype=torch.float32, device=device)
        self.record = BatchRecord(
            hit=any_hit, best_similarity=np.where(np.isfinite(best), best, np.nan), confidence=confidence,
            alpha=self.nudge.alpha_max * confidence if self.nudge_enabled else np.zeros(b),
            nudge_norm_sum=np.zeros(b), nudges=np.zeros(b, dtype=np.int64), clipped=np.zeros(b, dtype=np.int64),
            neighbor_ids=np.where(hits, ids, -1),
        )

    def _without_own_entries(self, sims: np.ndarray, ids: np.ndarray, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The k best of k + 1 neighbours (B, k + 1) once each row's own example is dropped (an example has
        one entry, so k remain); order kept."""
        if len(examples) != len(ids):
            raise ValueError(f"exclude_examples has {len(examples)} rows, the batch {len(ids)}")
        rows = np.clip(np.searchsorted(self._ids, ids), 0, max(len(self._ids) - 1, 0))  # (B, k + 1)
        own = (ids >= 0) & ((self._entry_example[rows] if len(self._ids) else -1) == np.asarray(examples)[:, None])
        order = np.argsort(own, axis=1, kind="stable")[:, : ids.shape[1] - 1]  # own entries last, then cut
        return (np.take_along_axis(np.where(own, -np.inf, sims), order, axis=1),
                np.take_along_axis(np.where(own, -1, ids), order, axis=1))

    def exit_scores(self, step: int, thought: Tensor) -> Tensor:
        """(B,) every row's score for making this thought (number ``step + 1``) its last; higher = stop."""
        metric = self.nudge.exit_metric
        if metric == "probe":
            return self.parts.probe.probability(thought, step).float()
        if metric == "stability":
            # Defined from the second thought on (it compares a thought with the one before): the first
            # thought can never be the last under this metric (docs/memory.md).
            if self._previous is None:
                return torch.full((thought.shape[0],), float("-inf"), device=thought.device)
            return torch.nn.functional.cosine_similarity(thought.float(), self._previous.float(), dim=-1)
        # neighbors: the retrieval confidence, once the neighbours' typical number of thoughts is reached
        return torch.where(step + 1 >= self._neighbor_exit.round(), self._confidence, torch.zeros_like(self._confidence))

    def __call__(self, step: int, thought: Tensor, thinking: Tensor) -> tuple[Tensor, Tensor]:
        started = time.perf_counter()
        if step == 0:
            self._previous = None
            self._retrieve(thought)
        last = torch.zeros_like(thinking)
        if self.exit_enabled:
            last = (self.exit_scores(step, thought) >= self.nudge.exit_threshold) & thinking
        self._previous = thought
        fed = thought
        if self.nudge_enabled and step < self._targets.shape[1]:
            fed = self._nudged(step, thought, thinking)
        self.seconds += time.perf_counter() - started
        return fed, last

    def _nudged(self, step: int, thought: Tensor, rows: Tensor) -> Tensor:
        """h~ = h + alpha * (v_t - h), capped at clip_radius, optionally rescaled to |h|."""
        h = thought.float()  # (B, D)
        active = rows & self._valid[:, step] & (self._alpha > 0)  # (B,)
        nudge = self._alpha[:, None] * (self._targets[:, step] - h)  # (B, D)
        norm = nudge.norm(dim=-1)  # (B,)
        clipped = torch.zeros_like(active)
        if self.nudge.clip_radius is not None:
            clipped = norm > self.nudge.clip_radius
            nudge = nudge * torch.where(clipped, self.nudge.clip_radius / norm.clamp_min(1e-12), 1.0)[:, None]
        moved = h + nudge
        if self.nudge.match_norm:
            moved = moved * (h.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        active_np = active.cpu().numpy()
        self.record.nudge_norm_sum += np.where(active_np, (moved - h).norm(dim=-1).cpu().numpy(), 0.0)
        self.record.nudges += active_np
        self.record.clipped += (clipped & active).cpu().numpy()
        return torch.where(active[:, None], moved, h).to(thought.dtype)
