"""`ibscope run` end to end on tiny settings: real training, capture, estimate, plots, report, OOD."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.pipeline import run_pipeline
from ibscope.results import read_results
from ibscope.store import open_store

# 40 epochs, checkpoints 0, 1, 6, 40; two layers; a seeded random 512 of the 4096 inputs
TINY = {
    "train": {"epochs": 40, "checkpoints": 3},
    "capture": {"layers": ["hidden3", "hidden5"], "max_samples": 512, "sample_seed": 0, "jacobian_samples": 0},
    "estimate": {"estimators": ["binning", "kde-upper", "effective-rank"]},  # kde-upper on the all1024 subset
    "plot": {"kinds": ["info-plane"]},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo-tanh.yaml").read_text())
    cfg.pop("quick")
    for k, v in TINY.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    p = d / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(d / "out")])
    assert res.exit_code == 0, res.output
    return d, p, res.output


@pytest.mark.slow
def test_first_run_writes_every_stage(tiny):
    d, _, output = tiny
    out = d / "out"
    assert "Report:" in output and str(out / "report.html") in " ".join(output.split()).replace("\n", "")
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [f"epoch_{e:06d}.pt" for e in (0, 1, 6, 40)]
    st = open_store(out / "stores" / "all")
    assert st.layers == ["hidden3", "hidden5"] and st.n_samples == 512 and [c.epoch for c in st.checkpoints] == [0, 1, 6, 40]
    assert st.config["run"] == "tanh" and st.config["split"] == "all"
    res = read_results(out / "results.csv")
    ixt = res.filter(quantity="I(X;T)", estimator="binning")
    assert len(ixt) == 4 * 2 and {r["run"] for r in ixt.rows} == {"tanh"}
    assert all(0 <= r["value"] <= math.log(512) + 1e-9 and r["cap"] == pytest.approx(math.log(512)) for r in ixt.rows)
    assert len(res.filter(estimator="effective-rank")) == 8
    # the config runs kde-upper on data.subsets' all1024 (here capped at 512 by capture.max_samples)
    kde = res.filter(estimator="kde-upper")
    assert {r["split"] for r in kde.rows} == {"all1024"} and len(kde) == 4 * 2 * 2
    assert {r["split"] for r in ixt.rows} == {"all"}
    metric_keys = [(r["split"], r["checkpoint"], r["quantity"]) for r in res.filter(estimator="metrics").rows]
    assert len(metric_keys) == len(set(metric_keys)) and {k[0] for k in metric_keys} == {"all", "all1024"}
    with np.load(out / "data" / "all1024.npz") as z, np.load(out / "data" / "all.npz") as a:
        assert z["x"].shape == (1024, 12) and np.array_equal(a["x"][z["ids"]], z["x"])  # rows of all.npz
    acc = res.filter(estimator="metrics", quantity="accuracy", split="all")
    assert [r["epoch"] for r in acc.rows] == [0, 1, 6, 40] and acc.rows[-1]["value"] > acc.rows[0]["value"]
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    # the plot stage drew the kinds asked for; the report adds the figures it shows (curves, metrics)
    plot_stamp = json.loads((out / ".ibscope" / "stages" / "plot.json").read_text())
    assert plot_stamp["outputs"] == ["figures/info-plane_binning.png", "figures/info-plane_kde-upper.png"]
    assert "info-plane_binning.png" in figs
    assert all((out / "figures" / f).stat().st_size > 5000 for f in figs)
    html = (out / "report.html").read_text()
    assert "hidden5" in html and "<img" in html
    stamps = {p.stem: json.loads(p.read_text()) for p in (out / ".ibscope" / "stages").glob("*.json")}
    assert set(stamps) == {"data", "train", "capture", "estimate", "plot", "report"}
    assert stamps["train"]["config"]["train"]["epochs"] == 40


def _again(tiny, *extra):
    d, p, _ = tiny
    res = CliRunner().invoke(app, ["run", str(p), "-o", str(d / "out"), *extra])
    assert res.exit_code == 0, res.output
    return run_summary(d / "out")


def run_summary(out):
    return {p.stem: json.loads(p.read_text())["finished"] for p in (out / ".ibscope" / "stages").glob("*.json")}


@pytest.mark.slow
def test_reruns_only_what_changed(tiny):
    d, p, _ = tiny
    before = run_summary(d / "out")
    mtime = (d / "out" / "results.csv").stat().st_mtime
    res = run_pipeline(p, out=d / "out", progress=False, quiet=True)
    assert res.ran() == [] and res.skipped() == ["data", "train", "capture", "estimate", "plot", "report"]
    assert len(run_summary(d / "out")) == 6
    # only plot options changed: figures and report are redrawn, nothing before them
    res = run_pipeline(p, out=d / "out", overrides={"plot": {"unit": "nats"}}, progress=False, quiet=True)
    assert res.ran() == ["plot", "report"]
    assert (d / "out" / "results.csv").stat().st_mtime == mtime
    # an estimator parameter changed: estimate and everything after it
    res = run_pipeline(p, out=d / "out", overrides={"plot": {"unit": "nats"}, "estimate": {"params": {"binning": {"bin_width": 0.5}}}},
                       progress=False, quiet=True)
    assert res.ran() == ["estimate", "plot", "report"]
    coarse = read_results(d / "out" / "results.csv").filter(quantity="I(X;T)", estimator="binning")
    assert all(r["params"]["bin_width"] == 0.5 for r in coarse.rows)
    # --only plot on an up-to-date run re-draws nothing; --force re-does the chosen stage
    res = run_pipeline(p, out=d / "out", overrides={"plot": {"unit": "nats"}, "estimate": {"params": {"binning": {"bin_width": 0.5}}}},
                       only=["plot"], force=True, progress=False, quiet=True)
    assert res.ran() == ["plot"]
    assert before["train"] == run_summary(d / "out")["train"]  # training never re-ran


@pytest.mark.slow
def test_existing_checkpoints_user_model_file_and_probe(tiny, tmp_path):
    d, _, _ = tiny
    (tmp_path / "mynet.py").write_text("from ibscope.demo.models import ib_net\n\ndef build():\n    return ib_net('tanh')\n")
    x = np.load(d / "out" / "data" / "test.npz")
    np.savez(tmp_path / "probe.npz", x=x["x"], y=x["y"])
    cfg = {"name": "mine", "model": {"factory": "mynet.py:build"}, "checkpoints": str(d / "out" / "checkpoints"),
           "data": {"probes": {"heldout": "probe.npz"}}, "capture": {"layers": ["hidden5"]},
           "estimate": {"estimators": ["binning"]}, "plot": {"enabled": False}, "report": {"enabled": False}}
    p = tmp_path / "sub" / "mine.yaml"
    p.parent.mkdir()
    cfg["data"]["probes"]["heldout"] = "../probe.npz"  # relative to the config file's folder
    cfg["model"]["factory"] = "../mynet.py:build"
    p.write_text(yaml.safe_dump(cfg))
    os.chdir(tmp_path)
    res = run_pipeline(p, progress=False, quiet=True)
    assert res.out == (tmp_path / "ibscope-runs" / "mine") and res.ran() == ["capture", "estimate"]
    rows = read_results(res.results).filter(quantity="I(T;Y)")
    assert {r["split"] for r in rows.rows} == {"heldout"} and {r["run"] for r in rows.rows} == {"mine"}
    assert rows.rows[0]["n_samples"] == len(x["y"])


def test_bad_training_data_is_a_data_error(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.zeros((10, 12), np.float32))
    cfg = {"model": {"factory": "ibscope.demo.models:ib_net"}, "data": {"train": "train.npz"}, "train": {"epochs": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 4, r.output
    assert "must be an .npz with arrays 'x' and 'y'. Found: ['x']" in r.output
    assert not (tmp_path / "o" / ".ibscope" / "stages" / "train.json").exists()  # a failed stage leaves no stamp
    np.savez(tmp_path / "train.npz", x=np.zeros((10, 12), np.float32), y=np.full(10, 0.5))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 4 and "y must hold integer class labels" in r.output


@pytest.mark.slow
def test_digits_example_with_ood(tmp_path):
    res = run_pipeline("digits", out=tmp_path / "digits", progress=False, quiet=True, overrides={
        "train": {"epochs": 8, "checkpoints": 2},
        "estimate": {"estimators": ["effective-rank"]},
        "plot": {"kinds": ["curves"]},
        "ood": {"detectors": ["mahalanobis", "knn"], "options": {"ks": [5], "n_bootstrap": 20}},
    })
    assert res.ran() == ["data", "train", "capture", "estimate", "plot", "ood", "report"]
    assert set(res.stores) == {"test", "train", "heldout", "transformed"}
    assert open_store(res.stores["heldout"]).n_samples == 354  # every 8 and 9 of sklearn's digits
    acc = read_results(res.results).filter(estimator="metrics", quantity="test_accuracy").rows
    assert acc[-1]["value"] > 0.6  # 8 epochs of Adam on 8 classes (chance 0.125)
    m = json.loads(res.ood.read_text())
    text = json.dumps(m)
    assert "heldout" in text and "transformed" in text and "mahalanobis" in text
    assert "heldout" in (tmp_path / "digits" / "report.html").read_text()


@pytest.mark.slow
def test_demo_runs_both_networks_and_compares_them(tmp_path):
    from ibscope.pipeline import run_demo

    small = {"train": {"epochs": 20, "checkpoints": 2},
             "capture": {"layers": ["hidden5"], "max_samples": 256, "sample_seed": 0, "jacobian_samples": 0},
             "estimate": {"estimators": ["binning"], "jobs": 1}, "plot": {"kinds": ["info-plane"]}}
    res = run_demo(tmp_path / "demo", overrides=small, progress=False, quiet=True)
    assert list(res.runs) == ["tanh", "relu"]
    for name, r in res.runs.items():
        assert r.report == tmp_path / "demo" / name / "report.html" and r.report.exists()
        assert read_results(r.results).unique("run") == [name]
    assert res.comparison == tmp_path / "demo" / "info-plane_tanh_vs_relu.png"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(res.comparison))
    single = mpimg.imread(str(res.runs["tanh"].figures[0]))
    assert img.shape[1] >= 2 * single.shape[1] * 0.9  # two planes next to each other
    again = run_demo(tmp_path / "demo", overrides=small, progress=False, quiet=True)
    assert all(r.ran() == [] for r in again.runs.values())


def test_demo_cli_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "f"), "-q"])
    assert r.exit_code == 2 and "is a file; it must be a folder" in r.output
    r = CliRunner().invoke(app, ["demo", "--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "tanh" in r.output
