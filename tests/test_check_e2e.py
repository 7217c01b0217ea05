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


# ------------------------------------------------------------------------------------------
# the example CI workflow uses only commands and options that exist, and its files agree
# ------------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-actions-ibscope-check.yml"


def _workflow_commands():
    import shlex

    import yaml

    wf = yaml.safe_load(WORKFLOW.read_text())
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    cmds = []
    for s in steps:
        for line in (s.get("run") or "").splitlines():
            if line.strip():
                cmds.append(shlex.split(line))
    return steps, cmds


def test_example_workflow_commands_exist():
    import importlib.util

    import typer

    steps, cmds = _workflow_commands()
    group = typer.main.get_command(app)
    ibscope_cmds = [c for c in cmds if c[0] == "ibscope"]
    assert [c[1] for c in ibscope_cmds] == ["capture", "estimate", "check"]
    for argv in ibscope_cmds:
        cmd = group.get_command(None, argv[1])
        assert cmd is not None, argv
        cmd.make_context(argv[1], argv[2:])  # raises click.UsageError on an unknown option or missing value
    # the training step runs the example script with options it accepts
    (train,) = [c for c in cmds if c[:2] == ["python", "examples/ci/train_tiny.py"]]
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / train[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.build_parser().parse_args(train[2:])
    assert args.out == "run" and args.epochs == 200
    # files the workflow reads are in the repository
    check = ibscope_cmds[-1]
    for opt in ("--baseline", "--rules"):
        assert (ROOT / check[check.index(opt) + 1]).is_file(), opt
    assert any(s.get("uses", "").startswith("mikepenz/action-junit-report") for s in steps)
    assert "--junit" in check


def test_example_baseline_satisfies_example_rules():
    """The committed baseline was produced by the workflow's steps; its rules hold on it."""
    base = ROOT / "examples" / "ci" / "baseline.csv"
    rep = run_check(base, baseline=base, rules=ROOT / "examples" / "check_rules.yaml", rtol=0, atol=0)
    assert rep.ok, rep.summary()
    assert sum(c.group == "rules" for c in rep.cases) == 5
    layers = {c.details["curve"]["layer"] for c in rep.cases if c.group == "baseline"}
    assert layers == {"hidden1", "hidden2", "hidden3", "output", "-"}


def test_example_training_script_writes_canonical_checkpoints(tmp_path):
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "examples" / "ci" / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    paths = mod.train(tmp_path, epochs=5)
    assert [p.name for p in paths] == [f"epoch_{e:06d}.pt" for e in mod.checkpoint_epochs(5)]
    ck = torch.load(paths[-1], weights_only=True)
    assert ck["epoch"] == 5 and 0 <= ck["accuracy"] <= 1 and ck["loss"] > 0
    assert set(ck["state_dict"]) == set(mod.make_model().state_dict())
    probe = __import__("numpy").load(tmp_path / "probe.npz")
    assert probe["x"].shape == (4096, 12) and probe["y"].shape == (4096,)


def test_docs_commands_parse():
    """Every `ibscope ...` line in docs/check.md names a real command with real options."""
    import re
    import shlex

    import typer

    group = typer.main.get_command(app)
    text = (ROOT / "docs" / "check.md").read_text()
    n = 0
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line.startswith("ibscope "):
                continue
            argv = shlex.split(line)
            cmd = group.get_command(None, argv[1])
            assert cmd is not None, line
            cmd.make_context(argv[1], argv[2:])
            n += 1
    assert n == 9  # quick start (2), try it (6), per-curve tolerances (1)
