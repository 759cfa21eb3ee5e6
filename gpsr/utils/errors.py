"""The errors gpsr raises for a user's settings, inputs and files.

The entry points print any `GPSRError` as one line (exit status 1) and let every other
exception through with its traceback: a bug, or a failure inside torch or PIL, is never
shortened. Each class is also the matching built-in type, so `except ValueError` and the
like keep working.
"""

from __future__ import annotations

import errno

__all__ = [
    "GPSRError",
    "ConfigError",
    "InputNotFoundError",
    "OutputError",
    "TooLargeError",
    "NonFiniteOutputError",
    "os_error_in_chain",
    "NO_SPACE",
    "NOT_WRITABLE",
]

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def os_error_in_chain(err: BaseException, codes: tuple[int, ...]) -> OSError | None:
    """The first OSError whose errno is one of `codes` in `err`'s chain of causes and
    contexts (torch and PIL may report a full disk as another error raised while handling
    the OSError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in codes:
            return err
        err = err.__cause__ or err.__context__
    return None


class GPSRError(Exception):
    """A problem with what the user gave gpsr; the message names the setting or the file."""


class ConfigError(GPSRError, ValueError):
    """A setting that gpsr cannot use."""


class InputNotFoundError(GPSRError, FileNotFoundError):
    """A file or folder named in the settings does not exist."""


class OutputError(GPSRError, PermissionError):
    """An output place that cannot be written (not writable, disk full, a file in the way)."""


class TooLargeError(GPSRError, MemoryError):
    """An input that would need more memory than the machine has, with the setting that helps."""


class NonFiniteOutputError(GPSRError, FloatingPointError):
    """A model produced NaN or infinite values: nothing is returned or written as an image."""
