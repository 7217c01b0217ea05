"""The results table: one row per run x split x checkpoint x layer x estimator x quantity.

Written by ``ibscope estimate``; read by ``plot``, ``report`` and ``check``. It is a plain
CSV (readable with any tool) plus a provenance sidecar ``<stem>.provenance.json``.

Columns (``COLUMNS``):

=============  ======================================================================
run            name of the training run / seed ("run" by default)
split          probe set ("train", "test", ...; "probe" by default)
checkpoint     index of the checkpoint in the store's order (0, 1, ...)
epoch, step    as stored by capture (empty when unknown)
layer          layer name; "-" for run-level rows (e.g. accuracy)
layer_index    position of the layer in the network (0 = closest to the input)
estimator      registered estimator name ("metrics" for training metrics)
quantity       "I(X;T)", "I(T;Y)", or a single-representation quantity (e.g. "effective_rank")
value          the number, in ``unit``
unit           "nats", "bits", "dimensions", "ratio", ...
stderr         standard error where the estimator gives one (empty otherwise)
cap            theoretical cap in ``unit`` (e.g. log n for plug-in I(X;T)) or empty
n_samples      samples used
dims           feature dims used, e.g. "12" or "12x10"
params         JSON object of the estimator's hyper-parameters
=============  ======================================================================

Information is stored in nats; the plot and check commands convert.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ibscope.errors import DataError, UsageError

RESULTS_FORMAT = "ibscope-results"
RESULTS_VERSION = 1
COLUMNS = [
    "run", "split", "checkpoint", "epoch", "step", "layer", "layer_index", "estimator", "quantity",
    "value", "unit", "stderr", "cap", "n_samples", "dims", "params",
]
INFO_UNITS = ("nats", "bits")
_INT = {"checkpoint", "epoch", "step", "layer_index", "n_samples"}
_FLOAT = {"value", "stderr", "cap"}


def provenance_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".provenance.json")


def _parse(col: str, raw: str, where: str) -> Any:
    if col in _INT:
        if raw == "":
            return None
        try:
            return int(raw)
        except ValueError:
            raise DataError(f"{where}: column '{col}' must be an integer. Got {raw!r}.") from None
    if col in _FLOAT:
        if raw == "":
            return None
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: column '{col}' must be a number. Got {raw!r}.") from None
    if col == "params":
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            raise DataError(f"{where}: column 'params' must be a JSON object. Got {raw!r}.") from None
    return raw


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return ""
    if col == "params":
        return json.dumps(v, sort_keys=True, default=str)
    if col in _FLOAT:
        return repr(float(v))
    return str(v)


@dataclass
class Results:
    rows: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def filter(self, **conds: Any) -> "Results":
        """Rows whose columns equal the given values (a value may be a list/tuple/set of options)."""
        def ok(r):
            for k, v in conds.items():
                if isinstance(v, (list, tuple, set)):
                    if r.get(k) not in v:
                        return False
                elif r.get(k) != v:
                    return False
            return True
        return Results([r for r in self.rows if ok(r)], self.provenance, self.path)

    def unique(self, col: str) -> list:
        seen: dict = {}
        for r in self.rows:
            seen.setdefault(r[col], None)
        return list(seen)

    def to_unit(self, unit: str) -> "Results":
        """Convert every information row (nats/bits) to ``unit``; other rows are unchanged."""
        if unit not in INFO_UNITS:
            raise UsageError(f"Unit must be one of {INFO_UNITS}. Got {unit!r}.")
        out = []
        for r in self.rows:
            r = dict(r)
            if r["unit"] in INFO_UNITS and r["unit"] != unit:
                f = math.log(2) if r["unit"] == "bits" else 1 / math.log(2)
                for c in ("value", "stderr", "cap"):
                    if r.get(c) is not None:
                        r[c] = r[c] * f
                r["unit"] = unit
            out.append(r)
        return Results(out, self.provenance, self.path)


def make_row(**kw: Any) -> dict[str, Any]:
    """A row with every column present (missing ones None; run/split defaulted)."""
    unknown = set(kw) - set(COLUMNS)
    if unknown:
        raise ValueError(f"Unknown result columns: {sorted(unknown)}")
    row = {c: kw.get(c) for c in COLUMNS}
    row["run"] = row["run"] or "run"
    row["split"] = row["split"] or "probe"
    row["params"] = row["params"] or {}
    return row


def read_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Results:
    """Read one results CSV (or several, concatenated). Raises DataError on a bad table."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[dict] = []
    prov: dict = {}
    first: Path | None = None
    for path in paths:
        p = Path(path)
        first = first or p
        if not p.exists():
            raise DataError(f"Results file not found: '{p}'.", hint="Create it with `ibscope estimate STORE -o results.csv`.")
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("layer", "estimator", "quantity", "value", "unit") if c not in header]
            if missing:
                raise DataError(f"'{p}' is not an ibscope results table: missing column(s) {missing}. Got columns {header}.")
            for i, raw in enumerate(reader, start=2):
                where = f"{p}:{i}"
                row = {c: _parse(c, raw.get(c) or "", where) for c in COLUMNS}
                row["run"] = row["run"] or "run"
                row["split"] = row["split"] or "probe"
                if row["value"] is None:
                    raise DataError(f"{where}: empty 'value'.")
                rows.append(row)
        pp = provenance_path(p)
        if pp.exists():
            try:
                this = json.loads(pp.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(f"Provenance file '{pp}' is not valid JSON: {exc}.") from None
            if this.get("format_version", RESULTS_VERSION) != RESULTS_VERSION:
                raise DataError(f"'{p}' has results format version {this.get('format_version')}; expected {RESULTS_VERSION}.")
            prov = prov or this
            prov.setdefault("sources", []).append(str(p))
    if not rows:
        raise DataError(f"Results table '{first}' holds no rows.", hint="Run `ibscope estimate` first.")
    return Results(rows, prov, first)


def write_results(path: str | os.PathLike, rows: Iterable[dict], provenance: dict | None = None) -> Path:
    """Write rows atomically (tmp file + rename) and the provenance sidecar."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(c, r.get(c)) for c in COLUMNS])
    prov = dict(provenance or {})
    prov.setdefault("format", RESULTS_FORMAT)
    prov.setdefault("format_version", RESULTS_VERSION)
    ptmp = provenance_path(p).with_suffix(".json.tmp")
    ptmp.write_text(json.dumps(prov, indent=2, sort_keys=True, default=str))
    os.replace(ptmp, provenance_path(p))
    os.replace(tmp, p)
    return p
