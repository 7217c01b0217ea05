"""The one rich Console of the process: stderr (progress, tables and warnings never go to stdout),
no emoji codes, no automatic highlighting. Used by the CLI (its ``_common.console``) and by
the few library displays that still draw their own (capture's plan and progress)."""

from __future__ import annotations

from typing import Any

_console: Any = None


def console() -> Any:
    """The shared ``rich.console.Console`` on stderr (created on first use)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False, emoji=False)
    return _console
