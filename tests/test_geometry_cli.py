"""Geometry estimators through `ibscope estimate` on a real HDF5 store: values in the results
table equal the library's, and their user-facing errors give the documented exit codes."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

import ibscope
from ibscope.cli.main import app
from ibscope.store import StoreWriter


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two checkpoints x one layer: rank-3 activations in R^16 and Jacobian spectra."""
    path = tmp_path_factory.mktemp("geo") / "acts"
    rs = np.random.RandomState(0)
    n = 120
    w = StoreWriter(path, config={"split": "probe", "run": "geo"}, sample_ids=np.arange(n),
                    labels=rs.randint(0, 2, n), layers={"fc": {}})
    acts, jac = [], []
    for e in range(2):
        a = (rs.randn(n, 3) @ rs.randn(3, 16)).astype(np.float32)
        s = np.sort(np.abs(rs.randn(20, 4)), axis=1)[:, ::-1].astype(np.float32)
        s[:, 2 + e:] = 0.0  # rank 2 at checkpoint 0, rank 3 at checkpoint 1
        with w.checkpoint(epoch=e, step=None, path=f"c{e}.pt", sha256=f"{e}" * 64) as sh:
            sh.append("fc", a)
            sh.set_jacobian("fc", s, np.arange(20))
        acts.append(a)
        jac.append(s)
    return path, acts, jac


def _rows(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["estimator"] != "metrics"]


def test_estimate_writes_geometry_rows(store, tmp_path):
    path, acts, jac = store
    out = tmp_path / "r.csv"
    res = CliRunner().invoke(app, ["estimate", str(path), "-o", str(out), "-e", "numerical-rank", "-e",
                                   "effective-rank", "-e", "mle-id", "-e", "local-rank", "--param", "mle-id.k=10",
                                   "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    got = {(r["estimator"], int(r["checkpoint"])): r for r in rows}
    for c in range(2):
        assert float(got[("numerical-rank", c)]["value"]) == 3
        assert got[("numerical-rank", c)]["unit"] == "dimensions"
        assert float(got[("effective-rank", c)]["value"]) == pytest.approx(
            ibscope.measure(acts[c], "effective-rank").value, rel=1e-12)
        assert float(got[("mle-id", c)]["value"]) == pytest.approx(
            ibscope.measure(acts[c], "mle-id", k=10).value, rel=1e-12)
        assert got[("local-rank", c)]["quantity"] == "local_rank"
        assert float(got[("local-rank", c)]["value"]) == 2 + c


def test_alpha_req_window_too_large_is_a_noted_cell(store, tmp_path):
    """A window larger than the spectrum is a data error of each cell: noted rows (with the
    estimator's hint), exit 0; --strict makes it exit 4 after writing them."""
    from ibscope.results import read_results

    path, _, _ = store
    out = tmp_path / "a.csv"
    res = CliRunner().invoke(app, ["estimate", str(path), "-o", str(out), "-e", "alpha-req", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "fit window ends at rank 100" in res.output and "fit_end" in res.output
    rows = read_results(out).filter(estimator="alpha-req").rows
    assert rows and all(r["value"] is None and "fit window ends at rank 100" in r["note"] and "fit_end" in r["note"]
                        for r in rows)
    res = CliRunner().invoke(app, ["estimate", str(path), "-o", str(tmp_path / "s.csv"), "-e", "alpha-req",
                                   "--quiet", "--strict"])
    assert res.exit_code == 4 and "--strict" in res.output and (tmp_path / "s.csv").exists()
    assert "Traceback" not in res.output


def test_bad_geometry_parameter_is_a_usage_error(store, tmp_path):
    path, _, _ = store
    out = tmp_path / "b.csv"
    res = CliRunner().invoke(app, ["estimate", str(path), "-o", str(out), "-e", "twonn", "--param", "twonn.fit=slope",
                                   "--quiet"])
    assert res.exit_code == 2
    assert "The 'fit' parameter of twonn must be 'lsq' or 'ml'. Got 'slope' instead." in res.output
    assert not out.exists()
    res = CliRunner().invoke(app, ["estimate", str(path), "-o", str(out), "-e", "pca-dim", "--param",
                                   "pca-dim.fraction=high", "--quiet"])
    assert res.exit_code == 2 and "fraction" in res.output and "float" in res.output
