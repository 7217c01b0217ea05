"""Jinja2 templates shipped in ``ibscope/templates/`` (package data): the HTML report and the OOD reports.

HTML templates (``*.html*``) are autoescaped, so values are escaped by default and markup is
written in the template; Markdown and CSS templates are not. Undefined names are errors.
"""

from __future__ import annotations

import functools
from typing import Any


def _autoescape(name: str | None) -> bool:
    return name is not None and ".html" in name


@functools.lru_cache(maxsize=1)
def environment():
    """The shared jinja2 Environment (templates loaded from the installed package)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("ibscope", "templates"), autoescape=_autoescape,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` (a path under ``ibscope/templates/``) with ``context``."""
    return environment().get_template(name).render(**context)
