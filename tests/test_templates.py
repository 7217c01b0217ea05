"""Templates (ibscope/templates/): shipped as package data, HTML autoescaped, Markdown not."""

import fnmatch
import tomllib
from html.parser import HTMLParser
from pathlib import Path

from ibscope._templates import environment, render
from ibscope.ood.report import write_markdown_report

ROOT = Path(__file__).parents[1]


def test_every_template_is_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["ibscope"]
    files = [p.relative_to(ROOT / "ibscope").as_posix() for p in (ROOT / "ibscope" / "templates").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 8
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"not shipped in a wheel (add to package-data): {missing}"
    assert {"jinja2>=3.1", "pydantic>=2.5"} <= set(data["project"]["dependencies"])


def test_every_template_compiles():
    env = environment()
    names = env.list_templates(filter_func=lambda n: n.endswith(".j2"))
    assert "report/page.html.j2" in names and "ood/report.md.j2" in names
    for n in names:
        env.get_template(n)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text += data


def _doc(layer, warning, figure):
    return {"layer": layer, "warnings": [warning], "figures": [figure],
            "provenance": {"ibscope_version": "1", "created": "now",
                           "settings": {"validation": "val", "tpr": 0.95, "ci_level": 0.9, "n_bootstrap": 10},
                           "inputs": {"id_test": {"path": "a.h5", "n_samples": 4}}},
            "results": [{"config": "knn", "checkpoint": 1, "epoch": 2, "ood_set": "<i>noise</i>", "auroc": 0.75,
                         "auroc_ci_low": 0.5, "auroc_ci_high": 0.875}]}


def test_ood_reports_escape_html_but_not_markdown(tmp_path):
    md, html = write_markdown_report(tmp_path, _doc("<script>x</script>", "a & b < c", 'f".png'))
    page = _Tags()
    page.feed(html.read_text())
    assert "script" not in page.tags and "i" not in page.tags  # user text never becomes markup
    assert "OOD report: layer <script>x</script>" in page.text and "a & b < c" in page.text
    assert "0.750 [0.500, 0.875]" in page.text
    text = md.read_text()
    assert "# OOD report: layer `<script>x</script>`" in text and "- a & b < c" in text
    assert "| knn | 1 | 2 | <i>noise</i> | 0.750 [0.500, 0.875] |" in text


def test_report_macros_escape_attributes():
    out = render("report/macros.html.j2")  # a macro library renders to (almost) nothing
    assert out.strip() == ""
    m = environment().get_template("report/macros.html.j2").module
    html = str(m.figure('data:x" onload="alert(1)', "a<b", "c&d", id="fig-1"))
    assert 'onload="alert' not in html and "&#34; onload=&#34;" in html and "a&lt;b" in html and "c&amp;d" in html
