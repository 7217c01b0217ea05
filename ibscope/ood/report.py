"""A small self-contained Markdown + HTML report of an OOD run (``report.md`` / ``report.html``)."""

from __future__ import annotations

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
    """Write ``report.md`` and ``report.html`` next to ``ood_metrics.json`` (templates
    ``ibscope/templates/ood/report.md.j2`` and ``report.html.j2``; the HTML is autoescaped)."""
    from ibscope._templates import render

    prov = doc["provenance"]
    s = prov["settings"]
    rows = sorted(doc["results"], key=lambda r: (r["ood_set"], r["checkpoint"], -r["auroc"]))
    context = {
        "layer": doc["layer"],
        "summary": f"ibscope {prov['ibscope_version']}, {prov['created']}. Scores: higher = more OOD. "
                   f"Threshold from the ID validation split ({s['validation']}) at TPR {s['tpr']:g}; "
                   f"brackets are {s['ci_level']:.0%} bootstrap intervals ({s['n_bootstrap']} replicates).",
        "inputs": "Inputs: " + ", ".join(f"{role} = `{v['path']}` (n={v['n_samples']})"
                                         for role, v in prov["inputs"].items()),
        "head": [t for _, t in COLUMNS],
        "rows": [[_fmt(r, k) for k, _ in COLUMNS] for r in rows],
        "warnings": list(doc["warnings"]),
        "figures": list(doc["figures"]),
    }
    md_path = out / "report.md"
    write_text_atomic(md_path, render("ood/report.md.j2", **context))
    html_path = out / "report.html"
    write_text_atomic(html_path, render("ood/report.html.j2", **context))
    return md_path, html_path
