"""A small self-contained Markdown + HTML report of an OOD run (``report.md`` / ``report.html``)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping

from ibscope._atomic import write_text_atomic

COLUMNS = [("config", "configuration"), ("checkpoint", "ckpt"), ("epoch", "epoch"), ("ood_set", "OOD set"),
           ("auroc", "AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"),
           ("fpr95_id_positive", "FPR95 (ID pos., Lee/Sun)"), ("fpr95_openood", "FPR95 (OOD pos., OpenOOD v1.5)"),
           ("detection_accuracy", "det. acc."), ("flagged_fraction", "OOD flagged"),
           ("id_flagged_fraction", "ID test flagged")]


def _fmt(row: Mapping[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if isinstance(v, float):
        lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        s = f"{v:.3f}"
        if lo is not None and hi is not None:
            s += f" [{lo:.3f}, {hi:.3f}]"
        return s
    return str(v)


def write_markdown_report(out: Path, doc: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` next to ``ood_metrics.json``."""
    prov = doc["provenance"]
    s = prov["settings"]
    head = [
        f"# OOD report: layer `{doc['layer']}`",
        "",
        f"ibscope {prov['ibscope_version']}, {prov['created']}. Scores: higher = more OOD. "
        f"Threshold from the ID validation split ({s['validation']}) at TPR {s['tpr']:g}; "
        f"brackets are {s['ci_level']:.0%} bootstrap intervals ({s['n_bootstrap']} replicates).",
        "",
        "Inputs: " + ", ".join(f"{role} = `{v['path']}` (n={v['n_samples']})" for role, v in prov["inputs"].items()),
        "",
    ]
    rows = sorted(doc["results"], key=lambda r: (r["ood_set"], r["checkpoint"], -r["auroc"]))
    table = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(_fmt(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    warn = ["", "## Warnings", ""] + [f"- {w}" for w in doc["warnings"]] if doc["warnings"] else []
    figs = ["", "## Figures", ""] + [f"![{f}]({f})" for f in doc["figures"]]
    md = "\n".join(head + ["## Metrics", ""] + table + warn + figs) + "\n"
    md_path = out / "report.md"
    write_text_atomic(md_path, md)

    e = html.escape
    th = "".join(f"<th>{e(t)}</th>" for _, t in COLUMNS)
    trs = "".join("<tr>" + "".join(f"<td>{e(_fmt(r, k))}</td>" for k, _ in COLUMNS) + "</tr>" for r in rows)
    warn_html = "".join(f"<li>{e(w)}</li>" for w in doc["warnings"])
    imgs = "".join(f'<figure><img src="{e(f)}" style="max-width:100%"><figcaption>{e(f)}</figcaption></figure>'
                   for f in doc["figures"])
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ibscope OOD report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
        f"<h1>OOD report: layer {e(doc['layer'])}</h1><p>{e(head[2])}</p><p>{e(head[4])}</p>"
        f"<h2>Metrics</h2><table><tr>{th}</tr>{trs}</table>"
        + (f"<h2>Warnings</h2><ul>{warn_html}</ul>" if warn_html else "")
        + f"<h2>Figures</h2>{imgs}</body></html>\n"
    )
    html_path = out / "report.html"
    write_text_atomic(html_path, page)
    return md_path, html_path
