"""The check's settings: tolerances, policies, unit and axis, from a rules file and from arguments.

A rules file (YAML/JSON) is a mapping with the keys of :class:`CheckSettings`; a bare list is
taken as its ``rules``. Values given to :func:`ibscope.check.run_check` (the CLI options)
override the file's, which override the defaults. Every level is a pydantic model with
``extra="forbid"``, so a misspelt key is an error that names it and suggests the right one.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from ibscope.check._schema import NonNegative, Selector, usage_error
from ibscope.errors import UsageError, unknown_name

DEFAULT_RTOL = 0.1
DEFAULT_ATOL = 0.02
CURVE_FIELDS = ("run", "split", "layer", "estimator", "quantity")
AXES = ("epoch", "step", "checkpoint")
POLICIES = ("fail", "warn", "ignore")
FAIL_ON = ("both", "decrease", "increase")
SELECTOR_KEYS = CURVE_FIELDS

Policy = Literal["fail", "warn", "ignore"]
FailOn = Literal["both", "decrease", "increase"]
Align = Literal["auto", "epoch", "step", "checkpoint"]
Unit = Literal["nats", "bits"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ToleranceValues(_Model):
    """Tolerance settings for some curves (each key optional: unset keys keep the value they had)."""

    rtol: Optional[NonNegative] = Field(None, description="Relative tolerance (times |baseline|).")
    atol: Optional[NonNegative] = Field(None, description="Absolute tolerance, in the comparison unit.")
    sigma: Optional[NonNegative] = Field(
        None, description="Also allow sigma standard deviations of the difference (stderr or seed spread).")
    fail_on: Optional[FailOn] = Field(None, description="Which direction fails: both, decrease or increase.")


class CurveMatch(_Model):
    """Curves a tolerance entry applies to: results column -> name or glob (all given must match)."""

    run: Optional[Selector] = None
    split: Optional[Selector] = None
    layer: Optional[Selector] = None
    estimator: Optional[Selector] = None
    quantity: Optional[Selector] = None


class ToleranceEntry(ToleranceValues):
    """A rules-file ``tolerances:`` entry: ``{match: {quantity: "I(X;T)"}, rtol: 0.2, ...}``."""

    match: CurveMatch = Field(default_factory=CurveMatch, description="Which curves (default: all).")


class CheckSettings(_Model):
    """The top level of a rules file; also what the CLI options set."""

    rtol: Optional[NonNegative] = Field(None, description=f"Relative tolerance (default {DEFAULT_RTOL}).")
    atol: Optional[NonNegative] = Field(None, description=f"Absolute tolerance (default {DEFAULT_ATOL}).")
    sigma: Optional[NonNegative] = Field(None, description="Allowed standard deviations of the difference "
                                                           "(default: not used).")
    unit: Optional[Unit] = Field(None, description="Unit in which information is compared (default nats).")
    missing: Optional[Policy] = Field(None, description="A baseline curve/point absent from the results "
                                                        "(default fail).")
    extra: Optional[Policy] = Field(None, description="A curve/point not in the baseline (default warn).")
    align: Optional[Align] = Field(None, description="x axis of the curves (default auto).")
    seeds: Optional[StrictBool] = Field(None, description="Pool runs as seeds (default: when sigma is set and "
                                                          "the baseline holds several runs).")
    tolerances: Optional[list[Any]] = Field(None, description="Per-curve tolerance entries (ToleranceEntry).")
    rules: Optional[list[Any]] = Field(None, description="Shape rules (see ibscope.check.rules).")


@dataclass(frozen=True)
class Tolerance:
    """The tolerance in force for one curve."""

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    sigma: float | None = None
    fail_on: str = "both"

    def updated(self, spec: Mapping[str, Any], where: str) -> Tolerance:
        """This tolerance with the keys of ``spec`` (validated) replacing its own."""
        vals = _validate(ToleranceValues, dict(spec), where)
        kw: dict[str, Any] = dict(rtol=self.rtol, atol=self.atol, sigma=self.sigma, fail_on=self.fail_on)
        kw.update({k: getattr(vals, k) for k in vals.model_fields_set})
        if kw["rtol"] is None or kw["atol"] is None or kw["fail_on"] is None:
            raise UsageError(f"{where}: rtol, atol and fail_on cannot be null.")
        return Tolerance(**kw)


@dataclass(frozen=True)
class ToleranceOverride:
    """Tolerances for the curves matching ``match`` (field -> glob pattern)."""

    match: dict[str, str]
    spec: dict[str, Any]
    where: str
    any_name: str | None = None   # from --tol NAME:...: matches quantity OR estimator

    def matches(self, key: Mapping[str, Any]) -> bool:
        if self.any_name is not None:
            return (fnmatch.fnmatchcase(str(key["quantity"]), self.any_name)
                    or fnmatch.fnmatchcase(str(key["estimator"]), self.any_name))
        return all(fnmatch.fnmatchcase(str(key.get(f)), str(p)) for f, p in self.match.items())


def _validate(model: type[BaseModel], data: Any, where: str, hint: str | None = None) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise usage_error(exc, where, model, hint=hint) from None


def parse_tolerance_entry(entry: Any, where: str) -> ToleranceOverride:
    """A rules-file ``tolerances:`` entry: ``{match: {quantity: "I(X;T)"}, rtol: 0.2, ...}``."""
    if not isinstance(entry, Mapping):
        raise UsageError(f"{where} must be a mapping like {{match: {{quantity: 'I(X;T)'}}, rtol: 0.2}}. Got {entry!r}.")
    match = entry.get("match") or {}
    if not isinstance(match, Mapping):
        raise UsageError(f"{where}: 'match' must map fields ({', '.join(SELECTOR_KEYS)}) to names or globs. "
                         f"Got {match!r}.")
    m = _validate(CurveMatch, dict(match), f"{where}: match")
    spec = {k: v for k, v in entry.items() if k != "match"}
    if not spec:
        raise UsageError(f"{where} sets no tolerance.", hint="Give at least one of rtol, atol, sigma, fail_on.")
    _validate(ToleranceEntry, {**spec, "match": dict(match)}, where)  # validate now, not at first use
    return ToleranceOverride(m.model_dump(exclude_none=True), spec, where)


def parse_tol_flag(text: str) -> ToleranceOverride:
    """``--tol SELECTOR:key=value[,key=value]``; SELECTOR is a quantity or estimator name
    (glob allowed) or ``field=pattern`` (field one of run, split, layer, estimator, quantity)."""
    where = f"--tol {text!r}"
    if ":" not in text:
        raise UsageError(f"{where}: expected SELECTOR:key=value[,key=value], e.g. 'I(X;T):rtol=0.2,atol=0.05'.")
    sel, _, body = text.partition(":")
    sel = sel.strip()
    if not sel:
        raise UsageError(f"{where}: empty selector before ':'.")
    spec: dict[str, Any] = {}
    for part in body.split(","):
        if "=" not in part:
            raise UsageError(f"{where}: expected key=value after ':'. Got {part!r}.")
        k, v = (s.strip() for s in part.split("=", 1))
        spec[k] = v
    _validate(ToleranceValues, spec, where)
    if "=" in sel:
        f, _, pat = sel.partition("=")
        f = f.strip()
        if f not in SELECTOR_KEYS:
            raise unknown_name("selector field", f, SELECTOR_KEYS)
        return ToleranceOverride({f: pat.strip()}, spec, where)
    return ToleranceOverride({}, spec, where, any_name=sel)


def load_rules(rules: str | os.PathLike | Mapping | Sequence | None) -> dict[str, Any]:
    """Read a rules file (YAML/JSON path) or take a mapping / list of rules.

    Top-level keys: ``rtol, atol, sigma, unit, missing, extra, align, seeds, tolerances,
    rules`` (:class:`CheckSettings`); a bare list is taken as the ``rules`` list. Returns the
    mapping as given (validated) plus ``_source`` (the file name, or "rules").
    """
    if rules is None:
        return {}
    src = "rules"
    if isinstance(rules, (str, os.PathLike)):
        p = Path(rules)
        src = str(p)
        if not p.exists():
            raise UsageError(f"Rules file not found: '{p}'.", hint="Pass the path of a YAML file; see docs/check.md for the format.")
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"Rules file '{p}' is not valid YAML: {exc}") from None
        if data is None:
            raise UsageError(f"Rules file '{p}' is empty.", hint="Add a 'rules:' list and/or 'tolerances:'.")
    else:
        data = rules
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        data = {"rules": list(data)}
    if not isinstance(data, Mapping):
        raise UsageError(f"{src}: expected a mapping with 'rules:' and/or 'tolerances:'. Got {type(data).__name__}.")
    out = dict(data)
    src = str(out.pop("_source", src))  # the output of load_rules is accepted again
    _validate(CheckSettings, out, src)
    out["_source"] = src
    return out


def resolve_settings(cfg: Mapping[str, Any], given: Mapping[str, Any]) -> CheckSettings:
    """The settings in force: ``given`` (arguments, None = not given) over the file's ``cfg``.

    An error names the argument when the bad value came from one, else the rules file."""
    src = cfg.get("_source", "rules")
    merged = {k: v for k, v in cfg.items() if k in CheckSettings.model_fields}
    args = {k: v for k, v in given.items() if v is not None}
    merged.update(args)
    try:
        return CheckSettings.model_validate(merged)
    except ValidationError as exc:
        key = exc.errors()[0]["loc"][0]
        raise usage_error(exc, "" if key in args else src, CheckSettings) from None
