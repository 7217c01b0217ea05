"""The summary of an ``ibscope estimate`` run: saturation counts and lines, the summary lines
(see :mod:`ibscope.estimate`)."""

from __future__ import annotations

from typing import Iterable

from ibscope.errors import IbscopeError
from ibscope.estimate.cells import METRICS
from ibscope.results import Results

#: where caps, saturation and nulls are explained
TRUST_DOC = "docs/trust.md"


def _cap_name(estimator: str, quantity: str, params: dict | None) -> str:
    from ibscope.estimators import registry

    try:
        est = registry.create(estimator, **{k: v for k, v in (params or {}).items() if k != "x_source"})
        return est.cap_name(quantity)
    except Exception:  # an estimator no longer registered, or a plug-in's own trouble: a plain name
        return "its cap"


def saturation_counts(rows: Iterable[dict]) -> dict:
    """{estimator: {quantity: {"saturated": k, "cells": m, "cap": name}}} over rows with a value and a cap."""
    out: dict = {}
    for r in rows:
        if r.get("value") is None or r.get("saturated") is None or r["estimator"] == METRICS:
            continue
        q = out.setdefault(r["estimator"], {}).setdefault(r["quantity"], {"saturated": 0, "cells": 0, "cap": None})
        q["cells"] += 1
        q["saturated"] += bool(r["saturated"])
        if q["cap"] is None:
            q["cap"] = _cap_name(r["estimator"], r["quantity"], r.get("params"))
    return out


def saturation_lines(counts: dict) -> list[str]:
    """One line per information estimator with saturated cells, e.g. "binning: 24 of 24 I(T;Y)
    cells at the cap H(Y): at this n and width the estimator cannot see compression; see
    docs/trust.md". (Ranks carry no flag: a full-rank layer is no artefact.)"""
    from ibscope.estimators import registry

    out = []
    for name, qs in sorted(counts.items()):
        parts = [f"{c['saturated']} of {c['cells']} {q} cells at the cap {c['cap']}"
                 for q, c in qs.items() if c["saturated"]]
        try:
            info = registry.get(name).unit in ("nats", "bits")
        except IbscopeError:
            info = True
        if parts and info:
            out.append(f"{name}: {', '.join(parts)}: at this n and width the estimator cannot see compression; "
                       f"see {TRUST_DOC}")
    return out


def summary_lines(res: Results, *, strict: bool = False) -> list[str]:
    """Warnings about a finished :func:`run_estimate` for people: noted cells (the first few
    reasons), rows whose value comes with a warning (in their note), one line per estimator
    with cells at their cap (:func:`saturation_lines`), rows dropped because their store
    changed or their checkpoint is gone. Empty when there is nothing to say. ``ibscope
    estimate`` prints them on stderr."""
    prov = res.provenance or {}
    out: list[str] = []
    n = prov.get("noted_cells", 0)
    if n:
        notes = prov.get("first_notes") or []
        now = prov.get("noted_cells_computed_now", n)
        out.append(f"{n} cell(s) could not be estimated" + (f" ({now} of them in this run, the others kept from "
                                                               f"before)" if now != n else "")
                   + f"; their rows have an empty value and a note (column 'note' of {res.path}). First reasons:")
        out += [f"  - {t}" for t in notes]
        if n > len(notes):
            out.append(f"  ... and more: {n} noted cell(s) in all.")
        if not strict:
            out.append("  Pass --strict to make noted cells an error (exit code 4).")
    w = prov.get("rows_with_warnings", 0)
    if w:
        first = prov.get("first_warnings") or []
        out.append(f"{w} row(s) have a value and a warning in their note (column 'note' of {res.path}). First:")
        out += [f"  - {t}" for t in first]
        if w > len(first):
            out.append(f"  ... and more: {w} row(s) with a warning in all.")
    out += saturation_lines(prov.get("saturation") or {})
    d = prov.get("rows_dropped_stale", 0)
    if d:
        ests = prov.get("dropped_stale_estimators") or []
        out.append(f"Dropped {d} row(s) of estimator(s) {', '.join(ests)} that were computed from other store "
                   f"content or by another ibscope version, and that this run did not select: re-run with "
                   f"{' '.join('-e ' + e for e in ests)} to compute them from the store as it is now.")
    m = prov.get("rows_dropped_missing_checkpoint", 0)
    if m:
        gone = prov.get("missing_checkpoints") or []
        out.append(f"Dropped {m} row(s) of checkpoint(s) no longer in the store: {', '.join(gone[:5])}"
                   + (" ..." if len(gone) > 5 else "") + ".")
    return out


