"""Declared hyper-parameter constraints: one table per estimator, checked by one function.

A field of an estimator dataclass declares what it accepts with :func:`param`::

    @dataclass(frozen=True)
    class KSG(PairEstimator):
        k: int = param(3, Integer(ge=1))
        norm: str = param("max", OneOf("max", "euclidean"))
        sigma: float | None = param(None, Real(gt=0), optional=True)

:func:`check_params` (called when an estimator is built) checks every declared field and raises
one :class:`~ibscope.errors.UsageError` naming the parameter, what it must be and what it got:
``The 'k' parameter of ksg must be an integer >= 1. Got 0 instead.`` Rules that relate two
fields (``range_min < range_max``) stay in the estimator's ``validate()``.

Each constraint also lists values that break it (:meth:`Constraint.invalid`), which is how
:func:`ibscope.estimators.conformance.check_parameters` tests every estimator's checks without
a hand-written list; ``ibscope estimators`` shows :meth:`Constraint.describe`.

Like ``base.py``, this module imports nothing from ibscope but :mod:`ibscope.errors`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ibscope.errors import UsageError

#: the key under which a field's constraint is stored in ``dataclasses.Field.metadata``
METADATA_KEY = "ibscope_constraint"

T = TypeVar("T")


class Constraint(abc.ABC):
    """What one hyper-parameter accepts."""

    @abc.abstractmethod
    def accepts(self, value: Any) -> bool:
        """True when ``value`` satisfies the constraint."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The expected value in words, as in "must be <describe()>"."""

    @abc.abstractmethod
    def invalid(self) -> list[Any]:
        """Values that break the constraint (used to generate conformance tests)."""

    def convert(self, text: str) -> Any:
        """Read ``text`` (a CLI ``--param KEY=VALUE``) as a value of this constraint's type;
        ValueError when it cannot be read."""
        return text


def _is_int(v: Any) -> bool:
    t = type(v)
    return t is int or (t is not bool and t is not float and isinstance(v, numbers.Integral))


def _is_real(v: Any) -> bool:
    t = type(v)
    return t is float or t is int or (t is not bool and isinstance(v, numbers.Real))


@dataclass(frozen=True)
class _Bounds:
    """Bounds shared by :class:`Integer` and :class:`Real` (``None``: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def _within(self, v: Any) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def _bounds_text(self) -> str:
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if lo is not None and hi is not None:
            return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        if lo is not None:
            return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        if hi is not None:
            return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
        return ""

    def _outside(self, step: float) -> list[Any]:
        out: list[Any] = []
        if self.ge is not None:
            out.append(self.ge - step)
        if self.gt is not None:
            out.append(self.gt)
        if self.le is not None:
            out.append(self.le + step)
        if self.lt is not None:
            out.append(self.lt)
        return out


def _num(v: float | None) -> str:
    return repr(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


@dataclass(frozen=True)
class Integer(_Bounds, Constraint):
    """An integer (Python or numpy, never bool) within the bounds."""

    def accepts(self, value: Any) -> bool:
        return _is_int(value) and self._within(value)

    def describe(self) -> str:
        return "an integer" + self._bounds_text()

    def invalid(self) -> list[Any]:
        return [*(int(v) for v in self._outside(1)), 2.5, "3", True, None]

    def convert(self, text: str) -> Any:
        return int(text)


@dataclass(frozen=True)
class Real(_Bounds, Constraint):
    """A finite real number (int or float, never bool) within the bounds."""

    def accepts(self, value: Any) -> bool:
        return _is_real(value) and math.isfinite(float(value)) and self._within(value)

    def describe(self) -> str:
        return "a finite number" + self._bounds_text()

    def invalid(self) -> list[Any]:
        return [*(float(v) for v in self._outside(0.5)), float("nan"), float("inf"), "0.5", True, None]

    def convert(self, text: str) -> Any:
        return float(text)


@dataclass(frozen=True)
class Boolean(Constraint):
    """True or False (not 0/1, not a string)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"

    def invalid(self) -> list[Any]:
        return [1, "true", None]

    def convert(self, text: str) -> Any:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)


class OneOf(Constraint):
    """One of a closed set of values (strings or integers; ``True`` is not ``1``)."""

    def __init__(self, *choices: Any) -> None:
        if not choices:
            raise ValueError("OneOf needs at least one choice")
        self.choices = tuple(choices)

    def __repr__(self) -> str:
        return f"OneOf{self.choices!r}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OneOf) and other.choices == self.choices

    def __hash__(self) -> int:
        return hash(self.choices)

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(c) and value == c for c in self.choices) or any(
            _is_int(value) and _is_int(c) and value == c for c in self.choices)

    def describe(self) -> str:
        words = [repr(c) for c in self.choices]
        if len(words) <= 2:
            return " or ".join(words)
        return "one of " + ", ".join(words)

    def invalid(self) -> list[Any]:
        if all(isinstance(c, str) for c in self.choices):
            return ["not-a-choice", 1, None]
        return [max(c for c in self.choices if _is_int(c)) + 1, True, None]

    def convert(self, text: str) -> Any:
        for c in self.choices:
            if str(c) == text:
                return c
        return text


@dataclass(frozen=True)
class OrNone(Constraint):
    """``None``, or a value accepted by ``inner``."""

    inner: Constraint

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def describe(self) -> str:
        return self.inner.describe() + " or None"

    def invalid(self) -> list[Any]:
        return [v for v in self.inner.invalid() if v is not None]

    def convert(self, text: str) -> Any:
        return None if text.lower() in ("none", "null") else self.inner.convert(text)


def param(default: T, constraint: Constraint, *, optional: bool = False) -> T:
    """A hyper-parameter field with a declared constraint (``optional``: None is accepted too).

    Use it as the default of a field of an estimator dataclass; the value of the field is
    ``default`` and :func:`check_params` checks it against ``constraint``.
    """
    c = OrNone(constraint) if optional else constraint
    if not c.accepts(default):
        raise ValueError(f"default {default!r} breaks its own constraint: {c.describe()}")
    f: T = dataclasses.field(default=default, metadata={METADATA_KEY: c})
    return f


def constraints(cls_or_obj: Any) -> dict[str, Constraint]:
    """Field name -> declared constraint of an estimator class or instance (fields without one
    are left out: plug-ins that check their parameters in ``validate()`` have none)."""
    return dict(_table(cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)))


_TABLES: dict[type, dict[str, Constraint]] = {}


def _table(cls: type) -> dict[str, Constraint]:
    """:func:`constraints` of a class, computed once (a dataclass's fields do not change)."""
    table = _TABLES.get(cls)
    if table is None:
        table = {}
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                c = f.metadata.get(METADATA_KEY) if isinstance(f.metadata, Mapping) else None
                if isinstance(c, Constraint):
                    table[f.name] = c
        _TABLES[cls] = table
    return table


def message(owner: str, name: str, expected: str, got: Any) -> str:
    """The one wording of a bad hyper-parameter (``owner``: the estimator's name)."""
    return f"The '{name}' parameter of {owner} must be {expected}. Got {got!r} instead."


def check_values(values: Mapping[str, Any], table: Mapping[str, Constraint], owner: str) -> None:
    """Check ``values`` (name -> value) against ``table`` (name -> constraint; names without a
    constraint are not checked); UsageError naming the first bad one."""
    for name, c in table.items():
        if name in values and not c.accepts(values[name]):
            raise UsageError(message(owner, name, c.describe(), values[name]))


def check_params(est: Any, owner: str) -> None:
    """Check every declared field of the estimator ``est``; UsageError naming the first bad one."""
    for name, c in _table(type(est)).items():
        value = getattr(est, name)
        if not c.accepts(value):
            raise UsageError(message(owner, name, c.describe(), value))
