"""`ibscope plot` / `ibscope report` on a results table made by the real pipeline: a tiny tanh net
really trained for a few steps, real checkpoints, `ibscope capture`, `ibscope estimate`. The
plotted points are the table's values in bits; the installed console script keeps stdout clean."""

from __future__ import annotations

import math
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from capture_support import tiny_tanh_run
from ibscope.cli.main import app
from ibscope.plot import figures
from ibscope.results import read_results



def invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return r


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tiny_tanh_run(tmp_path_factory.mktemp("plot_e2e"), 96, "tiny_plot_model")
    invoke("capture", "-m", f"{d / 'tiny.py'}:make", "-c", d / "ck" / "*.pt", "-p", d / "probe.npz",
           "-l", "type:Tanh", "-o", d / "acts", "-q")
    invoke("estimate", d / "acts", "-o", d / "results.csv", "-e", "binning", "-e", "effective-rank", "-q")
    return d / "results.csv"


def test_plane_shows_the_estimated_values_in_bits(results):
    res = read_results(results)
    fig = [j for j in figures(results, kinds=["info-plane"])][0].make()
    layers = [r["layer"] for r in sorted(res.filter(quantity="I(X;T)", epoch=2).rows, key=lambda r: r["layer_index"])]
    line = [a for ax in fig.axes for a in ax.get_lines() if a.get_gid() == "snapshot:2.0"][0]
    want_x = [res.filter(quantity="I(X;T)", epoch=2, layer=ly).rows[0]["value"] / math.log(2) for ly in layers]
    want_y = [res.filter(quantity="I(T;Y)", epoch=2, layer=ly).rows[0]["value"] / math.log(2) for ly in layers]
    np.testing.assert_allclose(line.get_xdata(), want_x, rtol=1e-12)
    np.testing.assert_allclose(line.get_ydata(), want_y, rtol=1e-12)
    caps = [a for ax in fig.axes for a in ax.get_lines() if (a.get_gid() or "").startswith("cap:x:")]
    assert caps and caps[0].get_xdata()[0] == pytest.approx(math.log2(96))  # binning's log n cap, n = 96


def test_cli_plot_and_report_on_pipeline_output(results, tmp_path):
    # the console script of the environment running the tests (not whichever `ibscope` is first on PATH)
    exe = Path(sys.executable).parent / "ibscope"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "ibscope.cli.main"]
    out = subprocess.run([*cmd, "plot", str(results), "-o", str(tmp_path / "figs"), "--dpi", "40"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # data goes to files, messages to stderr
    written = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert written == ["curves_I_T_Y.png", "curves_I_X_T.png", "curves_effective_rank.png",
                       "info-plane_binning.png", "metrics.png", "trajectory_binning.png"]
    assert all(name in out.stderr for name in written)
    r = CliRunner().invoke(app, ["report", str(results), "-o", str(tmp_path / "r.html"), "-q",
                                 "--figures-dir", str(tmp_path / "figs")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") == len(written)
    assert "content_hash" in html  # the store hash from estimate's provenance sidecar
