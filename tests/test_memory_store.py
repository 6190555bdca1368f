"""The latent memory store: search against a brute-force oracle, id bookkeeping, persistence and its failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from noblankslate.memory import store as store_module  # noqa: E402
from noblankslate.memory import store_files  # noqa: E402
from noblankslate.memory.store import LatentMemory, MemoryFileError, sidecar_paths  # noqa: E402

KEY_DIM, STEPS, VALUE_DIM = 8, 3, 5
FINGERPRINT = "model-abc"


def make_memory(metric: str = "cosine", value_dtype: str = "float16") -> LatentMemory:
    return LatentMemory(KEY_DIM, STEPS, VALUE_DIM, metric, FINGERPRINT, value_dtype=value_dtype)


def random_entries(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    keys = rng.normal(size=(n, KEY_DIM)).astype(np.float32)
    values = rng.normal(size=(n, STEPS, VALUE_DIM)).astype(np.float32)
    metadata = [{"example_id": int(i), "correct": True, "retrieved": 0} for i in range(n)]
    return keys, values, metadata


def oracle_search(
    keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, metric: str, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every query against every key in float64, sorted; padded with -1 / -inf."""
    keys, queries = keys.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        sims = -((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    else:
        sims = queries @ keys.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    out_sims = np.full((len(queries), k), -np.inf)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    found = order.shape[1]
    out_sims[:, :found] = np.take_along_axis(sims, order, axis=1)
    out_ids[:, :found] = ids[order]
    return out_sims, out_ids


def assert_same_search(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    got_sims, got_ids = got
    want_sims, want_ids = want
    assert got_sims.dtype == np.float32 and got_ids.dtype == np.int64
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_sims, want_sims, rtol=1e-5, atol=1e-4)


def assert_memories_equal(a: LatentMemory, b: LatentMemory, queries: np.ndarray) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.ids, b.ids)
    sims_a, ids_a = a.search(queries, 4)
    sims_b, ids_b = b.search(queries, 4)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(sims_a, sims_b)
    np.testing.assert_array_equal(a.values(a.ids), b.values(b.ids))
    assert [a.metadata_of(i) for i in a.ids] == [b.metadata_of(i) for i in b.ids]
    assert a.stats() == b.stats()


class CountingIndex:
    """Delegates to a FAISS index and counts its search calls."""

    def __init__(self, index) -> None:
        self.index = index
        self.searches = 0

    def search(self, x, k):
        self.searches += 1
        return self.index.search(x, k)

    def __getattr__(self, name):
        return getattr(self.index, name)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_search_matches_bruteforce_oracle(metric: str) -> None:
    rng = np.random.default_rng(0)
    memory = make_memory(metric)
    keys, values, metadata = random_entries(rng, 40)
    ids = memory.add(keys, values, metadata)
    np.testing.assert_array_equal(ids, np.arange(40))
    queries = rng.normal(size=(6, KEY_DIM)).astype(np.float32)
    for k in (1, 3, 7, 40, 45):
        assert_same_search(memory.search(queries, k), oracle_search(keys, ids, queries, metric, k))

    gone = np.array([0, 5, 6, 17, 39])
    assert memory.remove(gone) == 5
    kept = np.setdiff1d(ids, gone)
    for k in (1, 10, 35, 50):
        assert_same_search(memory.search(queries, k), oracle_search(keys[kept], kept, queries, metric, k))


def test_search_is_one_faiss_call_per_batch() -> None:
    rng = np.random.default_rng(1)
    memory = make_memory()
    memory.add(*random_entries(rng, 10))
    counting = CountingIndex(memory._index)
    memory._index = counting
    sims, ids = memory.search(rng.normal(size=(32, KEY_DIM)).astype(np.float32), 4)
    assert counting.searches == 1
    assert sims.shape == ids.shape == (32, 4)


def test_search_on_empty_memory_pads() -> None:
    memory = make_memory("l2")
    sims, ids = memory.search(np.ones((2, KEY_DIM), np.float32), 3)
    np.testing.assert_array_equal(ids, -np.ones((2, 3)))
    assert np.all(np.isneginf(sims))
    assert memory.values(ids).shape == (2, 3, STEPS, VALUE_DIM)
    assert not memory.values(ids).any()


def test_cosine_normalises_keys_and_queries() -> None:
    rng = np.random.default_rng(2)
    keys, values, metadata = random_entries(rng, 12)
    scale = rng.uniform(0.1, 50.0, size=(12, 1)).astype(np.float32)
    plain, scaled = make_memory("cosine"), make_memory("cosine")
    plain.add(keys, values, metadata)
    scaled.add(keys * scale, values, metadata)
    np.testing.assert_allclose(np.linalg.norm(scaled.keys(), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(scaled.keys(), plain.keys(), rtol=1e-5, atol=1e-6)
    queries = rng.normal(size=(4, KEY_DIM)).astype(np.float32)
    sims_a, ids_a = plain.search(queries, 5)
    sims_b, ids_b = scaled.search(queries * 7.0, 5)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(sims_a, sims_b, rtol=1e-5, atol=1e-6)
    self_sims, self_ids = scaled.search(keys[:3] * 3.0, 1)
    np.testing.assert_array_equal(self_ids[:, 0], [0, 1, 2])
    np.testing.assert_allclose(self_sims[:, 0], 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="zero norm"):
        scaled.search(np.zeros((1, KEY_DIM), np.float32), 1)


def test_ip_and_l2_similarities_are_exact_on_a_small_case() -> None:
    keys = np.zeros((2, KEY_DIM), np.float32)
    keys[0, 0], keys[1, 1] = 2.0, 3.0
    values = np.zeros((2, STEPS, VALUE_DIM), np.float32)
    query = np.zeros((1, KEY_DIM), np.float32)
    query[0, 0] = 1.0
    ip, l2 = make_memory("ip"), make_memory("l2")
    ip.add(keys, values)
    l2.add(keys, values)
    sims, ids = ip.search(query, 3)
    np.testing.assert_array_equal(ids, [[0, 1, -1]])
    np.testing.assert_array_equal(sims, np.array([[2.0, 0.0, -np.inf]], np.float32))
    sims, ids = l2.search(query, 3)
    np.testing.assert_array_equal(ids, [[0, 1, -1]])
    np.testing.assert_array_equal(sims, np.array([[-1.0, -10.0, -np.inf]], np.float32))  # higher = closer
    np.testing.assert_array_equal(l2.keys(), keys)  # l2 and ip keep keys as given
    np.testing.assert_array_equal(l2.reconstruct(1), keys[1])


def test_ids_are_stable_and_never_reused(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    memory = make_memory("l2")
    keys, values, metadata = random_entries(rng, 5)
    np.testing.assert_array_equal(memory.add(keys, values, metadata), [0, 1, 2, 3, 4])
    memory.remove([1, 3])
    np.testing.assert_array_equal(memory.add(keys[:2], values[:2], metadata[:2]), [5, 6])
    np.testing.assert_array_equal(memory.ids, [0, 2, 4, 5, 6])
    np.testing.assert_array_equal(memory.reconstruct(4), keys[4])  # an id still finds its own key
    np.testing.assert_array_equal(memory.reconstruct(6), keys[1])
    memory.remove([6])  # the highest id: still never handed out again, even after save and load
    memory.save(tmp_path / "index.bin")
    loaded = LatentMemory.load(tmp_path / "index.bin")
    assert loaded.next_id == 7
    np.testing.assert_array_equal(loaded.add(keys[:1], values[:1], metadata[:1]), [7])
    stats = loaded.stats()
    assert (stats["added"], stats["removed"], stats["entries"]) == (8, 3, 5)


def test_values_and_metadata_stay_aligned_after_removals() -> None:
    rng = np.random.default_rng(4)
    memory = make_memory("ip")
    keys, values, metadata = random_entries(rng, 20)
    memory.add(keys, values, metadata)
    memory.remove([0, 7, 8, 19])
    more_keys, more_values, more_meta = random_entries(rng, 3)
    memory.add(more_keys, more_values, [{"example_id": 100 + i} for i in range(3)])
    memory.remove([21])
    all_values = np.concatenate([values, more_values]).astype(np.float16).astype(np.float32)
    all_meta = metadata + [{"example_id": 100 + i} for i in range(3)]

    query_ids = np.array([[1, 20, -1], [22, 9, 18]])  # (B, k) as search returns them
    got = memory.values(query_ids)
    assert got.shape == (2, 3, STEPS, VALUE_DIM) and got.dtype == np.float32
    for (b, j), entry_id in np.ndenumerate(query_ids):
        want = np.zeros((STEPS, VALUE_DIM)) if entry_id < 0 else all_values[entry_id]
        np.testing.assert_array_equal(got[b, j], want)
    for entry_id in memory.ids:
        assert memory.metadata_of(entry_id) == all_meta[entry_id]
    for missing in (0, 21, 23):
        assert missing not in memory
        with pytest.raises(KeyError, match=str(missing)):
            memory.values([[1, missing]])
        with pytest.raises(KeyError):
            memory.metadata_of(missing)
    with pytest.raises(KeyError):
        memory.remove([1, 0])
    assert 1 in memory  # a failed remove changes nothing


def test_update_metadata_counts_each_retrieval() -> None:
    rng = np.random.default_rng(5)
    memory = make_memory()
    keys, values, _ = random_entries(rng, 4)
    memory.add(keys, values, [{"example_id": i} for i in range(4)])
    memory.update_metadata(np.array([[0, 2, -1], [2, 3, -1]]), "retrieved", lambda n: n + 1, default=0)
    assert [memory.metadata_of(i).get("retrieved") for i in range(4)] == [1, None, 2, 1]
    memory.update_metadata([1], "exit_step", 3)
    assert memory.metadata_of(1) == {"example_id": 1, "exit_step": 3}
    with pytest.raises(KeyError):
        memory.update_metadata([0, 99], "retrieved", lambda n: n + 1, default=0)
    assert memory.metadata_of(0)["retrieved"] == 1  # unchanged: ids are checked first
    with pytest.raises(ValueError, match="JSON"):
        memory.update_metadata([0], "bad", np.int64(3))
    copy = memory.metadata_of(0)
    copy["retrieved"] = 50
    assert memory.metadata_of(0)["retrieved"] == 1


def test_add_rejects_bad_input_clearly() -> None:
    memory = make_memory()
    good_keys = np.ones((2, KEY_DIM), np.float32)
    good_values = np.ones((2, STEPS, VALUE_DIM), np.float32)
    cases = [
        ((np.ones((2, KEY_DIM + 1)), good_values, None), ValueError, "keys: expected shape"),
        ((good_keys, np.ones((2, STEPS + 1, VALUE_DIM)), None), ValueError, "values: expected shape"),
        ((np.ones((2, KEY_DIM), np.int64), good_values, None), TypeError, "floating-point"),
        ((np.full((2, KEY_DIM), np.nan), good_values, None), ValueError, "NaN"),
        ((good_keys, np.full((2, STEPS, VALUE_DIM), np.inf), None), ValueError, "NaN or infinite"),
        ((good_keys, np.full((2, STEPS, VALUE_DIM), 1e5), None), ValueError, "overflow float16"),
        ((good_keys, good_values, [{}]), ValueError, "expected 2 dicts"),
        ((good_keys, good_values, [{}, {"id": np.int64(1)}]), ValueError, r"metadata\[1\]: not JSON"),
        ((good_keys, good_values, [{}, "x"]), TypeError, r"metadata\[1\]"),
        ((np.zeros((2, KEY_DIM), np.float32), good_values, None), ValueError, "zero norm"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            memory.add(*args)
    assert len(memory) == 0 and memory.next_id == 0
    with pytest.raises(ValueError, match="metric"):
        LatentMemory(4, 2, 4, "dot", FINGERPRINT)
    with pytest.raises(ValueError, match="fingerprint"):
        LatentMemory(4, 2, 4, "ip", "")
    f32 = make_memory(value_dtype="float32")
    f32.add(good_keys, np.full((2, STEPS, VALUE_DIM), 1e5, np.float32))  # float32 values hold it
    np.testing.assert_array_equal(f32.values([0]), np.full((1, STEPS, VALUE_DIM), 1e5))


def test_dedup_skips_near_duplicates_of_stored_and_earlier_entries() -> None:
    def unit(i: int, tilt: float = 0.0) -> np.ndarray:
        v = np.zeros(KEY_DIM, np.float32)
        v[i] = 1.0
        v[(i + 1) % KEY_DIM] = tilt
        return v

    memory = make_memory("cosine")
    values = np.zeros((1, STEPS, VALUE_DIM), np.float32)
    memory.add(unit(0)[None], values)
    # 1: a scaled copy of the stored key; 3: a near copy of row 2; 4: a far key.
    batch = np.stack([unit(1), unit(0) * 5, unit(2), unit(2, 0.01), unit(3)])
    ids = memory.add(batch, np.zeros((5, STEPS, VALUE_DIM), np.float32), dedup_threshold=0.99)
    np.testing.assert_array_equal(ids, [1, -1, 2, -1, 3])
    assert len(memory) == 4 and memory.stats()["skipped_duplicates"] == 2

    # A chain a ~ b ~ c with a !~ c: b is skipped, so c is compared with a only and kept, exactly as
    # if the rows were added one at a time.
    angle = np.deg2rad(10)
    chain = np.zeros((3, KEY_DIM), np.float32)
    for j, t in enumerate((0, angle, 2 * angle)):
        chain[j, 4], chain[j, 5] = np.cos(t), np.sin(t)
    ids = memory.add(chain, np.zeros((3, STEPS, VALUE_DIM), np.float32), dedup_threshold=float(np.cos(angle * 1.5)))
    np.testing.assert_array_equal(ids, [4, -1, 5])


@pytest.mark.parametrize("metric,threshold", [("cosine", 0.95), ("ip", 0.9), ("l2", -0.3)])
def test_dedup_batch_equals_one_at_a_time(metric: str, threshold: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_DEDUP_BLOCK", 4)  # cross block boundaries
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(5, KEY_DIM))
    keys = (centres[rng.integers(0, 5, size=30)] + 0.1 * rng.normal(size=(30, KEY_DIM))).astype(np.float32)
    values = np.zeros((30, STEPS, VALUE_DIM), np.float32)
    batch, single = make_memory(metric), make_memory(metric)
    batch.add(keys[:3], values[:3])
    single.add(keys[:3], values[:3])
    got = batch.add(keys[3:], values[3:], dedup_threshold=threshold)
    want = np.concatenate([single.add(keys[i : i + 1], values[:1], dedup_threshold=threshold) for i in range(3, 30)])
    np.testing.assert_array_equal(got >= 0, want >= 0)
    assert 0 < (got >= 0).sum() < 27  # the case exercises both outcomes
    np.testing.assert_array_equal(batch.keys(), single.keys())


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for metric in ("cosine", "ip", "l2"):
        memory = make_memory(metric)
        keys, values, metadata = random_entries(rng, 25)
        memory.add(keys, values, metadata)
        memory.remove([3, 4])
        memory.update_metadata([5], "retrieved", 2)
        memory.info = {"calibration": {"kind": "temperature", "t": 0.5}}
        path = tmp_path / metric / "faiss_index.bin"
        memory.save(path)
        assert sorted(p.name for p in path.parent.iterdir()) == [
            "faiss_index.bin", "faiss_index.bin.meta.json", "faiss_index.bin.values.npy"
        ]
        loaded = LatentMemory.load(
            path, expected_fingerprint=FINGERPRINT, expected_dims={"key_dim": KEY_DIM, "metric": metric}
        )
        assert loaded.info == memory.info and loaded.fingerprint == FINGERPRINT
        assert_memories_equal(memory, loaded, rng.normal(size=(5, KEY_DIM)).astype(np.float32))
        loaded.add(*random_entries(rng, 2))  # a loaded memory keeps working
        assert len(loaded) == 25


def test_empty_memory_round_trip(tmp_path: Path) -> None:
    memory = make_memory("ip", value_dtype="float32")
    memory.save(tmp_path / "m.bin")
    loaded = LatentMemory.load(tmp_path / "m.bin")
    assert len(loaded) == 0 and loaded.value_dtype == np.float32
    assert loaded.stats()["value_norm_mean"] is None


FAILURE_POINTS = ["serialize", "np.save", "replace-index", "replace-values", "replace-meta"]


def inject_failure(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if point == "serialize":
        monkeypatch.setattr(store_module.faiss, "serialize_index", boom)
    elif point == "np.save":
        monkeypatch.setattr(store_module.np, "save", boom)
    else:
        fail_on = {"replace-index": 1, "replace-values": 2, "replace-meta": 3}[point]
        real_replace, calls = os.replace, []

        def flaky_replace(src, dst):
            calls.append(dst)
            if len(calls) == fail_on:
                boom()
            real_replace(src, dst)

        monkeypatch.setattr(store_module.os, "replace", flaky_replace)


@pytest.mark.parametrize("point", FAILURE_POINTS)
def test_interrupted_save_leaves_the_previous_memory_loadable(
    tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    path = tmp_path / "faiss_index.bin"
    queries = rng.normal(size=(4, KEY_DIM)).astype(np.float32)
    memory = make_memory("cosine")
    memory.add(*random_entries(rng, 10))
    memory.save(path)
    old = LatentMemory.load(path)

    memory.remove([0, 1])
    memory.add(*random_entries(rng, 6))
    with monkeypatch.context() as patch:
        inject_failure(patch, point)
        with pytest.raises(OSError, match="simulated"):
            memory.save(path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert_memories_equal(LatentMemory.load(path), old, queries)

    # A second save interrupted the same way must not lose the committed generation either.
    with monkeypatch.context() as patch:
        inject_failure(patch, point)
        with pytest.raises(OSError):
            memory.save(path)
    assert_memories_equal(LatentMemory.load(path), old, queries)

    memory.save(path)
    assert_memories_equal(LatentMemory.load(path), memory, queries)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".prev")]


def test_killed_save_leftovers_are_ignored_and_cleaned(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    path = tmp_path / "faiss_index.bin"
    memory = make_memory()
    memory.add(*random_entries(rng, 3))
    memory.save(path)
    leftover = tmp_path / ".faiss_index.bin.values.npy.tmp-deadbeef"
    leftover.write_bytes(b"half a file")
    assert len(LatentMemory.load(path)) == 3
    memory.save(path)
    assert not leftover.exists()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    rng = np.random.default_rng(10)
    memory = make_memory("ip")
    memory.add(*random_entries(rng, 6))
    path = tmp_path / "index" / "faiss_index.bin"
    memory.save(path)
    return path


def rewrite_meta(meta_path: Path, **changes) -> None:
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if key in ("index_sha", "values_sha"):
            meta["files"][key.split("_")[0]]["sha256"] = value
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))


def sha256(path: Path) -> str:
    return store_files.sha256_file(path)


def test_load_missing_files(saved: Path) -> None:
    index_path, values_path, meta_path = sidecar_paths(saved)
    for victim in (values_path, index_path, meta_path):
        data = victim.read_bytes()
        victim.unlink()
        with pytest.raises(MemoryFileError, match="missing") as err:
            LatentMemory.load(saved)
        assert str(victim) in str(err.value)
        victim.write_bytes(data)
    assert len(LatentMemory.load(saved)) == 6


def test_load_truncated_or_damaged_files(saved: Path) -> None:
    index_path, values_path, meta_path = sidecar_paths(saved)
    for victim in (values_path, index_path):
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        with pytest.raises(MemoryFileError, match="checksum") as err:
            LatentMemory.load(saved)
        assert str(victim) in str(err.value)
        victim.write_bytes(data)

    # Truncated with a matching checksum (written by something else): the readers' errors are wrapped.
    data = values_path.read_bytes()
    values_path.write_bytes(data[:-7])
    rewrite_meta(meta_path, values_sha=sha256(values_path))
    with pytest.raises(MemoryFileError, match="values.npy: not a readable .npy"):
        LatentMemory.load(saved)
    values_path.write_bytes(data)
    rewrite_meta(meta_path, values_sha=sha256(values_path))

    data = index_path.read_bytes()
    index_path.write_bytes(data[:-7])
    rewrite_meta(meta_path, index_sha=sha256(index_path))
    with pytest.raises(MemoryFileError, match="faiss_index.bin: not a readable FAISS index"):
        LatentMemory.load(saved)


def test_load_index_with_another_count(saved: Path) -> None:
    index_path, _, meta_path = sidecar_paths(saved)
    other = make_memory("ip")
    other.add(*random_entries(np.random.default_rng(11), 4))
    other.save(saved.parent / "other.bin")
    index_path.write_bytes((saved.parent / "other.bin").read_bytes())
    with pytest.raises(MemoryFileError, match="checksum") as err:
        LatentMemory.load(saved)
    assert str(index_path) in str(err.value)
    rewrite_meta(meta_path, index_sha=sha256(index_path))
    with pytest.raises(MemoryFileError, match="holds 4 entries, faiss_index.bin.meta.json says 6") as err:
        LatentMemory.load(saved)
    assert str(index_path) in str(err.value)


def test_load_files_that_disagree_with_the_meta(saved: Path) -> None:
    index_path, values_path, meta_path = sidecar_paths(saved)
    good = meta_path.read_text()

    np.save(values_path, np.zeros((5, STEPS, VALUE_DIM), np.float16), allow_pickle=False)
    rewrite_meta(meta_path, values_sha=sha256(values_path))
    with pytest.raises(MemoryFileError, match=r"shape \(5, 3, 5\), expected \(6, 3, 5\)") as err:
        LatentMemory.load(saved)
    assert str(values_path) in str(err.value)

    meta_path.write_text(good)
    rewrite_meta(meta_path, metric="l2")
    with pytest.raises(MemoryFileError, match="metric 'l2' needs IndexFlatL2"):
        LatentMemory.load(saved)
    meta_path.write_text(good)
    rewrite_meta(meta_path, key_dim=KEY_DIM + 1)
    with pytest.raises(MemoryFileError, match="keys of size 8"):
        LatentMemory.load(saved)
    meta_path.write_text(good)
    rewrite_meta(meta_path, ids=[0, 1, 2, 3, 4, 9], next_id=10)
    with pytest.raises(MemoryFileError, match="ids differ"):
        LatentMemory.load(saved)
    meta_path.write_text(good)
    rewrite_meta(meta_path, count=7)
    with pytest.raises(MemoryFileError, match="lists 6 ids for 7 entries") as err:
        LatentMemory.load(saved)
    assert str(meta_path) in str(err.value)


def test_load_refuses_unexpected_dims_and_fingerprint(saved: Path) -> None:
    meta_path = sidecar_paths(saved)[2]
    with pytest.raises(MemoryFileError, match="key_dim is 8, expected 16") as err:
        LatentMemory.load(saved, expected_dims={"key_dim": 16})
    assert str(meta_path) in str(err.value)
    with pytest.raises(MemoryFileError, match="steps is 3, expected 6"):
        LatentMemory.load(saved, expected_dims={"steps": 6, "value_dim": VALUE_DIM})
    with pytest.raises(MemoryFileError, match="metric is 'ip', expected 'cosine'"):
        LatentMemory.load(saved, expected_dims={"metric": "cosine"})
    with pytest.raises(MemoryFileError, match="another model") as err:
        LatentMemory.load(saved, expected_fingerprint="model-xyz")
    assert str(meta_path) in str(err.value) and "model-abc" in str(err.value)
    with pytest.raises(ValueError, match="unknown keys"):
        LatentMemory.load(saved, expected_dims={"hidden": 8})
    loaded = LatentMemory.load(saved, expected_fingerprint=FINGERPRINT, expected_dims={"value_dtype": "float16"})
    assert len(loaded) == 6


def test_load_corrupted_meta(saved: Path) -> None:
    meta_path = sidecar_paths(saved)[2]
    good = meta_path.read_text()
    for bad, message in [
        (good[: len(good) // 2], "not valid JSON"),
        ("[1, 2]", "not a latent memory meta file"),
        (good.replace('"fingerprint"', '"fingerprnt"'), "field 'fingerprint' is missing"),
        (good.replace('"key_dim":8', '"key_dim":"8"'), "field 'key_dim' has the wrong type"),
        (good.replace('"metric":"ip"', '"metric":"dot"'), "metric: expected one of"),
    ]:
        meta_path.write_text(bad)
        with pytest.raises(MemoryFileError, match=message) as err:
            LatentMemory.load(saved)
        assert str(meta_path) in str(err.value)
    meta_path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MemoryFileError, match="not valid JSON"):
        LatentMemory.load(saved)


def test_bytes_per_entry_exact_and_matches_the_files(tmp_path: Path) -> None:
    memory = make_memory("cosine")
    # index: 8 float32 + an int64 id = 40; values: 3 x 5 float16 = 30; no entries, no metadata.
    assert memory.bytes_per_entry() == 70
    assert make_memory(value_dtype="float32").bytes_per_entry() == 40 + 60
    assert LatentMemory(768, 6, 768, "cosine", FINGERPRINT).bytes_per_entry() == 768 * 4 + 8 + 6 * 768 * 2

    rng = np.random.default_rng(12)
    keys, values, _ = random_entries(rng, 5)
    memory.add(keys[:2], values[:2], [{"a": 1}, {"a": 1}])
    # metadata: '{"a":1}' (7) + a one-digit id (1) + two commas (2) = 10 per entry.
    assert memory.bytes_per_entry() == 80
    assert memory.stats()["bytes"] == 160
    path = tmp_path / "m.bin"
    memory.save(path)
    before = [p.stat().st_size for p in sidecar_paths(path)]
    memory.add(keys[2:], values[2:], [{"a": 1}] * 3)
    assert memory.bytes_per_entry() == 80
    memory.save(path)
    after = [p.stat().st_size for p in sidecar_paths(path)]
    assert [b - a for a, b in zip(before, after)] == [3 * 40, 3 * 30, 3 * 10]


def test_stats_on_known_data() -> None:
    memory = make_memory("l2")
    keys = np.zeros((2, KEY_DIM), np.float32)
    keys[0, 0], keys[1, 0] = 3.0, 5.0
    values = np.zeros((2, STEPS, VALUE_DIM), np.float32)
    values[0, :, 0] = 2.0  # thought norms 2, 2, 2
    values[1, :, 1] = 4.0  # thought norms 4, 4, 4
    memory.add(keys, values, [{}, {}])
    memory.remove([0])
    memory.add(keys[:1], values[:1], [{}])
    stats = memory.stats()
    assert stats["entries"] == 2 and stats["added"] == 3 and stats["removed"] == 1
    assert (stats["key_dim"], stats["steps"], stats["value_dim"], stats["metric"]) == (KEY_DIM, STEPS, VALUE_DIM, "l2")
    assert stats["key_norm_mean"] == pytest.approx(4.0) and stats["key_norm_std"] == pytest.approx(1.0)
    assert stats["value_norm_mean"] == pytest.approx(3.0) and stats["value_norm_std"] == pytest.approx(1.0)
    json.dumps(stats)
