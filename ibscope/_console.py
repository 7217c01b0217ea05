"""The rich Consoles of the process: stderr for progress, messages and warnings; stdout (:func:`listing`)
only for the listing that is a command's result (``ibscope info``, ``estimators``, ``checkpoints``,
``layers``: pipe them to grep, less or a file),
no emoji codes, no automatic highlighting. Used by the CLI (its ``_common.console``) and by the few
library displays that still draw their own (capture's plan and progress).

Width: the terminal's; ``COLUMNS`` when set; otherwise (not a terminal: a CI log, a file) at least
:data:`OFF_TERMINAL_WIDTH`, since rich would use 80 and cut tables.
"""

from __future__ import annotations

from typing import Any

#: width of tables and wrapped text when the output is not a terminal and COLUMNS is not set
OFF_TERMINAL_WIDTH = 120

_console: Any = None


def _console_class() -> Any:
    from rich.console import Console, ConsoleDimensions

    class _Console(Console):
        """A Console whose width off a terminal is max(detected, OFF_TERMINAL_WIDTH) unless COLUMNS says."""

        @property
        def size(self) -> ConsoleDimensions:
            size = super().size
            if self._width is None and not self.is_terminal and not (self._environ.get("COLUMNS") or "").isdigit():
                return ConsoleDimensions(max(size.width, OFF_TERMINAL_WIDTH), size.height)
            return size

        @size.setter
        def size(self, new_size) -> None:
            Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    return _Console


def console() -> Any:
    """The shared ``rich.console.Console`` on stderr (created on first use)."""
    global _console
    if _console is None:
        _console = _console_class()(stderr=True, highlight=False, emoji=False)
    return _console


_listing: Any = None


def listing() -> Any:
    """The Console on stdout for a listing command's result (tables a user may pipe or redirect)."""
    global _listing
    if _listing is None:
        _listing = _console_class()(highlight=False, emoji=False)
    return _listing
