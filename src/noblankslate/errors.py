"""The project's expected errors: one base class, caught once by the ``nbs`` command.

An expected error is one the user can fix (a bad config key, a damaged file, a folder in use). Each
carries the label its one-line message starts with and the exit status; ``nbs`` prints
``label: message`` on stderr and exits with that status, without a traceback. Anything else is a bug or
an environment failure and keeps its traceback, except file-system errors (permission, missing path,
full disk), which also become one line naming the file (``describe_os_error``).

This module imports nothing of the project, so every layer may raise these errors.
"""

from __future__ import annotations

import errno


class NbsError(Exception):
    """Base of the project's expected errors.

    Subclasses set ``label`` (the message's first word(s), e.g. "config error") and ``exit_code``
    (2: the input was wrong; 1: the run failed; 130: interrupted by the user).
    """

    label = "error"
    exit_code = 2


class InvalidValue(NbsError, ValueError):
    """An option, argument or setting outside what is allowed (the message names it and the range)."""

    label = "invalid value"


class InputError(NbsError, ValueError):
    """An input file or folder that cannot be used as given (missing, empty, not what it should be)."""

    label = "input error"


class GenerationError(NbsError, RuntimeError):
    """A data generator cannot produce what was asked (e.g. too few distinct questions exist)."""

    label = "data generation"


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error: what happened, and to which file."""
    where = error.filename if error.filename is not None else "(no file named)"
    if error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    if error.errno == errno.ENOSPC:
        return f"disk full while writing {where}: free space on that file system and run again (runs resume)"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {where}"
    if isinstance(error, PermissionError):
        return f"permission denied: {where} (check the owner and mode of the file or its folder)"
    if isinstance(error, FileNotFoundError):
        return f"no such file or folder: {where}"
    if error.errno == errno.EROFS:
        return f"read-only file system: {where}"
    reason = error.strerror or str(error)
    return f"{reason}: {where}"
