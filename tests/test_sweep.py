"""`ibscope sweep`: one config over seeds (and two configs) through the pipeline, runs in parallel,
a combined report per experiment with the seeds as median and band, failures listed at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.results import read_results
from ibscope.sweep import parse_seeds, plan_sweep

SMALL = {"train": {"epochs": 12, "checkpoints": 2},
         "capture": {"layers": ["hidden5"], "max_samples": 128, "sample_seed": 0, "jacobian_samples": 0},
         "estimate": {"estimators": ["binning"], "null_permutations": 0}, "plot": {"kinds": ["info-plane"]}}


def tiny_config(d: Path, name: str, **extra) -> Path:
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo-tanh.yaml").read_text())
    cfg.pop("quick", None)
    for k, v in {**SMALL, **extra}.items():
        cfg[k] = {**(cfg.get(k) or {}), **v} if isinstance(v, dict) else v
    cfg["name"] = name
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_parse_seeds_and_plan(tmp_path):
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5") == [3, 4, 5] and parse_seeds("0-1,7") == [0, 1, 7]
    assert parse_seeds(None) is None
    for bad in ("a", "1,1", ""):
        with pytest.raises(Exception, match="--seeds"):
            parse_seeds(bad)
    a = tiny_config(tmp_path, "alpha")
    runs = plan_sweep([a], tmp_path / "sw", seeds=[0, 3])
    assert [(r.experiment, r.name, r.seed) for r in runs] == [("alpha", "alpha-s0", 0), ("alpha", "alpha-s3", 3)]
    assert runs[1].out == (tmp_path / "sw" / "runs" / "alpha-s3").resolve()
    (tmp_path / "other").mkdir()
    b = tiny_config(tmp_path / "other", "alpha")
    with pytest.raises(Exception, match="both have the name 'alpha'"):
        plan_sweep([a, b], tmp_path / "sw")


@pytest.mark.slow
def test_sweep_seeds_in_parallel_and_combined_report(tmp_path):
    cfg = tiny_config(tmp_path, "tanh")
    bad = tiny_config(tmp_path, "broken", capture={"layers": ["no_such_layer"]})
    res = CliRunner().invoke(app, ["sweep", str(cfg), str(bad), "--seeds", "0-1", "-o", str(tmp_path / "sw"),
                                   "--jobs", "2", "-q"])
    assert "Traceback" not in res.output, res.output
    out = " ".join(res.output.split())
    # the broken experiment's runs fail (unknown layer: usage, exit 2), the others complete
    assert res.exit_code == 2, res.output
    assert "Run broken-s0 failed:" in out and "no_such_layer" in out
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    st = {r["name"]: r["status"] for r in doc["runs"]}
    assert st == {"tanh-s0": "ok", "tanh-s1": "ok", "broken-s0": "failed", "broken-s1": "failed"}
    ran = {r["name"]: r["stages_ran"] for r in doc["runs"]}
    assert ran["broken-s0"] == ["data", "train"]  # what a failed run completed before its capture failed
    assert ran["tanh-s0"] == ["data", "train", "capture", "estimate", "plot", "report"]
    assert doc["engine"]["engine"] == "process-pool" and doc["engine"]["workers"] == 2
    assert list(doc["reports"]) == ["tanh"]  # no report for an experiment with failed runs
    r0 = read_results(tmp_path / "sw" / "runs" / "tanh-s0" / "results.csv")
    r1 = read_results(tmp_path / "sw" / "runs" / "tanh-s1" / "results.csv")
    assert r0.unique("run") == ["tanh-s0"] and r1.unique("run") == ["tanh-s1"]
    v0 = [r["value"] for r in r0.filter(estimator="binning").rows]
    v1 = [r["value"] for r in r1.filter(estimator="binning").rows]
    assert len(v0) == len(v1) == 3 * 2 and v0 != v1  # epochs 0, 1, 12 x I(X;T), I(T;Y); two seeds: two trainings
    html = (tmp_path / "sw" / "tanh_report.html").read_text()
    assert "tanh: 2 seeds, median and 25-75 % band" in html
    assert "tanh-s0" in html and "tanh-s1" in html
    # again: every stage of the good runs is up to date
    again = CliRunner().invoke(app, ["sweep", str(cfg), "--seeds", "0-1", "-o", str(tmp_path / "sw"), "-q"])
    assert again.exit_code == 0, again.output
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["stages_ran"] for r in doc["runs"]] == [[], []] and doc["engine"]["engine"] == "in-process"
