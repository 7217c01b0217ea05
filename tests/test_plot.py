"""`ibscope plot`: the plotted data checked numerically, every kind rendered, bad input refused.

Tables are built by hand (make_row + write_results) with values in nats, so every coordinate,
colour and cap has a closed-form expected value: bits = nats / ln 2, colour = viridis(LogNorm(
1, max+1)(epoch + 1)). Figures come back from the library as matplotlib Figures; their artists
are found by the gid the drawing code gives them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.errors import DataError, UsageError
from ibscope.plot import figures, load_results, plot_results
from ibscope.results import make_row, read_results, write_results

LN2 = math.log(2)
N = 1024  # probe samples: log2 n = 10 bits exactly


def ixt(run_i: int, epoch: float, li: int) -> float:
    """I(X;T) in nats: decreases with depth, rises with log epoch, shifted per run."""
    return (6.0 - li + math.log1p(epoch) + run_i) * LN2


def ity(run_i: int, epoch: float, li: int, split_i: int = 0) -> float:
    return (0.2 + 0.1 * math.log1p(epoch) - 0.05 * li - 0.1 * split_i) * LN2


def table(runs=("run",), splits=("probe",), epochs=(0, 9, 99), layers=("fc1", "fc2", "fc3"),
          settings=(("binning", {"n_bins": 30}),), metrics=True, extra=True) -> list[dict]:
    rows = []
    for ri, run in enumerate(runs):
        for si, split in enumerate(splits):
            for ci, e in enumerate(epochs):
                for li, layer in enumerate(layers):
                    for est, params in settings:
                        kw = dict(run=run, split=split, checkpoint=ci, epoch=e, layer=layer, layer_index=li,
                                  estimator=est, params=params, n_samples=N, dims="12x8")
                        rows.append(make_row(quantity="I(X;T)", value=ixt(ri, e, li), unit="nats",
                                             cap=math.log(N), **kw))
                        rows.append(make_row(quantity="I(T;Y)", value=ity(ri, e, li, si), unit="nats", cap=LN2, **kw))
                if extra:
                    for li, layer in enumerate(layers):
                        rows.append(make_row(run=run, split=split, checkpoint=ci, epoch=e, layer=layer,
                                             layer_index=li, estimator="effective-rank", params={},
                                             quantity="effective_rank", value=8.0 - li - 0.01 * e + ri,
                                             unit="dimensions", stderr=0.25, n_samples=N))
                if metrics:
                    kw = dict(run=run, split=split, checkpoint=ci, epoch=e, layer="-", estimator="metrics")
                    rows.append(make_row(quantity="accuracy", value=0.5 + 0.004 * e + 0.01 * ri, unit="ratio", **kw))
                    rows.append(make_row(quantity="loss", value=0.7 - 0.005 * e, unit="nats", **kw))
    return rows


def by_gid(fig, gid: str):
    out = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert out, f"no artist with gid {gid!r}"
    return out


def job(results, kind: str, **kw):
    (j,) = [j for j in figures(results, kinds=[kind], **kw) if j.kind == kind][:1]
    return j.make()


def test_import_does_not_pull_torch():
    code = ("import sys, ibscope.plot, ibscope.plot.animate, ibscope.report, ibscope.cli.plot;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_snapshot_coordinates_colours_caps_in_bits(tmp_path):
    p = write_results(tmp_path / "r.csv", table(extra=False, metrics=False))
    fig = job(p, "info-plane")
    cmap, norm = colormaps["viridis"], LogNorm(1, 100)  # epochs 0..99 shifted by one for the log scale
    for e in (0, 9, 99):
        (line,) = by_gid(fig, f"snapshot:{float(e)!r}")
        # one polyline per checkpoint across the three layers, in bits
        np.testing.assert_allclose(line.get_xdata(), [ixt(0, e, li) / LN2 for li in range(3)], rtol=1e-12)
        np.testing.assert_allclose(line.get_ydata(), [ity(0, e, li) / LN2 for li in range(3)], rtol=1e-12)
        np.testing.assert_allclose(line.get_color(), cmap(norm(e + 1)), atol=1e-12)
    (pts,) = by_gid(fig, "layer:fc2")
    np.testing.assert_allclose(pts.get_offsets(), [[ixt(0, e, 1) / LN2, ity(0, e, 1) / LN2] for e in (0, 9, 99)])
    np.testing.assert_allclose(pts.get_facecolors(), [cmap(norm(e + 1)) for e in (0, 9, 99)], atol=1e-12)
    # caps: log n = 10 bits (vertical), H(Y) = 1 bit (horizontal)
    (cx,) = by_gid(fig, "cap:x:10.0")
    (cy,) = by_gid(fig, "cap:y:1.0")
    assert cx.get_xdata()[0] == pytest.approx(10.0) and cy.get_ydata()[0] == pytest.approx(1.0)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "log n = 10.00 bits" in texts and "H(Y) = 1.00 bits" in texts
    # the colour bar says what it means and is labelled in real epochs
    cbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert "log scale of epoch + 1" in cbar.get_ylabel()
    assert [t.get_text() for t in cbar.get_yticklabels()] == ["0", "1", "10", "99"]  # first and last epoch shown
    ax = fig.axes[0]
    assert ax.get_xlabel() == "I(X;T)  [bits]" and ax.get_ylabel() == "I(T;Y)  [bits]"
    assert "binning (n_bins=30)" in fig.get_suptitle()
    assert ax.get_xlim()[1] >= 10.0 and ax.get_ylim()[1] >= 1.0  # caps inside the axes


def test_nats_unit_keeps_stored_values(tmp_path):
    rows = table(extra=False, metrics=False)
    for r in rows:  # some rows stored in bits: converted, not refused (nats and bits are one family)
        if r["epoch"] == 9 and r["layer"] == "fc2":
            r.update(value=r["value"] / LN2, cap=r["cap"] / LN2, unit="bits")
    p = write_results(tmp_path / "r.csv", rows)
    fig = job(p, "info-plane", unit="nats")
    (line,) = by_gid(fig, "snapshot:9.0")
    np.testing.assert_allclose(line.get_xdata(), [ixt(0, 9, li) for li in range(3)], rtol=1e-12)
    (cx,) = by_gid(fig, f"cap:x:{round(math.log(N), 9)!r}")
    assert cx.get_xdata()[0] == pytest.approx(math.log(N))
    assert fig.axes[0].get_xlabel() == "I(X;T)  [nats]"


def test_trajectory_one_line_per_layer(tmp_path):
    p = write_results(tmp_path / "r.csv", table(extra=False, metrics=False, epochs=(1, 10, 100)))
    fig = job(p, "trajectory")
    for li, layer in enumerate(("fc1", "fc2", "fc3")):
        (line,) = by_gid(fig, f"trajectory:{layer}")
        np.testing.assert_allclose(line.get_xdata(), [ixt(0, e, li) / LN2 for e in (1, 10, 100)])
        np.testing.assert_allclose(line.get_ydata(), [ity(0, e, li) / LN2 for e in (1, 10, 100)])
    cbar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert cbar.get_ylabel() == "epoch (log scale)"  # epochs start at 1: no shift needed


def test_median_and_band_over_runs(tmp_path):
    # runs shift I(X;T) by 0, 1, 2 bits: median = run 1, 25-75th pct = +-0.5 bit around it
    p = write_results(tmp_path / "r.csv", table(runs=("a", "b", "c"), extra=False, metrics=False))
    fig = job(p, "curves")  # first curves job is I(X;T)
    (line,) = by_gid(fig, "curve:probe:fc1")
    np.testing.assert_allclose(line.get_ydata(), [ixt(1, e, 0) / LN2 for e in (0, 9, 99)])
    (band,) = by_gid(fig, "curve:probe:fc1:band")
    verts = band.get_paths()[0].vertices
    for e in (0.0, 9.0, 99.0):
        ys = verts[np.isclose(verts[:, 0], e), 1]
        assert ys.min() == pytest.approx(ixt(1, e, 0) / LN2 - 0.5) and ys.max() == pytest.approx(ixt(1, e, 0) / LN2 + 0.5)
    assert "median of 3 runs" in fig.get_suptitle()
    fig_all = job(p, "curves", runs_mode="all")
    for r in range(3):
        (faint,) = by_gid(fig_all, f"curve:probe:fc1:run{r}")
        np.testing.assert_allclose(faint.get_ydata(), [ixt(r, e, 0) / LN2 for e in (0, 9, 99)])
        assert faint.get_alpha() < 0.5
    plane = job(p, "info-plane")
    (snap,) = by_gid(plane, "snapshot:99.0")
    np.testing.assert_allclose(snap.get_xdata(), [ixt(1, 99, li) / LN2 for li in range(3)])
    assert "median of 3 runs, bars 25–75th pct" in plane.axes[0].get_title()


def test_curves_stderr_band_log_axis_and_single_quantities(tmp_path):
    p = write_results(tmp_path / "r.csv", table(epochs=(0, 10, 100, 1000), metrics=False))
    jobs = {j.name: j for j in figures(p, kinds=["curves"])}
    assert list(jobs) == ["curves_I_X_T", "curves_I_T_Y", "curves_effective_rank"]
    fig = jobs["curves_effective_rank"].make()
    (line,) = by_gid(fig, "curve:probe:fc3")
    np.testing.assert_allclose(line.get_ydata(), [8.0 - 2 - 0.01 * e for e in (0, 10, 100, 1000)])
    (err,) = by_gid(fig, "curve:probe:fc3:stderr")
    ys = err.get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(6.25) and ys.min() == pytest.approx(8.0 - 2 - 10 - 0.25)
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and "log scale" in ax.get_xlabel()  # epochs span 0..1000
    assert ax.get_ylabel() == "effective_rank  [dimensions]"
    lin = figures(p, kinds=["curves"], logx=False)[0].make()
    assert lin.axes[0].get_xscale() == "linear"
    ixt_fig = jobs["curves_I_X_T"].make()
    (cap,) = by_gid(ixt_fig, "cap:10.0")
    assert cap.get_ydata()[0] == pytest.approx(10.0)


def test_estimator_facets_share_axes_and_name_params(tmp_path):
    settings = (("binning", {"n_bins": 30}), ("binning", {"n_bins": 100}), ("ksg", {"k": 3}))
    p = write_results(tmp_path / "r.csv", table(settings=settings, extra=False, metrics=False))
    names = [j.name for j in figures(p)]
    assert "estimators" in names  # several settings: the comparison is drawn by default
    assert {"info-plane_binning_n_bins30", "info-plane_binning_n_bins100", "info-plane_ksg"} <= set(names)
    fig = job(p, "estimators")
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()]
    assert len(axes) == 3
    assert len({ax.get_xlim() for ax in axes}) == 1 and len({ax.get_ylim() for ax in axes}) == 1
    titles = [ax.get_title() for ax in axes]
    assert any("n_bins=100" in t for t in titles) and any("ksg (k=3)" in t for t in titles)


def test_train_and_test_side_by_side(tmp_path):
    p = write_results(tmp_path / "r.csv", table(splits=("train", "test"), extra=False, metrics=False))
    fig = job(p, "info-plane")
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title().split(" ·")[0] for ax in axes] == ["split: train", "split: test"]
    assert axes[0].get_ylim() == axes[1].get_ylim()
    for si, ax in enumerate(axes):
        (line,) = [a for a in ax.get_lines() if a.get_gid() == "snapshot:9.0"]
        np.testing.assert_allclose(line.get_ydata(), [ity(0, 9, li, si) / LN2 for li in range(3)])
    curves = figures(p, kinds=["curves"])[1].make()  # I(T;Y): test dashed, train solid
    (tr,) = by_gid(curves, "curve:train:fc1")
    (te,) = by_gid(curves, "curve:test:fc1")
    assert tr.get_linestyle() == "-" and te.get_linestyle() == "--"


def test_metrics_panel_counts_each_checkpoint_once(tmp_path):
    p = write_results(tmp_path / "r.csv", table(splits=("train", "test"), extra=False))
    fig = job(p, "metrics")
    (acc,) = by_gid(fig, "metric:accuracy")
    np.testing.assert_allclose(acc.get_ydata(), [0.5 + 0.004 * e for e in (0, 9, 99)])
    (loss,) = by_gid(fig, "metric:loss")
    # a logged loss is a number as logged, never converted (this table, like those of older ibscope versions,
    # wrote it as "nats": it is read as unit "loss")
    np.testing.assert_allclose(loss.get_ydata(), [0.7 - 0.005 * e for e in (0, 9, 99)])
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy (ratio)", "loss (as logged)"]
    assert {r["unit"] for r in read_results(p).rows if r["estimator"] == "metrics"} == {"ratio", "loss"}
    for ax in fig.axes:  # whole epochs on the time axis
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def _nonblank(path) -> float:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), float)
    return float((a < 245).mean())


def test_every_kind_rendered_to_files(tmp_path):
    from PIL import Image

    p = write_results(tmp_path / "res.csv", table(settings=(("binning", {"n_bins": 30}), ("ksg", {"k": 3}))))
    paths = plot_results(p, kinds=list(("info-plane", "trajectory", "estimators", "curves", "metrics", "animation")),
                         animation_format="gif", dpi=60)
    names = sorted(x.name for x in paths)
    assert all(x.parent == tmp_path / "res_plots" for x in paths)
    assert names == sorted([
        "info-plane_binning.png", "info-plane_ksg.png", "trajectory_binning.png", "trajectory_ksg.png",
        "estimators.png", "curves_I_X_T.png", "curves_I_T_Y.png", "curves_effective_rank.png", "metrics.png",
        "animation_binning.gif", "animation_ksg.gif"])
    for x in paths:
        assert x.stat().st_size > 5000, x
        if x.suffix == ".png":
            assert 0.02 < _nonblank(x) < 0.9, x  # drawn, and not a solid block
    with Image.open(tmp_path / "res_plots" / "animation_binning.gif") as gif:
        assert gif.n_frames == 3  # one frame per checkpoint
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("L"), float))
    assert np.abs(frames[0] - frames[-1]).mean() > 0.1  # the plane moves
    assert not list((tmp_path / "res_plots").glob(".*tmp*"))  # no temporary files left behind
    svg = plot_results(p, tmp_path / "svg", kinds=["info-plane"], fmt="svg", estimators=["ksg"])
    assert [x.name for x in svg] == ["info-plane_ksg.svg"] and "<svg" in svg[0].read_text()[:500]


def test_several_files_with_clashing_run_names_stay_apart(tmp_path):
    a = write_results(tmp_path / "seed0.csv", table(extra=False, metrics=False))
    b = write_results(tmp_path / "seed1.csv", table(runs=("x", "run"), extra=False, metrics=False)[
        len(table(extra=False, metrics=False)):])  # only run "run" with shifted values (run index 1)
    res = load_results([a, b])
    assert sorted(res.unique("run")) == ["seed0/run", "seed1/run"]
    fig = job([a, b], "curves")
    (line,) = by_gid(fig, "curve:probe:fc1")
    assert "median of 2 runs" in fig.get_suptitle()
    np.testing.assert_allclose(line.get_ydata(), [(ixt(0, e, 0) + ixt(1, e, 0)) / 2 / LN2 for e in (0, 9, 99)])


def test_library_errors(tmp_path):
    rows = table(extra=False, metrics=False)
    with pytest.raises(DataError, match="two rows for quantity 'I\\(X;T\\)'"):
        figures(load_results_rows(rows + rows[:1]), kinds=["info-plane"])[0].make()
    with pytest.raises(UsageError, match="percentiles"):
        figures(load_results_rows(rows), band="80:20")
    with pytest.raises(UsageError, match="Unknown layer 'fc9'"):
        figures(load_results_rows(rows), layers=["fc9"])
    only_single = [r for r in table() if r["quantity"] == "effective_rank"]
    with pytest.raises(DataError, match="needs rows with both I\\(X;T\\) and I\\(T;Y\\)"):
        figures(load_results_rows(only_single), kinds=["trajectory"])
    assert [j.kind for j in figures(load_results_rows(only_single))] == ["curves"]


def load_results_rows(rows):
    from ibscope.results import Results

    return Results([dict(r) for r in rows])


# ------------------------------------------------------------------------------------ CLI

def test_cli_default_writes_next_to_results_and_lists_paths(tmp_path):
    p = write_results(tmp_path / "results.csv", table(epochs=(0, 9)))
    r = CliRunner().invoke(app, ["plot", str(p), "--dpi", "50"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "results_plots"
    written = sorted(x.name for x in out.iterdir())
    assert written == ["curves_I_T_Y.png", "curves_I_X_T.png", "curves_effective_rank.png",
                       "info-plane_binning.png", "metrics.png", "trajectory_binning.png"]
    assert "Wrote 6 file(s)" in r.output
    for name in written:
        assert name in r.output


def _cli(args):
    return CliRunner().invoke(app, args)


def test_cli_errors_have_messages_and_exit_codes(tmp_path, monkeypatch):
    empty = tmp_path / "empty.csv"
    write_results(empty, [])
    r = _cli(["plot", str(empty), "-o", str(tmp_path / "o1")])
    assert r.exit_code == 4 and "holds no rows" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o1").exists()

    good = write_results(tmp_path / "good.csv", table(epochs=(0, 9)))
    r = _cli(["plot", str(good), "--quantity", "I(X,T)"])
    assert r.exit_code == 2 and "Unknown quantity 'I(X,T)'" in r.output and "Did you mean" in r.output
    r = _cli(["plot", str(good), "-k", "infoplane"])
    assert r.exit_code == 2 and "Did you mean 'info-plane'?" in r.output
    r = _cli(["plot", str(good), "--unit", "bytes"])
    assert r.exit_code == 2 and "--unit must be one of nats, bits" in r.output
    r = _cli(["plot", str(good), "--format", "jpg"])
    assert r.exit_code == 2 and "--format must be one of png, svg, pdf. Got 'jpg'." in r.output
    r = _cli(["plot", str(good), "--runs", "mean"])
    assert r.exit_code == 2 and "--runs must be one of median, all. Got 'mean'." in r.output
    r = _cli(["plot", str(good), "--logx", "maybe"])
    assert r.exit_code == 2 and "--logx must be auto, on or off" in r.output
    r = _cli(["plot", str(good), "--animate", "--fps", "0", "-o", str(tmp_path / "o4")])
    assert r.exit_code == 2 and "--fps must be > 0. Got 0.0" in r.output and not (tmp_path / "o4").exists()
    r = _cli(["plot", str(good), "--dpi", "5"])
    assert r.exit_code == 2 and "--dpi must be between 20 and 1200. Got 5" in r.output

    mixed = table(epochs=(0, 9))
    for row in mixed:
        if row["quantity"] == "effective_rank" and row["epoch"] == 9:
            row["unit"] = "nats"
    pm = write_results(tmp_path / "mixed.csv", mixed)
    r = _cli(["plot", str(pm), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 4 and "Quantity 'effective_rank' has rows in units ['dimensions', 'nats']" in r.output
    assert not (tmp_path / "o2").exists()

    single = write_results(tmp_path / "single.csv", [x for x in table() if x["quantity"] == "effective_rank"])
    r = _cli(["plot", str(single), "-k", "info-plane"])
    assert r.exit_code == 4 and "needs rows with both I(X;T) and I(T;Y)" in r.output

    monkeypatch.setattr("ibscope.plot.animate.shutil.which", lambda name: None)
    r = _cli(["plot", str(good), "--animate", "--animation-format", "mp4", "-o", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "MP4 needs ffmpeg" in r.output and "--animation-format gif" in r.output
    assert not (tmp_path / "o3").exists()

    r = _cli(["plot", str(tmp_path / "missing.csv")])
    assert r.exit_code == 4 and "Results file not found" in r.output


def test_figure_metadata_names_estimator(tmp_path):
    from PIL import Image

    p = write_results(tmp_path / "r.csv", table(extra=False, metrics=False, epochs=(0, 9)))
    (png,) = plot_results(p, kinds=["info-plane"], dpi=40)
    with Image.open(png) as im:
        desc = im.info.get("Description", "")
    assert "binning (n_bins=30)" in desc and "log n" in desc
    assert json.loads(json.dumps(desc))  # plain text, no binary junk


def test_animation_frames_follow_the_checkpoints(tmp_path):
    from ibscope.plot.animate import build_animation

    p = write_results(tmp_path / "r.csv", table(extra=False, epochs=(0, 9, 99)))
    meta = figures(p, kinds=["animation"])[0].meta
    anim = build_animation(meta["rows"], title=meta["title"], time_col="epoch", metric_rows=meta["metric_rows"])
    assert anim.n_frames == 3
    current = anim.moving[3]  # after the three history lines
    for i, e in enumerate((0, 9, 99)):
        anim.update(i)
        np.testing.assert_allclose(current.get_xdata(), [ixt(0, e, li) / LN2 for li in range(3)])
        np.testing.assert_allclose(current.get_ydata(), [ity(0, e, li) / LN2 for li in range(3)])
        assert anim.moving[-2].get_text() == f"epoch {e}"  # the counter
        assert list(anim.moving[-1].get_xdata()) == [e, e]  # cursor on the accuracy panel
        assert sum(len(h.get_xdata()) > 0 for h in anim.moving[:3]) == i  # earlier checkpoints faint


def test_caps_that_differ_by_layer_are_drawn_in_the_layer_colour(tmp_path):
    rows = [r for r in table(metrics=False) if r["quantity"] == "effective_rank"]
    for r in rows:
        r["cap"] = 10.0 - r["layer_index"]  # e.g. a rank capped by each layer's width
    p = write_results(tmp_path / "r.csv", rows)
    fig = job(p, "curves")
    for li, layer in enumerate(("fc1", "fc2", "fc3")):
        (cap,) = by_gid(fig, f"cap:{layer}:{10.0 - li!r}")
        (curve,) = by_gid(fig, f"curve:probe:{layer}")
        assert cap.get_ydata()[0] == 10.0 - li and cap.get_color() == curve.get_color()
    assert not [t for t in fig.axes[0].texts if t.get_text().startswith("cap")]  # no pile of labels


def test_noted_row_is_a_gap_not_a_crash(tmp_path):
    """A cell `ibscope estimate` could not estimate (empty value, a note) leaves a gap in its
    curve; every other point is drawn at its value, and the report lists the note."""
    from ibscope.report import write_report

    rows = table(extra=False, metrics=False)
    (dead,) = [r for r in rows if r["epoch"] == 9 and r["layer"] == "fc2" and r["quantity"] == "I(X;T)"]
    dead.update(value=None, cap=None, note="binning I(X;T) not estimated at layer 'fc2', checkpoint 1 (epoch 9): "
                                           "every column of T is constant")
    p = write_results(tmp_path / "r.csv", rows)
    fig = job(p, "curves", quantities=["I(X;T)"], unit="nats")
    (line,) = by_gid(fig, "curve:probe:fc2")
    y = np.asarray(line.get_ydata(), float)
    assert np.isnan(y[1]) and y[0] == pytest.approx(ixt(0, 0, 1)) and y[2] == pytest.approx(ixt(0, 99, 1))
    (other,) = by_gid(fig, "curve:probe:fc1")
    np.testing.assert_allclose(other.get_ydata(), [ixt(0, e, 0) for e in (0, 9, 99)], rtol=1e-12)
    # the snapshot plane at epoch 9 joins the two layers that have a value
    (snap,) = by_gid(job(p, "info-plane", unit="nats"), "snapshot:9.0")
    xs = np.asarray(snap.get_xdata(), float)
    assert np.isnan(xs[1]) and xs[0] == pytest.approx(ixt(0, 9, 0)) and xs[2] == pytest.approx(ixt(0, 9, 2))
    written = plot_results(p, tmp_path / "figs")
    assert written and all(f.stat().st_size > 0 for f in written)
    html = write_report(p, tmp_path / "r.html").read_text()
    assert "Cells without a value" in html and "checkpoint 1 (epoch 9): every column of T is constant" in html
    # a table with no value at all has nothing to draw: a data error quoting the note
    only = write_results(tmp_path / "only.csv", [dead])
    with pytest.raises(DataError, match="Every row of the results has no value.*every column of T is constant"):
        figures(only)
