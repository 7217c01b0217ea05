"""End to end on the demo pipeline: train -> capture -> estimate -> check.

A small version of the packaged ``demo-tanh`` run (few epochs and checkpoints, one
estimator) is made the baseline. Re-running it reproduces the baseline exactly (training is
seeded and deterministic on CPU), so the check holds even at zero tolerance; the same run
with ReLU instead of tanh (a deliberate change to the model) changes the curves and the
check fails, through the Python API, the CLI (exit 3, JUnit) and the pipeline's check stage.
"""

import json
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from ibscope.check import run_check, write_baseline
from ibscope.cli.main import app
from ibscope.errors import RegressionFound
from ibscope.pipeline import run_pipeline
from ibscope.results import read_results

# small and fast: 30 epochs, 5 checkpoints (0, 1, 3, 10, 30), 3 layers, 1024 of the 4096 probe inputs
SMALL = {
    "train": {"epochs": 30, "checkpoints": 4},
    "capture": {"jacobian_samples": 0, "batch_size": 1024, "max_samples": 1024,
                "layers": ["hidden1", "hidden3", "hidden5"]},
    "estimate": {"estimators": ["binning"]},
}
RELU = {**SMALL, "model": {"args": {"activation": "relu"}}}


def pipeline(out, overrides, until="estimate"):
    return run_pipeline("demo-tanh", out=out, overrides=overrides, until=until, progress=False, quiet=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    tanh = pipeline(d / "tanh", SMALL)
    again = pipeline(d / "tanh-again", SMALL)
    relu = pipeline(d / "relu", RELU)
    base = write_baseline(tanh.results, d / "baseline.csv")
    return d, base, tanh.results, again.results, relu.results


def test_rerun_matches_its_own_baseline_exactly(runs):
    d, base, tanh, again, relu = runs
    rows = read_results(tanh).rows
    layers = {r["layer"] for r in rows if r["estimator"] == "binning"}
    assert layers == {"hidden1", "hidden3", "hidden5"}
    assert {r["n_samples"] for r in rows if r["estimator"] == "binning"} == {1024}
    rep = run_check(again, baseline=base, rtol=0, atol=0)
    assert rep.ok, rep.summary()
    quantities = {c.details["curve"]["quantity"] for c in rep.cases}
    assert {"I(X;T)", "I(T;Y)", "accuracy"} <= quantities
    assert all(c.details["n_compared"] >= 4 for c in rep.cases if c.status == "pass")


def test_different_activation_is_a_regression(runs):
    d, base, tanh, again, relu = runs
    rep = run_check(relu, baseline=base)  # default tolerance: 0.02 + 0.1*|baseline|
    assert not rep.ok
    failed = {(c.details["curve"]["layer"], c.details["curve"]["quantity"]) for c in rep.failures}
    # binned I(X;T) of ReLU layers differs from tanh's well beyond 10%
    assert any(q == "I(X;T)" for _, q in failed), failed
    for c in rep.failures:
        w = max(c.details["failing_points"], key=lambda p: p["ratio"])
        assert abs(w["diff"]) > w["tol"]

    r = CliRunner().invoke(app, ["check", str(relu), "--baseline", str(base), "--junit", str(d / "j.xml"),
                                 "--json", str(d / "s.json")])
    assert r.exit_code == 3, r.output
    root = ET.parse(d / "j.xml").getroot()
    assert int(root.get("failures")) == len(rep.failures) == len(root.findall(".//failure"))
    assert int(root.get("tests")) == len(rep.cases)
    assert json.loads((d / "s.json").read_text())["counts"]["failed"] == len(rep.failures)


def test_pipeline_check_stage_uses_the_baseline(runs):
    d, base, tanh, again, relu = runs
    check = {"check": {"baseline": str(base), "junit": True}, "plot": {"enabled": False}, "report": {"enabled": False}}
    # the tanh re-run passes its stage (stages before check are up to date and skipped)
    res = pipeline(d / "tanh-again", {**SMALL, **check}, until="check")
    assert res.check.ok
    assert res.ran() == ["check"]  # data, train, capture, estimate were up to date
    with pytest.raises(RegressionFound):
        pipeline(d / "relu", {**RELU, **check}, until="check")
    assert json.loads((d / "relu" / "check.json").read_text())["ok"] is False
