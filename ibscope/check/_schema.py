"""Field types and error mapping shared by the check models (settings, tolerances, rules).

pydantic does the parsing; this module makes its errors read like the rest of ibscope: a
:class:`~ibscope.errors.UsageError` that names where the bad key is (``rule 2 (at_least)``,
``rules.yaml: tolerances[0]``), what was expected and what was got, with a did-you-mean for
unknown keys and choices.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError

from ibscope.errors import UsageError, did_you_mean

#: the error type of the validators below; its message is used as written
_OWN = "ibscope_value"


def _number(minimum: float | None) -> Callable[[Any], float]:
    """A before-validator: a real number (not a bool), finite, ``>= minimum``; numeric strings are accepted
    (``--tol 'I(X;T):rtol=0.2'`` gives strings)."""
    need = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "")

    def check(v: Any) -> float:
        if isinstance(v, bool):
            raise PydanticCustomError(_OWN, f"must be a number ({need})")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise PydanticCustomError(_OWN, f"must be {need}") from None
        if not math.isfinite(f) or (minimum is not None and f < minimum):
            raise PydanticCustomError(_OWN, f"must be {need}")
        return f

    return check


#: a finite number >= 0 (tolerances, margins)
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_number(0.0))]
#: any finite number (bounds, epochs)
Finite = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_number(None))]


def _selector(v: Any) -> Any:
    # YAML reads `run: 1` as an int; selectors are matched as text
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return v


#: a name or glob matched against a results column
Selector = Annotated[str, BeforeValidator(_selector)]


def _curve_point(allow_peak: bool) -> Callable[[Any], Any]:
    words = ("start", "end", "peak") if allow_peak else ("start", "end")

    def check(v: Any) -> Any:
        if isinstance(v, str) and v in words:
            return v
        if v == "peak":
            raise PydanticCustomError(_OWN, "cannot be 'peak'; 'peak' is only allowed for 'from'")
        if isinstance(v, bool):
            raise PydanticCustomError(_OWN, f"must be {', '.join(repr(w) for w in words)} or a number")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise PydanticCustomError(_OWN, f"must be {', '.join(repr(w) for w in words)} or a number") from None
        if not math.isfinite(f):
            raise PydanticCustomError(_OWN, "must be a finite number")
        return f

    return check


#: where on a curve: 'start', 'end' or an x value (epoch/step/checkpoint; the nearest point is used)
At = Annotated[Literal["start", "end"] | float, BeforeValidator(_curve_point(False))]
#: as :data:`At`, or 'peak' (the curve's maximum)
From = Annotated[Literal["start", "end", "peak"] | float, BeforeValidator(_curve_point(True))]


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def usage_error(exc: ValidationError, where: str, model: type[BaseModel], *, hint: str | None = None) -> UsageError:
    """The first error of ``exc`` as a UsageError: ``{where}: unknown key 'x'. Did you mean 'y'?`` and the like.

    ``where`` names the place (a file, a rule, an option); ``model`` is the model that was validated, for the
    list of allowed keys; ``hint`` is shown for missing keys (what the section needs)."""
    errs = exc.errors(include_url=False)
    # a misspelt key also shows as the right key missing: name the misspelling first
    err = next((e for e in errs if e["type"] == "extra_forbidden"), errs[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))  # drop union-branch tags
    key = _loc(loc) or "value"
    name = f"'{key}'" if where else key  # an option (no where) reads like the old messages: "rtol must be ..."
    kind, got = err["type"], err.get("input")
    prefix = f"{where}: " if where else ""
    if kind == "extra_forbidden":
        allowed = _keys(model)
        return UsageError(f"{prefix}unknown key '{key}'.{did_you_mean(str(loc[-1]), allowed)}",
                          hint=f"Allowed keys: {', '.join(allowed)}.")
    if kind == "missing":
        return UsageError(f"{where} needs '{key}'.", hint=hint)
    if kind == _OWN:
        return UsageError(f"{prefix}{name} {err['msg']}. Got {got!r}.")
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return UsageError(f"{prefix}{name} must be one of {', '.join(choices)}. Got {got!r}."
                          f"{did_you_mean(str(got), choices)}")
    if kind in ("bool_type", "bool_parsing"):
        return UsageError(f"{prefix}{name} must be true or false. Got {got!r}.")
    if kind in ("list_type", "dict_type", "model_type", "string_type"):
        want = {"list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
                "string_type": "a string"}[kind]
        return UsageError(f"{prefix}{name} must be {want}. Got {type(got).__name__}: {got!r}.")
    return UsageError(f"{prefix}{name}: {err['msg']}. Got {got!r}.")
