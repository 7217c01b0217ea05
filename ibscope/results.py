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
value          the number, in ``unit``; empty only when ``note`` says why
unit           one of ``KNOWN_UNITS``: "nats", "bits", "dimensions", "exponent", "ratio",
               "value" (plus units that plug-in estimators declare, listed in the
               provenance under ``plugin_units``)
stderr         standard error where the estimator gives one (empty otherwise)
cap            theoretical cap in ``unit`` (e.g. log n for plug-in I(X;T)) or empty
n_samples      samples used
dims           feature dims used, e.g. "12" or "12x10"
params         JSON object of the estimator's hyper-parameters
null_mean      mean of the estimate over permutations of the rows of Y (or X): its value
               under independence, in ``unit``; empty when no null was computed
null_std       standard deviation of that permutation null, in ``unit``
p_value        (1 + #{null >= value}) / (N + 1) over N permutations; empty without a null
saturated      true when an information value lies within 1 % of its cap (the estimator
               cannot see more at this n and width), false when it does not, empty
               without a positive cap and for non-information rows (ranks, metrics)
key            content key of the row (``ibscope.estimate.cell_key``): a hash of the
               store's config hash and probe hash, the checkpoint's sha256, the layer, the
               estimator, quantity and parameters, and the estimator code version. An
               incremental ``ibscope estimate`` keeps a row only while its key still
               matches the store; empty in tables not written by ``estimate``
note           empty when the value is fine; otherwise why the cell has no value (or
               what to know about it), naming the layer and checkpoint. Always the last
               column
=============  ======================================================================

Information is stored in nats; the plot and check commands convert. Readers skip rows
without a value (plot and report leave a gap; check treats them as missing points).

Reading is strict: a file that is not UTF-8 CSV text, lacks the required columns, has an
empty value without a note, or a unit outside the known set is a :class:`DataError`
(exit code 4) naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ibscope.errors import DataError, UsageError, io_error
from ibscope.units import INFO_UNITS as INFO_UNITS  # re-exported: ibscope.results.INFO_UNITS
from ibscope.units import conversion_factor

RESULTS_FORMAT = "ibscope-results"
RESULTS_VERSION = 1
COLUMNS = [
    "run", "split", "checkpoint", "epoch", "step", "layer", "layer_index", "estimator", "quantity",
    "value", "unit", "stderr", "cap", "n_samples", "dims", "params",
    "null_mean", "null_std", "p_value", "saturated", "key", "note",
]
#: the estimator name of training-metric rows (layer "-")
METRICS = "metrics"
#: every unit ibscope writes: information (nats, bits), the geometry measures' "dimensions"
#: and "exponent" (alpha-req), and the training metrics' "ratio" (accuracies), "loss" (losses,
#: as logged: never converted, whatever base the training used) and "value" (anything else).
#: Plug-in estimators may declare others: ``ibscope estimate`` lists them in the provenance
#: under ``plugin_units`` and readers accept them for that file. Metric rows of older tables
#: in "nats" are read as "loss".
KNOWN_UNITS = ("nats", "bits", "dimensions", "exponent", "ratio", "value", "loss")
#: columns a file must have to be read as a results table (older tables lack key and note)
REQUIRED_COLUMNS = ("layer", "estimator", "quantity", "value", "unit")
_INT = {"checkpoint", "epoch", "step", "layer_index", "n_samples"}
_FLOAT = {"value", "stderr", "cap", "null_mean", "null_std", "p_value"}
_BOOL = {"saturated"}
#: columns in the unit of ``value`` (converted together between nats and bits)
VALUE_COLUMNS = ("value", "stderr", "cap", "null_mean", "null_std")


def provenance_path(path: str | os.PathLike[str]) -> Path:
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
    if col in _BOOL:
        low = raw.strip().lower()
        if low == "":
            return None
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise DataError(f"{where}: column '{col}' must be true, false or empty. Got {raw!r}.")
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
    if col in _BOOL:
        return "true" if v else "false"
    return str(v)


@dataclass
class Results:
    rows: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def filter(self, **conds: Any) -> Results:
        """Rows whose columns equal the given values (a value may be a list/tuple/set of options)."""
        def ok(r: dict[str, Any]) -> bool:
            for k, v in conds.items():
                if isinstance(v, (list, tuple, set)):
                    if r.get(k) not in v:
                        return False
                elif r.get(k) != v:
                    return False
            return True
        return Results([r for r in self.rows if ok(r)], self.provenance, self.path)

    def unique(self, col: str) -> list[Any]:
        seen: dict[Any, None] = {}
        for r in self.rows:
            seen.setdefault(r[col], None)
        return list(seen)

    def to_unit(self, unit: str) -> Results:
        """Convert every information row (nats/bits) to ``unit``; other rows, and training
        metrics whatever their unit, are unchanged."""
        if unit not in INFO_UNITS:
            raise UsageError(f"Unit must be one of {INFO_UNITS}. Got {unit!r}.")
        out = []
        for r in self.rows:
            r = dict(r)
            if r["unit"] in INFO_UNITS and r["unit"] != unit and r.get("estimator") != METRICS:
                f = conversion_factor(r["unit"], unit)
                for c in VALUE_COLUMNS:
                    if r.get(c) is not None:
                        r[c] = r[c] * f
                r["unit"] = unit
            out.append(r)
        return Results(out, self.provenance, self.path)


def make_row(**kw: Any) -> dict[str, Any]:
    """A row with every column present, as :func:`read_results` returns it: missing numbers None,
    run/split defaulted, params {} and dims, key and note '' when not given."""
    unknown = set(kw) - set(COLUMNS)
    if unknown:
        raise ValueError(f"Unknown result columns: {sorted(unknown)}")
    row = {c: kw.get(c) for c in COLUMNS}
    row["run"] = row["run"] or "run"
    row["split"] = row["split"] or "probe"
    row["params"] = row["params"] or {}
    for c in ("dims", "key", "note"):  # text columns read back as "" when empty
        row[c] = row[c] or ""
    return row


def _not_a_table(p: Path, why: str) -> DataError:
    return DataError(f"'{p}' is not an ibscope results table: {why}.",
                     hint="Pass the CSV written by `ibscope estimate` (e.g. results.csv).")


def _read_provenance(p: Path) -> dict[str, Any] | None:
    pp = provenance_path(p)
    if not pp.exists():
        return None
    try:
        this = json.loads(pp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"Provenance file '{pp}' is not valid JSON: {exc}.") from None
    if not isinstance(this, dict):
        raise DataError(f"Provenance file '{pp}' must hold a JSON object. Got {type(this).__name__}.")
    if this.get("format_version", RESULTS_VERSION) != RESULTS_VERSION:
        raise DataError(f"'{p}' has results format version {this.get('format_version')}; expected {RESULTS_VERSION}.")
    return this


def _read_one(p: Path, allow_empty: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    if not p.exists():
        raise DataError(f"Results file not found: '{p}'.", hint="Create it with `ibscope estimate STORE -o results.csv`.")
    if p.is_dir():
        raise DataError(f"'{p}' is a directory; expected a results CSV file.",
                        hint="Pass the -o file of `ibscope estimate` (e.g. results.csv).")
    this = _read_provenance(p)
    plugin_units = (this or {}).get("plugin_units") or {}
    units = set(KNOWN_UNITS) | (set(plugin_units) if isinstance(plugin_units, dict) else set())
    try:
        with open(p, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise _not_a_table(p, f"it is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") \
            from None
    if "\x00" in text:
        raise _not_a_table(p, f"it contains NUL bytes (offset {text.index(chr(0))}): a binary file, not CSV text")
    want = (this or {}).get("table_sha256")
    if want and hashlib.sha256(text.encode("utf-8")).hexdigest() != want:
        assert this is not None  # want came from it
        this["table_matches"] = False
        warnings.warn(f"The provenance '{provenance_path(p)}' does not describe '{p}' as it is now: the table was "
                      f"changed after ibscope wrote it, or a write was interrupted. Treat its provenance with care; "
                      f"`ibscope estimate` into it rewrites both (when the table itself can be read).", stacklevel=3)
    rows: list[dict[str, Any]] = []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            shown = header if len(header) <= 20 and all(len(str(h)) < 40 for h in header) else "(not a CSV header)"
            raise _not_a_table(p, f"missing column(s) {missing}. Got columns {shown}")
        for i, raw in enumerate(reader, start=2):
            where = f"{p}:{i}"
            if None in raw:  # more fields than the header names
                raise DataError(f"{where}: the line has {len(header) + len(raw[None])} fields; the header names "
                                f"{len(header)}.")
            row = {c: _parse(c, raw.get(c) or "", where) for c in COLUMNS}
            row["run"] = row["run"] or "run"
            row["split"] = row["split"] or "probe"
            row["note"] = row["note"].strip()
            if row["estimator"] == METRICS and row["unit"] in INFO_UNITS:
                row["unit"] = "loss"  # tables before 0.x wrote logged losses as "nats": they are numbers as logged
            if row["value"] is None and not row["note"]:
                raise DataError(f"{where}: empty 'value' and no 'note' saying why.",
                                hint="A cell that could not be estimated has an empty value and a note; "
                                     "any other row needs a number.")
            if row["unit"] not in units:
                raise DataError(
                    f"{where}: unknown unit {row['unit']!r}. Expected one of: {', '.join(sorted(units))}.",
                    hint="Units are written by `ibscope estimate`; a table edited by hand or by another "
                         "tool may have renamed them.")
            rows.append(row)
    except csv.Error as exc:
        raise _not_a_table(p, f"it is not CSV text ({exc})") from None
    if not rows and not allow_empty:
        raise DataError(f"Results table '{p}' holds no rows.", hint="Run `ibscope estimate` first.")
    return rows, this


def read_results(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, allow_empty: bool = False) -> Results:
    """Read one results CSV (or several, concatenated). Raises DataError on a bad table.

    ``allow_empty``: accept a table with a header and no rows (``ibscope estimate`` merging
    into an existing file does); otherwise an empty table is a DataError.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    prov: dict[str, Any] = {}
    first: Path | None = None
    for path in paths:
        p = Path(path)
        first = first or p
        got, this = _read_one(p, allow_empty=True)
        rows += got
        if this is not None:
            prov = prov or this
            prov.setdefault("sources", []).append(str(p))
    if not rows and not allow_empty:
        raise DataError(f"Results table '{first}' holds no rows.", hint="Run `ibscope estimate` first.")
    return Results(rows, prov, first)


def write_results(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]], provenance: dict[str, Any] | None = None) -> Path:
    """Write rows atomically (tmp file + rename) and the provenance sidecar.

    Both files are written in full under temporary names first; a failure (disk full, ...)
    removes them and leaves any earlier table and sidecar as they were.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    ptmp = provenance_path(p).with_suffix(".json.tmp")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_fmt(c, r.get(c)) for c in COLUMNS])
    text = buf.getvalue()
    prov = dict(provenance or {})
    prov.setdefault("format", RESULTS_FORMAT)
    prov.setdefault("format_version", RESULTS_VERSION)
    # the sidecar names the exact table it describes: a crash between the two renames, or a
    # table edited afterwards, is detected by readers (see _read_one)
    prov["table_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        ptmp.write_text(json.dumps(prov, indent=2, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, p)
        os.replace(ptmp, provenance_path(p))
    except OSError as exc:
        raise io_error(exc, str(p), "writing the results table") from None
    finally:
        for t in (tmp, ptmp):
            try:
                t.unlink(missing_ok=True)
            except OSError:
                pass
    return p


def time_axis(rows: Sequence[dict[str, Any]]) -> str:
    """The column to put on the time axis: epoch if every row has one and epochs tell checkpoints
    apart (within a run and split), else step under the same rule, else the checkpoint index.
    One rule for ``plot`` and ``report`` (and any reader that aligns rows over training time)."""
    for col in ("epoch", "step"):
        if not all(r[col] is not None for r in rows):
            continue
        seen: dict[tuple[Any, ...], Any] = {}
        ok = True
        for r in rows:
            key = (r["run"], r["split"], r[col])
            ck = r["checkpoint"]
            if ck is None:
                continue
            if seen.setdefault(key, ck) != ck:
                ok = False
                break
        if ok:
            return col
    if any(r["checkpoint"] is None for r in rows):
        raise DataError("Some rows have no epoch, step or checkpoint; they cannot be placed on a time axis.",
                        hint="Results written by `ibscope estimate` always carry a checkpoint index.")
    return "checkpoint"
