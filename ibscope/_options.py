"""Parsing of repeatable ``KEY=VALUE`` options, shared by the CLI and the library (``--param``,
``--set``, ``--reduce``, ...)."""

from __future__ import annotations

from typing import Iterable

from ibscope.errors import UsageError


def parse_kv(items: Iterable[str] | None, option: str = "--param", *, form: str = "KEY=VALUE",
             example: str | None = None, strip: bool = True, nonempty: bool = False,
             unique: str | None = None) -> dict[str, str]:
    """``["a=1", "b.c=x"]`` -> ``{"a": "1", "b.c": "x"}`` (split at the first ``=``; a later key wins).

    A string without ``=`` is a UsageError naming ``option``, the expected ``form`` and the bad
    string; so is an empty key or value with ``nonempty``, and a repeated key with ``unique`` (the
    name of what the key is, for the message).
    """
    out: dict[str, str] = {}
    for it in items or []:
        if "=" not in it:
            raise UsageError(f"{option} expects {form}. Got {it!r}.",
                             hint=f"Example: {option} {example}" if example else None)
        k, v = it.split("=", 1)
        if strip:
            k, v = k.strip(), v.strip()
        if nonempty and not (k.strip() and v.strip()):
            raise UsageError(f"{option} expects {form} with both parts non-empty. Got {it!r}.")
        if unique and k in out:
            raise UsageError(f"{unique} {k!r} is given twice.")
        out[k] = v
    return out
