"""Baseline comparison: a current curve against the baseline's, point by point.

A point holds when ``|current - baseline| <= tol`` with
``tol = max(atol + rtol * |baseline|, sigma * s)``, where ``s`` is the standard deviation of
the difference: ``sqrt(se_b**2 + se_c**2)`` from the tables' ``stderr`` columns or, for
pooled seeds, ``sd_seeds * sqrt(1/m + 1/n)``. ``fail_on`` restricts failures to one direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ibscope.check.curves import Point, curves, fmt, key_dict, key_name
from ibscope.check.report import CaseResult
from ibscope.check.settings import CURVE_FIELDS, Tolerance, ToleranceOverride

# relative rounding guard: a nats->bits->nats round trip must not fail a zero tolerance
_ROUNDING = 1e-12


@dataclass(frozen=True)
class PointVerdict:
    """The arithmetic for one x: the difference, the tolerance in force and whether it fails."""

    x: Any
    baseline: float
    current: float
    diff: float
    tol: float
    sigma_sd: float | None   # the sd used for sigma (None: sigma off or nothing to compute it from)
    ratio: float             # |diff| / tol: > 1 is outside
    bad: bool

    def as_dict(self, axis: str) -> dict[str, Any]:
        return {axis: self.x, "baseline": self.baseline, "current": self.current, "diff": self.diff,
                "tol": self.tol, "sigma_sd": self.sigma_sd, "ratio": self.ratio}


def point_verdict(x: Any, b: Point, c: Point, tol: Tolerance) -> PointVerdict:
    """Compare one point: ``tol = max(atol + rtol*|b|, sigma*s)``; non-finite values hold only when equal."""
    diff = c.value - b.value
    t = tol.atol + tol.rtol * abs(b.value)
    s = None
    if tol.sigma is not None:
        if b.spread is not None:
            s = b.spread * math.sqrt(1.0 / c.n_runs + 1.0 / b.n_runs)
        elif b.stderr is not None or c.stderr is not None:
            s = math.sqrt((b.stderr or 0.0) ** 2 + (c.stderr or 0.0) ** 2)
        if s is not None:
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
    return PointVerdict(x, b.value, c.value, diff, t, s, ratio, bad)


def _xs(xs: list) -> str:
    return f"{', '.join(map(str, xs[:5]))}{' ...' if len(xs) > 5 else ''}"


def compare_curve(key: tuple, bcurve: dict[Any, Point], ccurve: dict[Any, Point], tol: Tolerance,
                  used: list[str], *, axis: str, missing: str, extra: str, unit: str) -> CaseResult:
    """One baseline test case: the verdicts of the shared points, then missing/extra points and
    provenance differences summarised into a status and a message."""
    name = key_name(key)
    units_b = {p.unit for p in bcurve.values()}
    units_c = {p.unit for p in ccurve.values()}
    if units_b != units_c:
        return CaseResult(name, "baseline", "fail",
                          f"unit mismatch: baseline in {sorted(units_b)}, current in {sorted(units_c)}; "
                          "only nats and bits convert",
                          {"curve": key_dict(key), "baseline_units": sorted(units_b), "current_units": sorted(units_c)})
    unit = next(iter(units_b)) if units_b else unit
    verdicts = [point_verdict(x, b, ccurve[x], tol) for x, b in bcurve.items() if x in ccurve]
    return summarize(key, bcurve, ccurve, verdicts, tol, used, axis=axis, missing=missing, extra=extra, unit=unit)


def summarize(key: tuple, bcurve: dict[Any, Point], ccurve: dict[Any, Point], verdicts: Sequence[PointVerdict],
              tol: Tolerance, used: list[str], *, axis: str, missing: str, extra: str, unit: str) -> CaseResult:
    """Status, message and details of one baseline curve from its point verdicts."""
    name = key_name(key)
    failing = [v.as_dict(axis) for v in verdicts if v.bad]
    worst_v = None
    for v in verdicts:
        if worst_v is None or v.ratio > worst_v.ratio:
            worst_v = v
    worst = worst_v.as_dict(axis) if worst_v is not None else None
    missing_x = [x for x in bcurve if x not in ccurve]
    extra_x = [x for x in ccurve if x not in bcurve]
    sigma_missing = sum(v.sigma_sd is None for v in verdicts) if tol.sigma is not None else 0
    n_compared = len(verdicts)
    details: dict[str, Any] = {
        "curve": key_dict(key), "axis": axis, "unit": unit, "n_baseline_points": len(bcurve),
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
                    f"baseline {fmt(w['baseline'])}, current {fmt(w['current'])} {unit} "
                    f"(diff {w['diff']:+.4g}, tol {fmt(w['tol'])})")
    if missing_x:
        if missing == "fail":
            status = "fail"
        elif missing == "warn" and status == "pass":
            status = "warn"
        if missing != "ignore":
            msgs.append(f"{len(missing_x)} baseline point(s) missing from current results ({axis} {_xs(missing_x)})")
    if extra_x and extra != "ignore":
        if extra == "fail":
            status = "fail"
        elif status == "pass":
            status = "warn"
        msgs.append(f"{len(extra_x)} extra point(s) not in the baseline ({axis} {_xs(extra_x)})")
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
                        f"|diff| {abs(worst['diff']):.3g} <= tol {fmt(worst['tol'])} {unit})")
        else:
            msgs.append("no points to compare")
    return CaseResult(name, "baseline", status, "; ".join(msgs), details)


def tolerance_for(key: tuple, base: Tolerance, overrides: Sequence[ToleranceOverride]) -> tuple[Tolerance, list[str]]:
    """The tolerance for one curve: ``base`` updated by every matching override, in order."""
    tol, used = base, []
    kd = {f: v for f, v in zip(CURVE_FIELDS, key)}
    for o in overrides:
        if o.matches(kd):
            tol = tol.updated(o.spec, o.where)
            used.append(o.where)
    return tol, used


def compare(current: list[dict], baseline: list[dict], *, axis: str, pooled: bool, tol: Tolerance,
            overrides: Sequence[ToleranceOverride], missing: str, extra: str, unit: str) -> list[CaseResult]:
    """Compare two row lists (already in one unit) curve by curve."""
    bcurves = curves(baseline, axis, pooled, "Baseline")
    ccurves = curves(current, axis, pooled, "Current")
    cases = []
    for key, bc in bcurves.items():
        t, used = tolerance_for(key, tol, overrides)
        if key not in ccurves:
            if missing == "ignore":
                continue
            cases.append(CaseResult(key_name(key), "baseline", "fail" if missing == "fail" else "warn",
                                    f"curve missing from current results ({len(bc)} baseline points)",
                                    {"curve": key_dict(key), "missing_curve": True, "n_baseline_points": len(bc)}))
            continue
        cases.append(compare_curve(key, bc, ccurves[key], t, used, axis=axis, missing=missing, extra=extra, unit=unit))
    if extra != "ignore":
        for key, cc in ccurves.items():
            if key not in bcurves:
                cases.append(CaseResult(key_name(key), "baseline", "fail" if extra == "fail" else "warn",
                                        f"extra curve not in the baseline ({len(cc)} points)",
                                        {"curve": key_dict(key), "extra_curve": True, "n_current_points": len(cc)}))
    return cases
