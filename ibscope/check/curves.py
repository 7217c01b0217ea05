"""Results tables as curves: rows grouped by ``(run, split, layer, estimator, quantity)`` and
indexed by the x axis (epoch, step or checkpoint), optionally pooled over runs (seeds)."""

from __future__ import annotations

import math
import operator
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ibscope.check.settings import AXES, CURVE_FIELDS
from ibscope.errors import DataError, UsageError
from ibscope.results import Results, read_results

CurveKey = tuple  # (run, split, layer, estimator, quantity); run is None when pooled


@dataclass
class Point:
    """One x of a curve: the value (the mean over runs when pooled) and what is known of its uncertainty."""

    value: float
    stderr: float | None
    unit: str
    n_runs: int = 1
    spread: float | None = None   # sample sd over runs (pooled)
    params: Any = None
    n_samples: int | None = None


def as_results(obj: Any, what: str) -> Results:
    """A results path, a list of paths (concatenated) or a :class:`Results`, read and checked."""
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


def sources(obj: Any, res: Results) -> list[str]:
    """The file names behind ``obj`` (for the report)."""
    if isinstance(obj, (str, os.PathLike)):
        return [str(obj)]
    if isinstance(obj, Results):
        return [str(res.path)] if res.path else []
    return [str(p) for p in obj]


def in_unit(res: Results, unit: str) -> list[dict]:
    """Rows converted to ``unit``; rows without a value (cells ``ibscope estimate`` noted as not
    estimable) are left out, so they count as missing points."""
    return [r for r in res.to_unit(unit).rows if r["value"] is not None]


def noted(res: Results, what: str) -> list[str]:
    """A note on the rows without a value (left out of the comparison)."""
    rows = [r for r in res.rows if r["value"] is None]
    if not rows:
        return []
    return [f"{len(rows)} {what} row(s) have no value and were left out (first note: {rows[0].get('note') or '-'})"]


RUN_KEY = operator.itemgetter(*CURVE_FIELDS)
POOLED_KEY = operator.itemgetter(*CURVE_FIELDS[1:])


def resolve_axis(align: str, tables: Sequence[list[dict]]) -> str:
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
            keys = [k + (x,) for k, x in zip(map(RUN_KEY, rows), xs)]  # run included: unique per run
            if len(set(keys)) != len(keys):
                ok = False
                break
        if ok:
            return col
    raise DataError("Cannot align the results: no column of epoch, step, checkpoint is present on every row "
                    "and unique within each curve.",
                    hint="Check that the tables come from `ibscope estimate`, or pass --align.")


def key_dict(key: CurveKey) -> dict[str, Any]:
    return {f: v for f, v in zip(CURVE_FIELDS, key) if v is not None}


def key_name(key: CurveKey) -> str:
    """``run/split layer estimator quantity`` (the case name of a curve)."""
    d = key_dict(key)
    lead = "/".join(str(d[f]) for f in ("run", "split") if f in d)
    return f"{lead} {d['layer']} {d['estimator']} {d['quantity']}".strip()


def curves(rows: list[dict], axis: str, pooled: bool, what: str) -> dict[CurveKey, dict[Any, Point]]:
    """Group ``rows`` into curves, points sorted by x. Pooled: runs averaged per x (their sample sd
    kept as ``spread``); otherwise two rows at one x of one curve are a DataError."""
    grouped: dict[tuple, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    keyf = (lambda r: (None,) + POOLED_KEY(r)) if pooled else RUN_KEY
    for r in rows:
        grouped[keyf(r)][r[axis]].append(r)
    out: dict[tuple, dict[Any, Point]] = {}
    for key, pts in grouped.items():
        curve: dict[Any, Point] = {}
        for x, rs in pts.items():
            r0 = rs[0]
            if len(rs) == 1:
                curve[x] = Point(float(r0["value"]), r0["stderr"], r0["unit"], 1, None, r0.get("params"),
                                 r0.get("n_samples"))
                continue
            units = {r["unit"] for r in rs}
            if len(units) > 1:
                raise DataError(f"{what} curve {key_name(key)} at {axis} {x} mixes units {sorted(units)}.")
            runs = [r["run"] for r in rs]
            if not pooled or len(set(runs)) != len(runs):
                raise DataError(
                    f"{what} results hold {len(rs)} rows for curve {key_name(key)} at {axis} {x}"
                    f"{' in one run' if pooled else ''}; expected one.",
                    hint="Pass --align step or checkpoint if several checkpoints share an epoch"
                         f"{'' if pooled else ', or --seeds to pool runs'}.")
            vals = [float(r["value"]) for r in rs]
            mean = math.fsum(vals) / len(vals)
            spread = None
            if all(math.isfinite(v) for v in vals):
                spread = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            curve[x] = Point(mean, None, r0["unit"], len(rs), spread, r0.get("params"), r0.get("n_samples"))
        out[key] = dict(sorted(curve.items(), key=lambda kv: kv[0]))
    return out


def unit_factor(src: str, dst: str) -> float:
    """Multiplicative factor from information unit ``src`` to ``dst`` (nats or bits)."""
    if src == dst:
        return 1.0
    if (src, dst) == ("bits", "nats"):
        return math.log(2)
    if (src, dst) == ("nats", "bits"):
        return 1.0 / math.log(2)
    raise UsageError(f"Cannot convert {src} to {dst}: only nats and bits convert.")


def fmt(v: float | None) -> str:
    """A number for messages: 4 significant digits, '-' for None."""
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"
