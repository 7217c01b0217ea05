"""Shape rules: statements about one curve that need no baseline.

Each rule type is one class that owns its parsing (a pydantic model: its keys, their types and
constraints), its label and its evaluation. A rule selects curves by ``quantity`` (and optionally
``run``, ``split``, ``estimator``: names or globs; ``layer``: a name, a glob, ``first``, ``last``
or a position) and is evaluated on each, giving one test case per curve. Thresholds are in the
rule's ``unit`` (default nats) and converted to the curve's unit.

======================  =====================================================================
``compression``         value at ``from`` minus value at ``to`` >= ``min_decrease``
``decreases``           value at ``to`` below its value at ``from`` (by ``min_decrease``)
``increases``           value at ``to`` above its value at ``from`` (by ``min_increase``)
``at_least``            value at ``at`` >= ``min``
``at_most``             value at ``at`` <= ``max``
``peak_epoch``          the x of the curve's max (min) within ``within`` of ``epoch``
======================  =====================================================================
"""

from __future__ import annotations

import abc
import fnmatch
import math
import warnings
from collections import defaultdict
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ibscope.check._schema import At, Finite, From, NonNegative, Selector, usage_error
from ibscope.check.curves import fmt, key_name, unit_factor
from ibscope.check.report import CaseResult
from ibscope.check.settings import CURVE_FIELDS, SELECTOR_KEYS, Unit
from ibscope.errors import UsageError, unknown_name
from ibscope.results import INFO_UNITS

#: one curve's points: (x, value, unit), sorted by x
Points = Sequence[tuple[Any, float, str]]


class RuleFailure(Exception):
    """A rule cannot be evaluated on a curve (e.g. its point lies outside the curve): the case fails."""


class Rule(BaseModel):
    """Keys every rule has: which curves (selectors), a display name and the unit of its thresholds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    #: the rule's default quantity (None: the rule needs one)
    default_quantity: ClassVar[Optional[str]] = None
    #: one line for docs and for the hint of a missing key
    doc: ClassVar[str] = ""

    type: str
    name: Optional[str] = Field(None, description="Label of the test case (default: generated from the rule).")
    run: Optional[Selector] = Field(None, description="Run name or glob.")
    split: Optional[Selector] = Field(None, description="Split name or glob.")
    layer: Optional[int | str] = Field(
        None, description="Layer name or glob, 'first', 'last' or a position (negative from the end); "
                          "default: every layer.")
    estimator: Optional[Selector] = Field(None, description="Estimator name or glob.")
    quantity: Selector = Field(description="Quantity (e.g. 'I(T;Y)', 'local_rank'); glob allowed.")
    unit: Optional[Unit] = Field(None, description="Unit of the rule's thresholds (information only; default nats).")

    _index: int = PrivateAttr(0)

    @field_validator("layer", mode="before")
    @classmethod
    def _layer(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
            raise ValueError("must be a name, a glob, 'first', 'last' or an index")
        return v

    # ------------------------------------------------------------------ description
    @property
    def index(self) -> int:
        """Position of the rule in its file (0-based)."""
        return self._index

    @property
    def spec(self) -> dict[str, Any]:
        """The rule as given (file keys, numbers as floats), with its quantity filled in."""
        d = self.model_dump(by_alias=True, exclude_unset=True)
        d["type"] = self.type
        d.setdefault("quantity", self.quantity)
        return d

    @property
    def label(self) -> str:
        return self.name or self.describe()

    def _what(self) -> str:
        return f"{self.quantity} of {self.layer if self.layer is not None else 'each layer'}"

    @abc.abstractmethod
    def describe(self) -> str:
        """The generated label, e.g. ``I(T;Y) of last at end >= 0.6``."""

    # ------------------------------------------------------------------ evaluation
    @abc.abstractmethod
    def measure(self, pts: Points, axis: str, factor: float, d: dict[str, Any], unit: str) -> tuple[bool, str]:
        """Evaluate on one curve (thresholds times ``factor`` are in its unit); add the numbers used to ``d``;
        return (holds, message). Raise :class:`RuleFailure` when it cannot be evaluated."""

    def check_axis(self, axis: str) -> None:
        """Warn when the rule reads the results on another axis than it assumes."""

    def evaluate(self, key: tuple, pts: Points, axis: str) -> CaseResult:
        """One test case: this rule on the curve ``key``."""
        kd = {f: v for f, v in zip(CURVE_FIELDS, key)}
        name = f"{self.label} [{key_name(key)}]"
        units = {p[2] for p in pts}
        if len(units) > 1:
            return CaseResult(name, "rules", "fail", f"curve mixes units {sorted(units)}", {"curve": kd})
        unit = next(iter(units))
        # thresholds are in the rule's unit (default nats); convert them to the curve's unit
        f = 1.0
        if unit in INFO_UNITS:
            f = unit_factor(self.unit or "nats", unit)
        elif self.unit is not None:
            return CaseResult(name, "rules", "fail",
                              f"rule gives unit '{self.unit}' but the curve is in '{unit}', which does not convert",
                              {"curve": kd})
        d: dict[str, Any] = {"rule": self.spec, "rule_index": self.index + 1, "curve": kd,
                             "axis": axis, "unit": unit, "n_points": len(pts)}
        try:
            ok, msg = self.measure(pts, axis, f, d, unit)
        except RuleFailure as exc:
            return CaseResult(name, "rules", "fail", str(exc), d)
        if any(not math.isfinite(v) for k, v in d.items() if k.startswith("value") and isinstance(v, float)):
            ok = False
            msg += "; a value is not finite"
        return CaseResult(name, "rules", "pass" if ok else "fail", msg, d)


def point_at(pts: Points, where: Any, axis: str) -> tuple[Any, float, str]:
    """(x used, value, note) for 'start'/'end'/a number (nearest point; the note says so)."""
    if where == "end":
        return pts[-1][0], pts[-1][1], ""
    if where == "start":
        return pts[0][0], pts[0][1], ""
    xs = [p[0] for p in pts]
    if where < xs[0] or where > xs[-1]:
        raise RuleFailure(f"{axis} {fmt(where)} is outside the curve's range [{xs[0]}, {xs[-1]}]")
    best = min(pts, key=lambda p: (abs(p[0] - where), p[0]))
    note = "" if best[0] == where else f"nearest {axis} to requested {fmt(where)}"
    return best[0], best[1], note


# ---------------------------------------------------------------------------------- change rules
class _Change(Rule):
    """A change between two points of the curve: ``from`` (or its peak) and ``to``."""

    from_: From = Field(alias="from", description="Where the change starts: 'start', 'end', 'peak' or an x value.")
    to: At = Field("end", description="Where it ends: 'start', 'end' or an x value (default end).")

    def _ends(self, pts: Points, axis: str, d: dict[str, Any]) -> tuple[Any, float, Any, float]:
        if self.from_ == "peak":
            x0, v0 = max(pts, key=lambda p: (p[1], -p[0]))[:2]
            n0 = "peak of the curve"
        else:
            x0, v0, n0 = point_at(pts, self.from_, axis)
        x1, v1, n1 = point_at(pts, self.to, axis)
        if x1 <= x0:
            raise RuleFailure(f"'to' point ({axis} {x1}) is not after 'from' point ({axis} {x0})")
        d.update({f"{axis}_from": x0, "value_from": v0, f"{axis}_to": x1, "value_to": v1})
        for n, tag in ((n0, "from"), (n1, "to")):
            if n:
                d[f"note_{tag}"] = n
        return x0, v0, x1, v1

    def _decrease(self, pts: Points, axis: str, need: float, d: dict[str, Any], unit: str) -> tuple[bool, str]:
        x0, v0, x1, v1 = self._ends(pts, axis, d)
        change = v0 - v1
        ok = change > 0 if need == 0 else change >= need
        d.update({"decrease": change, "required_decrease": need})
        return ok, (f"{axis} {x0} -> {x1}: {fmt(v0)} -> {fmt(v1)} {unit}, decrease {change:+.4g} "
                    f"({'>' if need == 0 else '>='} {fmt(need)} required)")


class Compression(_Change):
    """A compression phase exists: the value at ``from`` minus the value at ``to`` >= ``min_decrease``."""

    default_quantity: ClassVar[Optional[str]] = "I(X;T)"
    doc: ClassVar[str] = ("value at `from` minus value at `to` (default end) >= min_decrease "
                          "(a compression phase exists)")

    type: Literal["compression"] = "compression"
    quantity: Selector = Field("I(X;T)", description="Quantity (default I(X;T)).")
    min_decrease: NonNegative = Field(description="Required decrease, in the rule's unit.")

    def describe(self) -> str:
        return f"{self._what()} decreases by >= {self.min_decrease} {self.unit or 'nats'} from {self.from_} to {self.to}"

    def measure(self, pts, axis, factor, d, unit):
        return self._decrease(pts, axis, self.min_decrease * factor, d, unit)


class Decreases(_Change):
    """The value at ``to`` is below its value at ``from`` (by at least ``min_decrease`` when > 0)."""

    doc: ClassVar[str] = "value at `to` (default end) is below its value at `from` (by more than min_decrease, default 0)"

    type: Literal["decreases"] = "decreases"
    min_decrease: NonNegative = Field(0.0, description="Required decrease (0: any decrease).")

    def describe(self) -> str:
        return f"{self._what()} at {self.to} below its value at {self.from_}"

    def measure(self, pts, axis, factor, d, unit):
        return self._decrease(pts, axis, self.min_decrease * factor, d, unit)


class Increases(_Change):
    """The value at ``to`` is above its value at ``from`` (by at least ``min_increase`` when > 0)."""

    doc: ClassVar[str] = "value at `to` (default end) is above its value at `from` (by more than min_increase, default 0)"

    type: Literal["increases"] = "increases"
    min_increase: NonNegative = Field(0.0, description="Required increase (0: any increase).")

    def describe(self) -> str:
        return f"{self._what()} at {self.to} above its value at {self.from_}"

    def measure(self, pts, axis, factor, d, unit):
        x0, v0, x1, v1 = self._ends(pts, axis, d)
        need = self.min_increase * factor
        change = v1 - v0
        ok = change > 0 if need == 0 else change >= need
        d.update({"increase": change, "required_increase": need})
        return ok, (f"{axis} {x0} -> {x1}: {fmt(v0)} -> {fmt(v1)} {unit}, increase {change:+.4g} "
                    f"({'>' if need == 0 else '>='} {fmt(need)} required)")


# ---------------------------------------------------------------------------------- bounds
class _Bound(Rule):
    at: At = Field("end", description="Where: 'start', 'end' or an x value (nearest point; default end).")

    def _value(self, pts: Points, axis: str, d: dict[str, Any]) -> tuple[Any, float]:
        x, v, n = point_at(pts, self.at, axis)
        d.update({axis: x, "value": v})
        if n:
            d["note"] = n
        return x, v


class AtLeast(_Bound):
    """The value at ``at`` (default end) is at least ``min``."""

    doc: ClassVar[str] = "value at `at` (default end) >= min"

    type: Literal["at_least"] = "at_least"
    min: Finite = Field(description="Lower bound, in the rule's unit.")

    def describe(self) -> str:
        return f"{self._what()} at {self.at} >= {self.min} {self.unit or ''}".strip()

    def measure(self, pts, axis, factor, d, unit):
        x, v = self._value(pts, axis, d)
        bound = self.min * factor
        d["bound"] = bound
        return v >= bound, f"at {axis} {x}: {fmt(v)} {unit} (>= {fmt(bound)} required)"


class AtMost(_Bound):
    """The value at ``at`` (default end) is at most ``max``."""

    doc: ClassVar[str] = "value at `at` (default end) <= max"

    type: Literal["at_most"] = "at_most"
    max: Finite = Field(description="Upper bound, in the rule's unit.")

    def describe(self) -> str:
        return f"{self._what()} at {self.at} <= {self.max} {self.unit or ''}".strip()

    def measure(self, pts, axis, factor, d, unit):
        x, v = self._value(pts, axis, d)
        bound = self.max * factor
        d["bound"] = bound
        return v <= bound, f"at {axis} {x}: {fmt(v)} {unit} (<= {fmt(bound)} required)"


# ---------------------------------------------------------------------------------- peak
class PeakEpoch(Rule):
    """The epoch of the curve's maximum (``mode: min``: minimum) lies within ``within`` of ``epoch``."""

    default_quantity: ClassVar[Optional[str]] = "I(X;T)"
    doc: ClassVar[str] = "the epoch of the maximum (mode: max) or minimum (mode: min) lies within +-within of epoch"

    type: Literal["peak_epoch"] = "peak_epoch"
    quantity: Selector = Field("I(X;T)", description="Quantity (default I(X;T)).")
    epoch: Finite = Field(description="Expected epoch (x value) of the extremum.")
    within: NonNegative = Field(description="Allowed distance from `epoch`.")
    mode: Literal["max", "min"] = Field("max", description="Which extremum: max or min.")

    def describe(self) -> str:
        return f"{self.mode} of {self._what()} within +-{self.within} of {self.epoch}"

    def check_axis(self, axis: str) -> None:
        if axis != "epoch":
            warnings.warn(f"rule {self.index + 1} (peak_epoch): results have no epochs; its 'epoch' is read on the "
                          f"'{axis}' axis", stacklevel=3)

    def measure(self, pts, axis, factor, d, unit):
        finite = [p for p in pts if math.isfinite(p[1])]
        if not finite:
            raise RuleFailure("the curve has no finite values")
        if self.mode == "max":
            xp, vp = max(finite, key=lambda p: (p[1], -p[0]))[:2]
        else:
            xp, vp = min(finite, key=lambda p: (p[1], p[0]))[:2]
        off = xp - self.epoch
        d.update({f"{self.mode}_at": xp, "value": vp, "expected": self.epoch, "within": self.within, "offset": off})
        return abs(off) <= self.within, (f"{self.mode} {fmt(vp)} {unit} at {axis} {xp}; expected {fmt(self.epoch)} "
                                         f"+- {fmt(self.within)} (offset {off:+g})")


#: the rule types by their ``type`` key
RULE_TYPES: dict[str, type[Rule]] = {
    cls.model_fields["type"].default: cls
    for cls in (Compression, Decreases, Increases, AtLeast, AtMost, PeakEpoch)
}

#: any rule, told apart by ``type`` (for JSON Schema and typed configs)
AnyRule = Annotated[Compression | Decreases | Increases | AtLeast | AtMost | PeakEpoch, Field(discriminator="type")]


def parse_rule(spec: Any, index: int) -> Rule:
    """Rule number ``index`` (0-based) of a rules file, validated; UsageError naming the rule and key."""
    where = f"rule {index + 1}"
    if not isinstance(spec, Mapping):
        raise UsageError(f"{where} must be a mapping with a 'type'. Got {spec!r}.")
    if "type" not in spec:
        raise UsageError(f"{where} has no 'type'.", hint=f"Rule types: {', '.join(RULE_TYPES)}.")
    typ = spec["type"]
    if typ not in RULE_TYPES:
        err = unknown_name("rule type", str(typ), RULE_TYPES)
        raise UsageError(f"{where}: {err.message}", hint=err.hint)
    cls = RULE_TYPES[typ]
    where = f"rule {index + 1} ({typ}{': ' + str(spec['name']) if spec.get('name') else ''})"
    try:
        rule = cls.model_validate(dict(spec))
    except ValidationError as exc:
        hint = f"{typ}: {cls.doc}."
        if [e["loc"] for e in exc.errors()] == [("quantity",)]:
            hint = "e.g. quantity: 'I(T;Y)' or 'local_rank'."
        raise usage_error(exc, where, cls, hint=hint) from None
    rule._index = index
    return rule


# ---------------------------------------------------------------------------------- selection
def select_curves(rule: Rule, rows: list[dict], axis: str) -> list[tuple[tuple, list[tuple[Any, float, str]]]]:
    """The curves a rule applies to, each as (curve key, points sorted by x)."""
    cand = [r for r in rows if fnmatch.fnmatchcase(str(r["quantity"]), str(rule.quantity))]
    for f in ("run", "split", "estimator"):
        pat = getattr(rule, f)
        if pat is not None:
            cand = [r for r in cand if fnmatch.fnmatchcase(str(r[f]), str(pat))]
    # layer: name/glob, first/last, or integer position (negative from the end)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in cand:
        groups[(r["run"], r["split"], r["estimator"], r["quantity"])].append(r)
    out = []
    for (run, split, est, q), rs in groups.items():
        order: dict[str, Any] = {}
        for r in rs:
            order.setdefault(r["layer"], r["layer_index"])
        layers = sorted((n for n in order if n != "-"),
                        key=lambda n: (order[n] is None, order[n] if order[n] is not None else 0,
                                       list(order).index(n)))
        everything = layers + (["-"] if "-" in order else [])  # network order, run-level rows last
        if "-" in order:
            layers = layers or ["-"]
        sel = rule.layer
        if sel is None:
            chosen = everything
        elif isinstance(sel, int) or sel.lstrip("-").isdigit():
            i = int(sel)
            chosen = [layers[i]] if -len(layers) <= i < len(layers) else []
        elif sel == "last":
            chosen = layers[-1:]
        elif sel == "first":
            chosen = layers[:1]
        else:
            chosen = [n for n in everything if fnmatch.fnmatchcase(str(n), sel)]
        for layer in chosen:
            pts = sorted(((r[axis], float(r["value"]), r["unit"]) for r in rs if r["layer"] == layer),
                         key=lambda t: t[0])
            out.append(((run, split, layer, est, q), pts))
    return out


def evaluate_rules(rules: Sequence[Rule], rows: list[dict], axis: str) -> list[CaseResult]:
    """Every rule on every curve it selects; a rule that selects nothing is a failing case."""
    cases = []
    for rule in rules:
        rule.check_axis(axis)
        matched = select_curves(rule, rows, axis)
        if not matched:
            spec = rule.spec
            sel = {k: spec[k] for k in SELECTOR_KEYS if k in spec}
            have = sorted({r["quantity"] for r in rows})
            cases.append(CaseResult(f"{rule.label}", "rules", "fail",
                                    f"no curve matches {sel}; quantities present: {', '.join(have)}",
                                    {"rule": spec, "rule_index": rule.index + 1, "matched": 0}))
            continue
        for key, pts in matched:
            if not pts:
                continue
            cases.append(rule.evaluate(key, pts, axis))
    return cases
