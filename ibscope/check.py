"""Regression checks of compression curves for CI (``ibscope check``).

Two kinds of checks, each reported as one test case with the numbers it used:

* **Baseline comparison**: the current results table and a baseline results table are
  aligned on curves ``(run, split, layer, estimator, quantity)`` and on the x axis (epoch,
  step or checkpoint), converted to one unit, and compared point by point. A point holds
  when ``|current - baseline| <= tol`` with

  ``tol = max(atol + rtol * |baseline|, sigma * s)``

  where ``s`` is the standard deviation of the difference: ``sqrt(se_b**2 + se_c**2)``
  from the tables' ``stderr`` columns, or, when the baseline holds several runs (seeds)
  and they are pooled, ``sd_seeds * sqrt(1/m + 1/n)`` (``n`` baseline seeds, ``m`` current
  runs averaged). ``fail_on`` restricts failures to one direction (``decrease``: only a
  drop below the baseline fails). Missing curves or points fail by default; extra ones
  warn (both configurable).

* **Shape rules** (no baseline needed), e.g. "I(X;T) of the last layer decreases by at
  least 0.1 nats from epoch 100 to the end", "final I(T;Y) >= 0.6", "local rank at the end
  is below its value at epoch 5", "the epoch of maximal I(X;T) is within +-10 of 50".

Public API: :func:`run_check` -> :class:`CheckReport` (``.ok``, ``.failures``,
``.to_dict()``, ``.to_junit_xml()``, ``.write_json()``, ``.write_junit()``),
:func:`load_rules`, :func:`write_baseline`, :data:`RULE_TYPES`.

Values are compared in nats unless ``unit="bits"`` (information rows only; other units
such as "dimensions" are compared as they are). ``atol`` is in the comparison unit.
"""

from __future__ import annotations

import fnmatch
import json
import math
import operator
import os
import subprocess
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ibscope._version import __version__
from ibscope.errors import DataError, UsageError, did_you_mean, unknown_name
from ibscope.results import INFO_UNITS, Results, read_results, write_results

CHECK_FORMAT = "ibscope-check"
CHECK_VERSION = 1

DEFAULT_RTOL = 0.1
DEFAULT_ATOL = 0.02
CURVE_FIELDS = ("run", "split", "layer", "estimator", "quantity")
AXES = ("epoch", "step", "checkpoint")
POLICIES = ("fail", "warn", "ignore")
FAIL_ON = ("both", "decrease", "increase")
# relative rounding guard: a nats->bits->nats round trip must not fail a zero tolerance
_ROUNDING = 1e-12

SETTINGS_KEYS = ("rtol", "atol", "sigma", "unit", "missing", "extra", "align", "seeds", "tolerances", "rules")
TOLERANCE_KEYS = ("match", "rtol", "atol", "sigma", "fail_on")
SELECTOR_KEYS = ("run", "split", "layer", "estimator", "quantity")


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """One test case: a baseline curve or one rule applied to one curve."""

    name: str
    group: str                    # "baseline" | "rules"
    status: str                   # "pass" | "fail" | "warn"
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "status": self.status,
                "message": self.message, "details": self.details}


@dataclass
class CheckReport:
    """What ``run_check`` found. ``ok`` is True when no case failed."""

    cases: list[CaseResult]
    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.cases)

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "fail"]

    @property
    def warnings(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "warn"]

    def counts(self) -> dict[str, int]:
        return {"cases": len(self.cases), "passed": sum(c.status == "pass" for c in self.cases),
                "failed": len(self.failures), "warnings": len(self.warnings)}

    def summary(self) -> str:
        n = self.counts()
        if not self.cases:
            return "nothing was compared (0 checks)"
        head = "all checks hold" if self.ok else f"{n['failed']} of {n['cases']} checks failed"
        return f"{head} ({n['cases']} checks, {n['passed']} passed, {n['failed']} failed, {n['warnings']} warnings)"

    def to_dict(self) -> dict[str, Any]:
        return {"format": CHECK_FORMAT, "format_version": CHECK_VERSION, "ibscope_version": __version__,
                "ok": self.ok, "counts": self.counts(), "settings": self.settings, "sources": self.sources,
                "notes": self.notes, "cases": _clean([c.to_dict() for c in self.cases])}

    def to_junit_xml(self, suite_name: str = "ibscope check") -> str:
        """JUnit XML: one <testsuite> per group, one <testcase> per case; failures carry the numbers."""
        import xml.etree.ElementTree as ET

        counts = self.counts()
        root = ET.Element("testsuites", name=suite_name, tests=str(counts["cases"]),
                          failures=str(counts["failed"]), errors="0", time="0")
        for group in ("baseline", "rules"):
            cases = [c for c in self.cases if c.group == group]
            if not cases:
                continue
            suite = ET.SubElement(root, "testsuite", name=f"{suite_name}: {group}", tests=str(len(cases)),
                                  failures=str(sum(c.failed for c in cases)), errors="0", skipped="0", time="0")
            for c in cases:
                tc = ET.SubElement(suite, "testcase", classname=f"ibscope.check.{group}", name=c.name, time="0")
                body = json.dumps(_clean(c.details), indent=2, sort_keys=True, default=_json_default)
                if c.status == "fail":
                    el = ET.SubElement(tc, "failure", message=c.message, type="regression")
                    el.text = body
                else:
                    out = ET.SubElement(tc, "system-out")
                    out.text = (f"WARNING: {c.message}\n" if c.status == "warn" else f"{c.message}\n") + body
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

    def write_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n")

    def write_junit(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_junit_xml())

    def __rich__(self):
        return self.table()

    def table(self, show_passing: bool = False):
        """A rich table of failures and warnings (all cases with ``show_passing``)."""
        from rich.markup import escape
        from rich.table import Table

        t = Table(title="ibscope check", title_justify="left", show_lines=False)
        t.add_column("status")
        t.add_column("check", overflow="fold")
        t.add_column("result", overflow="fold")
        style = {"fail": "[bold red]FAIL[/]", "warn": "[yellow]WARN[/]", "pass": "[green]ok[/]"}
        for c in self.cases:
            if c.status == "pass" and not show_passing:
                continue
            t.add_row(style[c.status], escape(c.name), escape(c.message))
        return t


def junit_for_error(message: str, exit_code: int, suite_name: str = "ibscope check") -> str:
    """JUnit XML for a check that could not run (unusable input): one test case with an
    <error>, so that a CI test reporter shows why instead of "no report found"."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name=suite_name, tests="1", failures="0", errors="1", time="0")
    suite = ET.SubElement(root, "testsuite", name=f"{suite_name}: input", tests="1", failures="0", errors="1",
                          skipped="0", time="0")
    tc = ET.SubElement(suite, "testcase", classname="ibscope.check.input", name="read results, baseline and rules",
                       time="0")
    ET.SubElement(tc, "error", message=message, type=f"exit code {exit_code}").text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _json_default(o: Any):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    from ibscope._atomic import write_text_atomic

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(p, text)


# ------------------------------------------------------------------------------------------
# settings, tolerances, rules file
# ------------------------------------------------------------------------------------------
def _num(v: Any, what: str, *, minimum: float | None = 0.0) -> float:
    if isinstance(v, bool):
        raise UsageError(f"{what} must be a number. Got {v!r}.")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number. Got {v!r}.") from None
    if not math.isfinite(f) or (minimum is not None and f < minimum):
        raise UsageError(f"{what} must be a finite number >= {minimum}. Got {v!r}.")
    return f


def _choice(v: Any, choices: Sequence[str], what: str) -> str:
    if v not in choices:
        raise UsageError(f"{what} must be one of {', '.join(choices)}. Got {v!r}.{did_you_mean(str(v), choices)}")
    return v


def _check_keys(d: Mapping, allowed: Sequence[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise UsageError(f"{where}: unknown key '{k}'.{did_you_mean(str(k), allowed)}",
                             hint=f"Allowed keys: {', '.join(allowed)}.")


@dataclass(frozen=True)
class Tolerance:
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    sigma: float | None = None
    fail_on: str = "both"

    def updated(self, spec: Mapping[str, Any], where: str) -> Tolerance:
        kw = dict(rtol=self.rtol, atol=self.atol, sigma=self.sigma, fail_on=self.fail_on)
        for k in ("rtol", "atol"):
            if k in spec:
                kw[k] = _num(spec[k], f"{where}: '{k}'")
        if "sigma" in spec:
            kw["sigma"] = None if spec["sigma"] is None else _num(spec["sigma"], f"{where}: 'sigma'")
        if "fail_on" in spec:
            kw["fail_on"] = _choice(spec["fail_on"], FAIL_ON, f"{where}: 'fail_on'")
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


def parse_tolerance_entry(entry: Any, where: str) -> ToleranceOverride:
    """A rules-file ``tolerances:`` entry: ``{match: {quantity: "I(X;T)"}, rtol: 0.2, ...}``."""
    if not isinstance(entry, Mapping):
        raise UsageError(f"{where} must be a mapping like {{match: {{quantity: 'I(X;T)'}}, rtol: 0.2}}. Got {entry!r}.")
    _check_keys(entry, TOLERANCE_KEYS, where)
    match = entry.get("match") or {}
    if not isinstance(match, Mapping):
        raise UsageError(f"{where}: 'match' must map fields ({', '.join(SELECTOR_KEYS)}) to names or globs. Got {match!r}.")
    _check_keys(match, SELECTOR_KEYS, f"{where}: match")
    spec = {k: v for k, v in entry.items() if k != "match"}
    if not spec:
        raise UsageError(f"{where} sets no tolerance.", hint="Give at least one of rtol, atol, sigma, fail_on.")
    Tolerance().updated(spec, where)  # validate now, not at first use
    return ToleranceOverride({str(k): str(v) for k, v in match.items()}, spec, where)


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
        _check_keys({k: v}, TOLERANCE_KEYS[1:], where)
        spec[k] = v
    Tolerance().updated(spec, where)
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
    rules``. A bare list is taken as the ``rules`` list.
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
    _check_keys(data, SETTINGS_KEYS, src)
    out = dict(data)
    out["_source"] = src
    for k in ("rules", "tolerances"):
        if k in out and not isinstance(out[k], list):
            raise UsageError(f"{src}: '{k}' must be a list. Got {type(out[k]).__name__}.")
    return out


# ------------------------------------------------------------------------------------------
# curves
# ------------------------------------------------------------------------------------------
def _as_results(obj: Any, what: str) -> Results:
    if isinstance(obj, Results):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        paths = [obj]
    elif isinstance(obj, Iterable):
        paths = list(obj)
    else:
        raise UsageError(f"{what} must be a results path, a list of paths or a Results. Got {type(obj).__name__}.")
    for p in paths:
        if not Path(p).exists():
            hint = ("Write one with `ibscope check RESULTS --baseline B --update-baseline`." if what == "baseline"
                    else "Create it with `ibscope estimate STORE -o results.csv`.")
            raise DataError(f"The {what} results file '{p}' does not exist.", hint=hint)
        if Path(p).is_dir():
            raise DataError(f"The {what} results path '{p}' is a directory; expected a results CSV file.",
                            hint="Pass the -o file of `ibscope estimate` (e.g. results.csv).")
    return read_results(paths[0] if len(paths) == 1 else paths)  # not UTF-8 CSV text: a DataError naming the file


def _sources(obj: Any, res: Results) -> list[str]:
    if isinstance(obj, (str, os.PathLike)):
        return [str(obj)]
    if isinstance(obj, Results):
        return [str(res.path)] if res.path else []
    return [str(p) for p in obj]


def _in_unit(res: Results, unit: str) -> list[dict]:
    """Rows converted to ``unit``; rows without a value (cells ``ibscope estimate`` noted as not
    estimable) are left out, so they count as missing points."""
    return [r for r in res.to_unit(unit).rows if r["value"] is not None]


def _noted(res: Results, what: str) -> list[str]:
    rows = [r for r in res.rows if r["value"] is None]
    if not rows:
        return []
    return [f"{len(rows)} {what} row(s) have no value and were left out (first note: {rows[0].get('note') or '-'})"]


def _resolve_axis(align: str, tables: Sequence[list[dict]], pooled: bool) -> str:
    """The x column: ``align`` if given, else the first of epoch/step/checkpoint that every
    row has and that is unique within each curve (and run) of each table."""
    if align != "auto":
        for rows in tables:
            missing = sum(r[align] is None for r in rows)
            if missing:
                raise DataError(f"--align {align}: {missing} result row(s) have no '{align}'.",
                                hint="Use --align auto, or another of: epoch, step, checkpoint.")
        return align
    for col in AXES:
        ok = True
        for rows in tables:
            xs = [r[col] for r in rows]
            if any(x is None for x in xs):
                ok = False
                break
            keys = [k + (x,) for k, x in zip(map(_RUN_KEY, rows), xs)]  # run included: unique per run
            if len(set(keys)) != len(keys):
                ok = False
                break
        if ok:
            return col
    raise DataError("Cannot align the results: no column of epoch, step, checkpoint is present on every row "
                    "and unique within each curve.",
                    hint="Check that the tables come from `ibscope estimate`, or pass --align.")


_RUN_KEY = operator.itemgetter(*CURVE_FIELDS)
_POOLED_KEY = operator.itemgetter(*CURVE_FIELDS[1:])


def _key_dict(key: tuple) -> dict[str, Any]:
    return {f: v for f, v in zip(CURVE_FIELDS, key) if v is not None}


def _key_name(key: tuple) -> str:
    d = _key_dict(key)
    lead = "/".join(str(d[f]) for f in ("run", "split") if f in d)
    return f"{lead} {d['layer']} {d['estimator']} {d['quantity']}".strip()


@dataclass
class _Point:
    value: float
    stderr: float | None
    unit: str
    n_runs: int = 1
    spread: float | None = None   # sample sd over runs (pooled)
    params: Any = None
    n_samples: int | None = None


def _curves(rows: list[dict], axis: str, pooled: bool, what: str) -> dict[tuple, dict[Any, _Point]]:
    grouped: dict[tuple, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    keyf = (lambda r: (None,) + _POOLED_KEY(r)) if pooled else _RUN_KEY
    for r in rows:
        grouped[keyf(r)][r[axis]].append(r)
    out: dict[tuple, dict[Any, _Point]] = {}
    for key, pts in grouped.items():
        curve: dict[Any, _Point] = {}
        for x, rs in pts.items():
            r0 = rs[0]
            if len(rs) == 1:
                curve[x] = _Point(float(r0["value"]), r0["stderr"], r0["unit"], 1, None, r0.get("params"),
                                  r0.get("n_samples"))
                continue
            units = {r["unit"] for r in rs}
            if len(units) > 1:
                raise DataError(f"{what} curve {_key_name(key)} at {axis} {x} mixes units {sorted(units)}.")
            runs = [r["run"] for r in rs]
            if not pooled or len(set(runs)) != len(runs):
                raise DataError(
                    f"{what} results hold {len(rs)} rows for curve {_key_name(key)} at {axis} {x}"
                    f"{' in one run' if pooled else ''}; expected one.",
                    hint="Pass --align step or checkpoint if several checkpoints share an epoch"
                         f"{'' if pooled else ', or --seeds to pool runs'}.")
            vals = [float(r["value"]) for r in rs]
            mean = math.fsum(vals) / len(vals)
            spread = None
            if all(math.isfinite(v) for v in vals):
                spread = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            curve[x] = _Point(mean, None, r0["unit"], len(rs), spread, r0.get("params"), r0.get("n_samples"))
        out[key] = dict(sorted(curve.items(), key=lambda kv: kv[0]))
    return out


def _factor(src: str, dst: str) -> float:
    """nats <-> bits multiplicative factor."""
    if src == dst:
        return 1.0
    return math.log(2) if (src, dst) == ("bits", "nats") else 1.0 / math.log(2)


def _clean(o: Any) -> Any:
    """Non-finite floats become strings so that the JSON is strict (no NaN/Infinity)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, Mapping):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


# ------------------------------------------------------------------------------------------
# baseline comparison
# ------------------------------------------------------------------------------------------
def _tolerance_for(key: tuple, base: Tolerance, overrides: Sequence[ToleranceOverride]) -> tuple[Tolerance, list[str]]:
    tol, used = base, []
    kd = {f: v for f, v in zip(CURVE_FIELDS, key)}
    for o in overrides:
        if o.matches(kd):
            tol = tol.updated(o.spec, o.where)
            used.append(o.where)
    return tol, used


def _compare_curve(key, bcurve, ccurve, tol: Tolerance, used, axis, missing, extra, unit_label) -> CaseResult:
    name = _key_name(key)
    failing, extra_x, missing_x, sigma_missing = [], [], [], 0
    worst = None  # the point with the largest |diff| / tol
    units_b = {p.unit for p in bcurve.values()}
    units_c = {p.unit for p in ccurve.values()}
    if units_b != units_c:
        return CaseResult(name, "baseline", "fail",
                          f"unit mismatch: baseline in {sorted(units_b)}, current in {sorted(units_c)}; "
                          "only nats and bits convert",
                          {"curve": _key_dict(key), "baseline_units": sorted(units_b), "current_units": sorted(units_c)})
    unit = next(iter(units_b)) if units_b else unit_label
    n_compared = 0
    for x, b in bcurve.items():
        c = ccurve.get(x)
        if c is None:
            missing_x.append(x)
            continue
        n_compared += 1
        diff = c.value - b.value
        t = tol.atol + tol.rtol * abs(b.value)
        s = None
        if tol.sigma is not None:
            if b.spread is not None:
                s = b.spread * math.sqrt(1.0 / c.n_runs + 1.0 / b.n_runs)
            elif b.stderr is not None or c.stderr is not None:
                s = math.sqrt((b.stderr or 0.0) ** 2 + (c.stderr or 0.0) ** 2)
            if s is None:
                sigma_missing += 1
            else:
                t = max(t, tol.sigma * s)
        t_eff = t + _ROUNDING * max(1.0, abs(b.value))
        if not (math.isfinite(b.value) and math.isfinite(c.value)):
            bad = not (b.value == c.value or (math.isnan(b.value) and math.isnan(c.value)))
        elif tol.fail_on == "decrease":
            bad = diff < -t_eff
        elif tol.fail_on == "increase":
            bad = diff > t_eff
        else:
            bad = abs(diff) > t_eff
        ratio = abs(diff) / t if t > 0 else (0.0 if diff == 0 else math.inf)
        if not math.isfinite(diff):
            ratio = math.inf if bad else 0.0
        pt = {axis: x, "baseline": b.value, "current": c.value, "diff": diff, "tol": t,
              "sigma_sd": s, "ratio": ratio}
        if bad:
            failing.append(pt)
        if worst is None or ratio > worst["ratio"]:
            worst = pt
    for x in ccurve:
        if x not in bcurve:
            extra_x.append(x)
    details: dict[str, Any] = {
        "curve": _key_dict(key), "axis": axis, "unit": unit, "n_baseline_points": len(bcurve),
        "n_current_points": len(ccurve), "n_compared": n_compared,
        "tolerance": {"rtol": tol.rtol, "atol": tol.atol, "sigma": tol.sigma, "fail_on": tol.fail_on,
                      "overrides": used},
        "worst": worst, "failing_points": failing, "missing_points": missing_x, "extra_points": extra_x,
    }
    if tol.sigma is not None:
        details["points_without_uncertainty"] = sigma_missing
    pb = next((p.params for p in bcurve.values()), None)
    pc = next((p.params for p in ccurve.values()), None)
    if pb is not None and pc is not None and pb != pc:
        details["params_differ"] = {"baseline": pb, "current": pc}
    nb = sorted({p.n_samples for p in bcurve.values() if p.n_samples is not None})
    nc = sorted({p.n_samples for p in ccurve.values() if p.n_samples is not None})
    if nb and nc and nb != nc:  # e.g. plug-in I(X;T) is capped at log n: a different probe size moves it
        details["n_samples_differ"] = {"baseline": nb, "current": nc}
    status, msgs = "pass", []
    if failing:
        status = "fail"
        w = max(failing, key=lambda p: p["ratio"])
        msgs.append(f"{len(failing)} of {n_compared} points outside tolerance; worst at {axis} {w[axis]}: "
                    f"baseline {_fmt(w['baseline'])}, current {_fmt(w['current'])} {unit} "
                    f"(diff {w['diff']:+.4g}, tol {_fmt(w['tol'])})")
    if missing_x:
        if missing == "fail":
            status = "fail"
        elif missing == "warn" and status == "pass":
            status = "warn"
        if missing != "ignore":
            msgs.append(f"{len(missing_x)} baseline point(s) missing from current results ({axis} "
                        f"{', '.join(map(str, missing_x[:5]))}{' ...' if len(missing_x) > 5 else ''})")
    if extra_x and extra != "ignore":
        if extra == "fail":
            status = "fail"
        elif status == "pass":
            status = "warn"
        msgs.append(f"{len(extra_x)} extra point(s) not in the baseline ({axis} "
                    f"{', '.join(map(str, extra_x[:5]))}{' ...' if len(extra_x) > 5 else ''})")
    if tol.sigma is not None and sigma_missing and status != "fail":
        msgs.append(f"{sigma_missing} point(s) have no stderr or seed spread; sigma not applied there")
    if "params_differ" in details:
        msgs.append(f"estimator parameters differ: baseline {pb}, current {pc}")
    if "n_samples_differ" in details:
        msgs.append(f"sample counts differ: baseline {nb}, current {nc}")
    if status == "pass" and ("params_differ" in details or "n_samples_differ" in details):
        status = "warn"  # the numbers agree, but they may not measure the same thing
    if status == "pass" and not msgs:
        if worst is not None:
            msgs.append(f"{n_compared} points within tolerance (worst {axis} {worst[axis]}: "
                        f"|diff| {abs(worst['diff']):.3g} <= tol {_fmt(worst['tol'])} {unit})")
        else:
            msgs.append("no points to compare")
    return CaseResult(name, "baseline", status, "; ".join(msgs), details)


def compare(current: list[dict], baseline: list[dict], *, axis: str, pooled: bool, tol: Tolerance,
            overrides: Sequence[ToleranceOverride], missing: str, extra: str, unit: str) -> list[CaseResult]:
    """Compare two row lists (already in one unit) curve by curve."""
    bcurves = _curves(baseline, axis, pooled, "Baseline")
    ccurves = _curves(current, axis, pooled, "Current")
    cases = []
    for key, bc in bcurves.items():
        t, used = _tolerance_for(key, tol, overrides)
        if key not in ccurves:
            if missing == "ignore":
                continue
            cases.append(CaseResult(_key_name(key), "baseline", "fail" if missing == "fail" else "warn",
                                    f"curve missing from current results ({len(bc)} baseline points)",
                                    {"curve": _key_dict(key), "missing_curve": True, "n_baseline_points": len(bc)}))
            continue
        cases.append(_compare_curve(key, bc, ccurves[key], t, used, axis, missing, extra, unit))
    if extra != "ignore":
        for key, cc in ccurves.items():
            if key not in bcurves:
                cases.append(CaseResult(_key_name(key), "baseline", "fail" if extra == "fail" else "warn",
                                        f"extra curve not in the baseline ({len(cc)} points)",
                                        {"curve": _key_dict(key), "extra_curve": True, "n_current_points": len(cc)}))
    return cases


# ------------------------------------------------------------------------------------------
# shape rules
# ------------------------------------------------------------------------------------------
_COMMON = ("type", "name", "run", "split", "layer", "estimator", "quantity", "unit")
RULE_TYPES: dict[str, dict[str, Any]] = {
    "compression": {
        "keys": ("from", "to", "min_decrease"), "required": ("from", "min_decrease"), "quantity": "I(X;T)",
        "doc": "value at `from` minus value at `to` (default end) >= min_decrease (a compression phase exists)",
    },
    "decreases": {
        "keys": ("from", "to", "min_decrease"), "required": ("from",), "quantity": None,
        "doc": "value at `to` (default end) is below its value at `from` (by more than min_decrease, default 0)",
    },
    "increases": {
        "keys": ("from", "to", "min_increase"), "required": ("from",), "quantity": None,
        "doc": "value at `to` (default end) is above its value at `from` (by more than min_increase, default 0)",
    },
    "at_least": {
        "keys": ("at", "min"), "required": ("min",), "quantity": None,
        "doc": "value at `at` (default end) >= min",
    },
    "at_most": {
        "keys": ("at", "max"), "required": ("max",), "quantity": None,
        "doc": "value at `at` (default end) <= max",
    },
    "peak_epoch": {
        "keys": ("epoch", "within", "mode"), "required": ("epoch", "within"), "quantity": "I(X;T)",
        "doc": "the epoch of the maximum (mode: max) or minimum (mode: min) lies within +-within of epoch",
    },
}


@dataclass(frozen=True)
class Rule:
    type: str
    spec: dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        if self.spec.get("name"):
            return str(self.spec["name"])
        s = self.spec
        what = f"{s.get('quantity')} of {s.get('layer', 'each layer')}"
        u = s.get("unit", "")
        if self.type == "compression":
            return f"{what} decreases by >= {s['min_decrease']} {u or 'nats'} from {s['from']} to {s.get('to', 'end')}".strip()
        if self.type == "decreases":
            return f"{what} at {s.get('to', 'end')} below its value at {s['from']}"
        if self.type == "increases":
            return f"{what} at {s.get('to', 'end')} above its value at {s['from']}"
        if self.type == "at_least":
            return f"{what} at {s.get('at', 'end')} >= {s['min']} {u}".strip()
        if self.type == "at_most":
            return f"{what} at {s.get('at', 'end')} <= {s['max']} {u}".strip()
        return f"{s.get('mode', 'max')} of {what} within +-{s['within']} of {s['epoch']}"


def parse_rule(spec: Any, index: int) -> Rule:
    where = f"rule {index + 1}"
    if not isinstance(spec, Mapping):
        raise UsageError(f"{where} must be a mapping with a 'type'. Got {spec!r}.")
    if "type" not in spec:
        raise UsageError(f"{where} has no 'type'.", hint=f"Rule types: {', '.join(RULE_TYPES)}.")
    typ = spec["type"]
    if typ not in RULE_TYPES:
        raise unknown_name("rule type", str(typ), RULE_TYPES)
    info = RULE_TYPES[typ]
    where = f"rule {index + 1} ({typ}{': ' + str(spec['name']) if spec.get('name') else ''})"
    _check_keys(spec, _COMMON + info["keys"], where)
    for k in info["required"]:
        if k not in spec:
            raise UsageError(f"{where} needs '{k}'.", hint=f"{typ}: {info['doc']}.")
    s = dict(spec)
    if info["quantity"] and "quantity" not in s:
        s["quantity"] = info["quantity"]
    if "quantity" not in s:
        raise UsageError(f"{where} needs 'quantity' (e.g. 'I(T;Y)', 'local_rank').")
    for k in ("min_decrease", "min_increase", "within"):
        if k in s:
            s[k] = _num(s[k], f"{where}: '{k}'")
    for k in ("min", "max"):
        if k in s:
            s[k] = _num(s[k], f"{where}: '{k}'", minimum=None)
    if "epoch" in s:
        s["epoch"] = _num(s["epoch"], f"{where}: 'epoch'", minimum=None)
    for k in ("from", "to", "at"):
        if k in s:
            v = s[k]
            if isinstance(v, str) and v in ("end", "start", "peak"):
                if v == "peak" and k != "from":
                    raise UsageError(f"{where}: '{k}: peak' is not allowed; 'peak' is only for 'from'.")
                continue
            s[k] = _num(v, f"{where}: '{k}'", minimum=None)
    if "mode" in s:
        _choice(s["mode"], ("max", "min"), f"{where}: 'mode'")
    if "unit" in s:
        _choice(s["unit"], INFO_UNITS, f"{where}: 'unit'")
    if "layer" in s and not isinstance(s["layer"], (str, int)):
        raise UsageError(f"{where}: 'layer' must be a name, a glob, 'first', 'last' or an index. Got {s['layer']!r}.")
    return Rule(typ, s, index)


def _select_curves(rule: Rule, rows: list[dict], axis: str) -> list[tuple[tuple, list[tuple[Any, float, str]]]]:
    s = rule.spec
    cand = [r for r in rows if fnmatch.fnmatchcase(str(r["quantity"]), str(s["quantity"]))]
    for f in ("run", "split", "estimator"):
        if f in s:
            cand = [r for r in cand if fnmatch.fnmatchcase(str(r[f]), str(s[f]))]
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
        sel = s.get("layer")
        if sel is None:
            chosen = everything
        elif isinstance(sel, int) or (isinstance(sel, str) and sel.lstrip("-").isdigit()):
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


def _point_at(pts, where: Any, axis: str) -> tuple[Any, float, str]:
    """(x used, value, note) for 'start'/'end'/a number (nearest point; the note says so)."""
    if where == "end":
        return pts[-1][0], pts[-1][1], ""
    if where == "start":
        return pts[0][0], pts[0][1], ""
    xs = [p[0] for p in pts]
    if where < xs[0] or where > xs[-1]:
        raise _RuleFailure(f"{axis} {_fmt(where)} is outside the curve's range [{xs[0]}, {xs[-1]}]")
    best = min(pts, key=lambda p: (abs(p[0] - where), p[0]))
    note = "" if best[0] == where else f"nearest {axis} to requested {_fmt(where)}"
    return best[0], best[1], note


class _RuleFailure(Exception):
    pass


def _eval_rule(rule: Rule, key: tuple, pts, axis: str) -> CaseResult:
    s = rule.spec
    kd = {f: v for f, v in zip(CURVE_FIELDS, key)}
    name = f"{rule.label} [{_key_name(key)}]"
    units = {p[2] for p in pts}
    if len(units) > 1:
        return CaseResult(name, "rules", "fail", f"curve mixes units {sorted(units)}", {"curve": kd})
    unit = next(iter(units))
    # thresholds are in the rule's unit (default nats); convert them to the curve's unit
    f = 1.0
    if unit in INFO_UNITS:
        f = _factor(s.get("unit", "nats"), unit)
    elif "unit" in s:
        return CaseResult(name, "rules", "fail",
                          f"rule gives unit '{s['unit']}' but the curve is in '{unit}', which does not convert",
                          {"curve": kd})
    d: dict[str, Any] = {"rule": {k: v for k, v in s.items()}, "rule_index": rule.index + 1, "curve": kd,
                         "axis": axis, "unit": unit, "n_points": len(pts)}
    try:
        if rule.type in ("compression", "decreases", "increases"):
            if s["from"] == "peak":
                x0, v0 = max(pts, key=lambda p: (p[1], -p[0]))[:2]
                n0 = "peak of the curve"
            else:
                x0, v0, n0 = _point_at(pts, s["from"], axis)
            x1, v1, n1 = _point_at(pts, s.get("to", "end"), axis)
            if x1 <= x0:
                raise _RuleFailure(f"'to' point ({axis} {x1}) is not after 'from' point ({axis} {x0})")
            d.update({f"{axis}_from": x0, "value_from": v0, f"{axis}_to": x1, "value_to": v1})
            for n, tag in ((n0, "from"), (n1, "to")):
                if n:
                    d[f"note_{tag}"] = n
            if rule.type == "increases":
                change = v1 - v0
                need = s.get("min_increase", 0.0) * f
                ok = change > 0 if need == 0 else change >= need
                d.update({"increase": change, "required_increase": need})
                msg = (f"{axis} {x0} -> {x1}: {_fmt(v0)} -> {_fmt(v1)} {unit}, increase {change:+.4g} "
                       f"({'>' if need == 0 else '>='} {_fmt(need)} required)")
            else:
                change = v0 - v1
                need = s.get("min_decrease", 0.0) * f
                ok = change > 0 if need == 0 else change >= need
                d.update({"decrease": change, "required_decrease": need})
                msg = (f"{axis} {x0} -> {x1}: {_fmt(v0)} -> {_fmt(v1)} {unit}, decrease {change:+.4g} "
                       f"({'>' if need == 0 else '>='} {_fmt(need)} required)")
        elif rule.type in ("at_least", "at_most"):
            x, v, n = _point_at(pts, s.get("at", "end"), axis)
            if rule.type == "at_least":
                bound = s["min"] * f
                ok = v >= bound
                msg = f"at {axis} {x}: {_fmt(v)} {unit} (>= {_fmt(bound)} required)"
            else:
                bound = s["max"] * f
                ok = v <= bound
                msg = f"at {axis} {x}: {_fmt(v)} {unit} (<= {_fmt(bound)} required)"
            d.update({axis: x, "value": v, "bound": bound})
            if n:
                d["note"] = n
        else:  # peak_epoch
            mode = s.get("mode", "max")
            finite = [p for p in pts if math.isfinite(p[1])]
            if not finite:
                raise _RuleFailure("the curve has no finite values")
            pick = max if mode == "max" else min
            xp, vp = pick(finite, key=lambda p: (p[1], -p[0]) if mode == "max" else (p[1], p[0]))[:2]
            off = xp - s["epoch"]
            ok = abs(off) <= s["within"]
            d.update({f"{mode}_at": xp, "value": vp, "expected": s["epoch"], "within": s["within"], "offset": off})
            msg = (f"{mode} {_fmt(vp)} {unit} at {axis} {xp}; expected {_fmt(s['epoch'])} +- {_fmt(s['within'])} "
                   f"(offset {off:+g})")
    except _RuleFailure as exc:
        return CaseResult(name, "rules", "fail", str(exc), d)
    if any(not math.isfinite(v) for k, v in d.items() if k.startswith("value") and isinstance(v, float)):
        ok = False
        msg += "; a value is not finite"
    return CaseResult(name, "rules", "pass" if ok else "fail", msg, d)


def evaluate_rules(rules: Sequence[Rule], rows: list[dict], axis: str) -> list[CaseResult]:
    cases = []
    for rule in rules:
        if rule.type == "peak_epoch" and axis != "epoch":
            warnings.warn(f"rule {rule.index + 1} (peak_epoch): results have no epochs; its 'epoch' is read on the "
                          f"'{axis}' axis", stacklevel=2)
        matched = _select_curves(rule, rows, axis)
        if not matched:
            sel = {k: rule.spec[k] for k in SELECTOR_KEYS if k in rule.spec}
            have = sorted({r["quantity"] for r in rows})
            cases.append(CaseResult(f"{rule.label}", "rules", "fail",
                                    f"no curve matches {sel}; quantities present: {', '.join(have)}",
                                    {"rule": rule.spec, "rule_index": rule.index + 1, "matched": 0}))
            continue
        for key, pts in matched:
            if not pts:
                continue
            cases.append(_eval_rule(rule, key, pts, axis))
    return cases


# ------------------------------------------------------------------------------------------
# baseline writing
# ------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_baseline(results: Any, path: str | os.PathLike) -> Path:
    """Write ``results`` (path(s) or Results) as a baseline results table, atomically, with a
    provenance sidecar that records where it came from (source files + sha256, source
    provenance, ibscope version, time, git commit when available)."""
    from ibscope.store import file_sha256

    res = _as_results(results, "current")
    srcs = _sources(results, res)
    prov = dict(res.provenance or {})
    prov.pop("sources", None)
    prov["baseline"] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ibscope_version": __version__,
        "from": [{"path": s, "sha256": file_sha256(s) if Path(s).is_file() else None} for s in srcs],
        "n_rows": len(res.rows),
        "git_commit": _git_commit(),
    }
    return write_results(path, res.rows, prov)


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def run_check(
    results: Any,
    *,
    baseline: Any = None,
    rules: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    sigma: float | None = None,
    tolerances: Sequence[ToleranceOverride | Mapping | str] | None = None,
    unit: str | None = None,
    missing: str | None = None,
    extra: str | None = None,
    align: str | None = None,
    seeds: bool | None = None,
    update_baseline: bool = False,
) -> CheckReport:
    """Check ``results`` against a ``baseline`` and/or shape ``rules``.

    ``results`` / ``baseline``: results CSV path(s) or :class:`~ibscope.results.Results`.
    ``rules``: a YAML/JSON file, a mapping (keys as in the file) or a list of rules.
    Settings given here override those of the rules file, which override the defaults
    (rtol 0.1, atol 0.02, no sigma, unit nats, missing "fail", extra "warn", align auto).
    ``tolerances``: extra per-curve overrides (``ToleranceOverride``, a rules-file style
    mapping, or a ``--tol`` string), applied after the file's. ``seeds``: pool the runs as
    seeds (None = when sigma is set and the baseline holds several runs).
    ``update_baseline``: write the current results to ``baseline`` (with provenance) instead
    of comparing to it; rules are still evaluated.
    Raises DataError for unusable tables, UsageError for bad settings.
    """
    cfg = load_rules(rules)
    src = cfg.get("_source", "rules")

    def pick(name, given, default):
        return given if given is not None else cfg.get(name, default)

    rtol_v = _num(pick("rtol", rtol, DEFAULT_RTOL), "rtol")
    atol_v = _num(pick("atol", atol, DEFAULT_ATOL), "atol")
    sig = pick("sigma", sigma, None)
    sigma_v = None if sig is None else _num(sig, "sigma")
    unit_v = _choice(pick("unit", unit, "nats"), INFO_UNITS, "unit")
    missing_v = _choice(pick("missing", missing, "fail"), POLICIES, "missing")
    extra_v = _choice(pick("extra", extra, "warn"), POLICIES, "extra")
    align_v = _choice(pick("align", align, "auto"), ("auto",) + AXES, "align")
    seeds_v = pick("seeds", seeds, None)
    if seeds_v is not None and not isinstance(seeds_v, bool):
        raise UsageError(f"seeds must be true or false. Got {seeds_v!r}.")
    overrides = [parse_tolerance_entry(e, f"{src}: tolerances[{i}]") for i, e in enumerate(cfg.get("tolerances") or [])]
    for i, t in enumerate(tolerances or []):
        if isinstance(t, ToleranceOverride):
            overrides.append(t)
        elif isinstance(t, str):
            overrides.append(parse_tol_flag(t))
        else:
            overrides.append(parse_tolerance_entry(t, f"tolerances[{i}]"))
    rule_objs = [parse_rule(r, i) for i, r in enumerate(cfg.get("rules") or [])]
    if update_baseline and baseline is None:
        raise UsageError("--update-baseline needs --baseline PATH (where to write it).")
    if baseline is None and not rule_objs:
        raise UsageError("Nothing to check: give a baseline and/or rules.",
                         hint="Pass --baseline BASELINE.csv and/or --rules RULES.yaml (see docs/check.md).")

    cur = _as_results(results, "current")
    cur_rows = _in_unit(cur, unit_v)
    report = CheckReport([], sources={"results": _sources(results, cur)})
    report.notes += _noted(cur, "current")
    if rules is not None:
        report.sources["rules"] = src

    base_rows: list[dict] | None = None
    pooled = False
    if baseline is not None and not update_baseline:
        base = _as_results(baseline, "baseline")
        report.sources["baseline"] = _sources(baseline, base)
        base_rows = _in_unit(base, unit_v)
        report.notes += _noted(base, "baseline")
        base_runs = sorted({r["run"] for r in base_rows})
        pooled = bool(seeds_v) if seeds_v is not None else (sigma_v is not None and len(base_runs) >= 2)
        if pooled:
            report.notes.append(f"runs pooled as seeds: baseline {base_runs}, current "
                                f"{sorted({r['run'] for r in cur_rows})}")

    axis = _resolve_axis(align_v, [cur_rows] + ([base_rows] if base_rows is not None else []), pooled)
    report.settings = {"rtol": rtol_v, "atol": atol_v, "sigma": sigma_v, "unit": unit_v, "missing": missing_v,
                       "extra": extra_v, "align": axis, "seeds_pooled": pooled,
                       "tolerances": [{"where": o.where, "match": o.match or {"quantity|estimator": o.any_name},
                                       **o.spec} for o in overrides],
                       "n_rules": len(rule_objs), "update_baseline": update_baseline}

    if base_rows is not None:
        report.cases += compare(cur_rows, base_rows, axis=axis, pooled=pooled,
                                tol=Tolerance(rtol_v, atol_v, sigma_v), overrides=overrides,
                                missing=missing_v, extra=extra_v, unit=unit_v)
        if not report.cases:
            report.notes.append("baseline and current results share no curves to compare")
    if rule_objs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report.cases += evaluate_rules(rule_objs, cur_rows, axis)
        report.notes += [str(w.message) for w in caught]
    if update_baseline:
        out = write_baseline(results, baseline)
        report.sources["baseline_written"] = str(out)
        report.notes.append(f"baseline written to {out} ({len(cur.rows)} rows)")
    return report
