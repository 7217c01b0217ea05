"""Reading estimates against their caps, their permutation nulls and a validation run.

Torch-free helpers shared by ``ibscope plot``, ``ibscope report`` and ``ibscope validate``
(see docs/trust.md):

* :func:`is_saturated`: a row's ``saturated`` flag, or, for tables written before the column
  was filled, the same rule computed from ``value`` and ``cap`` (within
  :data:`SATURATION_TOLERANCE` = 1 % of the cap);
* :func:`has_null` / :data:`NULL_MODES`: the permutation null columns ``null_mean``,
  ``null_std``, ``p_value`` and the plot modes ``band`` / ``subtract`` / ``off``;
* :func:`read_validation`: the ``validation.csv`` written by ``ibscope validate`` (strict:
  a DataError naming the file and line for anything else), and :func:`truth_interval`, which
  turns its biases into the error bars ``ibscope plot --validation`` draws.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ibscope.errors import DataError, UsageError
from ibscope.units import conversion_factor

#: an estimate within this fraction of its cap is "saturated": the estimator cannot show more
SATURATION_TOLERANCE = 0.01
#: how plots show the permutation null of I(T;Y) (and of I(X;T) where it was computed)
NULL_MODES = ("band", "subtract", "off")

VALIDATION_CSV = "validation.csv"
VALIDATION_PNG = "validation.png"
VALIDATION_JSON = "validation.json"
#: columns of validation.csv, in order (values in ``unit``, nats as written by ``ibscope validate``)
VALIDATION_COLUMNS = [
    "estimator", "params", "quantity", "n_samples", "dims", "task", "family", "level", "true_value",
    "true_value_error", "truth", "mean_estimate", "bias", "rmse", "sd", "repeats", "n_used", "unit", "seconds",
    "note",
]
_V_REQUIRED = ("estimator", "params", "quantity", "n_samples", "dims", "task", "true_value", "mean_estimate",
               "bias", "rmse")
_V_FLOAT = {"true_value", "true_value_error", "mean_estimate", "bias", "rmse", "sd", "seconds"}
_V_INT = {"n_samples", "repeats", "n_used"}


def check_null_mode(mode: str) -> str:
    if mode not in NULL_MODES:
        raise UsageError(f"--null must be one of {', '.join(NULL_MODES)}. Got {mode!r}.",
                         hint="band: draw null_mean ± 2·null_std; subtract: plot value − null_mean; off: ignore nulls.")
    return mode


def is_saturated(row: dict) -> bool | None:
    """The row's ``saturated`` flag; for an information row (nats or bits) with a cap but no flag
    (tables written before ``ibscope estimate`` filled the column) computed with the same rule,
    ``cap - value <= 1 % of |cap|``; None otherwise (no value, no cap, or a geometry measure, whose
    cap, the layer's width, is a fact about the layer rather than a limit of the estimator)."""
    flag = row.get("saturated")
    if flag is not None:
        return bool(flag)
    if row.get("unit") not in ("nats", "bits"):
        return None
    v, cap = row.get("value"), row.get("cap")
    if v is None or cap is None or not math.isfinite(cap) or cap <= 0:
        return None
    return bool(cap - v <= SATURATION_TOLERANCE * abs(cap))


def has_null(row: dict) -> bool:
    return row.get("null_mean") is not None and row.get("null_std") is not None


def within_null(row: dict, k: float = 2.0) -> bool | None:
    """True when the value lies inside the band the plots draw, null_mean ± k·null_std (it cannot be
    told from chance at this n and width); None without a null. The band, not the p-value, is the
    criterion: with N permutations p cannot go below 1/(N + 1), which is 0.09 for N = 10."""
    if not has_null(row) or row.get("value") is None:
        return None
    # the same tie tolerance as the p-value (a value equal to its null up to rounding is inside)
    from ibscope.estimators.nulls import TIE_TOLERANCE

    tol = TIE_TOLERANCE * max(1.0, abs(row["null_mean"]))
    return bool(row["value"] <= row["null_mean"] + k * row["null_std"] + tol)


def params_key(params: Any) -> str:
    """Canonical JSON of an estimator's parameters (how results and validation rows are matched)."""
    if isinstance(params, str):
        try:
            params = json.loads(params) if params else {}
        except json.JSONDecodeError:
            return params
    return json.dumps(params or {}, sort_keys=True, default=str)


def validation_key(row: dict) -> tuple:
    """(estimator, parameters, quantity, n_samples, dims): what one validation covers."""
    n = row.get("n_samples")
    return (row["estimator"], params_key(row.get("params")), row["quantity"], None if n is None else int(n),
            str(row.get("dims") or ""))


def _validation_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / VALIDATION_CSV
    if not p.exists():
        raise DataError(f"Validation table not found: '{p}'.",
                        hint="Create it with `ibscope validate RESULTS -o DIR` and pass DIR.")
    return p


def read_validation(path: str | os.PathLike) -> list[dict]:
    """Rows of ``validation.csv`` (or of ``DIR/validation.csv``), numbers parsed, params as dicts.

    Raises DataError (exit 4) for a missing file, a file that is not UTF-8 CSV, missing columns
    or a malformed number, naming the file and line.
    """
    p = _validation_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"'{p}' is not a validation table: it is not UTF-8 text (offset {exc.start}).") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in _V_REQUIRED if c not in header]
    if missing:
        raise DataError(f"'{p}' is not a validation table: missing column(s) {missing}.",
                        hint="Pass the folder written by `ibscope validate` (it holds validation.csv).")
    rows = []
    for i, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {}
        for c in header:
            v = (raw.get(c) or "").strip()
            if c in _V_FLOAT:
                try:
                    row[c] = float(v) if v else None
                except ValueError:
                    raise DataError(f"{p}:{i}: column '{c}' must be a number. Got {v!r}.") from None
            elif c in _V_INT:
                try:
                    row[c] = int(v) if v else None
                except ValueError:
                    raise DataError(f"{p}:{i}: column '{c}' must be an integer. Got {v!r}.") from None
            elif c == "params":
                try:
                    row[c] = json.loads(v) if v else {}
                except json.JSONDecodeError:
                    raise DataError(f"{p}:{i}: column 'params' must be a JSON object. Got {v!r}.") from None
            else:
                row[c] = v
        row.setdefault("unit", "nats")
        if row["unit"] not in ("nats", "bits"):
            raise DataError(f"{p}:{i}: unit must be nats or bits. Got {row['unit']!r}.")
        rows.append(row)
    return rows


def validation_tasks(vrows: Iterable[dict], unit: str = "nats") -> dict[tuple, list[tuple[float, float, float]]]:
    """Per :func:`validation_key`: the (mean estimate, bias, sd) of its tasks in ``unit`` (tasks that
    did not run are left out)."""
    out: dict[tuple, list] = {}
    for r in vrows:
        b, e = r.get("bias"), r.get("mean_estimate")
        if b is None or e is None or not (math.isfinite(b) and math.isfinite(e)):
            continue
        f = conversion_factor(r.get("unit", "nats"), unit)
        out.setdefault(validation_key(r), []).append((e * f, b * f, (r.get("sd") or 0.0) * f))
    return out


def truth_interval(value: float, tasks: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Where the truth lies for an estimate ``value``, from the validation tasks of its key.

    The tasks whose mean estimate is close to ``value`` are the relevant ones: those whose mean
    estimate lies within max(2 sd, 2 % of |value|, 0.01) of it, joined with the nearest task on
    either side (the two that bracket it). Each says "an estimate here came from a truth of
    estimate − bias"; the interval spans value − bias over them (and value itself), floored at 0.
    A saturated estimate gets the wide interval it deserves: every task that read at the cap,
    whatever its truth, is close to it.
    """
    if not tasks:
        return None
    sel = {i for i, (e, _, sd) in enumerate(tasks) if abs(e - value) <= max(2 * sd, 0.02 * abs(value), 0.01)}
    below = [i for i, (e, _, _) in enumerate(tasks) if e <= value]
    above = [i for i, (e, _, _) in enumerate(tasks) if e >= value]
    if below:
        sel.add(max(below, key=lambda i: tasks[i][0]))
    if above:
        sel.add(min(above, key=lambda i: tasks[i][0]))
    truths = [value - tasks[i][1] for i in sel] + [value]
    return max(0.0, min(truths)), max(truths)


def write_csv_atomic(path: Path, columns: list[str], rows: Iterable[dict]) -> Path:
    """Write a CSV whole or not at all (temporary file, fsync, rename; an OSError becomes an
    IOFailure naming the file: :func:`ibscope._atomic.write_text_atomic`)."""
    from ibscope._atomic import write_text_atomic

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        out = []
        for c in columns:
            v = r.get(c)
            if v is None:
                out.append("")
            elif c == "params":
                out.append(params_key(v))
            elif isinstance(v, float):
                out.append(repr(v))
            else:
                out.append(str(v))
        w.writerow(out)
    return write_text_atomic(path, buf.getvalue())
