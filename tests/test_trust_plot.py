"""Saturation, permutation nulls and validation in `ibscope plot` and `ibscope report`.

Tables are built by hand in nats with the columns null_mean, null_std, p_value, saturated
filled, so the plotted band, the hollow markers, the subtracted values and the validation
error bars have closed-form expected values (bits = nats / ln 2). One real table from
`ibscope estimate` (those columns empty) shows that older tables still plot and report.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import LogNorm, to_rgba
from typer.testing import CliRunner

from capture_support import tiny_tanh_run
from ibscope.cli.main import app
from ibscope.errors import DataError, UsageError
from ibscope.plot import figures, plot_results
from ibscope.report import trust_counts, write_report
from ibscope.results import make_row, read_results, write_results
from ibscope.trust import VALIDATION_COLUMNS, is_saturated, write_csv_atomic
from test_plot import by_gid, job
from test_report import parse

LN2 = math.log(2)
N = 1024
EPOCHS = (0, 9, 99)
LAYERS = ("fc1", "fc2")
PARAMS = {"n_bins": 30}


def nm(ci, li):  # null mean of I(T;Y), nats
    return (0.30 + 0.02 * ci + 0.01 * li) * LN2


def ns(ci, li):
    return (0.04 + 0.01 * li) * LN2


def v_ity(ci, li):
    return (0.5 + 0.1 * ci - 0.05 * li) * LN2


def v_ixt(ci, li):
    return (9.0 - 2 * li + 0.475 * ci) * LN2  # fc1 at epoch 99: 9.95 bits, within 1 % of log n = 10 bits


def trust_table(with_null=True, with_flags=True, chance=()):
    rows = []
    for ci, e in enumerate(EPOCHS):
        for li, layer in enumerate(LAYERS):
            kw = dict(run="run", split="probe", checkpoint=ci, epoch=e, layer=layer, layer_index=li,
                      estimator="binning", params=PARAMS, n_samples=N)
            x = v_ixt(ci, li)
            sat_x = (N_CAP - x) <= 0.01 * N_CAP
            rows.append(make_row(quantity="I(X;T)", value=x, unit="nats", cap=N_CAP, dims="1x8",
                                 saturated=sat_x if with_flags else None, **kw))
            # cells in ``chance`` sit inside their null band (value = null mean + 1 sd): chance level
            y, p = (nm(ci, li) + ns(ci, li), 0.4) if (ci, li) in chance else (v_ity(ci, li), 1 / 11)
            rows.append(make_row(quantity="I(T;Y)", value=y, unit="nats", cap=LN2, dims="8x1",
                                 null_mean=nm(ci, li) if with_null else None, null_std=ns(ci, li) if with_null else None,
                                 p_value=p if with_null else None, saturated=False if with_flags else None, **kw))
    return rows


N_CAP = math.log(N)


# ------------------------------------------------------------------------------------------- plot
def test_curves_null_band_equals_mean_plus_minus_two_sd_in_bits(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table())
    fig = [j for j in figures(p, kinds=["curves"]) if j.meta["quantity"] == "I(T;Y)"][0].make()
    for li, layer in enumerate(LAYERS):
        (band,) = by_gid(fig, f"curve:probe:{layer}:null")
        verts = band.get_paths()[0].vertices
        for ci, e in enumerate(EPOCHS):
            ys = verts[np.isclose(verts[:, 0], e), 1]
            assert ys.min() == pytest.approx((nm(ci, li) - 2 * ns(ci, li)) / LN2, abs=1e-12)
            assert ys.max() == pytest.approx((nm(ci, li) + 2 * ns(ci, li)) / LN2, abs=1e-12)
        assert band.get_hatch() == "////"
        (line,) = by_gid(fig, f"curve:probe:{layer}")
        np.testing.assert_allclose(line.get_ydata(), [v_ity(ci, li) / LN2 for ci in range(3)])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("permutation null" in t for t in labels)


def test_plane_null_ribbon_follows_each_layer(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table())
    for kind in ("info-plane", "trajectory"):
        fig = job(p, kind)
        for li, layer in enumerate(LAYERS):
            (rib,) = by_gid(fig, f"null:{layer}")
            polys = [path.vertices for path in rib.get_paths()]
            assert len(polys) == 2  # one quadrilateral between each pair of consecutive checkpoints
            for q, ci in zip(polys, (0, 1)):
                # corners: (x_t, lo_t), (x_t+1, lo_t+1), (x_t+1, hi_t+1), (x_t, hi_t), all in bits
                want = [(v_ixt(ci, li), nm(ci, li) - 2 * ns(ci, li)),
                        (v_ixt(ci + 1, li), nm(ci + 1, li) - 2 * ns(ci + 1, li)),
                        (v_ixt(ci + 1, li), nm(ci + 1, li) + 2 * ns(ci + 1, li)),
                        (v_ixt(ci, li), nm(ci, li) + 2 * ns(ci, li))]
                np.testing.assert_allclose(q[:4], np.array(want) / LN2, rtol=1e-12)
            (tick,) = by_gid(fig, f"null-mean:{layer}")
            np.testing.assert_allclose(tick.get_ydata(), [nm(ci, li) / LN2 for ci in range(3)])
        ax = fig.axes[0]
        assert ax.get_ylim()[0] <= min(nm(0, li) - 2 * ns(0, li) for li in range(2)) / LN2  # the band is inside


def test_saturated_points_are_hollow_and_the_legend_says_so(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table())
    fig = job(p, "info-plane")
    cmap, norm = colormaps["viridis"], LogNorm(1, 100)
    (pts,) = by_gid(fig, "layer:fc1")
    face, edge = pts.get_facecolors(), pts.get_edgecolors()
    # fc1 at epoch 99 is at 99 % of log n: hollow (face alpha 0), its edge in the epoch's colour
    assert face[2][3] == 0.0
    np.testing.assert_allclose(edge[2], cmap(norm(99 + 1)), atol=1e-12)
    for i, e in enumerate(EPOCHS[:2]):
        np.testing.assert_allclose(face[i], cmap(norm(e + 1)), atol=1e-12)  # filled, epoch colour
    (pts2,) = by_gid(fig, "layer:fc2")
    assert (pts2.get_facecolors()[:, 3] == 1.0).all()  # fc2 never saturated
    assert any("hollow" in t.get_text() for t in fig.legends[0].get_texts())
    curves = [j for j in figures(p, kinds=["curves"]) if j.meta["quantity"] == "I(X;T)"][0].make()
    (hollow,) = by_gid(curves, "curve:probe:fc1:saturated")
    assert hollow.get_markerfacecolor() == "none"
    np.testing.assert_allclose(hollow.get_xdata(), [99.0])
    np.testing.assert_allclose(hollow.get_ydata(), [v_ixt(2, 0) / LN2])
    (line,) = by_gid(curves, "curve:probe:fc1")
    assert list(line.get_markevery()) == [0, 1]  # the filled markers skip the saturated point
    assert any("saturated" in t.get_text() for t in curves.legends[0].get_texts())
    assert "1 saturated estimate(s)" in [j for j in figures(p, kinds=["info-plane"])][0].caption


def test_saturation_computed_from_the_cap_when_the_table_has_no_flags(tmp_path):
    rows = trust_table(with_flags=False)
    assert is_saturated(rows[0]) is False
    assert [is_saturated(r) for r in rows if r["quantity"] == "I(X;T)" and r["layer"] == "fc1"] == [False, False, True]
    assert is_saturated(make_row(layer="l", estimator="e", quantity="q", value=0.98, unit="nats", cap=1.0)) is False
    assert is_saturated(make_row(layer="l", estimator="e", quantity="q", value=0.991, unit="nats", cap=1.0)) is True
    assert is_saturated(make_row(layer="l", estimator="e", quantity="q", value=5.0, unit="dimensions")) is None
    # a rank at the layer's width is a fact about the layer, not a limit of the estimator: no fallback flag
    assert is_saturated(make_row(layer="l", estimator="e", quantity="q", value=5.0, cap=5.0, unit="dimensions")) is None
    p = write_results(tmp_path / "r.csv", rows)
    (pts,) = by_gid(job(p, "info-plane"), "layer:fc1")
    assert pts.get_facecolors()[2][3] == 0.0


def test_null_subtract_and_off(tmp_path):
    rows = trust_table()
    for r in rows:  # one I(T;Y) row without a null: drawn as estimated
        if r["quantity"] == "I(T;Y)" and r["layer"] == "fc2" and r["epoch"] == 0:
            r.update(null_mean=None, null_std=None, p_value=None)
    p = write_results(tmp_path / "r.csv", rows)
    jobs = [j for j in figures(p, kinds=["curves"], null="subtract") if j.meta["quantity"] == "I(T;Y)"]
    fig = jobs[0].make()
    (line,) = by_gid(fig, "curve:probe:fc1")
    np.testing.assert_allclose(line.get_ydata(), [(v_ity(ci, 0) - nm(ci, 0)) / LN2 for ci in range(3)], rtol=1e-12)
    (line2,) = by_gid(fig, "curve:probe:fc2")
    np.testing.assert_allclose(line2.get_ydata(), [v_ity(0, 1) / LN2] + [(v_ity(ci, 1) - nm(ci, 1)) / LN2
                                                                         for ci in (1, 2)], rtol=1e-12)
    assert fig.axes[0].get_ylabel() == "I(T;Y) − null mean  [bits]"
    assert not [a for ax in fig.axes for a in ax.get_children() if (a.get_gid() or "").endswith(":null")]
    # no cap line (H(Y)) on an axis of subtracted values
    assert not [a for ax in fig.axes for a in ax.get_children() if (a.get_gid() or "").startswith("cap")]
    assert "null mean subtracted from 5 estimate(s); 1 without a null drawn as estimated" in jobs[0].caption
    plane = job(p, "info-plane", null="subtract")
    (snap,) = by_gid(plane, "snapshot:99.0")
    np.testing.assert_allclose(snap.get_ydata(), [(v_ity(2, li) - nm(2, li)) / LN2 for li in range(2)])
    assert plane.axes[0].get_ylabel() == "I(T;Y) − null mean  [bits]"
    off = job(p, "info-plane", null="off")
    assert not [a for ax in off.axes for a in ax.get_children() if (a.get_gid() or "").startswith("null")]
    with pytest.raises(UsageError, match="--null must be one of band, subtract, off"):
        figures(p, null="sub")


def _validation_dir(tmp_path, biases=(-0.2, 0.1)):
    d = tmp_path / "val"
    d.mkdir()
    rows = [dict(estimator="binning", params=PARAMS, quantity="I(T;Y)", n_samples=N, dims="8x1", task=f"t{i}",
                 family="mixture", level="-", true_value=0.3, true_value_error=0.001, truth="I(T;Y)",
                 mean_estimate=0.3 + b, bias=b, rmse=abs(b), sd=0.01, repeats=3, n_used=N, unit="nats",
                 seconds=0.1, note="") for i, b in enumerate(biases)]
    write_csv_atomic(d / "validation.csv", VALIDATION_COLUMNS, rows)
    return d


def test_validation_error_bars_span_the_measured_biases(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table())
    vdir = _validation_dir(tmp_path)
    jobs = [j for j in figures(p, kinds=["curves"], validation=vdir) if j.meta["quantity"] == "I(T;Y)"]
    fig = jobs[0].make()
    bars = by_gid(fig, "curve:probe:fc1:validation")
    segs = [s for a in bars for s in (a.get_segments() if hasattr(a, "get_segments") else [])]
    assert len(segs) == 3
    # tasks: mean estimate 0.1 nats (bias -0.2) and 0.4 nats (bias +0.1). The estimate 0.347 nats
    # (epoch 0) lies between them: the truth is in [v - 0.1, v + 0.2]. 0.416 and 0.485 (epochs 9, 99)
    # lie above both: only the nearest task (0.4, bias +0.1) speaks for them: [v - 0.1, v].
    want = {0: (-0.1, 0.2), 1: (-0.1, 0.0), 2: (-0.1, 0.0)}
    for seg, ci in zip(sorted(segs, key=lambda s: s[0][0]), range(3)):
        v = v_ity(ci, 0)
        lo, hi = want[ci]
        assert sorted(seg[:, 1]) == pytest.approx([(v + lo) / LN2, (v + hi) / LN2], abs=1e-12)
    assert "error bars: bias range measured by `ibscope validate` (6 estimate(s))" in jobs[0].caption
    ixt_job = [j for j in figures(p, kinds=["curves"], validation=vdir) if j.meta["quantity"] == "I(X;T)"][0]
    assert "(0 estimate(s); 6 not covered by the validation)" in ixt_job.caption  # no I(X;T) task in the table
    assert not [a for ax in ixt_job.make().axes for a in ax.get_children()
                if (a.get_gid() or "").endswith(":validation")]
    plane = job(p, "trajectory", validation=vdir)
    assert by_gid(plane, "validation:fc1")


def test_truth_interval_reads_the_tasks_near_the_estimate():
    from ibscope.trust import truth_interval

    # three tasks read at the cap (about 1.0) whatever their truth; one reads 0.5 without bias
    tasks = [(0.99, 0.95, 0.001), (0.998, 0.6, 0.001), (1.0, 0.04, 0.001), (0.5, 0.0, 0.01)]
    assert truth_interval(1.0, tasks) == pytest.approx((0.05, 1.0))  # saturated: any truth 0.05 .. 1.0
    assert truth_interval(0.5, tasks) == pytest.approx((0.5, 0.5))
    # bracketed by 0.5 (bias 0: truth 0.7) and 0.99 (bias 0.95: truth -0.25, floored at 0)
    assert truth_interval(0.7, tasks) == pytest.approx((0.0, 0.7))
    assert truth_interval(0.02, [(0.5, 0.6, 0.0)]) == (0.0, 0.02)  # floored at 0
    assert truth_interval(1.0, []) is None


def test_plot_cli_null_and_validation_render(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table())
    vdir = _validation_dir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["plot", str(p), "-o", str(tmp_path / "band"), "-k", "curves", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["plot", str(p), "-o", str(tmp_path / "off"), "-k", "curves", "--null", "off", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["plot", str(p), "-o", str(tmp_path / "sub"), "-k", "info-plane", "--null", "subtract",
                              "--validation", str(vdir), "-q"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(tmp_path / "band" / "curves_I_T_Y.png") as a, Image.open(tmp_path / "off" / "curves_I_T_Y.png") as b:
        ga, gb = np.asarray(a.convert("L"), float), np.asarray(b.convert("L"), float)
    assert len(np.unique(ga)) > 20  # rendered, not blank
    assert ga.shape != gb.shape or np.abs(ga - gb).sum() > 1000  # the hatched band is drawn (and only with band)
    assert (tmp_path / "sub" / "info-plane_binning.png").stat().st_size > 10_000
    bad = runner.invoke(app, ["plot", str(p), "--null", "bogus"])
    assert bad.exit_code == 2 and "--null must be one of" in bad.output
    missing = runner.invoke(app, ["plot", str(p), "--validation", str(tmp_path / "nowhere")])
    assert missing.exit_code == 4 and "Validation table not found" in missing.output
    notval = runner.invoke(app, ["plot", str(p), "--validation", str(p)])
    assert notval.exit_code == 4 and "not a validation table" in notval.output


# ------------------------------------------------------------------------------------------- report
def test_report_trust_section_counts(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table(chance={(0, 0), (0, 1)}))  # two estimates at chance level
    vdir = _validation_dir(tmp_path)
    (vdir / "validation.png").write_bytes(
        (tmp_path / "r.csv").read_bytes()[:0] or _tiny_png(tmp_path))
    out = write_report(p, tmp_path / "rep.html", validation=vdir)
    page = parse(out)
    assert "trust" in page.ids
    text = page.all_text
    assert "Can these numbers be trusted?" in text
    counts = trust_counts(read_results(p).rows)
    (cx,) = [c for (s, q), c in counts.items() if q == "I(X;T)"]
    (cy,) = [c for (s, q), c in counts.items() if q == "I(T;Y)"]
    assert (cx["with_cap"], cx["saturated"]) == (6, 1)
    assert (cy["with_null"], cy["above_chance"], cy["chance"]) == (6, 4, 2)
    cells = page.cells
    i = cells.index("binning (n_bins=30)")  # saturation table: I(X;T) with a cap 6, saturated 1, 17 %
    assert cells[i + 1:i + 5] == ["I(X;T)", "6", "1", "17 %"]
    j = [k for k, c in enumerate(cells) if c == "binning (n_bins=30)"][2]  # nulls table, I(T;Y) row
    assert cells[j + 1:j + 6] == ["I(T;Y)", "6", "4", "2", "0.091"]
    assert "I(T;Y) at layer fc1, split probe, epoch 0: 0.340 bits, null 0.300 ± 0.040, p = 0.400" in text
    assert "I(T;Y) at layer fc2, split probe, epoch 0: 0.360 bits, null 0.310 ± 0.050, p = 0.400" in text
    # the validation table and its figure
    assert "t0" in cells and "t1" in cells and "-0.289" in cells  # bias -0.2 nats in bits
    assert any(img.get("alt") == "estimate against truth" for img in page.imgs)


def _tiny_png(tmp_path):
    from matplotlib.figure import Figure

    f = Figure(figsize=(1, 1))
    f.subplots().plot([0, 1], [0, 1])
    f.savefig(tmp_path / "v.png")
    return (tmp_path / "v.png").read_bytes()


def test_report_cli_validation_option_and_errors(tmp_path):
    p = write_results(tmp_path / "r.csv", trust_table())
    vdir = _validation_dir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(p), "-o", str(tmp_path / "a.html"), "--validation", str(vdir), "-q"])
    assert res.exit_code == 0, res.output
    assert "Validation on tasks with a known answer" in (tmp_path / "a.html").read_text()
    res = runner.invoke(app, ["report", str(p), "-o", str(tmp_path / "b.html"), "--validation", str(tmp_path / "x")])
    assert res.exit_code == 4 and "Validation table not found" in res.output
    assert not (tmp_path / "b.html").exists()
    with pytest.raises(DataError):
        write_report(p, tmp_path / "c.html", validation=p)


@pytest.mark.slow
def test_real_table_without_nulls_plots_and_reports(tmp_path):
    d = tiny_tanh_run(tmp_path, 120, "tiny_trust_model")
    runner = CliRunner()
    res = runner.invoke(app, ["capture", "-m", f"{d / 'tiny.py'}:make", "-c", str(d / "ck" / "*.pt"), "-p",
                              str(d / "probe.npz"), "-l", "type:Tanh", "-o", str(d / "acts"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["estimate", str(d / "acts"), "-o", str(d / "r.csv"), "-e", "binning",
                              "--null-permutations", "0", "-q"])
    assert res.exit_code == 0, res.output
    table = read_results(d / "r.csv")
    info = [r for r in table.rows if r["quantity"] in ("I(X;T)", "I(T;Y)")]
    assert info and all(r["null_mean"] is None for r in info)  # a table without nulls (--null-permutations 0)
    res = runner.invoke(app, ["plot", str(d / "r.csv"), "-o", str(d / "figs"), "-q"])
    assert res.exit_code == 0, res.output
    out = write_report(d / "r.csv", d / "rep.html")
    text = parse(out).all_text
    assert "holds no permutation nulls" in text and "Not validated" in text
    sat = sum(bool(is_saturated(r)) for r in info)
    capped = sum(is_saturated(r) is not None for r in info)
    assert capped == len(info)  # binning gives every information row a cap
    if any(r["saturated"] is None for r in info):
        assert f"flag(s) were computed here from value and cap" in text
    from ibscope.plot._data import Setting

    cells = parse(out).cells
    for q in ("I(X;T)", "I(T;Y)"):  # the saturation table: estimator, quantity, with a cap, saturated, share
        rows_q = [r for r in info if r["quantity"] == q]
        i = next(k for k in range(len(cells) - 1) if cells[k] == Setting.of(rows_q[0]).label() and cells[k + 1] == q)
        assert cells[i + 2:i + 4] == [str(len(rows_q)), str(sum(bool(is_saturated(r)) for r in rows_q))]
    assert sat > 0  # 120 probe inputs, 6 tanh units, 30 bins: the first layer's I(X;T) sits at log n


def test_trust_helpers_and_validation_figure_do_not_pull_torch():
    import subprocess
    import sys

    code = ("import sys, ibscope.trust, ibscope.plot.validation, ibscope.cli.validate, ibscope.report;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
