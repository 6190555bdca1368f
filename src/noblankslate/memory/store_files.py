"""The latent memory's files: their names, the atomic save's helpers, checksums and the meta file's checks.

:mod:`noblankslate.memory.store` holds the index operations (add, search, remove, values); this module
holds everything about how a memory lies on disk, so the file format can be read (or changed, with its
version) in one place. The format is described in the store's module docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from noblankslate.errors import NbsError

logger = logging.getLogger(__name__)

FORMAT_NAME = "noblankslate-latent-memory"
FORMAT_VERSION = 1
VALUES_SUFFIX = ".values.npy"
META_SUFFIX = ".meta.json"
PREV_SUFFIX = ".prev"
HASH_CHUNK = 1 << 20


class MemoryFileError(NbsError, RuntimeError):
    """A saved memory is missing, damaged, inconsistent or from another model; the message names the file."""

    label = "memory file error"


def sidecar_paths(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """The three files of a memory saved at ``path``: (index, values, meta)."""
    index_path = Path(path)
    return (
        index_path,
        index_path.with_name(index_path.name + VALUES_SUFFIX),
        index_path.with_name(index_path.name + META_SUFFIX),
    )


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")


def remove_leftovers(folder: Path, index_name: str) -> None:
    """Temporary files of an earlier save that was killed (an exception removes its own)."""
    for leftover in folder.glob(f".{index_name}*.tmp-*"):
        leftover.unlink(missing_ok=True)


def write_synced(path: Path, write: Callable[[Any], object]) -> None:
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """Make the renames durable; not every platform lets a folder be opened, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def committed_checksums(meta_path: Path) -> dict[str, str]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return {kind: meta["files"][kind]["sha256"] for kind in ("index", "values")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def keep_committed(index_path: Path, values_path: Path, meta_path: Path) -> list[Path]:
    """Make sure ``*.prev`` holds the committed version of each data file before it is replaced.

    The main file is the committed one unless an earlier save died between its renames; then the
    committed one is already in ``*.prev`` and must not be overwritten by the uncommitted main file.
    Returns the ``*.prev`` paths, to be removed once the new meta is committed.
    """
    committed = committed_checksums(meta_path)
    prevs = []
    for kind, main in (("index", index_path), ("values", values_path)):
        prev = main.with_name(main.name + PREV_SUFFIX)
        prevs.append(prev)
        want = committed.get(kind)
        if want is None:
            continue
        if main.is_file() and sha256_file(main) == want:
            prev.unlink(missing_ok=True)
            try:
                os.link(main, prev)
            except OSError:  # a file system without hard links
                prev.write_bytes(main.read_bytes())
        elif not (prev.is_file() and sha256_file(prev) == want):
            logger.warning("%s: the committed version is already lost; nothing to keep", main)
    return prevs


def committed_file(path: Path, sha256: str, meta_path: Path) -> Path:
    """The file (``path`` or its ``*.prev`` left by an interrupted save) whose checksum meta names."""
    prev = path.with_name(path.name + PREV_SUFFIX)
    if not path.is_file() and not prev.is_file():
        raise MemoryFileError(f"{path}: missing (it belongs to {meta_path.name})")
    if path.is_file() and sha256_file(path) == sha256:
        return path
    if prev.is_file() and sha256_file(prev) == sha256:
        logger.warning("%s: an interrupted save left it unmatched; loading the committed %s", path, prev.name)
        return prev
    if not path.is_file():
        raise MemoryFileError(f"{path}: missing (it belongs to {meta_path.name})")
    raise MemoryFileError(
        f"{path}: checksum differs from the one recorded in {meta_path.name}: the file is damaged, "
        "truncated or from another save"
    )


META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key_dim": int,
    "steps": int,
    "value_dim": int,
    "metric": str,
    "value_dtype": str,
    "fingerprint": str,
    "count": int,
    "next_id": int,
    "added": int,
    "removed": int,
    "skipped_duplicates": int,
    "files": dict,
    "info": dict,
    "ids": list,
    "metadata": list,
}


def read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.is_file():
        raise MemoryFileError(f"{meta_path}: missing; a memory is saved as the index plus this file and the values")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise MemoryFileError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{meta_path}: not a latent memory meta file (no format {FORMAT_NAME!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise MemoryFileError(f"{meta_path}: format version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
    for key, kind in META_FIELDS.items():
        if key not in meta:
            raise MemoryFileError(f"{meta_path}: field {key!r} is missing")
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MemoryFileError(f"{meta_path}: field {key!r} has the wrong type ({type(value).__name__})")
    for kind in ("index", "values"):
        entry = meta["files"].get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise MemoryFileError(f"{meta_path}: field 'files.{kind}.sha256' is missing")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in meta["ids"]):
        raise MemoryFileError(f"{meta_path}: field 'ids' must hold integers")
    return meta
