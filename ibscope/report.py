"""``ibscope report``: one self-contained HTML file for a results table (and an OOD run).

The page holds the information plane(s), the curves, the training metrics, tables of the numbers
(median over runs, per estimator setting, quantity and split), the provenance (ibscope version,
estimator settings, store hashes, the resolved configuration) and, when given the
``ood_metrics.json`` written by ``ibscope ood``, an OOD section with its metrics table and figures.
Images are embedded as base64 data URIs and the full table is embedded as a CSV download, so the
file opens offline, can be mailed, and needs no network. Nothing here imports torch.

Public API::

    write_report(results, out_html=None, *, ood=None, figures_dir=None, unit="bits", ...) -> Path
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ibscope._atomic import write_text_atomic
from ibscope._paths import prepare_output
from ibscope._version import __version__
from ibscope.errors import DataError, UsageError
from ibscope.results import COLUMNS, Results

log = logging.getLogger(__name__)

OOD_COLUMNS = [
    ("config", "configuration"), ("detector", "detector"), ("reduction", "reduction"), ("k", "k"),
    ("layer", "layer"), ("checkpoint", "ckpt"), ("epoch", "epoch"), ("ood_set", "OOD set"),
    ("auroc", "AUROC ↑"), ("aupr_in", "AUPR-In ↑"), ("aupr_out", "AUPR-Out ↑"),
    ("fpr95_id_positive", "FPR95 ↓ (ID pos., Lee/Sun)"), ("fpr95_openood", "FPR95 ↓ (OOD pos., OpenOOD)"),
    ("detection_accuracy", "det. acc. ↑"),
]
OOD_REQUIRED = ("ood_set", "auroc")

def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–" if math.isnan(v) else str(v)
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def _png(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _sources(results: Any, res: Results) -> list[Path]:
    if isinstance(results, Results):
        return [res.path] if res.path is not None and res.path.exists() else []
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    return [Path(p) for p in paths]


def _default_out(res: Results) -> Path:
    if res.path is None:
        raise UsageError("No output file given and the results have no file to place it next to.",
                         hint="Pass out_html (CLI: -o report.html).")
    return res.path.with_name(res.path.stem + "_report.html")


# ---------------------------------------------------------------------------------------------
# tables of numbers

def _columns(times: list[float], most: int) -> tuple[list[float], bool]:
    if len(times) <= most:
        return times, False
    idx = sorted({round(i * (len(times) - 1) / (most - 1)) for i in range(most)})
    return [times[i] for i in idx], True


def _number_tables(rows: list[dict], time_col: str, max_columns: int) -> dict:
    """The "Numbers" tables: per (setting, quantity, split) the median over runs per layer and time,
    and the training metrics; at most ``max_columns`` time columns, evenly spaced."""
    from ibscope.plot._data import METRICS, Setting, cubes, layer_order, summarize

    tables: list[dict] = []
    info = [r for r in rows if r["estimator"] != METRICS]
    groups: dict[tuple, list[dict]] = {}
    for r in info:
        groups.setdefault((Setting.of(r), r["quantity"], r["split"]), []).append(r)
    pair = {"I(X;T)": 0, "I(T;Y)": 1}
    split_rank = {sp: i for i, sp in enumerate(dict.fromkeys(r["split"] for r in info))}
    order = sorted(groups, key=lambda k: (pair.get(k[1], 2), k[1], k[0].label(), split_rank[k[2]]))
    for s, q, split in order:
        g = groups[(s, q, split)]
        layers = layer_order(g)
        c = cubes(g, [q], time_col, layers=layers)[q]
        med, lo, hi = summarize(c.value)
        times = [float(t) for t in c.times]
        shown, cut = _columns(times, max_columns)
        runs = len(c.runs)
        body = [(layer, [_fmt(float(med[times.index(t), li])) for t in shown]) for li, layer in enumerate(layers)]
        note = (f"median of {runs} runs; " if runs > 1 else "") + f"{c.unit}; columns: {time_col}"
        if cut:
            note += f" ({len(shown)} of {len(times)} shown, evenly spaced; all in the CSV below)"
        caps = ", ".join(_fmt(x) for x in c.caps)
        if caps:
            note += f"; cap {caps} {c.unit}"
        tables.append({"quantity": q, "setting": s.label(), "split": split, "note": note,
                       "head": [_tick(t) for t in shown], "rows": body})
    metrics_table = None
    metrics = [r for r in rows if r["estimator"] == METRICS]
    if metrics:
        seen, uniq = set(), []
        for r in metrics:
            key = (r["run"], r[time_col], r["quantity"])
            if key not in seen:
                seen.add(key)
                uniq.append(r)
        names = list(dict.fromkeys(r["quantity"] for r in uniq))
        cs = cubes(uniq, names, time_col, layer_col="quantity")
        times = [float(t) for t in cs[names[0]].times]
        shown, cut = _columns(times, max_columns)
        body = []
        for q in names:
            med, _, _ = summarize(cs[q].value)
            li = cs[q].layers.index(q)
            body.append((f"{q} [{cs[q].unit}]", [_fmt(float(med[times.index(t), li])) for t in shown]))
        metrics_table = {"note": f"columns: {time_col}" + (f" ({len(shown)} of {len(times)} shown)" if cut else ""),
                         "head": [_tick(t) for t in shown], "rows": body}
    return {"tables": tables, "metrics": metrics_table}


def _tick(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:.4g}"


def _noted(rows: list[dict], shown: int = 20) -> dict | None:
    """The cells ``ibscope estimate`` could not estimate (no value, a note saying why)."""
    noted = [r for r in rows if r["value"] is None]
    if not noted:
        return None
    return {"count": len(noted), "lines": [r.get("note") or "(no note)" for r in noted[:shown]],
            "more": max(0, len(noted) - shown)}


def _csv_link(rows: list[dict], name: str) -> dict:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (json.dumps(r[c], sort_keys=True) if c == "params" else r[c])
                    for c in COLUMNS])
    return {"name": name, "href": _data_uri(buf.getvalue().encode(), "text/csv"), "n": len(rows)}


# ---------------------------------------------------------------------------------------------
# Can these numbers be trusted?

def _conv(v: float | None, src: str, unit: str) -> float | None:
    from ibscope.units import convert

    return convert(v, src, unit)


def trust_counts(rows: list[dict]) -> dict:
    """Per (estimator setting, quantity): saturation and null counts of the valued estimate rows.

    Returns ``{(Setting, quantity): {"estimates", "with_cap", "saturated", "computed_flags", "with_null",
    "above_chance", "chance", "p_min"}}`` where ``chance`` counts the estimates inside their null
    band, null_mean ± 2 null_std (:func:`ibscope.trust.within_null`), ``above_chance`` those
    above it, and ``computed_flags`` the rows whose flag was computed from value and cap (tables
    written before estimate filled the ``saturated`` column).
    """
    from ibscope.plot._data import METRICS, Setting
    from ibscope.trust import is_saturated, within_null

    out: dict = {}
    for r in rows:
        if r["estimator"] == METRICS or r["value"] is None:
            continue
        c = out.setdefault((Setting.of(r), r["quantity"]), {
            "estimates": 0, "with_cap": 0, "saturated": 0, "computed_flags": 0, "with_null": 0, "above_chance": 0,
            "chance": 0, "p_min": None, "caps": set()})
        c["estimates"] += 1
        flag = is_saturated(r)
        if flag is not None:
            c["with_cap"] += 1
            c["saturated"] += bool(flag)
            c["computed_flags"] += r.get("saturated") is None
            c["caps"].add(round(float(r["cap"]), 6))
        inside = within_null(r)
        if inside is not None:
            c["with_null"] += 1
            c["chance" if inside else "above_chance"] += 1
            if r.get("p_value") is not None:
                c["p_min"] = r["p_value"] if c["p_min"] is None else min(c["p_min"], r["p_value"])
    return out


def _validation_section(vdir: Path, unit: str) -> dict:
    from ibscope.trust import VALIDATION_JSON, VALIDATION_PNG, read_validation

    vpath = vdir / "validation.csv" if vdir.is_dir() else vdir
    base = vpath.parent
    vrows = read_validation(vpath)
    meta = {}
    if (base / VALIDATION_JSON).exists():
        try:
            meta = json.loads((base / VALIDATION_JSON).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    body = []
    for r in vrows:
        u = r.get("unit", "nats")
        tv, te = _conv(r.get("true_value"), u, unit), _conv(r.get("true_value_error"), u, unit)
        body.append({
            "estimator": r["estimator"], "params": json.dumps(r["params"], sort_keys=True), "quantity": r["quantity"],
            "n": _text(r.get("n_samples")), "dims": _text(r.get("dims")), "task": r["task"],
            "truth": _fmt(tv) + (f" ± {_fmt(te)}" if te else ""), "mean": _fmt(_conv(r.get("mean_estimate"), u, unit)),
            "bias": _fmt(_conv(r.get("bias"), u, unit)), "rmse": _fmt(_conv(r.get("rmse"), u, unit)),
            "runs": _text(r.get("repeats")), "note": r.get("note") or ""})
    png = base / VALIDATION_PNG
    figure = {"src": _data_uri(png.read_bytes(), "image/png"),
              "caption": f"{VALIDATION_PNG}: the mean estimate against the truth of every validation task, one panel "
                         "per estimator setting; on the diagonal the estimator is unbiased."} if png.exists() else None
    return {"path": str(vpath), "rows": body, "notes": list(meta.get("notes") or []), "figure": figure}


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def _trust_section(rows: list[dict], unit: str, validation: str | os.PathLike | None, shown: int = 12) -> dict:
    """The report's "Can these numbers be trusted?" section (rows already in ``unit``)."""
    from ibscope.plot._data import METRICS
    from ibscope.trust import within_null

    counts = trust_counts(rows)
    sat_rows = [(s, q, c) for (s, q), c in counts.items() if c["with_cap"]]
    saturation = [{"setting": s.label(), "quantity": q, "with_cap": c["with_cap"], "saturated": c["saturated"],
                   "share": f"{100.0 * c['saturated'] / c['with_cap']:.0f} %",
                   "caps": ", ".join(_fmt(x) for x in sorted(c["caps"]))} for s, q, c in sat_rows]
    nulls = [{"setting": s.label(), "quantity": q, "with_null": c["with_null"], "above": c["above_chance"],
              "chance": c["chance"], "p_min": _fmt(c["p_min"])}
             for (s, q), c in counts.items() if c["with_null"]]
    chance = [r for r in rows if r["estimator"] != METRICS and within_null(r)] if nulls else []
    items = [f"{r['estimator']} {r['quantity']} at layer {r['layer']}, split {r['split']}, "
             f"{'epoch ' + str(r['epoch']) if r.get('epoch') is not None else 'checkpoint ' + str(r['checkpoint'])}: "
             f"{_fmt(r['value'])} {unit}, null {_fmt(r['null_mean'])} ± {_fmt(r['null_std'])}"
             + (f", p = {_fmt(r['p_value'])}" if r.get("p_value") is not None else "") for r in chance[:shown]]
    return {"unit": unit, "saturation": saturation, "computed": sum(c["computed_flags"] for _, _, c in sat_rows),
            "nulls": nulls, "chance": items, "chance_more": max(0, len(chance) - shown),
            "validation": _validation_section(Path(validation), unit) if validation is not None else None}


# ---------------------------------------------------------------------------------------------
# provenance

def _find(d: Any, pred: Callable[[str], bool], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if pred(path) and not isinstance(v, (dict, list)):
                out.append((path, v))
            out += _find(v, pred, path)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _find(v, pred, f"{prefix}[{i}]")
    return out


def _provenance(res: Results, rows: list[dict]) -> dict:
    from ibscope.plot._data import METRICS, Setting

    prov = res.provenance or {}
    facts: list[tuple[str, Any]] = []
    ver = prov.get("ibscope_version") or prov.get("version")
    facts.append(("results written by", f"ibscope {ver}" if ver else "unknown (no provenance sidecar found)"))
    for key in ("created", "command", "device"):
        if key in prov:
            facts.append((key, prov[key]))
    if prov.get("sources"):
        facts.append(("results file(s)", ", ".join(map(str, prov["sources"]))))
    elif res.path:
        facts.append(("results file", str(res.path)))
    facts += [(k, v) for k, v in _find(prov, lambda k: any(w in k.lower() for w in ("hash", "sha", "store", "version")))
              if k not in ("ibscope_version", "version", "format_version")][:40]
    facts.append(("report made by", f"ibscope {__version__}, "
                  f"{_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}"))
    est: dict = {}
    for r in rows:
        if r["estimator"] == METRICS:
            continue
        s = Setting.of(r)
        e = est.setdefault(s, {"quantities": {}, "n": set(), "dims": set(), "splits": set()})
        e["quantities"].setdefault(r["quantity"], None)
        if r["n_samples"] is not None:
            e["n"].add(r["n_samples"])
        if r["dims"]:
            e["dims"].add(str(r["dims"]))
        e["splits"].add(r["split"])
    settings = [{"estimator": s.estimator, "params": s.params_json, "quantities": ", ".join(v["quantities"]),
                 "splits": ", ".join(sorted(v["splits"])), "n": ", ".join(map(str, sorted(v["n"]))),
                 "dims": ", ".join(sorted(v["dims"])[:6])} for s, v in est.items()]
    full = json.dumps(prov, indent=2, sort_keys=True, default=str) if prov else None
    return {"facts": [(k, _text(v)) for k, v in facts], "settings": settings, "full": full}


# ---------------------------------------------------------------------------------------------
# OOD section

def load_ood(path: str | os.PathLike) -> dict:
    """Read and check the ``ood_metrics.json`` written by ``ibscope ood`` (DataError if malformed)."""
    from ibscope.ood.runner import JSON_NAME, read_metrics

    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    doc = read_metrics(p)  # refuses an incomplete output set (a killed `ibscope ood`)
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        got = type(doc).__name__ if not isinstance(doc, dict) else f"keys {sorted(doc)[:8]}"
        raise DataError(f"OOD results file '{p}' must be a JSON object with a 'results' list. Got {got}.",
                        hint="Use the ood_metrics.json written by `ibscope ood`.")
    for i, r in enumerate(doc["results"]):
        missing = [k for k in OOD_REQUIRED if not isinstance(r, dict) or k not in r]
        if missing:
            raise DataError(f"OOD results file '{p}': entry {i} of 'results' lacks {missing}.",
                            hint="Each entry needs at least ood_set and auroc (see docs/plot.md).")
    if not isinstance(doc.get("figures", []), (list, dict)):
        raise DataError(f"OOD results file '{p}': 'figures' must be a list of paths. Got {type(doc['figures']).__name__}.")
    doc["_path"] = str(p)
    return doc


def _ood_section(doc: dict) -> dict:
    base = Path(doc["_path"]).parent
    rows = doc["results"]
    keys = [(k, t) for k, t in OOD_COLUMNS if any(k in r and r[k] is not None for r in rows)]
    if any("config" in r for r in rows):  # the configuration already names detector/reduction/k
        keys = [(k, t) for k, t in keys if k not in ("detector", "reduction", "k")]
    best: dict = {}
    for r in rows:
        g = (r.get("ood_set"), r.get("checkpoint"), r.get("layer"))
        if isinstance(r.get("auroc"), (int, float)) and r["auroc"] > best.get(g, -1):
            best[g] = r["auroc"]
    def ck(v):
        return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))

    rows = sorted(rows, key=lambda r: (str(r.get("ood_set")), ck(r.get("checkpoint")), -(r.get("auroc") or 0)))
    text_cols = ("config", "detector", "reduction", "layer", "ood_set")

    def cell(r, k):
        v = r.get(k)
        s = _fmt(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (
            "k", "checkpoint", "epoch") else _fmt(v)
        lo, hi = r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high")
        if lo is not None and hi is not None:
            s += f" [{_fmt(float(lo))}, {_fmt(float(hi))}]"
        cls = "best" if k == "auroc" and r.get("auroc") == best.get((r.get("ood_set"), r.get("checkpoint"),
                                                                      r.get("layer"))) else ""
        align = "l" if k in text_cols else ""
        return {"cls": f"{cls} {align}".strip(), "text": s}

    head = [{"cls": "l" if k in text_cols else "", "title": t} for k, t in keys]
    body = [[cell(r, k) for k, _ in keys] for r in rows]
    prov = doc.get("provenance") or {}
    settings = prov.get("settings") or {}
    from markupsafe import Markup

    intro: list[str] = []  # Markup (a str) where it holds HTML
    if doc.get("layer"):
        intro.append(Markup("layer <b>{}</b>").format(doc["layer"]))
    if "tpr" in settings:
        intro.append(f"threshold at TPR {settings['tpr']} from {settings.get('validation', 'the ID validation split')}")
    intro.append("scores: higher = more OOD; bold = best AUROC per OOD set and checkpoint; brackets: bootstrap interval")
    figs = doc.get("figures") or []
    if isinstance(figs, dict):
        figs = list(figs.values())
    fig_list: list[dict[str, Any]] = []
    for f in figs:
        fp = Path(f) if Path(f).is_absolute() else base / f
        mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".gif": "image/gif"}.get(
            fp.suffix.lower())
        if not fp.exists() or mime is None:
            why = "not found" if not fp.exists() else "not an image format a browser shows"
            msg = f"OOD figure '{f}' {why} (looked in {fp.parent}); it is missing from this report."
            warnings.warn(msg, stacklevel=3)
            fig_list.append({"missing": msg})
            continue
        fig_list.append({"missing": None, "src": _data_uri(fp.read_bytes(), mime), "name": fp.name})
    return {"intro": intro, "path": doc["_path"], "warnings": [str(w) for w in doc.get("warnings") or []],
            "head": head, "rows": body, "figures": fig_list,
            "provenance": json.dumps(prov, indent=2, sort_keys=True, default=str) if prov else None}


# ---------------------------------------------------------------------------------------------

def write_report(results: Any, out_html: str | os.PathLike | None = None, *, ood: str | os.PathLike | None = None,
                 figures_dir: str | os.PathLike | None = None, unit: str = "bits", title: str | None = None,
                 kinds: Sequence[str] | None = None, runs_mode: str = "median", max_columns: int = 10,
                 dpi: int = 110, validation: str | os.PathLike | None = None, null: str = "band",
                 callback: Callable[[int, int, str], None] | None = None) -> Path:
    """Write the self-contained HTML report and return its path.

    ``results``: results CSV path(s) or a Results. ``out_html`` defaults to
    ``<results stem>_report.html`` next to the results. ``ood``: the ``ood_metrics.json`` (or
    its folder) written by ``ibscope ood``. ``figures_dir``: a folder of PNGs drawn by
    ``ibscope plot`` from the same results (``<kind>_<name>.png``): those newer than the results
    are embedded as they are; the others are drawn and also saved there.
    ``kinds``: plot kinds to include (default: all the data supports except the animation).
    ``validation``: the folder (or validation.csv) of ``ibscope validate``: its table and figure go into
    the section "Can these numbers be trusted?", which is always there (saturation and null counts).
    ``null``: how figures show permutation nulls ("band", "subtract", "off"; as ``ibscope plot --null``).
    """
    from ibscope.plot import figures as plan_figures
    from ibscope.plot import load_results, save_figure
    from ibscope.plot._data import prepare
    from ibscope.results import time_axis

    if max_columns < 2:
        raise UsageError(f"max_columns must be >= 2. Got {max_columns}.")
    if kinds is not None and "animation" in kinds:
        raise UsageError("The HTML report embeds still images only; leave 'animation' out of the kinds.",
                         hint="Make the animation with `ibscope plot RESULTS --animate`.")
    res = load_results(results)
    out = Path(out_html) if out_html is not None else _default_out(res)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"The report is an HTML file; the output name should end in .html. Got '{out.name}'.")
    prepare_output(out, folder=False, what="report", create=False)  # before any work: -o under a file is exit 2
    ood_doc = load_ood(ood) if ood is not None else None
    if validation is not None:
        from ibscope.trust import read_validation

        read_validation(validation)  # a missing or malformed table is an error before anything is drawn
    jobs = plan_figures(res, kinds=kinds, unit=unit, runs_mode=runs_mode, null=null)
    conv = prepare(res, unit)
    tcol = time_axis(conv.rows)
    total = len(jobs) + 1
    fig_by_kind: dict[str, list[dict]] = {}
    src_mtime = max((Path(p).stat().st_mtime for p in _sources(results, res)), default=None)
    for i, job in enumerate(jobs):
        have = Path(figures_dir) / f"{job.name}.png" if figures_dir is not None else None
        if have is not None and src_mtime is not None and have.exists() and have.stat().st_mtime >= src_mtime:
            data = have.read_bytes()  # drawn by `ibscope plot` from these results: reuse, do not redraw
        else:
            assert job.make is not None  # report jobs are figures, never animations
            fig = job.make()
            data = _png(fig, dpi)
            if have is not None:
                save_figure(fig, have, "png", max(dpi, 150), job.name, job.caption)
        fig_by_kind.setdefault(job.kind, []).append(
            {"name": job.name, "src": _data_uri(data, "image/png"), "caption": job.caption})
        if callback is not None:
            callback(i + 1, total, job.name)
    runs = conv.unique("run")
    splits = conv.unique("split")
    n_ck = len({r[tcol] for r in conv.rows})
    name = title or f"ibscope report — {res.path.name if res.path else 'results'}"
    summary = (f"{len(conv.rows)} rows · {len(runs)} run(s): {', '.join(runs[:8])}{' …' if len(runs) > 8 else ''}"
               f" · split(s): {', '.join(splits)} · {n_ck} {tcol} value(s) · information in {unit}")
    sections = [("plane", "Information plane", ("info-plane", "trajectory", "estimators")),
                ("curves", "Curves over training", ("curves",)), ("metrics", "Training metrics", ("metrics",))]
    figure_sections = []
    for sid, head, ks in sections:
        figs = [f for k in ks for f in fig_by_kind.get(k, [])]
        if figs:
            figure_sections.append({"id": sid, "head": head, "figures": figs})
    from ibscope._templates import render

    page = render("report/page.html.j2", version=__version__, title=name, summary=summary,
                  figure_sections=figure_sections,
                  numbers={**_number_tables(conv.rows, tcol, max_columns), "noted": _noted(res.rows),
                           "csv": _csv_link(res.rows, (res.path.stem if res.path else "results") + ".csv")},
                  trust=_trust_section(conv.rows, unit, validation),
                  ood=_ood_section(ood_doc) if ood_doc is not None else None,
                  provenance=_provenance(res, conv.rows))
    prepare_output(out, folder=False, what="report")
    # disk full, read-only, ...: an error naming the report, and no temporary file left
    write_text_atomic(out, page, tmp=out.with_name(f".{out.name}.tmp"), action="writing the report")
    if callback is not None:
        callback(total, total, out.name)
    return out
