"""How every ibscope command presents itself: help text that rich can wrap, type labels that
read well, and choice errors in ibscope's voice. Applied centrally (``cls=`` of the root group and of
every registered command, see :func:`polish_app`), so no command module has to do anything.

* Docstrings and help strings are re-flowed: the single line breaks of a hard-wrapped paragraph
  are joined, so rich wraps the paragraph at the terminal's width instead of keeping the source's
  breaks (ragged lines). Paragraphs (blank-line separated), ``\\b`` blocks and indented lines
  (examples) are kept as written.
* Flags show no type (not ``--force <bool>``); repeatable options show their element type
  (``--layer <str>``, not ``<list[str]>``); arguments read ``STORE...`` / ``[CONFIG]`` in the usage
  line (not ``{STORE...}...``). Closed sets (``Literal``) show ``<choice>`` and list their values at
  the end of the help text: ``[one of: nats, bits]``.
* A value outside a closed set is a usage error (exit 2) that lists the choices and suggests the
  nearest one: ``--unit must be one of nats, bits. Got 'bit'. Did you mean 'bits'?``.

Nothing here imports torch.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click.exceptions import BadParameter, UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import BadParameter, UsageError  # type: ignore[assignment]  # the same classes, unvendored

_TYPE_WORDS = {"Path": "path", "str": "str", "int": "int", "float": "float"}


def reflow(text: str | None) -> str | None:
    """Join the hard line breaks inside each paragraph of ``text`` (see the module docstring)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    out = []
    for p in paragraphs:
        lines = p.split("\n")
        keep = (p.startswith("\b") or len(lines) == 1 or any(ln[:1].isspace() for ln in lines)
                or all(re.match(r"\s*([-*•]|\d+[.)])\s", ln) for ln in lines))
        out.append(p if keep else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _element_label(label: str) -> str:
    m = re.fullmatch(r"<list\[(.+)\]>", label)
    if not m:
        return label
    inner = m.group(1)
    return f"<{_TYPE_WORDS.get(inner, inner)}>"


def _choices(param: Any) -> list[str] | None:
    desc = getattr(param, "type_descriptor", None)
    if desc is None or not desc.is_choice or not desc.choices:
        return None
    return [str(getattr(c, "value", c)) for c in desc.choices]


class _Option(TyperOption):
    def display_type_rich(self, ctx: Any) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if self.is_flag or self.count:
            return None  # a flag takes no value: no "<bool>"
        if _choices(self) is not None:
            return "<choice>"  # the choices are listed in the help text (a long list would squeeze every help)
        return _element_label(self.display_type(ctx))

    def process_value(self, ctx: Any, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)
        except BadParameter:
            choices = _choices(self)
            if choices is None:
                raise
            from ibscope.errors import did_you_mean

            values = value if isinstance(value, (list, tuple)) else [value]
            bad = next((str(v) for v in values if str(v) not in choices), str(value))
            name = max(self.opts, key=len)
            raise UsageError(f"{name} must be one of {', '.join(choices)}. Got {bad!r}.{did_you_mean(bad, choices)}",
                             ctx=ctx) from None


class _Argument(TyperArgument):
    def display_type_rich(self, ctx: Any) -> str | None:
        return _element_label(self.display_type(ctx))

    def _bare_name(self) -> str:
        return (self.metavar or (self.name or "").upper()).removesuffix("...")

    def _rich_display_name(self) -> str:
        return self._bare_name() + ("..." if self.nargs != 1 else "")

    @property
    def display_name_raw(self) -> str:  # the Arguments panel: STORE... (typer adds nothing when a metavar is set)
        return self._rich_display_name()

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"


def _polish_params(params: list) -> list:
    for p in params:
        if type(p) is TyperOption:
            p.__class__ = _Option  # same state, different presentation (subclass adds no fields)
        elif type(p) is TyperArgument:
            p.__class__ = _Argument
        p.help = reflow(p.help)
        choices = _choices(p)
        if choices is not None and "\\[one of:" not in (p.help or ""):
            p.help = f"{p.help or ''} \\[one of: {', '.join(choices)}]".strip()
    return params


class IbscopeCommand(TyperCommand):
    """A typer command with re-flowed help and the presentation rules above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)
        self.epilog = reflow(self.epilog)

    def get_params(self, ctx: Any) -> list:
        return _polish_params(super().get_params(ctx))


class IbscopeGroup(TyperGroup):
    """The root ``ibscope`` group: the same rules for its own options (``--version``, ``--help``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def get_params(self, ctx: Any) -> list:
        return _polish_params(super().get_params(ctx))


def polish_app(app: Any) -> None:
    """Give every command registered on ``app`` (a ``typer.Typer``) the :class:`IbscopeCommand` class."""
    for info in app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:  # typer's default; a command's own class is kept
            info.cls = IbscopeCommand
