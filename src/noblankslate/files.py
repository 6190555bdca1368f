"""File helpers every layer may use (this module imports nothing of the project)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def give_plain_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would have (0666 minus the umask, usually 0644).

    Temporary files (``tempfile.mkstemp``, and the ones safetensors writes through) are private (0600):
    renamed into place they would hide a checkpoint or a memory from the other users of a shared folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, durable: bool = False) -> Iterator[IO]:
    """Write ``path`` all at once or not at all: the one crash-safe write every layer uses.

    Yields a file opened in ``mode`` ("w" for UTF-8 text, "wb" for bytes) on a hidden temporary sibling
    (``.{name}.{random}.tmp``: unique, so two writers never share one, and in the same folder, so the
    rename cannot cross file systems). When the block ends normally the file gets the mode a plain
    ``open()`` would give (see :func:`give_plain_mode`) and is renamed over ``path``; readers see the old
    file or the new one, never half of it. When the block raises (an error, a full disk, Ctrl-C) the
    temporary file is deleted and ``path`` is untouched. ``durable`` also fsyncs the file before the
    rename, for files a resumed run depends on (checkpoints' companions, the memory's arrays).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        give_plain_mode(temporary)  # mkstemp makes the file private (0600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, *, durable: bool = False) -> None:
    """``Path.write_text`` through :func:`atomic_write`."""
    with atomic_write(path, "w", durable=durable) as f:
        f.write(text)
