"""The one boundary between the library and whatever shows its progress.

Library functions that take a long time accept ``reporter: Reporter | None``. They tell it plain
text (:meth:`Reporter.info`, :meth:`Reporter.warning`) and open progress tasks
(:meth:`Reporter.task`); they never print and never import a console library. ``None`` means
:class:`NullReporter`: the Python API is silent (its warnings still go through :mod:`warnings`).
The command line passes its rich implementation (``RichReporter`` of the CLI package);
scripts and notebooks can pass :class:`LoggingReporter` (to :mod:`logging`) or
:class:`TextReporter` (plain text to a stream).

Tables (a checkpoint series, a layer plan) are :class:`Table` data, shown with
:func:`show_table`: a reporter with a ``table(t)`` method draws them its own way (rich, in the
CLI); any other gets the table as plain text through :meth:`Reporter.info`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import IO, ContextManager, Iterator, Protocol, runtime_checkable


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


@dataclass
class Table:
    """A table to show: ``title``, column names, rows of strings (one per column)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        """The table as plain text: the title, then aligned columns (two spaces apart)."""
        cells = [list(self.columns)] + [[str(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join(lines)


def show_table(reporter: Reporter | None, table: Table) -> None:
    """Show ``table`` through ``reporter``: its ``table`` method when it has one, else as plain
    text through :meth:`Reporter.info`; nothing for a silent reporter."""
    if is_silent(reporter):
        return
    assert reporter is not None
    draw = getattr(reporter, "table", None)
    if callable(draw):
        draw(table)
    else:
        reporter.info(table.text())


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


class _CountingTask:
    """A task that only counts (for reporters without bars): steps done, total, last note."""

    def __init__(self, total: int | None) -> None:
        self.done, self.total, self.note = 0, total, ""

    def advance(self, n: int = 1, *, note: str = "") -> None:
        self.done += n
        self.note = note or self.note

    def update(self, *, completed: int, total: int | None = None, note: str = "") -> None:
        self.done = completed
        self.total = total if total is not None else self.total
        self.note = note or self.note

    def summary(self, label: str, seconds: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{label}: {self.done}{of} done in {seconds:.1f} s" + (f" (last: {self.note})" if self.note else "")


class LoggingReporter:
    """Messages and tables to :mod:`logging` (``ibscope`` logger: info and warning levels); each
    progress task as two lines, its start (with its total) and its end (steps done, seconds)."""

    silent = False

    def __init__(self, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("ibscope")

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        self.log.warning(msg)

    def table(self, table: Table) -> None:
        self.log.info(table.text())

    @contextlib.contextmanager
    def task(self, label: str, total: int | None = None) -> Iterator[Task]:
        self.log.info(f"{label}: started" + (f" ({total} steps)" if total is not None else ""))
        t, t0 = _CountingTask(total), time.perf_counter()
        try:
            yield t
        finally:
            self.log.info(t.summary(label, time.perf_counter() - t0))


class TextReporter:
    """Messages and tables as plain text on ``stream`` (default: standard error); each progress
    task as one line when it ends. No colours, no bars: for scripts, logs and files."""

    silent = False

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream

    def _write(self, text: str) -> None:
        out = self.stream if self.stream is not None else sys.stderr
        out.write(text + "\n")
        out.flush()

    def info(self, msg: str) -> None:
        self._write(msg)

    def warning(self, msg: str) -> None:
        self._write(f"Warning: {msg}")

    def table(self, table: Table) -> None:
        self._write(table.text())

    @contextlib.contextmanager
    def task(self, label: str, total: int | None = None) -> Iterator[Task]:
        t, t0 = _CountingTask(total), time.perf_counter()
        try:
            yield t
        finally:
            self._write(t.summary(label, time.perf_counter() - t0))


def reporter_or_null(reporter: Reporter | None) -> Reporter:
    """``reporter``, or a :class:`NullReporter` for ``None``."""
    return reporter if reporter is not None else NullReporter()


def is_silent(reporter: Reporter | None) -> bool:
    """True for ``None`` and reporters that show nothing (their ``silent`` attribute)."""
    return reporter is None or bool(getattr(reporter, "silent", False))
