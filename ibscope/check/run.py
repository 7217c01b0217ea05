"""``run_check``: read the tables, settle the settings, compare with the baseline, apply the rules;
and ``write_baseline``."""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from ibscope._version import __version__
from ibscope.check.baseline import compare
from ibscope.check.curves import as_results, in_unit, noted, resolve_axis, sources
from ibscope.check.report import CheckReport
from ibscope.check.rules import evaluate_rules, parse_rule
from ibscope.check.settings import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    Tolerance,
    ToleranceOverride,
    load_rules,
    parse_tol_flag,
    parse_tolerance_entry,
    resolve_settings,
)
from ibscope.errors import UsageError
from ibscope.results import write_results


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

    res = as_results(results, "current")
    srcs = sources(results, res)
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
    st = resolve_settings(cfg, dict(rtol=rtol, atol=atol, sigma=sigma, unit=unit, missing=missing, extra=extra,
                                    align=align, seeds=seeds))
    rtol_v = DEFAULT_RTOL if st.rtol is None else st.rtol
    atol_v = DEFAULT_ATOL if st.atol is None else st.atol
    sigma_v = st.sigma
    unit_v = st.unit or "nats"
    missing_v = st.missing or "fail"
    extra_v = st.extra or "warn"
    align_v = st.align or "auto"
    overrides = [parse_tolerance_entry(e, f"{src}: tolerances[{i}]") for i, e in enumerate(cfg.get("tolerances") or [])]
    for i, t in enumerate(tolerances or []):
        if isinstance(t, ToleranceOverride):
            overrides.append(t)
        elif isinstance(t, str):
            overrides.append(parse_tol_flag(t))
        else:
            overrides.append(parse_tolerance_entry(t, f"tolerances[{i}]"))
    rule_objs = []
    for i, r in enumerate(cfg.get("rules") or []):
        try:
            rule_objs.append(parse_rule(r, i))
        except UsageError as exc:  # named like the file's other errors: FILE: rule N (...): ...
            raise UsageError(f"{src}: {exc.message}", hint=exc.hint) from None
    if update_baseline and baseline is None:
        raise UsageError("--update-baseline needs --baseline PATH (where to write it).")
    if baseline is None and not rule_objs:
        raise UsageError("Nothing to check: give a baseline and/or rules.",
                         hint="Pass --baseline BASELINE.csv and/or --rules RULES.yaml (see docs/check.md).")

    cur = as_results(results, "current")
    cur_rows = in_unit(cur, unit_v)
    report = CheckReport([], sources={"results": sources(results, cur)})
    report.notes += noted(cur, "current")
    if rules is not None:
        report.sources["rules"] = src

    base_rows: list[dict] | None = None
    pooled = False
    if baseline is not None and not update_baseline:
        base = as_results(baseline, "baseline")
        report.sources["baseline"] = sources(baseline, base)
        base_rows = in_unit(base, unit_v)
        report.notes += noted(base, "baseline")
        base_runs = sorted({r["run"] for r in base_rows})
        pooled = bool(st.seeds) if st.seeds is not None else (sigma_v is not None and len(base_runs) >= 2)
        if pooled:
            report.notes.append(f"runs pooled as seeds: baseline {base_runs}, current "
                                f"{sorted({r['run'] for r in cur_rows})}")

    axis = resolve_axis(align_v, [cur_rows] + ([base_rows] if base_rows is not None else []))
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
