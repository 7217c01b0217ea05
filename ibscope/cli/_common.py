"""Shared CLI plumbing: error handling, stderr console, option parsing helpers.

Nothing here imports torch: ``ibscope --help`` must stay fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import warnings
from typing import Any, Callable

import typer

from ibscope._console import OFF_TERMINAL_WIDTH, console
from ibscope._options import parse_kv
from ibscope.errors import IbscopeError, UsageError

__all__ = ["console", "OFF_TERMINAL_WIDTH", "RichReporter", "rich_table", "reporter", "progress_callback", "guard", "error_exit",
           "parse_kv", "load_mapping", "setup_logging"]


class _RichTask:
    def __init__(self, bar, tid):
        self.bar, self.tid = bar, tid

    def advance(self, n: int = 1, *, note: str = "") -> None:
        self.bar.update(self.tid, advance=n, **({"description": note} if note else {}))

    def update(self, *, completed: int, total: int | None = None, note: str = "") -> None:
        self.bar.update(self.tid, completed=completed, **({"total": total} if total is not None else {}),
                        **({"description": note} if note else {}))


def rich_table(table):
    """An :class:`ibscope.reporting.Table` as a ``rich.table.Table`` (cells are text, never markup;
    long cells fold)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=table.title, title_justify="left")
    for col in table.columns:
        t.add_column(col, overflow="fold")
    for row in table.rows:
        t.add_row(*(Text(str(c)) for c in row))
    return t


class RichReporter:
    """The CLI's :class:`ibscope.reporting.Reporter`: messages and progress bars on the one stderr console."""

    silent = False

    def __init__(self, con=None):
        self.console = con or console()
        self._bar: Any = None  # the live display shared by the open tasks
        self._open = 0

    def info(self, msg: str) -> None:
        from rich.text import Text

        style = "bold cyan" if msg.startswith("> ") else "dim" if msg.startswith("- ") else ""
        self.console.print(Text(msg, style=style), soft_wrap=True)

    def warning(self, msg: str) -> None:
        from rich.text import Text

        self.console.print(Text(msg, style="yellow"), soft_wrap=True)

    def table(self, table) -> None:
        """An :class:`ibscope.reporting.Table` as a rich table."""
        self.console.print(rich_table(table))

    @contextlib.contextmanager
    def task(self, label: str, total: int | None = None):
        """A progress bar for ``label``, removed when the block ends. Tasks may nest (capture's
        checkpoints, batches and Jacobian passes): they share one live display, which runs
        while any task is open."""
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._bar is None:
            self._bar = Progress(TextColumn("{task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console,
                                 transient=True)
            self._bar.start()
        bar = self._bar
        tid = bar.add_task("", total=total, label=escape(label))
        self._open += 1
        try:
            yield _RichTask(bar, tid)
        finally:
            bar.remove_task(tid)
            self._open -= 1
            if self._open == 0:
                bar.stop()
                self._bar = None


@contextlib.contextmanager
def progress_callback(quiet: bool, what: str):
    """A library ``callback(done, total, name)`` feeding a progress bar of the CLI's reporter;
    ``None`` with --quiet."""
    if quiet:
        yield None
        return
    with RichReporter().task(what) as task:
        def cb(done: int, total: int, name) -> None:
            task.update(completed=done, total=total, note=str(getattr(name, "name", name)))

        yield cb


def reporter(quiet: bool = False):
    """The reporter of a command: rich on stderr, or ``None`` (silent) with --quiet."""
    return None if quiet else RichReporter()


def error_exit(exc: IbscopeError) -> typer.Exit:
    from rich.markup import escape

    c = console()
    # messages quote user input (paths, selectors like "lstm[0]"): never read them as markup
    c.print(f"[bold red]Error:[/] {escape(exc.message)}", markup=True, soft_wrap=True)
    if exc.hint:
        c.print(f"[yellow]Hint:[/] {escape(exc.hint)}", soft_wrap=True)
    return typer.Exit(code=exc.exit_code)


_shown: set[str] = set()

#: what Ctrl-C leaves behind, per command (the function name of the command)
_INTERRUPTED = {
    "capture": "Completed checkpoints are kept; re-run with --resume to capture the rest.",
    "estimate": "The cells computed so far were written; re-run the same command to compute the rest.",
    "run": "Completed stages are kept; re-run the same command to continue where it stopped.",
    "demo": "Completed stages are kept; re-run the same command to continue where it stopped.",
    "": "Nothing half-written was left; re-run the same command.",
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    if text in _shown:
        return
    _shown.add(text)
    console().print(f"Warning: {text}", markup=False, soft_wrap=True)


def guard(fn: Callable) -> Callable:
    """Turn library errors into a message + documented exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning  # "Warning: ..." once each, no file:line or source
                _shown.clear()
                return fn(*args, **kwargs)
        except IbscopeError as exc:
            raise error_exit(exc) from None
        except KeyboardInterrupt:
            console().print("[red]Interrupted.[/] " + _INTERRUPTED.get(fn.__name__.removesuffix("_cmd"), _INTERRUPTED[""]))
            raise typer.Exit(code=130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except OSError as exc:  # disk full, read-only, permissions: the OS error and path, not "a bug"
            from ibscope.errors import io_error

            raise error_exit(io_error(exc, action="reading or writing")) from None
        except MemoryError as exc:
            raise error_exit(IbscopeError(f"Out of memory: {exc}", hint="Lower --batch-size or --chunk.")) from None
        except Exception as exc:  # unexpected: keep a traceback available with IBSCOPE_DEBUG=1
            import os

            if os.environ.get("IBSCOPE_DEBUG"):
                raise
            raise error_exit(IbscopeError(
                f"Unexpected {type(exc).__name__}: {exc}",
                hint="This is probably a bug in ibscope. Re-run with IBSCOPE_DEBUG=1 for a traceback and report it.",
            )) from None

    return wrapper


def load_mapping(text_or_path: str | None, what: str) -> dict[str, Any]:
    """JSON or YAML mapping given inline or as a file path."""
    if not text_or_path:
        return {}
    from pathlib import Path

    src = text_or_path
    p = Path(text_or_path)
    if len(text_or_path) < 4096 and p.suffix.lower() in (".json", ".yaml", ".yml") and p.exists():
        src = p.read_text()
    try:
        val = json.loads(src)
    except json.JSONDecodeError:
        import yaml

        try:
            val = yaml.safe_load(src)
        except yaml.YAMLError as exc:
            raise UsageError(f"{what} must be a JSON or YAML mapping. Could not parse {text_or_path!r}: {exc}") from None
    if val is None:
        return {}
    if not isinstance(val, dict):
        raise UsageError(f"{what} must be a JSON or YAML mapping. Got {type(val).__name__}: {text_or_path!r}.")
    return val


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    for h in logging.getLogger().handlers:  # warnings read "Warning: ...", like Python warnings
        h.setFormatter(_LevelFormatter())


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"Error: {msg}"
        return f"Warning: {msg}" if record.levelno >= logging.WARNING else msg
