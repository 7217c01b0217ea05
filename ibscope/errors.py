"""Exception hierarchy of ibscope.

Every user-facing error says what was expected, what was got and (where it helps) what to
do next. The CLI turns these into a short message on stderr and a documented exit code,
without a traceback:

======  =====================================================================
 code    meaning
======  =====================================================================
 0       success
 1       error (I/O, runtime failure, unexpected problem)
 2       usage error (bad option, unknown estimator/parameter/layer, bad spec)
 3       regression found by ``ibscope check``
 4       bad data or schema (NaN/inf, foreign or corrupt HDF5, wrong shapes)
 5       plug-in failure (a third-party estimator broke)
======  =====================================================================
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REGRESSION = 3
EXIT_DATA = 4
EXIT_PLUGIN = 5


class IbscopeError(Exception):
    """Base class: a message for the user, an optional hint, and an exit code."""

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # the hint travels with the message in Python too
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class UsageError(IbscopeError, ValueError):
    """A parameter, option or name the user gave is invalid (exit code 2)."""

    exit_code = EXIT_USAGE


class DataError(IbscopeError, ValueError):
    """Input data or a file has the wrong content, shape or schema (exit code 4)."""

    exit_code = EXIT_DATA


class ShardError(DataError):
    """A shard of an activation store turned out damaged while its data was read (exit code 4).

    Not a property of the estimate: ``ibscope estimate`` stops on it (naming the shard) instead
    of writing a noted row, as it does for shards found bad when the store is opened."""


class RegressionFound(IbscopeError):
    """``ibscope check`` found a curve outside its tolerance (exit code 3)."""

    exit_code = EXIT_REGRESSION


class PluginError(IbscopeError):
    """A third-party estimator failed to load or misbehaved (exit code 5)."""

    exit_code = EXIT_PLUGIN


class CheckpointError(IbscopeError):
    """A checkpoint could not be loaded safely or strictly (exit code 4)."""

    exit_code = EXIT_DATA


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'x'?"`` (or an empty string) for an unknown ``name``."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        return ""
    if len(close) == 1:
        return f" Did you mean '{close[0]}'?"
    return " Did you mean one of: " + ", ".join(f"'{c}'" for c in close) + "?"


def _plural(kind: str) -> str:
    return kind[:-1] + "ies" if kind.endswith("y") and kind[-2:-1] not in tuple("aeiou") else kind + "s"


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UsageError:
    """Build the standard "unknown X" error with a did-you-mean and the valid names."""
    choices = sorted(set(choices))
    shown = ", ".join(choices[:20]) + (" ..." if len(choices) > 20 else "")
    return UsageError(
        f"Unknown {kind} '{name}'.{did_you_mean(name, choices)}",
        hint=f"Valid {_plural(kind)}: {shown}" if choices else None,
    )


class IOFailure(IbscopeError):
    """The operating system refused a read or write: disk full, read-only, no permission (exit code 1)."""

    exit_code = EXIT_ERROR


_IO_HINTS = {
    "ENOSPC": "Free some space (or choose another output location), then re-run the same command; completed work "
              "is kept.",
    "EDQUOT": "Free some space within your quota (or choose another --out), then re-run.",
    "EROFS": "The file system is read-only: choose a writable output location.",
    "EACCES": "You have no permission there: choose another output location or fix its permissions.",
    "EPERM": "The operation is not permitted there: choose another output location or fix its permissions.",
}


def io_error(exc: OSError, path: str | os.PathLike[str] | None = None, action: str = "writing") -> IOFailure:
    """Turn an :class:`OSError` into an :class:`IOFailure` naming the path and the OS error.

    ``"No space left on device (ENOSPC) while writing '/data/acts/checkpoints/...h5'."``
    h5py reports errno inside its message; that is recognised too.
    """
    import errno as _errno
    import re

    code = exc.errno
    text = str(exc)
    if code is None:
        m = re.search(r"errno = (\d+)", text)
        code = int(m.group(1)) if m else None
    name = _errno.errorcode.get(code, "") if code is not None else ""
    reason = os.strerror(code) if code is not None else (exc.strerror or text or type(exc).__name__)
    where = path or exc.filename
    msg = f"{reason}{f' ({name})' if name else ''} while {action}" + (f" '{where}'" if where else "") + "."
    if code is None and text and text not in msg:
        msg += f" ({text})"
    hint = _IO_HINTS.get(name)
    wp = os.path.basename(os.path.dirname(str(where))) if where else ""
    if name == "ENOSPC" and where and (wp == "checkpoints" or os.path.basename(str(where)).startswith("manifest.h5")):
        hint = ("Free some space (or choose another output location), then add --resume to the same `ibscope "
                "capture` command: it continues from the last complete checkpoint (without it, the existing store "
                "is refused).")
    return IOFailure(msg, hint=hint)


class ClusterError(IbscopeError):
    """The work could not be run where it was sent: a Dask scheduler that cannot be reached or
    has no worker, a worker that cannot see a store or model file (exit code 1)."""

    exit_code = EXIT_ERROR
