"""`ibscope estimate` / `ibscope estimators` end to end on a store made by `ibscope capture`
from a tiny model really trained in the test; incremental runs; every error path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ibscope
from capture_support import tiny_tanh_run
from ibscope.cli.main import app
from ibscope.estimate import run_estimate
from ibscope.results import read_results
from ibscope.store import StoreWriter, open_store

REPO = Path(__file__).resolve().parents[1]



def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Train the 4-6-3-2 tanh net for a few Adam steps, save 3 checkpoints, capture them."""
    d = tiny_tanh_run(tmp_path_factory.mktemp("est"), 120, "tiny_est_model")
    res = invoke("capture", "-m", f"{d / 'tiny.py'}:make", "-c", str(d / "ck" / "*.pt"), "-p", d / "probe.npz",
                 "-l", "type:Tanh", "-o", d / "acts", "-q")
    assert res.exit_code == 0, res.output
    return d


@pytest.mark.slow
def test_estimate_end_to_end(run_dir, tmp_path):
    d = run_dir
    out = tmp_path / "r.csv"
    res = invoke("estimate", d / "acts", "-o", out, "-e", "binning", "-e", "ksg", "-e", "kde-upper",
                 "--param", "binning.n_bins=10", "--param", "kde-upper.noise_variance=0.01", "-q")
    assert res.exit_code == 0, res.output
    r = read_results(out)
    st = open_store(d / "acts")
    assert st.layers == ["1", "3"] and len(st.checkpoints) == 3
    # 3 checkpoints x 2 layers x 3 estimators x 2 quantities + 2 metrics per checkpoint
    assert len(r) == 3 * 2 * 3 * 2 + 3 * 2
    m = r.filter(estimator="metrics")
    assert {(row["quantity"], row["unit"]) for row in m.rows} == {("accuracy", "ratio"), ("loss", "loss")}
    acc0 = torch.load(d / "ck" / "e0.pt", weights_only=True)["accuracy"]
    assert m.filter(quantity="accuracy", epoch=0).rows[0]["value"] == pytest.approx(acc0)
    n = 120
    hy = -sum(p * math.log(p) for p in np.bincount(st.labels) / n)
    for row in r.filter(estimator="binning").rows:
        assert row["unit"] == "nats" and row["n_samples"] == n and row["params"]["n_bins"] == 10
        if row["quantity"] == "I(X;T)":
            assert row["cap"] == pytest.approx(math.log(n)) and 0 < row["value"] <= row["cap"] + 1e-12
            assert row["params"]["x_source"] == "identity"
        else:
            assert row["cap"] == pytest.approx(hy) and row["value"] <= hy + 1e-12
    ksg = r.filter(estimator="ksg", quantity="I(X;T)").rows
    assert all(row["params"]["x_source"] == "inputs" and row["stderr"] > 0 for row in ksg)
    # the table holds exactly what the Python API computes on the stored arrays
    t = st.activations(2, "3")
    row = r.filter(estimator="binning", quantity="I(X;T)", checkpoint=2, layer="3").rows[0]
    assert row["layer_index"] == 1 and row["epoch"] == 2
    assert row["value"] == ibscope.mutual_information(st.sample_ids, t, method="binning", n_bins=10).value
    row = r.filter(estimator="ksg", quantity="I(T;Y)", checkpoint=1, layer="1").rows[0]
    assert row["value"] == pytest.approx(ibscope.mutual_information(st.activations(1, "1"), st.labels).value, abs=1e-12)
    row = r.filter(estimator="kde-upper", quantity="I(X;T)", checkpoint=0, layer="1").rows[0]
    assert row["value"] == pytest.approx(ibscope.mutual_information(
        st.sample_ids, st.activations(0, "1"), method="kde-upper", noise_variance=0.01).value, abs=1e-12)
    prov = json.loads((tmp_path / "r.provenance.json").read_text())
    assert prov["stores"][0]["content_hash"] == st.content_hash() and prov["ibscope_version"] == ibscope.__version__
    assert prov["config"]["params"]["binning"]["n_bins"] == 10 and prov["cells_computed"] == 6

    # incremental: nothing to do; a new estimator only adds its own cells; --force recomputes
    before = out.read_text()
    res = invoke("estimate", d / "acts", "-o", out, "-e", "binning", "--param", "binning.n_bins=10")
    assert res.exit_code == 0 and "0 cell(s) computed" in res.output, res.output
    assert out.read_text() == before
    res = invoke("estimate", d / "acts", "-o", out, "-e", "gaussian", "-q")
    assert res.exit_code == 0, res.output
    r2 = read_results(out)
    assert len(r2) == len(r) + 12 and json.loads((tmp_path / "r.provenance.json").read_text())["cells_computed"] == 6
    res = invoke("estimate", d / "acts", "-o", out, "-e", "binning", "--param", "binning.n_bins=10", "--force")
    assert res.exit_code == 0 and "6 cell(s) computed" in res.output, res.output
    assert len(read_results(out)) == len(r2)
    # changed parameters are new cells, old ones are kept
    res = invoke("estimate", d / "acts", "-o", out, "-e", "binning", "--param", "binning.n_bins=3", "-q",
                 "--layer", "3")
    assert res.exit_code == 0, res.output
    assert len(read_results(out).filter(estimator="binning", layer="3")) == 3 * 2 * 2


@pytest.mark.slow
def test_presets_and_pipeline_config(run_dir, tmp_path):
    d = run_dir
    for preset, names in [("saxe-kde", {"kde-upper", "kde-lower", "binning"}),
                          ("shwartz-ziv-tishby-binning", {"binning"}),
                          ("chelombiev-adaptive", {"chelombiev-binning", "chelombiev-kde-upper",
                                                   "chelombiev-kde-lower"}),
                          ("ibscope-adaptive", {"adaptive-binning", "adaptive-kde-upper", "adaptive-kde-lower"}),
                          ("butakov-compressed", {"compressed"})]:
        out = tmp_path / f"{preset}.csv"
        # the compressed preset trains an autoencoder per cell (the 6-unit layer's T in I(T;Y)): 200
        # of its 2000 steps are enough to show that the preset runs (and that --param reaches it)
        fewer = ["--param", "compressed.ae_steps=200"] if preset == "butakov-compressed" else []
        res = invoke("estimate", d / "acts", "-c", REPO / "configs" / f"{preset}.yaml", "-o", out, "-q", *fewer)
        assert res.exit_code == 0, (preset, res.output)
        r = read_results(out)
        assert set(r.unique("estimator")) - {"metrics"} == names
        if fewer:  # the preset's settings, with the one changed
            assert {(x["params"]["latent_dim"], x["params"]["compressor_x"], x["params"]["k"], x["params"]["ae_steps"])
                    for x in r.filter(estimator="compressed").rows} == {(4, "autoencoder", 5, 200)}
    r = read_results(tmp_path / "saxe-kde.csv")
    assert {row["params"]["noise_variance"] for row in r.filter(estimator="kde-lower").rows} == {0.001}
    assert {row["params"]["bound"] for row in r.filter(estimator="kde-lower").rows} == {"lower"}
    # a bare preset name reads the installed copy (ibscope/configs/), with the same result
    res = invoke("estimate", d / "acts", "-c", "saxe-kde", "-o", tmp_path / "bare.csv", "-q")
    assert res.exit_code == 0, res.output
    assert [x["value"] for x in read_results(tmp_path / "bare.csv").rows] == [x["value"] for x in r.rows]
    res = invoke("estimate", d / "acts", "-c", "saxe-kd", "-o", tmp_path / "bare2.csv")
    assert res.exit_code == 2 and "Config file not found: 'saxe-kd'. Did you mean 'saxe-kde'?" in res.output
    # the `estimate:` section of an `ibscope run` config is read too
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text("name: x\nestimate:\n  estimators: [binning]\n  probes: [all]\n  params:\n    binning: {bin_width: 0.5}\n")
    res = invoke("estimate", d / "acts", "-c", cfg, "-o", tmp_path / "p.csv", "-q")
    assert res.exit_code == 0, res.output
    assert read_results(tmp_path / "p.csv").filter(estimator="binning").rows[0]["params"]["bin_width"] == 0.5


def test_jobs_and_x_source(run_dir, tmp_path):
    d = run_dir
    a = run_estimate(d / "acts", tmp_path / "a.csv", ["binning", "gaussian"], progress=False)
    b = run_estimate(d / "acts", tmp_path / "b.csv", ["binning", "gaussian"], jobs=2, progress=False)
    assert [r["value"] for r in a.rows] == [r["value"] for r in b.rows]
    c = run_estimate(d / "acts", tmp_path / "c.csv", ["binning"], x_source="inputs", progress=False)
    # X = the 120 distinct probe inputs: binning them jointly with T gives a different table than ids
    assert {r["params"].get("x_source") for r in c.filter(quantity="I(X;T)").rows} == {"inputs"}


def _store_without_inputs(path):
    w = StoreWriter(path, config={"run": "r", "split": "test"}, sample_ids=np.arange(30), labels=np.arange(30) % 2,
                    layers={"fc": {}}, inputs=None)
    with w.checkpoint(epoch=1, step=None, path="a.pt", sha256="a" * 64) as s:
        s.append("fc", np.random.default_rng(0).standard_normal((30, 3)))
    return path


def test_errors_have_messages_and_exit_codes(run_dir, tmp_path):
    d = run_dir
    out = tmp_path / "e.csv"
    cases = [
        (["estimate", tmp_path / "nope", "-o", out], 4, "Activation store not found"),
        (["estimate", d / "acts", "-o", out, "-e", "ksk"], 2, "Unknown estimator 'ksk'. Did you mean 'ksg'?"),
        (["estimate", d / "acts", "-o", out, "-e", "ksg", "--param", "ksg.kk=3"], 2,
         "Estimator 'ksg' has no parameter 'kk'. Did you mean 'k'?"),
        (["estimate", d / "acts", "-o", out, "-e", "ksg", "--param", "k=3"], 2, "--param expects ESTIMATOR.KEY=VALUE"),
        (["estimate", d / "acts", "-o", out, "-e", "ksg", "--param", "binning.n_bins=3"], 2,
         "Parameters were given for estimator 'binning', which is not selected"),
        (["estimate", d / "acts", "-o", out, "-e", "ksg", "--param", "ksg.k=zero"], 2,
         "The 'k' parameter of ksg must be of type int. Got 'zero' instead."),
        (["estimate", d / "acts", "-o", out, "-e", "ksg", "--param", "ksg.k=0"], 2,
         "The 'k' parameter of ksg must be an integer >= 1. Got 0 instead."),
        (["estimate", d / "acts", "-o", out, "--layer", "fc9"], 2, "Unknown layer 'fc9'"),
        (["estimate", d / "acts", "-o", out, "--x-source", "ids"], 2, "--x-source must be one of"),
        (["estimate", d / "acts", "-o", out, "-c", tmp_path / "none.yaml"], 2, "Config file not found"),
        (["estimate", d / "acts", "-o", out, "--jobs", "0"], 2, "--jobs must be an integer >= 1"),
        (["estimate", d / "acts", "-o", out, "--lock-timeout", "soon"], 2, "Invalid value for '--lock-timeout'"),
        (["estimate", d / "acts", "-o", tmp_path, "-e", "binning"], 2, f"The results file '{tmp_path}' is a directory"),
        (["estimate", d / "acts", d / "acts", "-o", out], 0, ""),  # the same store twice is one store
    ]
    if not torch.cuda.is_available():
        cases.append((["estimate", d / "acts", "-o", out, "--device", "cuda:0"], 2, "no CUDA device is available"))
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("estimator: [ksg]\n")
    cases.append((["estimate", d / "acts", "-o", out, "-c", bad_cfg], 2, "Unknown key 'estimator' in config"))
    nin = _store_without_inputs(tmp_path / "noin")
    cases.append((["estimate", nin, "-o", out, "-e", "ksg"], 4, "holds no inputs"))
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    cases.append((["estimate", d / "acts", "-o", junk, "-e", "binning"], 4, "is not an ibscope results table"))
    for args, code, msg in cases:
        res = invoke(*args)
        assert res.exit_code == code, (args, res.output)
        assert msg in " ".join(res.output.split()), (args, res.output)
        if code == 0:
            assert len(read_results(out)) == 3 * 2 * 2 * 2 + 3 * 2  # binning + ksg, 2 layers, 3 checkpoints once
            out.unlink()
            (tmp_path / "e.provenance.json").unlink()
        assert not out.exists() and not (tmp_path / "e.provenance.json").exists()  # no half-written output
    assert junk.read_text() == "a,b\n1,2\n"
    # two stores with the same run and split would give rows nobody can tell apart
    w = StoreWriter(tmp_path / "twin", config={"run": "r", "split": "test"}, sample_ids=np.arange(30),
                    labels=np.arange(30) % 2, layers={"fc": {}}, inputs=None)
    with w.checkpoint(epoch=1, step=None, path="b.pt", sha256="b" * 64) as sh:
        sh.append("fc", np.random.default_rng(1).standard_normal((30, 3)))
    res = invoke("estimate", nin, tmp_path / "twin", "-o", out, "-e", "binning")
    assert res.exit_code == 2 and "both hold run 'r', split 'test'" in " ".join(res.output.split()), res.output
    assert not out.exists()
    res = invoke("estimate", nin, "-o", out, "-e", "binning", "-q")
    assert res.exit_code == 0 and {r["split"] for r in read_results(out).rows} == {"test"}


def test_estimators_listing():
    res = invoke("estimators", "--json")
    assert res.exit_code == 0, res.output
    rows = {d["name"]: d for d in json.loads(res.output)["estimators"]}
    for name in ("binning", "adaptive-binning", "kde-upper", "kde-lower", "adaptive-kde-upper", "ksg", "gaussian",
                 "compressed", "infonce", "renyi"):
        assert rows[name]["kind"] == "pair" and rows[name]["unit"] == "nats" and rows[name]["reference"]
    assert rows["ksg"]["params"]["k"] == 3 and rows["binning"]["x_source"] == "identity"
    # an alias lists its own name with its pinned bound; every parameter says what it accepts
    assert rows["kde-lower"]["params"]["bound"] == "lower" and rows["kde-lower"]["fixed"] == {"bound": "lower"}
    assert rows["kde"]["params"]["bound"] == "upper" and rows["kde"]["fixed"] == {}
    assert rows["ksg"]["constraints"]["k"] == "an integer >= 1" and rows["twonn"]["kind"] == "single"
    res = invoke("estimators", "--kind", "pair")
    assert res.exit_code == 0 and "kde-upper" in res.output and "Kraskov" in res.output
    res = invoke("estimators", "--kind", "pairs")
    out = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "--kind must be one of pair, single, jacobian. Got 'pairs'. Did you mean 'pair'?" in out


def test_single_and_jacobian_measures_and_metrics(tmp_path):
    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path / "s", config={"run": "seed3", "split": "train"}, sample_ids=np.arange(40),
                    labels=np.arange(40) % 2, layers={"a": {}, "b": {}}, inputs=rng.standard_normal((40, 3)))
    sv = np.sort(np.abs(rng.standard_normal((5, 3))), axis=1)[:, ::-1].copy()
    with w.checkpoint(epoch=7, step=70, path="c.pt", sha256="c" * 64,
                      metrics={"test_accuracy": 0.75, "train_loss": 0.5, "lr": 0.1}) as s:
        s.append("a", rng.standard_normal((40, 4)))
        s.append("b", rng.standard_normal((40, 2)))
        s.set_jacobian("a", sv, np.arange(5))
    res = run_estimate(tmp_path / "s", tmp_path / "r.csv", ["effective-rank", "local-rank"], progress=False)
    er = res.filter(estimator="effective-rank")
    assert len(er) == 2 and {r["quantity"] for r in er.rows} == {"effective_rank"}
    st = open_store(tmp_path / "s")
    want = ibscope.measure(st.activations(0, "b"), method="effective-rank").value
    assert er.filter(layer="b").rows[0]["value"] == want and er.filter(layer="b").rows[0]["layer_index"] == 1
    lr = res.filter(estimator="local-rank")
    # only layer "a" has Jacobian spectra: "b" gets no row
    assert [r["layer"] for r in lr.rows] == ["a"] and lr.rows[0]["value"] == ibscope.measure(sv, method="local-rank").value
    m = {r["quantity"]: (r["value"], r["unit"]) for r in res.filter(estimator="metrics").rows}
    assert m == {"test_accuracy": (0.75, "ratio"), "train_loss": (0.5, "loss"), "lr": (0.1, "value")}
    assert {(r["run"], r["split"], r["epoch"], r["step"]) for r in res.rows} == {("seed3", "train", 7, 70)}


def test_jacobian_measure_without_any_jacobians_is_an_error(tmp_path):
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    rng = np.random.default_rng(1)
    w = StoreWriter(tmp_path / "s", config={}, sample_ids=np.arange(20), labels=np.arange(20) % 2,
                    layers={"a": {}}, inputs=rng.standard_normal((20, 3)))
    with w.checkpoint(epoch=1, step=None, path="c.pt", sha256="d" * 64) as s:
        s.append("a", rng.standard_normal((20, 4)))
    res = CliRunner().invoke(app, ["estimate", str(tmp_path / "s"), "-o", str(tmp_path / "r.csv"), "-e", "local-rank"])
    assert res.exit_code == 4, res.output
    assert "no Jacobian spectra" in res.output and "--jacobian-samples" in res.output
    assert not (tmp_path / "r.csv").exists()
