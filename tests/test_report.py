"""`ibscope report`: the HTML is parsed and checked for every figure, the numbers, the provenance
and the OOD section; it must be self-contained (no network) and written atomically."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.plot import figures
from ibscope.report import write_report
from ibscope.results import read_results, write_results
from test_plot import LN2, ixt, table

PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.ids, self.text, self.cells = [], [], [], [], []
        self._in_td = False
        self._bold = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag in ("a", "link", "script"):
            self.links.append(a.get("href") or a.get("src") or "")
        if tag == "td":
            self._in_td = True
            self._bold.append("best" in (a.get("class") or ""))
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_td:
            self.cells[-1] += data

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def parse(path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def ood_json(tmp_path, figure="figures/roc.png", make_figure=True):
    d = tmp_path / "ood"
    (d / "figures").mkdir(parents=True)
    if make_figure:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        f = Figure(figsize=(2, 2))
        f.subplots().plot([0, 1], [0, 1])
        f.savefig(d / "figures" / "roc.png")
    doc = {"format": "ibscope-ood", "layer": "fc2", "figures": [figure], "warnings": ["AUROC below 0.5 somewhere"],
           "results": [
               {"config": "mahalanobis", "detector": "mahalanobis", "reduction": "none", "layer": "fc2",
                "checkpoint": 2, "epoch": 99, "ood_set": "noise", "auroc": 0.8125, "aupr_in": 0.75, "aupr_out": 0.8,
                "fpr95_id_positive": 0.5, "fpr95_openood": 0.4, "auroc_ci_low": 0.7, "auroc_ci_high": 0.9},
               {"config": "knn/k=5", "detector": "knn", "reduction": "none", "k": 5, "layer": "fc2", "checkpoint": 2,
                "epoch": 99, "ood_set": "noise", "auroc": 0.9375, "aupr_in": 0.9, "aupr_out": 0.95,
                "fpr95_id_positive": 0.2, "fpr95_openood": 0.1}],
           "provenance": {"ibscope_version": "9.9.9", "settings": {"tpr": 0.95, "validation": "held-out 10%"}}}
    (d / "ood_metrics.json").write_text(json.dumps(doc))
    return d / "ood_metrics.json"


def test_report_embeds_every_figure_numbers_provenance_and_ood(tmp_path):
    prov = {"ibscope_version": "0.0.test", "stores": [{"path": "acts/train", "content_hash": "deadbeefcafe"}]}
    p = write_results(tmp_path / "res.csv", table(splits=("train", "test"), epochs=(0, 9, 99)), prov)
    figs_dir = tmp_path / "figs"
    out = write_report(p, tmp_path / "rep.html", ood=ood_json(tmp_path), figures_dir=figs_dir, dpi=50)
    page = parse(out)
    jobs = figures(p)
    # every planned figure is embedded as a decodable PNG, plus the OOD figure
    assert len(page.imgs) == len(jobs) + 1
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == PNG
    for j in jobs:
        assert f"fig-{j.name}" in page.ids
        assert (figs_dir / f"{j.name}.png").exists()  # figures also saved for reuse
    # self-contained: nothing fetched from the network
    assert all(not src.startswith(("http:", "https:", "//")) for src in page.links)
    assert "http://" not in out.read_text() and "https://" not in out.read_text()
    text = page.all_text
    # numbers: I(X;T) of fc1 at epoch 99 on train, in bits (stored in nats)
    assert f"{ixt(0, 99, 0) / LN2:.3f}" in page.cells
    assert "I(X;T) — binning (n_bins=30) — split: train" in text
    # provenance: versions, store hash, estimator settings
    assert "ibscope 0.0.test" in text and "deadbeefcafe" in text and '{"n_bins": 30}' in text
    # OOD: table, best AUROC in bold, warning, figure
    assert "0.938" in page.cells and "0.812 [0.700, 0.900]" in page.cells
    best = [c for c, b in zip(page.cells, page._bold) if b]
    assert best == ["0.938"]
    assert "AUROC below 0.5 somewhere" in text and "held-out 10%" in text
    # the full table rides along as a CSV download with every row
    (csv_link,) = [h for h in page.links if h.startswith("data:text/csv;base64,")]
    csv_text = base64.b64decode(csv_link.split(",", 1)[1]).decode()
    assert len(csv_text.strip().splitlines()) == len(read_results(p)) + 1
    assert not list(tmp_path.glob(".*tmp"))


def test_report_reuses_fresh_figures_and_tables_in_nats(tmp_path):
    p = write_results(tmp_path / "r.csv", table(epochs=(0, 9)))
    figs_dir = tmp_path / "figs"
    write_report(p, tmp_path / "a.html", figures_dir=figs_dir, kinds=["metrics"], dpi=40)
    marker = figs_dir / "metrics.png"
    stamp = marker.read_bytes()
    out = write_report(p, tmp_path / "b.html", figures_dir=figs_dir, kinds=["metrics"], unit="nats", dpi=40)
    page = parse(out)
    (img,) = page.imgs
    assert base64.b64decode(img["src"].split(",", 1)[1]) == stamp  # reused, not redrawn
    assert f"{ixt(0, 9, 0):.3f}" in page.cells  # nats now
    assert "information in nats" in page.all_text


def test_report_many_epochs_table_is_thinned(tmp_path):
    epochs = tuple(range(0, 30))
    p = write_results(tmp_path / "r.csv", table(epochs=epochs, extra=False, metrics=False))
    out = write_report(p, tmp_path / "r.html", kinds=["curves"], max_columns=5, dpi=30)
    text = parse(out).all_text
    assert "5 of 30 shown" in text


def test_cli_report_default_path_and_errors(tmp_path):
    p = write_results(tmp_path / "results.csv", table(epochs=(0, 9)))
    r = CliRunner().invoke(app, ["report", str(p), "-k", "metrics"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "results_report.html").exists() and "results_report.html" in r.output

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = CliRunner().invoke(app, ["report", str(p), "--ood", str(bad), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 4 and "is not valid JSON" in r.output and not (tmp_path / "x.html").exists()
    bad.write_text(json.dumps({"metrics": []}))
    r = CliRunner().invoke(app, ["report", str(p), "--ood", str(bad), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 4 and "must be a JSON object with a 'results' list" in r.output
    bad.write_text(json.dumps({"results": [{"ood_set": "noise"}]}))
    r = CliRunner().invoke(app, ["report", str(p), "--ood", str(bad), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 4 and "lacks ['auroc']" in r.output
    r = CliRunner().invoke(app, ["report", str(p), "--ood", str(tmp_path / "nope"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 4 and "OOD results file not found" in r.output
    r = CliRunner().invoke(app, ["report", str(p), "-o", str(tmp_path / "x.pdf")])
    assert r.exit_code == 2 and "should end in .html" in r.output
    r = CliRunner().invoke(app, ["report", str(p), "-k", "animation"])
    assert r.exit_code == 2 and "still images only" in r.output
    empty = write_results(tmp_path / "empty.csv", [])
    r = CliRunner().invoke(app, ["report", str(empty)])
    assert r.exit_code == 4 and "holds no rows" in r.output
    assert not (tmp_path / "x.html").exists()


def test_missing_ood_figure_is_reported_not_silent(tmp_path):
    p = write_results(tmp_path / "r.csv", table(epochs=(0, 9), extra=False))
    j = ood_json(tmp_path, figure="figures/gone.png", make_figure=False)
    with pytest.warns(UserWarning, match="gone.png' not found"):
        out = write_report(p, tmp_path / "r.html", ood=j, kinds=["metrics"], dpi=30)
    assert "OOD figure 'figures/gone.png' not found" in parse(out).all_text


def test_cli_report_says_when_an_ood_figure_is_missing(tmp_path):
    p = write_results(tmp_path / "r.csv", table(epochs=(0, 9), extra=False))
    j = ood_json(tmp_path, figure="figures/gone.png", make_figure=False)
    r = CliRunner().invoke(app, ["report", str(p), "--ood", str(j), "-k", "metrics", "-q", "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0 and "Warning: OOD figure 'figures/gone.png' not found" in r.output
