"""Whole-or-nothing file writes: a temporary file next to the target, renamed over it on success.

A failed write (disk full, read-only file system, no permission, an exception while producing
the content) deletes its temporary file, so nothing half-written is left behind (not even an
empty ``*.tmp``), and an :class:`OSError` becomes an :class:`~ibscope.errors.IOFailure` that
names the target and the OS error. HDF5 files use :class:`ibscope._h5io.AtomicH5` instead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ibscope.errors import IbscopeError, io_error


@contextmanager
def atomic_path(target: str | os.PathLike, tmp: str | os.PathLike | None = None,
                action: str = "writing") -> Iterator[Path]:
    """Yield a temporary path (default ``TARGET.tmp``) to write; on a clean exit it replaces
    ``target``; on any exception it is deleted. OSError is re-raised as IOFailure naming ``target``
    (and ``action``, e.g. "writing the report")."""
    target = Path(target)
    tmp = Path(tmp) if tmp is not None else target.with_name(target.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, IbscopeError):
            raise io_error(exc, target, action) from None
        raise


def write_text_atomic(target: str | os.PathLike, text: str, encoding: str = "utf-8",
                      tmp: str | os.PathLike | None = None, action: str = "writing") -> Path:
    """Write ``text`` to ``target`` whole or not at all (see :func:`atomic_path`)."""
    target = Path(target)
    with atomic_path(target, tmp, action) as t:
        with open(t, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
    return target
