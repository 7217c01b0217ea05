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
import html
import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ibscope._version import __version__
from ibscope._atomic import write_text_atomic
from ibscope._paths import prepare_output
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

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;color:#222;max-width:1180px;margin:0 auto;
padding:1.5em 2em 4em;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-top:1.6em}.sub{color:#666;margin-top:0}nav{background:#f6f8fa;padding:.6em 1em;border-radius:6px}
nav a{margin-right:1.2em;color:#0550ae;text-decoration:none}
figure{margin:1.2em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.92em;margin-top:.3em}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0 1.4em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dee4;padding:3px 8px;text-align:right}th{background:#f6f8fa}
td.l,th.l{text-align:left}tr:nth-child(even) td{background:#fbfcfd}td.best{font-weight:bold;background:#e6f4ea}
.note{color:#666;font-size:.9em}.warn{color:#9a6700;background:#fff8c5;padding:.4em .8em;border-radius:4px}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.82em}details{margin:.6em 0}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1.2em}dt{font-weight:600}dd{margin:0;word-break:break-all}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


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


def _img(data: bytes, mime: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">'


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


def _number_tables(rows: list[dict], time_col: str, max_columns: int) -> str:
    from ibscope.plot._data import METRICS, Setting, cubes, layer_order, summarize

    parts: list[str] = []
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
        head = "".join(f"<th>{_e(_tick(t))}</th>" for t in shown)
        body = []
        for li, layer in enumerate(layers):
            cells = "".join(f"<td>{_fmt(float(med[times.index(t), li]))}</td>" for t in shown)
            body.append(f"<tr><td class='l'>{_e(layer)}</td>{cells}</tr>")
        note = (f"median of {runs} runs; " if runs > 1 else "") + f"{c.unit}; columns: {time_col}"
        if cut:
            note += f" ({len(shown)} of {len(times)} shown, evenly spaced; all in the CSV below)"
        caps = ", ".join(_fmt(x) for x in c.caps)
        if caps:
            note += f"; cap {caps} {c.unit}"
        parts.append(f"<h3>{_e(q)} — {_e(s.label())} — split: {_e(split)}</h3>"
                     f"<p class='note'>{_e(note)}</p><table><tr><th class='l'>layer</th>{head}</tr>"
                     f"{''.join(body)}</table>")
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
        head = "".join(f"<th>{_e(_tick(t))}</th>" for t in shown)
        body = []
        for q in names:
            med, _, _ = summarize(cs[q].value)
            li = cs[q].layers.index(q)
            cells = "".join(f"<td>{_fmt(float(med[times.index(t), li]))}</td>" for t in shown)
            body.append(f"<tr><td class='l'>{_e(q)} [{_e(cs[q].unit)}]</td>{cells}</tr>")
        parts.append(f"<h3>Training metrics</h3><p class='note'>columns: {_e(time_col)}"
                     + (f" ({len(shown)} of {len(times)} shown)" if cut else "") + "</p>"
                     f"<table><tr><th class='l'>metric</th>{head}</tr>{''.join(body)}</table>")
    return "".join(parts)


def _tick(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:.4g}"


def _noted(rows: list[dict], shown: int = 20) -> str:
    """The cells ``ibscope estimate`` could not estimate (no value, a note saying why)."""
    noted = [r for r in rows if r["value"] is None]
    if not noted:
        return ""
    items = "".join(f"<li>{_e(r.get('note') or '(no note)')}</li>" for r in noted[:shown])
    more = f"<li>... and {len(noted) - shown} more (see the CSV)</li>" if len(noted) > shown else ""
    return (f"<h3>Cells without a value</h3><p class='note'>{len(noted)} row(s) could not be estimated and are "
            f"left out of the figures and tables above:</p><ul>{items}{more}</ul>")


def _csv_link(rows: list[dict], name: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (json.dumps(r[c], sort_keys=True) if c == "params" else r[c])
                    for c in COLUMNS])
    data = base64.b64encode(buf.getvalue().encode()).decode("ascii")
    return (f'<p><a download="{_e(name)}" href="data:text/csv;base64,{data}">Download the full table '
            f"({len(rows)} rows, values as stored) as CSV</a></p>")


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


def _validation_section(vdir: Path, unit: str) -> str:
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
    head = ("<tr><th class='l'>estimator</th><th class='l'>parameters</th><th class='l'>quantity</th><th>n</th>"
            "<th class='l'>dims</th><th class='l'>task</th><th>truth</th><th>mean estimate</th><th>bias</th>"
            "<th>rmse</th><th>runs</th><th class='l'>note</th></tr>")
    body = []
    for r in vrows:
        u = r.get("unit", "nats")
        tv, te = _conv(r.get("true_value"), u, unit), _conv(r.get("true_value_error"), u, unit)
        truth = _fmt(tv) + (f" ± {_fmt(te)}" if te else "")
        body.append(
            f"<tr><td class='l'>{_e(r['estimator'])}</td><td class='l'><code>{_e(json.dumps(r['params'], sort_keys=True))}"
            f"</code></td><td class='l'>{_e(r['quantity'])}</td><td>{_e(r.get('n_samples'))}</td>"
            f"<td class='l'>{_e(r.get('dims'))}</td><td class='l'>{_e(r['task'])}</td><td>{_e(truth)}</td>"
            f"<td>{_fmt(_conv(r.get('mean_estimate'), u, unit))}</td><td>{_fmt(_conv(r.get('bias'), u, unit))}</td>"
            f"<td>{_fmt(_conv(r.get('rmse'), u, unit))}</td><td>{_e(r.get('repeats'))}</td>"
            f"<td class='l'>{_e(r.get('note') or '')}</td></tr>")
    notes = "".join(f"<li>{_e(x)}</li>" for x in (meta.get("notes") or []))
    png = base / VALIDATION_PNG
    fig = (f"<figure>{_img(png.read_bytes(), 'image/png', 'estimate against truth')}<figcaption>"
           f"{_e(VALIDATION_PNG)}: the mean estimate against the truth of every validation task, one panel per "
           f"estimator setting; on the diagonal the estimator is unbiased.</figcaption></figure>") if png.exists() else ""
    return (f"<h3>Validation on tasks with a known answer</h3><p class='note'>From <code>{_e(vpath)}</code>"
            f" ({len(vrows)} task(s); {unit}): every estimator setting, quantity, n and dims of the results, run on "
            f"synthetic tasks of the same n and dims whose true value is known. bias = mean estimate − truth; rmse "
            f"over the repeats (different seeds).</p>"
            + (f"<ul class='note'>{notes}</ul>" if notes else "")
            + f"<table>{head}{''.join(body)}</table>{fig}")


def _trust_section(rows: list[dict], unit: str, validation: str | os.PathLike | None, shown: int = 12) -> str:
    """The report's "Can these numbers be trusted?" section (rows already in ``unit``)."""
    from ibscope.plot._data import METRICS
    from ibscope.trust import within_null

    counts = trust_counts(rows)
    parts = ["<p>Every number above is an estimate. Three checks say how far to trust it (how to read them: "
             "<code>docs/trust.md</code>): <b>saturation</b> (an estimate at its cap, log n or H(Y), cannot show "
             "more: compression or learning may be hidden), the <b>permutation null</b> (the estimate when T and "
             "Y are made independent by shuffling; an estimate inside it is chance) and <b>validation</b> on tasks "
             "with a known answer at the same n and width (<code>ibscope validate</code>).</p>"]
    sat_rows = [(s, q, c) for (s, q), c in counts.items() if c["with_cap"]]
    if sat_rows:
        trs = []
        computed = sum(c["computed_flags"] for _, _, c in sat_rows)
        for s, q, c in sat_rows:
            caps = ", ".join(_fmt(x) for x in sorted(c["caps"]))
            pct = 100.0 * c["saturated"] / c["with_cap"]
            trs.append(f"<tr><td class='l'>{_e(s.label())}</td><td class='l'>{_e(q)}</td><td>{c['with_cap']}</td>"
                       f"<td>{c['saturated']}</td><td>{pct:.0f} %</td>"
                       f"<td class='l'>{_e(caps)} {_e(unit)}</td></tr>")
        parts.append("<h3>Saturation</h3><p class='note'>Estimates within 1 % of their cap (drawn hollow in the "
                     "figures). At the cap the estimator cannot see compression (I(X;T)) or learning (I(T;Y)) at "
                     "this n and width." + (f" {computed} flag(s) were computed here from value and cap (the table "
                                             f"predates the <code>saturated</code> column)." if computed else "")
                     + "</p><table><tr><th class='l'>estimator</th><th class='l'>quantity</th><th>estimates with a "
                     "cap</th><th>saturated</th><th>share</th><th class='l'>cap(s)</th></tr>" + "".join(trs)
                     + "</table>")
    else:
        parts.append("<h3>Saturation</h3><p class='note'>No estimate in this table has a cap.</p>")
    null_rows = [(s, q, c) for (s, q), c in counts.items() if c["with_null"]]
    if null_rows:
        trs = "".join(
            f"<tr><td class='l'>{_e(s.label())}</td><td class='l'>{_e(q)}</td><td>{c['with_null']}</td>"
            f"<td>{c['above_chance']}</td><td>{c['chance']}</td>"
            f"<td>{_fmt(c['p_min'])}</td></tr>" for s, q, c in null_rows)
        chance = [r for r in rows if r["estimator"] != METRICS and within_null(r)]
        items = "".join(
            f"<li>{_e(r['estimator'])} {_e(r['quantity'])} at layer {_e(r['layer'])}, split {_e(r['split'])}, "
            f"{'epoch ' + str(r['epoch']) if r.get('epoch') is not None else 'checkpoint ' + str(r['checkpoint'])}: "
            f"{_fmt(r['value'])} {_e(unit)}, null {_fmt(r['null_mean'])} ± {_fmt(r['null_std'])}"
            + (f", p = {_fmt(r['p_value'])}" if r.get("p_value") is not None else "") + "</li>" for r in chance[:shown])
        more = f"<li>... and {len(chance) - shown} more (see the CSV)</li>" if len(chance) > shown else ""
        parts.append(
            "<h3>Permutation nulls</h3><p class='note'>Each estimate with a null was recomputed with the rows of Y "
            "(or X) shuffled: the null is what the estimator reports when there is no dependence at all. An estimate "
            "inside its null band (null mean ± 2 sd, hatched in the figures) cannot be told from chance at this n "
            "and width. p = (1 + #{null ≥ value}) / (N + 1) cannot go below 1/(N + 1) with N permutations (0.091 "
            "for N = 10), so read the band, and p against that floor.</p><table><tr><th class='l'>estimator</th>"
            "<th class='l'>quantity</th><th>estimates with a null</th><th>above the band</th><th>inside the band "
            f"(chance)</th><th>smallest p</th></tr>{trs}</table>"
            + (f"<p class='note'>Not distinguishable from chance:</p><ul>{items}{more}</ul>" if chance else ""))
    else:
        parts.append("<h3>Permutation nulls</h3><p class='note'>This table holds no permutation nulls (the columns "
                     "null_mean, null_std, p_value are empty). <code>ibscope estimate</code> computes them for "
                     "I(T;Y) (see docs/trust.md); without them an I(T;Y) near H(Y) cannot be told from chance.</p>")
    if validation is not None:
        parts.append(_validation_section(Path(validation), unit))
    else:
        parts.append("<h3>Validation on tasks with a known answer</h3><p class='note'>Not validated. Run "
                     "<code>ibscope validate RESULTS -o DIR</code> and pass <code>--validation DIR</code> to see the "
                     "bias of each estimator at this table's n and dims.</p>")
    return "".join(parts)


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


def _provenance(res: Results, rows: list[dict]) -> str:
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
                  f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
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
    trs = "".join(
        f"<tr><td class='l'>{_e(s.estimator)}</td><td class='l'><code>{_e(s.params_json)}</code></td>"
        f"<td class='l'>{_e(', '.join(v['quantities']))}</td><td class='l'>{_e(', '.join(sorted(v['splits'])))}</td>"
        f"<td>{_e(', '.join(map(str, sorted(v['n']))))}</td><td class='l'>{_e(', '.join(sorted(v['dims'])[:6]))}</td></tr>"
        for s, v in est.items())
    table = ("<table><tr><th class='l'>estimator</th><th class='l'>parameters</th><th class='l'>quantities</th>"
             f"<th class='l'>splits</th><th>n samples</th><th class='l'>dims</th></tr>{trs}</table>") if trs else ""
    full = (f"<details><summary>Full provenance record (JSON)</summary><pre>"
            f"{_e(json.dumps(prov, indent=2, sort_keys=True, default=str))}</pre></details>") if prov else ""
    return f"<dl>{dl}</dl><h3>Estimator settings</h3>{table}{full}"


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


def _ood_section(doc: dict) -> str:
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
        return f"<td class='{cls} {align}'>{_e(s)}</td>"

    head = "".join(f"<th class='{'l' if k in text_cols else ''}'>{_e(t)}</th>" for k, t in keys)
    body = "".join("<tr>" + "".join(cell(r, k) for k, _ in keys) + "</tr>" for r in rows)
    prov = doc.get("provenance") or {}
    settings = prov.get("settings") or {}
    intro = []
    if doc.get("layer"):
        intro.append(f"layer <b>{_e(doc['layer'])}</b>")
    if "tpr" in settings:
        intro.append(f"threshold at TPR {_e(settings['tpr'])} from {_e(settings.get('validation', 'the ID validation split'))}")
    intro.append("scores: higher = more OOD; bold = best AUROC per OOD set and checkpoint; brackets: bootstrap interval")
    warn = "".join(f"<p class='warn'>{_e(w)}</p>" for w in doc.get("warnings") or [])
    figs = doc.get("figures") or []
    if isinstance(figs, dict):
        figs = list(figs.values())
    fig_html = []
    for f in figs:
        fp = Path(f) if Path(f).is_absolute() else base / f
        mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".gif": "image/gif"}.get(
            fp.suffix.lower())
        if not fp.exists() or mime is None:
            why = "not found" if not fp.exists() else "not an image format a browser shows"
            msg = f"OOD figure '{f}' {why} (looked in {fp.parent}); it is missing from this report."
            warnings.warn(msg, stacklevel=3)
            fig_html.append(f"<p class='warn'>{_e(msg)}</p>")
            continue
        fig_html.append(f"<figure>{_img(fp.read_bytes(), mime, fp.name)}<figcaption>{_e(fp.name)}</figcaption></figure>")
    full = (f"<details><summary>OOD provenance (JSON)</summary><pre>"
            f"{_e(json.dumps(prov, indent=2, sort_keys=True, default=str))}</pre></details>") if prov else ""
    return (f"<p>{'; '.join(intro)}. Source: <code>{_e(doc['_path'])}</code></p>{warn}"
            f"<table><tr>{head}</tr>{body}</table>{''.join(fig_html)}{full}")


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
    fig_html: dict[str, list[str]] = {}
    src_mtime = max((Path(p).stat().st_mtime for p in _sources(results, res)), default=None)
    for i, job in enumerate(jobs):
        have = Path(figures_dir) / f"{job.name}.png" if figures_dir is not None else None
        if have is not None and src_mtime is not None and have.exists() and have.stat().st_mtime >= src_mtime:
            data = have.read_bytes()  # drawn by `ibscope plot` from these results: reuse, do not redraw
        else:
            fig = job.make()
            data = _png(fig, dpi)
            if have is not None:
                save_figure(fig, have, "png", max(dpi, 150), job.name, job.caption)
        fig_html.setdefault(job.kind, []).append(
            f"<figure id='fig-{_e(job.name)}'>{_img(data, 'image/png', job.caption)}"
            f"<figcaption>{_e(job.caption)}</figcaption></figure>")
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
    body = []
    nav = []
    for sid, head, ks in sections:
        figs = [f for k in ks for f in fig_html.get(k, [])]
        if figs:
            nav.append(f"<a href='#{sid}'>{_e(head)}</a>")
            body.append(f"<h2 id='{sid}'>{_e(head)}</h2>{''.join(figs)}")
    nav.append("<a href='#numbers'>Numbers</a>")
    body.append(f"<h2 id='numbers'>Numbers</h2>{_number_tables(conv.rows, tcol, max_columns)}"
                f"{_noted(res.rows)}{_csv_link(res.rows, (res.path.stem if res.path else 'results') + '.csv')}")
    nav.append("<a href='#trust'>Can these numbers be trusted?</a>")
    body.append(f"<h2 id='trust'>Can these numbers be trusted?</h2>{_trust_section(conv.rows, unit, validation)}")
    if ood_doc is not None:
        nav.append("<a href='#ood'>Out-of-distribution</a>")
        body.append(f"<h2 id='ood'>Out-of-distribution detection</h2>{_ood_section(ood_doc)}")
    nav.append("<a href='#provenance'>Provenance</a>")
    body.append(f"<h2 id='provenance'>Provenance</h2>{_provenance(res, conv.rows)}")
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<meta name='generator' content='ibscope {_e(__version__)}'><title>{_e(name)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(name)}</h1><p class='sub'>{_e(summary)}</p>"
            f"<nav>{''.join(nav)}</nav>{''.join(body)}</body></html>\n")
    prepare_output(out, folder=False, what="report")
    # disk full, read-only, ...: an error naming the report, and no temporary file left
    write_text_atomic(out, page, tmp=out.with_name(f".{out.name}.tmp"), action="writing the report")
    if callback is not None:
        callback(total, total, out.name)
    return out
