"""The order of a checkpoint series, shared by ``capture`` (before it runs) and the store
(when it lists its shards), so that both always agree.

Rule: by step when every checkpoint has one, else by epoch when every checkpoint has one,
else numbered checkpoints first (epoch, then step), then the rest by name. Names compare in
natural order (``ck2`` before ``ck10``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """``"ck10.pt"`` after ``"ck2.pt"``: digit runs compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(str(text)) if p != "")


def series_mode(items: Iterable[T], epoch: Callable[[T], float | None], step: Callable[[T], int | None]) -> str:
    """"step", "epoch" or "mixed": what orders ``items`` (see the module docstring)."""
    items = list(items)
    if items and all(step(i) is not None for i in items):
        return "step"
    if items and all(epoch(i) is not None for i in items):
        return "epoch"
    return "mixed"


def sort_series(items: Iterable[T], epoch: Callable[[T], float | None], step: Callable[[T], int | None],
                name: Callable[[T], str], mode: str | None = None) -> list[T]:
    """``items`` in run order. ``mode``: "step", "epoch", "name" or None (decided by :func:`series_mode`)."""
    items = list(items)
    mode = mode or series_mode(items, epoch, step)

    def num(v):
        return (0, v) if v is not None else (1, 0)

    key: Callable[[T], tuple[object, ...]]
    if mode == "step":
        key = lambda i: (num(step(i)), num(epoch(i)), natural_key(name(i)))  # noqa: E731
    elif mode == "epoch":
        key = lambda i: (num(epoch(i)), num(step(i)), natural_key(name(i)))  # noqa: E731
    elif mode == "name":
        key = lambda i: natural_key(name(i))  # noqa: E731
    else:  # numbered first (epoch, then step), the others by name
        key = lambda i: (epoch(i) is None and step(i) is None, num(epoch(i)), num(step(i)), natural_key(name(i)))  # noqa: E731
    return sorted(items, key=key)
