"""The latent memory: a FAISS index of anchor keys with the thought trajectories and metadata beside it.

One entry per solved example: a key (the projected anchor, float32), a value (the trajectory of T
continuous thoughts, stored float16 by default) and a JSON metadata dict. The store takes and returns
numpy arrays only; projecting anchors, nudging and calibration belong to the callers.

Ids are int64, assigned by the store from a counter that is saved with it and never reused, so an id
held by a caller (a training log, a metrics file) always means the same entry or a removed one.

Files, for an index path ``P`` (the project default is ``data/index/faiss_index.bin``)::

    P                 the FAISS index (IndexIDMap2 over IndexFlatIP or IndexFlatL2), faiss serialisation
    P.values.npy      the values, one row per entry in id order: (N, steps, value_dim), np.save
    P.meta.json       dims, metric, model fingerprint, counters, the id of each values row, the metadata,
                      and the SHA-256 of the two files above; written last, so it is the commit point

:meth:`LatentMemory.save` writes every file under a temporary name first, keeps the committed
generation as ``*.prev`` hard links while it swaps the files in, and removes them once the new meta
is in place. A save interrupted at any point therefore leaves a memory that loads as the old or the
new generation, never a mix: :meth:`LatentMemory.load` picks, for each data file, the one whose
checksum the meta names. Nothing is pickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.typing import ArrayLike

from noblankslate.memory.store_files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MemoryFileError,
    committed_file,
    keep_committed,
    read_meta,
    remove_leftovers,
    sha256_file,
    sidecar_paths,
    sync_folder,
    temp_path,
    write_synced,
)

logger = logging.getLogger(__name__)

METRICS = ("cosine", "ip", "l2")
VALUE_DTYPES = ("float16", "float32")

# Per entry the serialised index holds the float32 key (IndexFlat codes) and its int64 id (the id map).
_INDEX_ID_BYTES = 8
_DEDUP_BLOCK = 1024
_EXPECTED_DIM_KEYS = ("key_dim", "steps", "value_dim", "metric", "value_dtype")


class LatentMemory:
    """Keys, trajectories and metadata of solved examples, searchable in one batched FAISS call.

    Args:
        key_dim: size of a key (the projected anchor).
        steps: thoughts per trajectory (T).
        value_dim: size of a stored thought (d, or less when the caller compresses them).
        metric: "cosine" (keys L2-normalised on add and on search, similarity = inner product),
            "ip" (raw inner product) or "l2" (similarity = minus the squared L2 distance). Whatever the
            metric, a higher similarity means a closer neighbour.
        fingerprint: identifies the model whose states the entries are (e.g. a hash of its config and
            weights); :meth:`load` refuses a memory whose fingerprint differs from the expected one,
            because trajectories from another model would nudge toward meaningless targets.
        value_dtype: "float16" (half the bytes; thoughts are used as targets, not accumulated) or
            "float32".
    """

    def __init__(
        self,
        key_dim: int,
        steps: int,
        value_dim: int,
        metric: str,
        fingerprint: str,
        value_dtype: str = "float16",
    ) -> None:
        for name, dim in (("key_dim", key_dim), ("steps", steps), ("value_dim", value_dim)):
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
                raise ValueError(f"{name}: expected a positive int, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint: expected a non-empty string, got {fingerprint!r}")
        value_dtype = np.dtype(value_dtype).name
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype: expected one of {VALUE_DTYPES}, got {value_dtype!r}")
        self.key_dim = int(key_dim)
        self.steps = int(steps)
        self.value_dim = int(value_dim)
        self.metric = metric
        self.fingerprint = fingerprint
        self.value_dtype = np.dtype(value_dtype)
        self.info: dict[str, Any] = {}
        """Caller's JSON-serialisable extras saved in the meta file (e.g. calibration parameters)."""

        flat = faiss.IndexFlatL2(self.key_dim) if metric == "l2" else faiss.IndexFlatIP(self.key_dim)
        self._index = faiss.IndexIDMap2(flat)
        # Row r of _values and _metadata is the entry with id _ids[r]. Ids only grow and removal keeps
        # the order, so _ids is strictly increasing and an id finds its row by binary search.
        self._ids = np.zeros(0, dtype=np.int64)  # (N,)
        self._values = np.zeros((0, self.steps, self.value_dim), dtype=self.value_dtype)  # (capacity, T, V)
        self._metadata: list[dict[str, Any]] = []
        self._next_id = 0
        self._added = 0
        self._removed = 0
        self._skipped = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: object) -> bool:
        if isinstance(entry_id, bool) or not isinstance(entry_id, (int, np.integer)):
            return False
        row = int(np.searchsorted(self._ids, entry_id))
        return row < len(self._ids) and int(self._ids[row]) == int(entry_id)

    def __repr__(self) -> str:
        return (
            f"LatentMemory(entries={len(self)}, key_dim={self.key_dim}, steps={self.steps}, "
            f"value_dim={self.value_dim}, metric={self.metric!r}, value_dtype={self.value_dtype.name!r})"
        )

    @property
    def ids(self) -> np.ndarray:
        """The ids of the stored entries in ascending order, (N,) int64 (a copy)."""
        return self._ids.copy()

    @property
    def next_id(self) -> int:
        """The id the next added entry will get."""
        return self._next_id

    def add(
        self,
        keys: ArrayLike,
        values: ArrayLike,
        metadata: Sequence[dict[str, Any]] | None = None,
        dedup_threshold: float | None = None,
    ) -> np.ndarray:
        """Add one entry per row.

        Args:
            keys: (N, key_dim) floating point, finite.
            values: (N, steps, value_dim) floating point, finite and within the range of value_dtype.
            metadata: N JSON-serialisable dicts (None = empty dicts); stored as a JSON round trip, so
                tuples come back as lists, exactly as they would after save and load.
            dedup_threshold: when set, an entry whose key has similarity >= threshold (in this
                memory's metric, so for "l2" a negative squared distance) to a stored key or to an
                entry added earlier in this batch is skipped. The result equals adding the rows one
                at a time.

        Returns:
            (N,) int64: the new id of each row, or -1 where the row was skipped as a duplicate.
        """
        key_arr = self._prepare_keys(keys, "keys")  # (N, K)
        n = len(key_arr)
        value_arr = _float_array(values, "values")
        expected = (n, self.steps, self.value_dim)
        if value_arr.shape != expected:
            raise ValueError(f"values: expected shape {expected} to match {n} keys, got {value_arr.shape}")
        if not np.isfinite(value_arr).all():
            raise ValueError("values: contains NaN or infinite numbers")
        with np.errstate(over="ignore"):  # overflow is reported below, with the offending magnitude
            stored = value_arr.astype(self.value_dtype)
        if not np.isfinite(stored).all():
            raise ValueError(
                f"values: magnitudes up to {float(np.abs(value_arr).max()):.4g} overflow "
                f"{self.value_dtype.name}; store them as float32"
            )
        if metadata is None:
            metadata = [{} for _ in range(n)]
        if len(metadata) != n:
            raise ValueError(f"metadata: expected {n} dicts (one per key), got {len(metadata)}")
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict):
                raise TypeError(f"metadata[{i}]: expected a dict, got {type(meta).__name__}")
        meta_copies = [_json_copy(m, f"metadata[{i}]") for i, m in enumerate(metadata)]

        keep = np.ones(n, dtype=bool)
        if dedup_threshold is not None and n:
            if not math.isfinite(dedup_threshold):
                raise ValueError(f"dedup_threshold: expected a finite number, got {dedup_threshold!r}")
            keep = self._dedup_keep(key_arr, float(dedup_threshold))
        m = int(keep.sum())
        ids = np.full(n, -1, dtype=np.int64)
        ids[keep] = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
        self._skipped += n - m
        if m == 0:
            return ids

        new_ids = ids[keep]
        self._index.add_with_ids(np.ascontiguousarray(key_arr[keep]), new_ids)
        size = len(self._ids)
        self._reserve(size + m)
        self._values[size : size + m] = stored[keep]
        self._ids = np.concatenate([self._ids, new_ids])
        self._metadata.extend(meta for meta, k in zip(meta_copies, keep) if k)
        self._next_id += m
        self._added += m
        return ids

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar entries for each query, in one FAISS call for the whole batch.

        Args:
            queries: (B, key_dim) floating point, finite (nonzero for "cosine").
            k: neighbours per query, >= 1; may exceed the number of entries.

        Returns:
            similarities (B, k) float32, most similar first, and ids (B, k) int64. Slots beyond the
            number of entries have id -1 and similarity -inf.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        return self._search_prepared(self._prepare_keys(queries, "queries"), int(k))

    def values(self, ids: ArrayLike) -> np.ndarray:
        """Gather trajectories by id.

        Args:
            ids: int array of any shape S (typically the (B, k) ids from :meth:`search`); -1 is allowed.

        Returns:
            (*S, steps, value_dim) float32; all zeros where the id is -1.

        Raises:
            KeyError: an id that is not stored (removed or never assigned); zeros there would pass for
                a real trajectory.
        """
        id_arr = _id_array(ids)
        flat = id_arr.reshape(-1)
        present = flat >= 0
        out = np.zeros((flat.size, self.steps, self.value_dim), dtype=np.float32)  # (B*k, T, V)
        out[present] = self._values[self._rows_of(flat[present])]
        return out.reshape(*id_arr.shape, self.steps, self.value_dim)

    def metadata_of(self, entry_id: int) -> dict[str, Any]:
        """A copy of one entry's metadata (KeyError if the id is not stored)."""
        row = self._rows_of(np.array([entry_id], dtype=np.int64))[0]
        return copy.deepcopy(self._metadata[row])

    def update_metadata(
        self,
        ids: ArrayLike,
        key: str,
        fn_or_value: Callable[[Any], Any] | Any,
        default: Any = None,
    ) -> None:
        """Set ``metadata[key]`` of each listed entry.

        Args:
            ids: int array of any shape; -1 is skipped, so the ids from :meth:`search` can be passed
                as they are. An id listed twice is updated twice (two queries retrieved it).
            key: the metadata field.
            fn_or_value: a callable gets the current value (``default`` when the field is absent) and
                returns the new one, e.g. ``lambda n: n + 1`` with ``default=0`` to count retrievals;
                anything else is the new value itself. The result must be JSON-serialisable.
            default: see ``fn_or_value``.

        Raises:
            KeyError: an id that is not stored; nothing is changed then.
        """
        if not isinstance(key, str):
            raise TypeError(f"key: expected a str, got {type(key).__name__}")
        flat = _id_array(ids).reshape(-1)
        rows = self._rows_of(flat[flat >= 0])  # all checked before anything changes
        for row in rows:
            meta = self._metadata[row]
            new = fn_or_value(meta.get(key, default)) if callable(fn_or_value) else fn_or_value
            meta[key] = _json_copy(new, f"metadata[{key!r}]")

    def remove(self, ids: ArrayLike) -> int:
        """Remove entries from the index, the values and the metadata; their ids are never reused.

        Args:
            ids: int array of any shape; duplicates are removed once.

        Returns:
            the number of entries removed.

        Raises:
            KeyError: an id that is not stored; nothing is removed then.
        """
        flat = np.unique(_id_array(ids).reshape(-1))
        if flat.size == 0:
            return 0
        rows = self._rows_of(flat)
        removed = self._index.remove_ids(flat)
        if removed != flat.size:  # the index and the rows disagree: a bug, not a user error
            raise RuntimeError(f"FAISS removed {removed} of {flat.size} ids that the store holds")
        keep = np.ones(len(self._ids), dtype=bool)
        keep[rows] = False
        size = int(keep.sum())
        self._values[:size] = self._values[: len(self._ids)][keep]
        self._ids = self._ids[keep]
        self._metadata = [meta for meta, k in zip(self._metadata, keep) if k]
        self._removed += int(flat.size)
        return int(flat.size)

    def keys(self, ids: ArrayLike | None = None) -> np.ndarray:
        """Stored keys as the index holds them (unit norm for "cosine").

        Args:
            ids: int array of any shape S, or None for every entry in id order.

        Returns:
            (*S, key_dim) float32, or (N, key_dim) for ids=None.
        """
        if ids is None:
            flat_index = faiss.downcast_index(self._index.index)
            if len(self) == 0:
                return np.zeros((0, self.key_dim), dtype=np.float32)
            return flat_index.reconstruct_n(0, len(self))
        id_arr = _id_array(ids)
        flat = id_arr.reshape(-1)
        self._rows_of(flat)  # KeyError for an id that is not stored
        out = np.stack([self._index.reconstruct(int(i)) for i in flat]) if flat.size else np.zeros((0, self.key_dim))
        return out.astype(np.float32).reshape(*id_arr.shape, self.key_dim)

    def reconstruct(self, entry_id: int) -> np.ndarray:
        """The stored key of one entry, (key_dim,) float32 (KeyError if the id is not stored)."""
        return self.keys(np.array([entry_id], dtype=np.int64))[0]

    def bytes_per_entry(self) -> int:
        """Bytes one entry takes in the saved files, which is also its payload in memory.

        index: the float32 key plus its int64 id (what faiss serialises per entry); values:
        steps x value_dim x itemsize; metadata: the mean size of the entries' compact JSON plus the
        row id in the meta file, rounded up (0 for an empty memory). IndexIDMap2's in-memory reverse
        map (an id -> row hash table, a few tens of bytes per entry) is rebuilt on load and not counted.
        """
        return sum(self._entry_bytes().values())

    def stats(self) -> dict[str, Any]:
        """Sizes, counters and norm statistics, JSON-serialisable (norms are None when empty).

        Value norms are the L2 norms of single thoughts (one per entry and step), the quantity that
        ``nudge.match_norm`` and ``nudge.clip_radius`` are compared against.
        """
        n = len(self)
        parts = self._entry_bytes()
        key_norms = np.linalg.norm(self.keys(), axis=1) if n else np.zeros(0)
        value_sum = value_sq = 0.0
        for start in range(0, n, 4096):
            block = self._values[start : min(n, start + 4096)].astype(np.float32)  # (b, T, V)
            norms = np.linalg.norm(block, axis=-1).astype(np.float64)  # (b, T)
            value_sum += float(norms.sum())
            value_sq += float((norms**2).sum())
        count = n * self.steps
        value_mean = value_sum / count if count else None
        value_std = math.sqrt(max(value_sq / count - value_mean**2, 0.0)) if count else None
        return {
            "entries": n,
            "key_dim": self.key_dim,
            "steps": self.steps,
            "value_dim": self.value_dim,
            "metric": self.metric,
            "value_dtype": self.value_dtype.name,
            "fingerprint": self.fingerprint,
            "bytes": n * sum(parts.values()),
            "bytes_per_entry": sum(parts.values()),
            "bytes_per_entry_parts": parts,
            "added": self._added,
            "removed": self._removed,
            "skipped_duplicates": self._skipped,
            "next_id": self._next_id,
            "key_norm_mean": float(key_norms.mean()) if n else None,
            "key_norm_std": float(key_norms.std()) if n else None,
            "value_norm_mean": value_mean,
            "value_norm_std": value_std,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the memory to ``path`` (the index file) and its two sidecars, atomically.

        Every file is written and flushed under a temporary name in the same folder first. The
        committed generation is then kept as ``*.prev`` hard links while the data files are renamed
        into place, the meta file (the commit point, holding the others' checksums) is renamed last,
        and the ``*.prev`` links are removed. An interruption before the meta rename leaves the old
        generation loadable (from ``*.prev`` where a data file was already replaced); after it, the new.
        """
        index_path, values_path, meta_path = sidecar_paths(path)
        folder = index_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder, index_path.name)
        n = len(self)
        info = _json_copy(self.info, "info")
        temps: list[Path] = []
        try:
            index_tmp = temp_path(index_path)
            temps.append(index_tmp)
            index_bytes = faiss.serialize_index(self._index).tobytes()
            write_synced(index_tmp, lambda f: f.write(index_bytes))

            values_tmp = temp_path(values_path)
            temps.append(values_tmp)
            write_synced(values_tmp, lambda f: np.save(f, self._values[:n], allow_pickle=False))

            meta = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "key_dim": self.key_dim,
                "steps": self.steps,
                "value_dim": self.value_dim,
                "metric": self.metric,
                "value_dtype": self.value_dtype.name,
                "fingerprint": self.fingerprint,
                "count": n,
                "next_id": self._next_id,
                "added": self._added,
                "removed": self._removed,
                "skipped_duplicates": self._skipped,
                "files": {
                    "index": {"name": index_path.name, "sha256": hashlib.sha256(index_bytes).hexdigest()},
                    "values": {"name": values_path.name, "sha256": sha256_file(values_tmp)},
                },
                "info": info,
                "ids": self._ids.tolist(),
                "metadata": self._metadata,
            }
            meta_text = json.dumps(meta, allow_nan=False, separators=(",", ":"))
            meta_tmp = temp_path(meta_path)
            temps.append(meta_tmp)
            write_synced(meta_tmp, lambda f: f.write(meta_text.encode("utf-8")))

            prevs = keep_committed(index_path, values_path, meta_path)
            os.replace(index_tmp, index_path)
            os.replace(values_tmp, values_path)
            os.replace(meta_tmp, meta_path)
            temps.clear()
            sync_folder(folder)
            for prev in prevs:
                prev.unlink(missing_ok=True)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_fingerprint: str | None = None,
        expected_dims: dict[str, Any] | None = None,
    ) -> LatentMemory:
        """Read a memory written by :meth:`save`, checking that its files agree with each other and with
        what the caller expects.

        Args:
            path: the index file.
            expected_fingerprint: the current model's fingerprint; None skips that check.
            expected_dims: any of key_dim, steps, value_dim, metric, value_dtype, compared with the
                saved ones (e.g. from the run config).

        Raises:
            MemoryFileError: a file is missing, unreadable, damaged or truncated (checksum), the files
                disagree (counts, dims, metric, ids), or the memory does not match what is expected.
        """
        index_path, values_path, meta_path = sidecar_paths(path)
        if expected_dims is not None:
            unknown = sorted(set(expected_dims) - set(_EXPECTED_DIM_KEYS))
            if unknown:
                raise ValueError(f"expected_dims: unknown keys {unknown}; allowed: {list(_EXPECTED_DIM_KEYS)}")
        meta = read_meta(meta_path)
        memory = cls._from_meta(meta, meta_path)

        def fail(file: Path, message: str) -> MemoryFileError:
            return MemoryFileError(f"{file}: {message}")

        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise fail(
                meta_path,
                f"the memory was built by another model (fingerprint {meta['fingerprint']!r}, the current "
                f"model's is {expected_fingerprint!r}); rebuild the memory for this model",
            )
        for key, want in (expected_dims or {}).items():
            have = meta[key]
            if key == "value_dtype":
                want = np.dtype(want).name
            if have != want:
                raise fail(meta_path, f"{key} is {have!r}, expected {want!r}")

        count = meta["count"]
        index_file = committed_file(index_path, meta["files"]["index"]["sha256"], meta_path)
        try:
            index = faiss.deserialize_index(np.frombuffer(index_file.read_bytes(), dtype=np.uint8))
        except (RuntimeError, OSError) as err:
            raise fail(index_file, f"not a readable FAISS index ({str(err).splitlines()[0]})") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise fail(index_file, f"expected a FAISS IndexIDMap2, got {type(index).__name__}")
        inner = faiss.downcast_index(index.index)
        want_type = faiss.IndexFlatL2 if memory.metric == "l2" else faiss.IndexFlatIP
        if type(inner) is not want_type:
            raise fail(index_file, f"metric {memory.metric!r} needs {want_type.__name__}, found {type(inner).__name__}")
        if index.d != memory.key_dim:
            raise fail(index_file, f"holds keys of size {index.d}, {meta_path.name} says key_dim {memory.key_dim}")
        if index.ntotal != count:
            raise fail(index_file, f"holds {index.ntotal} entries, {meta_path.name} says {count}")
        index_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        if not np.array_equal(index_ids, memory._ids):
            raise fail(index_file, f"its ids differ from the ids listed in {meta_path.name}")

        values_file = committed_file(values_path, meta["files"]["values"]["sha256"], meta_path)
        try:
            values = np.load(values_file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise fail(values_file, f"not a readable .npy file ({err})") from None
        if not isinstance(values, np.ndarray):
            raise fail(values_file, "expected one array")
        want_shape = (count, memory.steps, memory.value_dim)
        if values.shape != want_shape:
            raise fail(values_file, f"shape {values.shape}, expected {want_shape} from {meta_path.name}")
        if values.dtype != memory.value_dtype:
            raise fail(values_file, f"dtype {values.dtype}, {meta_path.name} says {memory.value_dtype.name}")

        memory._index = index
        memory._values = values
        return memory

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], meta_path: Path) -> LatentMemory:
        try:
            memory = cls(
                meta["key_dim"],
                meta["steps"],
                meta["value_dim"],
                meta["metric"],
                meta["fingerprint"],
                value_dtype=meta["value_dtype"],
            )
        except (ValueError, TypeError) as err:
            raise MemoryFileError(f"{meta_path}: {err}") from None
        try:
            ids = np.asarray(meta["ids"], dtype=np.int64)
        except OverflowError:
            raise MemoryFileError(f"{meta_path}: field 'ids' holds numbers beyond int64") from None
        count, next_id = meta["count"], meta["next_id"]
        problem = None
        counters = ("count", "next_id", "added", "removed", "skipped_duplicates")
        if any(meta[name] < 0 for name in counters):
            problem = f"the counters {counters} must not be negative"
        elif len(ids) != count:
            problem = f"lists {len(ids)} ids for {count} entries"
        elif len(meta["metadata"]) != count:
            problem = f"holds {len(meta['metadata'])} metadata dicts for {count} entries"
        elif not all(isinstance(m, dict) for m in meta["metadata"]):
            problem = "metadata must be a list of objects"
        elif count and (ids[0] < 0 or np.any(np.diff(ids) <= 0) or ids[-1] >= next_id):
            problem = f"ids must be increasing, >= 0 and below next_id {next_id}"
        if problem:
            raise MemoryFileError(f"{meta_path}: {problem}")
        memory._ids = ids
        memory._metadata = meta["metadata"]
        memory._next_id = next_id
        memory._added = meta["added"]
        memory._removed = meta["removed"]
        memory._skipped = meta["skipped_duplicates"]
        memory.info = meta["info"]
        return memory

    def _prepare_keys(self, keys: ArrayLike, name: str) -> np.ndarray:
        """(N, key_dim) float32, C-contiguous, validated; L2-normalised for "cosine"."""
        arr = _float_array(keys, name)
        if arr.ndim != 2 or arr.shape[1] != self.key_dim:
            raise ValueError(f"{name}: expected shape (N, {self.key_dim}), got {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: contains NaN or infinite numbers (or numbers beyond float32)")
        if self.metric == "cosine":
            norms = np.linalg.norm(arr, axis=1, keepdims=True)  # (N, 1)
            if np.any(norms == 0):
                rows = np.flatnonzero(norms[:, 0] == 0)[:5].tolist()
                raise ValueError(f"{name}: rows {rows} have zero norm, which has no cosine similarity")
            arr = arr / norms
        return arr

    def _search_prepared(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        b = len(queries)
        sims = np.full((b, k), -np.inf, dtype=np.float32)  # (B, k)
        ids = np.full((b, k), -1, dtype=np.int64)  # (B, k)
        found = min(k, len(self))
        if b == 0 or found == 0:
            return sims, ids
        dist, got = self._index.search(queries, found)  # (B, found) each
        if self.metric == "l2":
            dist = -dist
        valid = got >= 0
        sims[:, :found] = np.where(valid, dist, -np.inf)
        ids[:, :found] = got
        return sims, ids

    def _pairwise(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Similarity of each prepared key in a (n, K) to each in b (m, K): (n, m), in this metric."""
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        dots = a64 @ b64.T
        if self.metric != "l2":
            return dots
        return -((a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2 * dots)

    def _dedup_keep(self, keys: np.ndarray, threshold: float) -> np.ndarray:
        """(N,) bool: which prepared keys survive deduplication, greedily in row order."""
        n = len(keys)
        keep = np.ones(n, dtype=bool)
        if len(self):
            best, _ = self._search_prepared(keys, 1)  # (N, 1)
            keep &= best[:, 0] < threshold
        accepted = np.zeros(0, dtype=np.int64)  # rows of this batch kept so far
        for start in range(0, n, _DEDUP_BLOCK):
            cand = np.arange(start, min(n, start + _DEDUP_BLOCK))
            cand = cand[keep[cand]]
            if accepted.size and cand.size:
                dup = (self._pairwise(keys[cand], keys[accepted]) >= threshold).any(axis=1)
                keep[cand[dup]] = False
                cand = cand[~dup]
            within = self._pairwise(keys[cand], keys[cand]) >= threshold  # (c, c)
            taken: list[int] = []
            for j in range(cand.size):
                if taken and within[j, taken].any():
                    keep[cand[j]] = False
                else:
                    taken.append(j)
            accepted = np.concatenate([accepted, cand[taken]])
        return keep

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of stored ids, (M,) int64; KeyError naming the ids that are not stored."""
        rows = np.searchsorted(self._ids, ids)
        clipped = np.minimum(rows, max(len(self._ids) - 1, 0))
        ok = (rows < len(self._ids)) & (self._ids[clipped] == ids) if len(self._ids) else np.zeros(ids.shape, bool)
        if not ok.all():
            missing = np.unique(ids[~ok])
            shown = missing[:10].tolist()
            more = f" and {missing.size - 10} more" if missing.size > 10 else ""
            raise KeyError(f"ids not in the memory (removed or never added): {shown}{more}")
        return rows

    def _reserve(self, size: int) -> None:
        """Grow the values buffer geometrically so that adding batch after batch stays linear."""
        capacity = len(self._values)
        if size <= capacity:
            return
        grown = np.zeros((max(size, 2 * capacity, 16), self.steps, self.value_dim), dtype=self.value_dtype)
        grown[: len(self._ids)] = self._values[: len(self._ids)]
        self._values = grown

    def _entry_bytes(self) -> dict[str, int]:
        index = self.key_dim * 4 + _INDEX_ID_BYTES
        values = self.steps * self.value_dim * self.value_dtype.itemsize
        n = len(self)
        metadata = 0
        if n:
            text = sum(len(json.dumps(m, separators=(",", ":")).encode("utf-8")) for m in self._metadata)
            id_text = sum(len(str(i)) for i in self._ids.tolist())
            # Each entry adds its JSON object and its id to two lists, plus a separating comma in each.
            metadata = math.ceil((text + id_text + 2 * n) / n)
        return {"index": index, "values": values, "metadata": metadata}


def _float_array(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    return arr


def _id_array(ids: ArrayLike) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _json_copy(value: Any, name: str) -> Any:
    """A JSON round trip of value: an independent copy that looks exactly as it will after load."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: not JSON-serialisable ({err}); use plain int/float/str/bool/list/dict") from None
