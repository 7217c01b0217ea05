"""The one boundary between the library and whatever shows its progress.

Library functions that take a long time accept ``reporter: Reporter | None``. They tell it plain
text (:meth:`Reporter.info`, :meth:`Reporter.warning`) and open progress tasks
(:meth:`Reporter.task`); they never print and never import a console library. ``None`` means
:class:`NullReporter`: the Python API is silent (its warnings still go through :mod:`warnings`).
The command line passes its rich implementation (``RichReporter`` of the CLI package);
scripts and notebooks can pass :class:`LoggingReporter`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager, Iterator, Protocol, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """One progress bar: ``total`` steps (``None``: unknown)."""

    def advance(self, n: int = 1, *, note: str = "") -> None: ...

    def update(self, *, completed: int, total: int | None = None, note: str = "") -> None: ...


@runtime_checkable
class Reporter(Protocol):
    """Where a library call reports to: messages and progress tasks."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...

    def task(self, label: str, total: int | None = None) -> ContextManager[Task]: ...


class _NullTask:
    def advance(self, n: int = 1, *, note: str = "") -> None:
        pass

    def update(self, *, completed: int, total: int | None = None, note: str = "") -> None:
        pass


class NullReporter:
    """Reports nothing (the default of every library function)."""

    silent = True

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    @contextlib.contextmanager
    def task(self, label: str, total: int | None = None) -> Iterator[Task]:
        yield _NullTask()


class LoggingReporter:
    """Messages to :mod:`logging` (``ibscope`` logger: info and warning levels); no progress bars."""

    silent = False

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("ibscope")

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        self.log.warning(msg)

    @contextlib.contextmanager
    def task(self, label: str, total: int | None = None) -> Iterator[Task]:
        self.log.info(label)
        yield _NullTask()


def reporter_or_null(reporter: Reporter | None) -> Reporter:
    """``reporter``, or a :class:`NullReporter` for ``None``."""
    return reporter if reporter is not None else NullReporter()


def is_silent(reporter: Reporter | None) -> bool:
    """True for ``None`` and reporters that show nothing (their ``silent`` attribute)."""
    return reporter is None or bool(getattr(reporter, "silent", False))
