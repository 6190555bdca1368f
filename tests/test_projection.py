"""PCA projections of the memory: reconstruction, explained variance on constructed data, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from noblankslate.memory.projection import PCAProjection, ProjectionFileError


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def low_rank_data(rng: np.random.Generator, n: int, d: int, rank: int) -> np.ndarray:
    basis = rng.normal(size=(rank, d))
    return (rng.normal(size=(n, rank)) @ basis + 5.0 * rng.normal(size=d)).astype(np.float32)


def test_round_trip_is_exact_at_the_rank_of_the_data() -> None:
    rng = np.random.default_rng(0)
    x = low_rank_data(rng, 200, 16, rank=4)
    pca = PCAProjection.fit(x, 4)
    y = pca.transform(x)
    assert y.shape == (200, 4) and y.dtype == np.float32
    np.testing.assert_allclose(pca.inverse_transform(y), x, atol=1e-4 * np.abs(x).max())
    assert pca.retained_variance == pytest.approx(1.0, abs=1e-9)
    # Trajectories (N, T, d) project thought by thought.
    traj = x.reshape(50, 4, 16)
    np.testing.assert_allclose(pca.transform(traj), y.reshape(50, 4, 4), rtol=1e-5, atol=1e-5)
    # Below the rank, it loses exactly the discarded share of the variance.
    pca2 = PCAProjection.fit(x, 2)
    residual = x - pca2.inverse_transform(pca2.transform(x))
    lost = (residual.astype(np.float64) ** 2).sum() / ((x - x.mean(0)).astype(np.float64) ** 2).sum()
    assert lost == pytest.approx(1.0 - pca2.retained_variance, rel=1e-3)


def test_explained_variance_on_constructed_data() -> None:
    # Columns of a Hadamard matrix (orthogonal, zero-mean +-1) scaled by 3, 2, 1 and rotated into 6-d:
    # variances exactly proportional to 9, 4, 1 along known orthogonal directions.
    h2 = np.array([[1, 1], [1, -1]])
    h8 = np.kron(np.kron(h2, h2), h2).astype(np.float64)
    z = h8[:, 1:4] * np.array([3.0, 2.0, 1.0])  # (8, 3)
    q = random_orthogonal(np.random.default_rng(1), 6)
    x = z @ q[:3] + np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    pca = PCAProjection.fit(x, 2)
    np.testing.assert_allclose(pca.explained_variance_ratio, [9 / 14, 4 / 14], rtol=1e-9)
    np.testing.assert_allclose(np.abs(pca.components @ q[:3].T.astype(np.float32)), [[1, 0, 0], [0, 1, 0]], atol=1e-5)
    np.testing.assert_allclose(pca.mean, x.mean(0), rtol=1e-6)


def test_matches_an_svd_oracle_and_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(300, 10)) * np.linspace(5, 0.5, 10)).astype(np.float32)
    pca = PCAProjection.fit(x, 3)
    centred = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(np.sum(pca.components * vt[:3], axis=1))
    np.testing.assert_allclose(pca.components, vt[:3] * signs[:, None], atol=1e-5)
    np.testing.assert_allclose(pca.explained_variance_ratio, (s**2 / (s**2).sum())[:3], rtol=1e-6)
    np.testing.assert_allclose(pca.transform(x), centred @ (vt[:3] * signs[:, None]).T, rtol=1e-4, atol=1e-4)
    again = PCAProjection.fit(x.copy(), 3)
    np.testing.assert_array_equal(again.components, pca.components)
    pivots = np.argmax(np.abs(pca.components), axis=1)
    assert np.all(pca.components[np.arange(3), pivots] > 0)


def test_identity_when_nothing_is_reduced() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for pca in (PCAProjection.fit(x, None), PCAProjection.fit(x, 4), PCAProjection.identity(4)):
        assert pca.is_identity and pca.out_dim == 4 and pca.explained_variance_ratio is None
        y = pca.transform(x)
        np.testing.assert_array_equal(y, x)
        assert y is not x
        np.testing.assert_array_equal(pca.inverse_transform(y), x)
        assert pca.retained_variance == 1.0


def test_bad_fits_and_inputs_are_refused_clearly() -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=r"cannot fit 5 principal components from 3 samples"):
        PCAProjection.fit(rng.normal(size=(3, 8)), 5)
    with pytest.raises(ValueError, match="out_dim 9 is larger than the data's dimension 8"):
        PCAProjection.fit(rng.normal(size=(20, 8)), 9)
    with pytest.raises(ValueError, match="NaN"):
        PCAProjection.fit(np.full((20, 8), np.nan), 2)
    with pytest.raises(TypeError, match="floating-point"):
        PCAProjection.fit(np.ones((20, 8), np.int64), 2)
    pca = PCAProjection.fit(rng.normal(size=(20, 8)), 2)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 8\)"):
        pca.transform(np.ones((2, 7), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 2\)"):
        pca.inverse_transform(np.ones((2, 8), np.float32))


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pca = PCAProjection.fit(rng.normal(size=(50, 12)), 5)
    path = tmp_path / "proj" / "key_projection"  # saved at exactly this path, no suffix added
    pca.save(path)
    assert path.is_file() and not list(path.parent.glob("*.tmp-*"))
    loaded = PCAProjection.load(path)
    np.testing.assert_array_equal(loaded.mean, pca.mean)
    np.testing.assert_array_equal(loaded.components, pca.components)
    np.testing.assert_array_equal(loaded.explained_variance_ratio, pca.explained_variance_ratio)
    x = rng.normal(size=(4, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))

    PCAProjection.identity(7).save(tmp_path / "identity.npz")
    ident = PCAProjection.load(tmp_path / "identity.npz")
    assert ident.is_identity and ident.in_dim == 7


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.npz"
    with pytest.raises(ProjectionFileError, match="missing") as err:
        PCAProjection.load(missing)
    assert str(missing) in str(err.value)

    good = tmp_path / "good.npz"
    PCAProjection.fit(np.random.default_rng(5).normal(size=(30, 6)), 2).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array([{"a": 1}], dtype=object))
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.ones(3))
    bad_shape = tmp_path / "bad_shape.npz"
    with np.load(good) as arrays:
        fields = dict(arrays)
    np.savez(bad_shape, **{**fields, "components": fields["components"][:1]})
    bad_format = tmp_path / "bad_format.npz"
    np.savez(bad_format, **{**fields, "format": np.array(["a", "b"])})
    for path, message in [
        (bad_format, "not a saved PCAProjection"),
        (truncated, "not a readable .npz"),
        (pickled, "not a readable .npz"),
        (other, "not a saved PCAProjection"),
        (bad_shape, r"components: expected shape \(2, 6\)"),
    ]:
        with pytest.raises(ProjectionFileError, match=message) as err:
            PCAProjection.load(path)
        assert str(path) in str(err.value)


def test_centering_removes_the_common_direction_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    common = rng.normal(size=16) * 10
    x = (common + rng.normal(size=(200, 16))).astype(np.float32)
    raw_cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    p = PCAProjection.centering(x)
    y = p.transform(x)
    np.testing.assert_allclose(y, x - x.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(p.inverse_transform(y), x, atol=1e-4)
    assert p.out_dim == 16 and not p.is_identity and p.retained_variance == pytest.approx(1.0)
    cos = (y / np.linalg.norm(y, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T
    off_diagonal = ~np.eye(200, dtype=bool)
    assert raw_cos[off_diagonal].mean() > 0.9 and abs(cos[off_diagonal].mean()) < 0.05
    p.save(tmp_path / "c.npz")
    np.testing.assert_allclose(PCAProjection.load(tmp_path / "c.npz").transform(x), y, atol=1e-6)


def test_the_memory_writes_its_maps_in_the_projection_format(tmp_path):
    """One file format for PCA maps: a memory's value map is a file PCAProjection.load reads."""
    import hashlib

    from noblankslate.memory.builder import LinearKeyMap, _load_map, _save_map
    from noblankslate.memory.store import MemoryFileError

    rng = np.random.default_rng(0)
    pca = PCAProjection.fit(rng.normal(size=(40, 6)).astype(np.float32), 3)
    path = tmp_path / "m.value_map.npz"
    digest = _save_map(path, pca)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    again = PCAProjection.load(path)
    assert np.array_equal(again.components, pca.components) and np.array_equal(again.mean, pca.mean)
    assert isinstance(_load_map(path, digest), PCAProjection)

    head = LinearKeyMap(rng.normal(size=(2, 6)).astype(np.float32), np.ones(2, np.float32))
    head_path = tmp_path / "m.key_map.npz"
    loaded = _load_map(head_path, _save_map(head_path, head))
    assert np.array_equal(loaded.weight, head.weight) and np.array_equal(loaded.bias, head.bias)

    old = tmp_path / "old.npz"
    np.savez(old, kind=np.array("pca"), mean=pca.mean)  # the format before there was one
    with pytest.raises(MemoryFileError, match="rebuild the memory"):
        _load_map(old, hashlib.sha256(old.read_bytes()).hexdigest())
    with pytest.raises(MemoryFileError, match="checksum"):
        _load_map(path, "0" * 64)
