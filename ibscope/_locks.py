"""One writer at a time: advisory locks on results files, activation stores and run folders.

Every command that *writes* a results file, a store or a run folder holds that target's lock
for as long as it writes. A second writer waits up to ``timeout`` seconds and then stops with a
:class:`LockTimeout` that names the lock file and the process holding it; it never interleaves
with the first and never loses its rows. Readers take no lock and are never blocked (every
file ibscope writes is renamed into place whole, so a reader sees the old or the new version).

The lock file sits next to its target, hidden (``results.csv`` -> ``.results.csv.lock``, store
``acts/`` -> ``.acts.lock``: a user's glob such as ``acts*`` does not pick it up), so it survives ``--overwrite`` replacing the target. Next to it, while the
lock is held, ``<lock>.holder.json`` records who holds it (pid, host, command, since). The
locks are ``fcntl``/``flock`` locks (the ``filelock`` package): the operating system releases
them when the holder dies, even on ``kill -9``, so a crashed run never leaves a stale lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ibscope.errors import IbscopeError, UsageError

#: seconds a second writer waits for a lock before it stops (``--lock-timeout``)
DEFAULT_LOCK_TIMEOUT = 10.0

_held: dict[str, list] = {}  # lock path -> [FileLock, depth]: re-entrant within one process
_guard = threading.Lock()


class LockTimeout(IbscopeError):
    """Another ibscope process holds the lock of the file or folder to be written (exit code 1)."""


def lock_path_for(target: str | os.PathLike) -> Path:
    """The lock file of ``target`` (a file or a folder): a hidden sibling named ``.<name>.lock``."""
    t = Path(os.path.abspath(target))
    return t.with_name("." + t.name + ".lock")


def check_timeout(timeout: float | None) -> float:
    """Validate a ``--lock-timeout`` value: seconds >= 0, or a negative number / None to wait forever."""
    if timeout is None:
        return -1.0
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise UsageError(f"--lock-timeout must be a number of seconds. Got {timeout!r}.") from None
    if t != t:
        raise UsageError("--lock-timeout must be a number of seconds. Got NaN.")
    return -1.0 if t < 0 or t == float("inf") else t


def _holder_text(lock: Path) -> str:
    try:
        info = json.loads((lock.with_name(lock.name + ".holder.json")).read_text())
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict):
        return "another process"
    cmd = info.get("command") or ""
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    return (f"process {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"
            + (f" ({cmd})" if cmd else ""))


@contextmanager
def writer_lock(target: str | os.PathLike, *, what: str, timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold the writer lock of ``target`` for the ``with`` block.

    ``what`` names the target for messages ("results file", "activation store", "run folder").
    ``timeout``: seconds to wait for another writer (0: do not wait; negative or None: wait for
    ever). Raises :class:`LockTimeout` naming the lock file and its holder when the wait runs out.
    Re-entrant within one process (a pipeline holding its run folder may capture into it).
    """
    from filelock import FileLock, Timeout

    t = check_timeout(timeout)
    lock = lock_path_for(target)
    key = str(lock)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield lock
        finally:
            with _guard:
                entry[1] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fl = FileLock(str(lock), timeout=t)
    try:
        fl.acquire(timeout=t, poll_interval=0.05)
    except Timeout:
        raise LockTimeout(
            f"The {what} '{target}' is being written by {_holder_text(lock)}; gave up after waiting "
            f"{t:g} s for its lock '{lock}'.",
            hint="Wait for that run to finish, or pass --lock-timeout SECONDS to wait longer (-1: no limit). "
                 "The lock is released automatically when its holder exits, even if it was killed.",
        ) from None
    holder = lock.with_name(lock.name + ".holder.json")
    try:
        try:
            holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        except OSError:
            pass  # holder info is a courtesy for messages; a full disk must not stop the lock
        with _guard:
            _held[key] = [fl, 1]
        yield lock
    finally:
        with _guard:
            _held.pop(key, None)
        try:
            holder.unlink(missing_ok=True)
        except OSError:
            pass
        fl.release()
