"""File helpers every layer may use (this module imports nothing of the project)."""

from __future__ import annotations

import os
from pathlib import Path


def give_plain_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would have (0666 minus the umask, usually 0644).

    Temporary files (``tempfile.mkstemp``, and the ones safetensors writes through) are private (0600):
    renamed into place they would hide a checkpoint or a memory from the other users of a shared folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
