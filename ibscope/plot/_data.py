"""The data half of the plots: loading, validation, unit conversion, arrays to draw.

Everything here is pure (numpy only, no matplotlib drawing) so it can be checked numerically.

* :func:`load_results` reads one or several results files (or takes a ``Results``); when several
  files reuse the same run names, runs are renamed ``<file stem>/<run>`` so they stay apart.
* :func:`select` filters by estimator/split/run/layer/quantity, failing with a did-you-mean on
  unknown names (exit 2).
* :func:`prepare` converts information rows to the plot unit and refuses quantities whose rows
  come in units that cannot be converted into one another (exit 4).
* :func:`cubes` lays rows out as ``(runs, times, layers)`` arrays; :func:`summarize` gives the
  median over runs and an inter-quantile band.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ibscope.errors import DataError, UsageError, unknown_name
from ibscope.results import INFO_UNITS, Results, read_results, time_axis  # noqa: F401 - time_axis re-exported
from ibscope.trust import check_null_mode, has_null, is_saturated, validation_key, validation_tasks
from ibscope.trust import truth_interval as truth_interval_of

log = logging.getLogger(__name__)

IXT = "I(X;T)"
ITY = "I(T;Y)"
PAIR = (IXT, ITY)
METRICS = "metrics"
RUN_MODES = ("median", "all")
# keys that :func:`apply_trust` adds to plotted rows (never written to a results table)
SATURATED = "_saturated"      # the saturation flag of the estimate as estimated (before any subtraction)
SUBTRACTED = "_null_subtracted"  # value is value - null_mean (``--null subtract``)
TRUTH_LO = "_truth_lo"        # error bar from a validation run
TRUTH_HI = "_truth_hi"
# parameters that only one side of a pair carries (``ibscope estimate`` records where X came from on
# the I(X;T) rows): not part of an estimator setting's identity; shown by side_note()
SIDE_KEYS = ("x_source",)


def load_results(results: Any) -> Results:
    """A :class:`Results` from a Results, a path, or a list of paths."""
    if isinstance(results, Results):
        res = results
    else:
        paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
        if not paths:
            raise UsageError("No results file given.", hint="Pass the CSV written by `ibscope estimate`.")
        parts = [read_results(p) for p in paths]
        if len(parts) == 1:
            res = parts[0]
        else:
            seen: dict[str, int] = {}
            for part in parts:
                for run in part.unique("run"):
                    seen[run] = seen.get(run, 0) + 1
            clash = any(v > 1 for v in seen.values())
            rows: list[dict] = []
            for p, part in zip(paths, parts):
                for r in part.rows:
                    r = dict(r)
                    if clash:
                        r["run"] = f"{Path(p).stem}/{r['run']}"
                    rows.append(r)
            if clash:
                log.info("Several results files share run names; runs renamed to '<file stem>/<run>'.")
            prov = dict(parts[0].provenance)
            prov["sources"] = [str(p) for p in paths]
            prov["per_source"] = {str(p): part.provenance for p, part in zip(paths, parts)}
            res = Results(rows, prov, Path(paths[0]))
    if not res.rows:
        where = f" '{res.path}'" if res.path else ""
        raise DataError(f"The results table{where} holds no rows; there is nothing to plot.",
                        hint="Run `ibscope estimate STORE -o results.csv` first.")
    return res


def select(res: Results, *, estimators: Sequence[str] | None = None, splits: Sequence[str] | None = None,
           runs: Sequence[str] | None = None, layers: Sequence[str] | None = None,
           quantities: Sequence[str] | None = None) -> Results:
    """Rows matching the filters; every name must exist (UsageError with did-you-mean otherwise).

    Training-metric rows (estimator "metrics", layer "-") survive the estimator and layer filters,
    so the accuracy/loss panel stays with the plane.
    """
    rows = res.rows
    info_rows = [r for r in rows if r["estimator"] != METRICS]

    def check(kind: str, col: str, wanted, pool):
        if not wanted:
            return None
        have = {r[col] for r in pool}
        for w in wanted:
            if w not in have:
                raise unknown_name(kind, w, have)
        return set(wanted)

    est = check("estimator", "estimator", estimators, info_rows)
    spl = check("split", "split", splits, rows)
    run = check("run", "run", runs, rows)
    lay = check("layer", "layer", layers, info_rows)
    qty = check("quantity", "quantity", quantities, rows)
    out = []
    for r in rows:
        metric = r["estimator"] == METRICS
        if est is not None and not metric and r["estimator"] not in est:
            continue
        if spl is not None and r["split"] not in spl:
            continue
        if run is not None and r["run"] not in run:
            continue
        if lay is not None and not metric and r["layer"] not in lay:
            continue
        if qty is not None and r["quantity"] not in qty:
            continue
        out.append(r)
    if not out:
        raise DataError("No rows are left after filtering.", hint="Loosen --estimator/--split/--run/--layer/--quantity.")
    return Results(out, res.provenance, res.path)


def prepare(res: Results, unit: str) -> Results:
    """Convert nats/bits rows to ``unit`` and check every quantity has one unit.

    Rows without a value (cells ``ibscope estimate`` could not estimate; their ``note`` says
    why) are left out: curves show a gap there.
    """
    if unit not in INFO_UNITS:
        raise UsageError(f"--unit must be one of {', '.join(INFO_UNITS)}. Got {unit!r}.")
    valued = [r for r in res.rows if r["value"] is not None]
    if len(valued) < len(res.rows):
        first = next(r for r in res.rows if r["value"] is None)
        if not valued:
            raise DataError(f"Every row of the results has no value; there is nothing to draw. First note: "
                            f"{first.get('note') or '-'}",
                            hint="See the 'note' column of the table for why each cell could not be estimated.")
        log.info("%d row(s) without a value are not drawn (first note: %s).", len(res.rows) - len(valued),
                 first.get("note") or "-")
        res = Results(valued, res.provenance, res.path)
    units: dict[str, set] = {}
    for r in res.rows:
        units.setdefault(r["quantity"], set()).add(r["unit"])
    for q, us in units.items():
        families = {"information" if u in INFO_UNITS else u for u in us}
        if len(families) > 1:
            raise DataError(
                f"Quantity '{q}' has rows in units {sorted(us)} that cannot be converted into one another; "
                "one axis cannot show them together.",
                hint="Only nats and bits convert. Filter with --estimator/--quantity or fix the table that mixed them.",
            )
    conv = res.to_unit(unit)
    return conv


def apply_trust(res: Results, null: str = "band", validation: Any = None) -> tuple[Results, dict]:
    """Rows as plotted: saturation flags fixed from the estimates as estimated, the permutation null
    subtracted (``null="subtract"``: value - null_mean where the row has a null) or dropped
    (``"off"``), and, with ``validation`` (a folder or validation.csv of ``ibscope validate``, or its
    rows), error bars: where the truth lies for each estimate. Call after :func:`prepare`
    (values already in the plot unit). Returns the rows and a summary (counts for captions).
    """
    from ibscope.trust import read_validation

    check_null_mode(null)
    ranges: dict = {}
    if validation is not None:
        vrows = read_validation(validation) if isinstance(validation, (str, os.PathLike)) else list(validation)
        units = {r["unit"] for r in res.rows if r["unit"] in INFO_UNITS}
        ranges = validation_tasks(vrows, next(iter(units)) if units else "nats")
    info: dict[str, Any] = {"null_rows": 0, "subtracted": 0, "without_null": 0, "saturated": 0, "validated": 0,
            "not_validated": 0, "null_mode": null}
    out = []
    for r in res.rows:
        if r["estimator"] == METRICS:
            out.append(r)
            continue
        r = dict(r)
        r[SATURATED] = is_saturated(r)
        info["saturated"] += bool(r[SATURATED])
        raw = r["value"]
        if has_null(r):
            info["null_rows"] += 1
            if null == "subtract":
                r["value"] = r["value"] - r["null_mean"]
                r[SUBTRACTED] = True
                info["subtracted"] += 1
            elif null == "off":
                r["null_mean"] = r["null_std"] = None
        elif r["unit"] in INFO_UNITS:
            info["without_null"] += 1
        if ranges and r["unit"] in INFO_UNITS:
            iv = truth_interval_of(raw, ranges.get(validation_key(r)) or [])
            if iv is None:
                info["not_validated"] += 1
            else:
                shift = r["value"] - raw  # the null mean, when subtracted
                r[TRUTH_LO], r[TRUTH_HI] = iv[0] + shift, iv[1] + shift
                info["validated"] += 1
        out.append(r)
    # value - null_mean has no cap: no cap line (at H(Y), log n) on an axis of subtracted values
    subtracted_q = {(r["quantity"], r["estimator"]) for r in out if r.get(SUBTRACTED)}
    out = [dict(r, cap=None) if (r["quantity"], r["estimator"]) in subtracted_q else r for r in out]
    return Results(out, res.provenance, res.path), info


def saturated_points(cube: Cube) -> np.ndarray:
    """(times, layers) bool: saturated in at least half the runs that have a flag (NaN-safe)."""
    if cube.saturated is None:
        return np.zeros(cube.value.shape[1:], bool)
    s = cube.saturated
    known = np.isfinite(s)
    n = known.sum(axis=0)
    hits = np.where(known, s, 0.0).sum(axis=0)
    return (n > 0) & (hits >= 0.5 * np.maximum(n, 1))


def null_interval(cube: Cube, k: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(times, layers) arrays of null_mean - k*null_std and null_mean + k*null_std (median over runs)."""
    if cube.null_mean is None:
        nan = np.full(cube.value.shape[1:], np.nan)
        return nan, nan
    assert cube.null_std is not None  # set together with null_mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = np.nanmedian(cube.null_mean - k * cube.null_std, axis=0)
        hi = np.nanmedian(cube.null_mean + k * cube.null_std, axis=0)
    return lo, hi


def truth_interval(cube: Cube) -> tuple[np.ndarray, np.ndarray]:
    """(times, layers) validation error bars (median over runs)."""
    if cube.truth_lo is None:
        nan = np.full(cube.value.shape[1:], np.nan)
        return nan, nan
    assert cube.truth_hi is not None  # set together with truth_lo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(cube.truth_lo, axis=0), np.nanmedian(cube.truth_hi, axis=0)


@dataclass(frozen=True, order=True)
class Setting:
    """An estimator with one set of hyper-parameters (a facet in comparisons)."""

    estimator: str
    params_json: str = "{}"

    @classmethod
    def of(cls, row: dict) -> Setting:
        params = {k: v for k, v in (row.get("params") or {}).items() if k not in SIDE_KEYS}
        return cls(row["estimator"], json.dumps(params, sort_keys=True, default=str))

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    def label(self) -> str:
        p = {k: v for k, v in self.params.items() if v is not None}  # None = "automatic": left out of titles
        if not p:
            return self.estimator
        return f"{self.estimator} (" + ", ".join(f"{k}={_short(v)}" for k, v in p.items()) + ")"

    def slug(self, with_params: bool) -> str:
        if not with_params or not self.params:
            return slug(self.estimator)
        body = slug("-".join(f"{k}{_short(v)}" for k, v in self.params.items()))
        if len(body) > 40:
            body = hashlib.sha1(self.params_json.encode()).hexdigest()[:8]
        return f"{slug(self.estimator)}_{body}"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def slug(text: str) -> str:
    """File-name-safe form: 'I(X;T)' -> 'I_X_T'.

    Only letters, digits, '_', '.' and '-'; no leading or trailing '.' or '_' (so never '..' or a
    hidden file); names from results files (split, quantity, estimator) longer than 80 characters
    end in a hash of the full text, so that file names stay short and distinct.
    """
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.") or "x"
    if len(s) > 80:
        s = s[:71] + "_" + hashlib.sha1(str(text).encode()).hexdigest()[:8]
    return s


def side_note(rows: Iterable[dict]) -> str:
    """'X: identity' style note for the side-only parameters found in ``rows`` ('' when none)."""
    found: dict[str, dict] = {}
    for r in rows:
        for k in SIDE_KEYS:
            v = (r.get("params") or {}).get(k)
            if v is not None:
                found.setdefault(k, {})[str(v)] = None
    return "; ".join(f"{k.split('_')[0].upper()} = {', '.join(v)}" for k, v in found.items())


def settings(rows: Iterable[dict], quantities: Sequence[str] | None = None) -> list[Setting]:
    """Estimator settings (in first-seen order) of the non-metric rows, optionally with a quantity."""
    out: dict[Setting, None] = {}
    for r in rows:
        if r["estimator"] == METRICS:
            continue
        if quantities is not None and r["quantity"] not in quantities:
            continue
        out.setdefault(Setting.of(r), None)
    return list(out)


def pair_settings(rows: Sequence[dict]) -> list[Setting]:
    """Settings that give both I(X;T) and I(T;Y) (those draw an information plane)."""
    x = set(settings(rows, [IXT]))
    return [s for s in settings(rows, [ITY]) if s in x]


def rows_of(rows: Iterable[dict], setting: Setting | None = None, split: str | None = None,
            quantity: str | None = None) -> list[dict]:
    out = []
    for r in rows:
        if setting is not None and (r["estimator"] != setting.estimator or Setting.of(r) != setting):
            continue
        if split is not None and r["split"] != split:
            continue
        if quantity is not None and r["quantity"] != quantity:
            continue
        out.append(r)
    return out


def layer_order(rows: Iterable[dict]) -> list[str]:
    """Layers from input to output: by layer_index, then first appearance."""
    first: dict[str, tuple] = {}
    for i, r in enumerate(rows):
        if r["layer"] == "-" or r["estimator"] == METRICS:
            continue
        li = r["layer_index"]
        key = (li if li is not None else math.inf, i)
        if r["layer"] not in first or key < first[r["layer"]]:
            first[r["layer"]] = key
    return sorted(first, key=lambda k: first[k])


@dataclass
class Cube:
    """Values of one quantity laid out as ``(runs, times, layers)``; NaN where absent."""

    quantity: str
    unit: str
    runs: list[str]
    times: np.ndarray
    layers: list[str]
    value: np.ndarray
    stderr: np.ndarray
    caps: list[float] = field(default_factory=list)
    n_samples: list[int] = field(default_factory=list)
    #: permutation null (mean, std) in the plot unit; NaN where the row has none
    null_mean: np.ndarray | None = None
    null_std: np.ndarray | None = None
    #: 1.0 saturated, 0.0 not, NaN unknown (no cap); see ibscope.trust.is_saturated
    saturated: np.ndarray | None = None
    #: error bars from a validation run (``ibscope plot --validation``): where the truth lies; NaN without
    truth_lo: np.ndarray | None = None
    truth_hi: np.ndarray | None = None

    @property
    def has_stderr(self) -> bool:
        return bool(np.isfinite(self.stderr).any())

    @property
    def has_null(self) -> bool:
        return self.null_mean is not None and bool(np.isfinite(self.null_mean).any())

    @property
    def has_truth(self) -> bool:
        return self.truth_lo is not None and bool(np.isfinite(self.truth_lo).any())


def cubes(rows: Sequence[dict], quantities: Sequence[str], time_col: str,
          layers: Sequence[str] | None = None, runs: Sequence[str] | None = None,
          times: Sequence[float] | None = None, layer_col: str = "layer") -> dict[str, Cube]:
    """One :class:`Cube` per quantity, all on the same runs/times/layers axes.

    ``layer_col="quantity"`` lays run-level rows (training metrics) out with one "layer" per
    metric name. Two rows for the same (run, time, layer, quantity) are a DataError: the table
    holds duplicates (the same results file given twice, or two settings not told apart).
    """
    sel = [r for r in rows if r["quantity"] in quantities]
    run_l = list(runs) if runs is not None else list(dict.fromkeys(r["run"] for r in sel))
    time_l = np.asarray(sorted({float(r[time_col]) for r in sel}) if times is None else list(times), float)
    lay_l = list(layers) if layers is not None else (
        layer_order(sel) if layer_col == "layer" else list(dict.fromkeys(r[layer_col] for r in sel)))
    ri = {k: i for i, k in enumerate(run_l)}
    ti = {float(k): i for i, k in enumerate(time_l)}
    li = {k: i for i, k in enumerate(lay_l)}
    out: dict[str, Cube] = {}
    for q in quantities:
        shape = (len(run_l), len(time_l), len(lay_l))
        val = np.full(shape, np.nan)
        err = np.full(shape, np.nan)
        nm, ns_, sat = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
        tlo, thi = np.full(shape, np.nan), np.full(shape, np.nan)
        filled = np.zeros(shape, bool)
        caps: dict[float, None] = {}
        ns: dict[int, None] = {}
        unit = ""
        for r in sel:
            if r["quantity"] != q:
                continue
            key = (r["run"], float(r[time_col]), r[layer_col])
            if key[0] not in ri or key[1] not in ti or key[2] not in li:
                continue
            idx = (ri[key[0]], ti[key[1]], li[key[2]])
            if filled[idx]:
                raise DataError(
                    f"The results hold two rows for quantity '{q}', estimator '{r['estimator']}', run '{r['run']}', "
                    f"split '{r['split']}', {time_col} {r[time_col]}, layer '{r['layer']}'.",
                    hint="Was the same results file given twice? Filter with --run/--split/--estimator.",
                )
            filled[idx] = True
            val[idx] = r["value"]
            if r["stderr"] is not None:
                err[idx] = r["stderr"]
            if r.get("null_mean") is not None and r.get("null_std") is not None and not r.get(SUBTRACTED):
                nm[idx], ns_[idx] = r["null_mean"], r["null_std"]
            flag = r.get(SATURATED, is_saturated(r))
            if flag is not None:
                sat[idx] = float(flag)
            if r.get(TRUTH_LO) is not None:
                tlo[idx], thi[idx] = r[TRUTH_LO], r[TRUTH_HI]
            if r["cap"] is not None and math.isfinite(r["cap"]):
                caps.setdefault(round(float(r["cap"]), 9), None)
            if r["n_samples"] is not None:
                ns.setdefault(int(r["n_samples"]), None)
            unit = r["unit"]
        out[q] = Cube(q, unit, run_l, time_l, lay_l, val, err, sorted(caps), sorted(ns), nm, ns_, sat, tlo, thi)
    return out


def summarize(value: np.ndarray, mode: str = "median", band: tuple[float, float] = (25.0, 75.0)):
    """Median over runs (axis 0) and the band's lower/upper percentiles (None with one run).

    ``mode`` "median" and "all" give the same centre line; "all" callers also draw each run.
    """
    if mode not in RUN_MODES:
        raise UsageError(f"--runs must be one of {', '.join(RUN_MODES)}. Got {mode!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are gaps, drawn as gaps
        med = np.nanmedian(value, axis=0)
        if value.shape[0] < 2:
            return med, None, None
        lo = np.nanpercentile(value, band[0], axis=0)
        hi = np.nanpercentile(value, band[1], axis=0)
    return med, lo, hi


def parse_band(text: str | Sequence[float]) -> tuple[float, float]:
    """'25:75' (percentiles) -> (25.0, 75.0); checks 0 <= lo < hi <= 100."""
    if isinstance(text, str):
        parts = re.split(r"[:,]", text.strip())
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError:
            raise UsageError(f"--band expects two percentiles LO:HI such as 25:75. Got {text!r}.") from None
    else:
        lo, hi = (float(v) for v in text)
    if not (0 <= lo < hi <= 100):
        raise UsageError(f"--band percentiles must satisfy 0 <= LO < HI <= 100. Got {lo:g}:{hi:g}.")
    return lo, hi


def cap_label(quantity: str, cap: float, unit: str, n_samples: Sequence[int]) -> str:
    """'log n = 12.00 bits' when the cap is log n of the rows' sample count, 'H(Y) = ...' for I(T;Y)."""
    if quantity == IXT:
        for n in n_samples:
            ln = math.log(n) / (math.log(2) if unit == "bits" else 1.0)
            if n > 0 and abs(ln - cap) < 1e-6 * max(1.0, abs(cap)):
                return f"log n = {cap:.2f} {unit}"
        return f"cap of I(X;T) = {cap:.2f} {unit}"
    if quantity == ITY:
        return f"H(Y) = {cap:.2f} {unit}"
    return f"cap = {cap:.3g} {unit}"
