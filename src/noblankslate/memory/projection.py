"""Linear projections owned by the memory, fitted when it is built: numpy only, saved without pickle.

Why PCA, for both uses:

- values (``retrieval.value_dim`` < d): among all rank-r linear maps, projecting onto the top r principal
  components gives the smallest mean squared reconstruction error (Eckart-Young), and the inverse is
  just the transpose plus the mean, so a compressed thought is reconstructed before use with the least
  distortion a linear code allows, and the explained variance says up front how much is lost.
- keys (``retrieval.key_dim`` < d): the anchor's few high-variance directions carry what separates
  questions, while the many low-variance ones add noise to every similarity; PCA keeps the former and
  makes the key cheaper to store and search. A learned projection (the contrastive training side) can
  replace it; this one needs no training.

The fit is an eigendecomposition of the float64 covariance (d x d, accumulated in blocks), which is
deterministic, cheap when N >> d as here (thousands of examples x T thoughts), and needs no float64
copy of the data. Component signs are fixed (largest coordinate positive) so that refitting the same
data gives the same projection.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from noblankslate.errors import NbsError
from noblankslate.files import atomic_write

FORMAT_NAME = "noblankslate-pca"
FORMAT_VERSION = 1
_FIT_BLOCK = 8192
_ORTHONORMAL_TOL = 1e-3


class ProjectionFileError(NbsError, RuntimeError):
    """A saved projection is missing, unreadable or inconsistent; the message names the file."""

    label = "memory file error"


class PCAProjection:
    """x -> (x - mean) @ components.T, and back; the identity when nothing is reduced.

    Attributes:
        in_dim: size of the input vectors (d).
        out_dim: size of the projected vectors.
        mean: (in_dim,) float32, None for the identity.
        components: (out_dim, in_dim) float32 with orthonormal rows, most variance first; None for the
            identity.
        explained_variance_ratio: (out_dim,) float64, each component's share of the total variance of
            the fitted data; None for the identity, which fits nothing and loses nothing.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        mean: np.ndarray | None = None,
        components: np.ndarray | None = None,
        explained_variance_ratio: np.ndarray | None = None,
    ) -> None:
        for name, dim in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
                raise ValueError(f"{name}: expected a positive int, got {dim!r}")
        if out_dim > in_dim:
            raise ValueError(f"out_dim {out_dim} is larger than in_dim {in_dim}")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        given = [a is not None for a in (mean, components, explained_variance_ratio)]
        if any(given) and not all(given):
            raise ValueError("mean, components and explained_variance_ratio go together: give all or none")
        if not any(given):
            if out_dim != in_dim:
                raise ValueError(f"a projection from {in_dim} to {out_dim} needs mean and components")
            self.mean = self.components = self.explained_variance_ratio = None
            return
        self.mean = np.asarray(mean, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)
        self.explained_variance_ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
        if self.mean.shape != (self.in_dim,):
            raise ValueError(f"mean: expected shape ({self.in_dim},), got {self.mean.shape}")
        if self.components.shape != (self.out_dim, self.in_dim):
            raise ValueError(f"components: expected shape ({self.out_dim}, {self.in_dim}), got {self.components.shape}")
        if self.explained_variance_ratio.shape != (self.out_dim,):
            raise ValueError(
                f"explained_variance_ratio: expected shape ({self.out_dim},), got {self.explained_variance_ratio.shape}"
            )
        for name in ("mean", "components", "explained_variance_ratio"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name}: contains NaN or infinite numbers")
        gram = self.components.astype(np.float64) @ self.components.T.astype(np.float64)
        if np.abs(gram - np.eye(self.out_dim)).max() > _ORTHONORMAL_TOL:
            raise ValueError("components: rows are not orthonormal")

    @classmethod
    def identity(cls, dim: int) -> PCAProjection:
        """The projection that changes nothing (``retrieval.key_dim`` / ``value_dim`` null)."""
        return cls(dim, dim)

    @classmethod
    def centering(cls, x: ArrayLike) -> PCAProjection:
        """x -> x - mean(x): no dimension is dropped, the axes are kept (components = identity).

        Retrieval keys need it: raw anchors of one model all point the same way (cosine ~0.98 between
        any two), so cosine similarity cannot tell problems apart until the common mean is removed.
        """
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or len(arr) == 0 or not np.isfinite(arr).all():
            raise ValueError(f"x: expected a non-empty finite (N, d) array, got shape {arr.shape}")
        d = arr.shape[1]
        variance = arr.var(axis=0)
        share = variance / variance.sum() if variance.sum() > 0 else np.full(d, 1.0 / d)
        return cls(d, d, mean=arr.mean(axis=0).astype(np.float32), components=np.eye(d, dtype=np.float32),
                   explained_variance_ratio=share)

    @classmethod
    def fit(cls, x: ArrayLike, out_dim: int | None = None) -> PCAProjection:
        """Fit the top ``out_dim`` principal components of x.

        Args:
            x: (N, d) finite floating-point samples (e.g. anchors, or thoughts flattened over steps).
            out_dim: components to keep; None or d gives the identity without looking at the data
                beyond its shape.

        Raises:
            ValueError: out_dim > d, or fewer samples N than out_dim (at most N directions can be
                found from N samples).
        """
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"x: expected a floating-point array, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"x: expected shape (N, d), got {arr.shape}")
        n, d = arr.shape
        out_dim = d if out_dim is None else out_dim
        if isinstance(out_dim, bool) or not isinstance(out_dim, (int, np.integer)) or out_dim < 1:
            raise ValueError(f"out_dim: expected a positive int or None, got {out_dim!r}")
        if out_dim > d:
            raise ValueError(f"out_dim {out_dim} is larger than the data's dimension {d}")
        if out_dim == d:
            return cls.identity(d)
        if n < out_dim:
            raise ValueError(
                f"cannot fit {out_dim} principal components from {n} samples: N samples span at most N "
                f"directions; use out_dim <= {n} or fit on more samples"
            )
        if not np.isfinite(arr).all():
            raise ValueError("x: contains NaN or infinite numbers")

        mean = arr.mean(axis=0, dtype=np.float64)  # (d,)
        cov = np.zeros((d, d), dtype=np.float64)
        for start in range(0, n, _FIT_BLOCK):
            block = arr[start : start + _FIT_BLOCK].astype(np.float64) - mean  # (b, d)
            cov += block.T @ block
        cov /= max(n - 1, 1)
        eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
        eigvals = np.clip(eigvals[::-1], 0.0, None)  # most variance first
        components = np.ascontiguousarray(eigvecs[:, ::-1][:, :out_dim].T)  # (out_dim, d)
        pivot = np.argmax(np.abs(components), axis=1)
        components *= np.sign(components[np.arange(out_dim), pivot])[:, None]
        total = float(np.trace(cov))
        ratio = eigvals[:out_dim] / total if total > 0 else np.zeros(out_dim)
        return cls(d, out_dim, mean, components, ratio)

    @property
    def is_identity(self) -> bool:
        return self.components is None

    @property
    def retained_variance(self) -> float:
        """Share of the fitted data's variance that survives the projection (1.0 for the identity)."""
        return 1.0 if self.explained_variance_ratio is None else float(self.explained_variance_ratio.sum())

    def transform(self, x: ArrayLike) -> np.ndarray:
        """Project (..., in_dim) -> (..., out_dim) float32 (a copy of x for the identity)."""
        arr = _check_last_dim(x, self.in_dim, "x")
        if self.components is None:
            return np.array(arr, dtype=np.float32)
        return (arr.astype(np.float32) - self.mean) @ self.components.T

    def inverse_transform(self, y: ArrayLike) -> np.ndarray:
        """Reconstruct (..., out_dim) -> (..., in_dim) float32: the closest point of the fitted subspace."""
        arr = _check_last_dim(y, self.out_dim, "y")
        if self.components is None:
            return np.array(arr, dtype=np.float32)
        return arr.astype(np.float32) @ self.components + self.mean

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an .npz at exactly ``path`` (no suffix added), atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = self.components is None
        arrays = {
            "format": np.array(FORMAT_NAME),
            "version": np.array(FORMAT_VERSION),
            "in_dim": np.array(self.in_dim),
            "out_dim": np.array(self.out_dim),
            "identity": np.array(identity),
            "mean": np.zeros(0, np.float32) if identity else self.mean,
            "components": np.zeros((0, 0), np.float32) if identity else self.components,
            "explained_variance_ratio": np.zeros(0) if identity else self.explained_variance_ratio,
        }
        with atomic_write(path, "wb", durable=True) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PCAProjection:
        """Read a projection written by :meth:`save`; ProjectionFileError names the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise ProjectionFileError(f"{path}: missing")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as err:
            raise ProjectionFileError(f"{path}: not a readable .npz file ({err})") from None
        try:
            if "format" not in arrays or arrays["format"].shape != () or arrays["format"].item() != FORMAT_NAME:
                raise ProjectionFileError(f"{path}: not a saved PCAProjection (no format {FORMAT_NAME!r})")
            names = ("version", "in_dim", "out_dim", "identity", "mean", "components", "explained_variance_ratio")
            missing = [k for k in names if k not in arrays]
            if missing:
                raise ProjectionFileError(f"{path}: missing arrays {missing}")
            version = arrays["version"].item()
            if version != FORMAT_VERSION:
                raise ProjectionFileError(f"{path}: format version {version}, this code reads {FORMAT_VERSION}")
            in_dim, out_dim = int(arrays["in_dim"].item()), int(arrays["out_dim"].item())
            if bool(arrays["identity"].item()):
                return cls(in_dim, out_dim)
            return cls(in_dim, out_dim, arrays["mean"], arrays["components"], arrays["explained_variance_ratio"])
        except (ValueError, TypeError) as err:  # a field of the wrong shape or kind
            raise ProjectionFileError(f"{path}: {err}") from None

def _check_last_dim(x: ArrayLike, dim: int, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape (..., {dim}), got {arr.shape}")
    return arr
