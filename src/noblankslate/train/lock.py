"""One run per folder: a lock file held for the run's life.

Two ``nbs train`` on the same ``save_path/name`` would overwrite each other's checkpoints, config and
predictions and interleave ``metrics.jsonl``. The first run creates ``.lock`` (atomically, with its pid,
host and start time); a second one is refused with the holder named. A lock left by a process that died
(same host, pid no longer running) is stale: it is replaced, with a message. A lock from another host
cannot be checked from here and is refused; delete it by hand if that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from noblankslate.errors import NbsError

LOCK_FILE = ".lock"


class RunLocked(NbsError, RuntimeError):
    """Another live run holds the run folder."""

    label = "run folder in use"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` or ``acquire()`` / ``release()``."""

    def __init__(self, run_dir: str | Path, echo=print):
        self.path = Path(run_dir) / LOCK_FILE
        self.echo = echo
        self.held = False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one.

        Raises:
            RunLocked: a live process (here or on another host) holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # unreadable or half written: retry once it settles
                    time.sleep(0.1)
                    holder = self._holder()
                if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    self.held = True  # this process already holds it (a second Trainer in one program)
                    return
                if holder is not None and holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    self.echo(f"{self.path}: replacing a stale lock of pid {holder.get('pid')} (not running), "
                              f"taken {holder.get('started')}")
                    self.path.unlink(missing_ok=True)
                    continue
                who = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
                       if holder else "an unknown process (the lock file is unreadable)")
                raise RunLocked(f"{self.path.parent} is in use by {who}; wait for it, use another name, or delete "
                                f"{self.path} if that run is gone") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunLocked(f"{self.path}: could not take the lock")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
