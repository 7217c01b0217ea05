"""The shared contracts: store, results table, registry, k-NN kernels, CLI start-up."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ibscope.errors import DataError, UsageError
from ibscope.estimators._knn import count_within, kth_neighbor_distances
from ibscope.estimators.base import Estimate, as_tensor
from ibscope.results import make_row, read_results, write_results
from ibscope.store import StoreWriter, open_store


def _writer(path, **kw):
    args = dict(config={"model": "m"}, sample_ids=np.arange(10), labels=np.arange(10) % 2,
                layers={"fc1": {"type": "Linear"}, "fc2": {}}, inputs=np.arange(30.0).reshape(10, 3))
    args.update(kw)
    return StoreWriter(path, **args)


def test_store_round_trip_and_order(tmp_path):
    w = _writer(tmp_path / "acts")
    for epoch in (10, 2):
        with w.checkpoint(epoch=epoch, step=None, path=f"e{epoch}.pt", sha256=f"{epoch:064d}") as s:
            s.append("fc1", np.full((6, 4), epoch, float))
            s.append("fc1", np.full((4, 4), -epoch, float))
            s.append("fc2", np.zeros((10, 2)))
    st = open_store(tmp_path / "acts" / "manifest.h5")
    assert [c.epoch for c in st.checkpoints] == [2, 10]
    a = st.activations(1, "fc1")
    assert a.shape == (10, 4) and a[0, 0] == 10 and a[9, 0] == -10
    assert st.inputs()[3, 1] == 10.0
    assert st.layers == ["fc1", "fc2"]


def test_store_failed_shard_is_absent(tmp_path):
    w = _writer(tmp_path / "acts")
    with pytest.raises(RuntimeError):
        with w.checkpoint(epoch=1, step=None, path="a.pt", sha256="a" * 64) as s:
            s.append("fc1", np.ones((5, 4)))
            raise RuntimeError("killed")
    with pytest.raises(DataError, match="wrote 5 rows, expected 10"):
        with w.checkpoint(epoch=2, step=None, path="b.pt", sha256="b" * 64) as s:
            s.append("fc1", np.ones((5, 4)))
    st = open_store(tmp_path / "acts")
    assert st.checkpoints == []
    assert list((tmp_path / "acts" / "checkpoints").iterdir()) == []


def test_store_refuses_other_data_on_resume(tmp_path):
    _writer(tmp_path / "acts")
    with pytest.raises(UsageError, match="already exists"):
        _writer(tmp_path / "acts")
    with pytest.raises(DataError, match="different probe data"):
        _writer(tmp_path / "acts", resume=True, labels=np.zeros(10, int))
    with pytest.raises(DataError, match="different settings"):
        _writer(tmp_path / "acts", resume=True, config={"model": "other"})
    _writer(tmp_path / "acts", resume=True)


def test_store_rejects_foreign_files(tmp_path):
    (tmp_path / "s").mkdir()
    import h5py

    with h5py.File(tmp_path / "s" / "manifest.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(DataError, match="not an ibscope activation store"):
        open_store(tmp_path / "s")
    (tmp_path / "s" / "manifest.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="corrupt or not HDF5"):
        open_store(tmp_path / "s")
    with pytest.raises(DataError, match="not found"):
        open_store(tmp_path / "nope")


def test_results_round_trip_and_units(tmp_path):
    rows = [make_row(checkpoint=0, epoch=1, layer="fc1", layer_index=0, estimator="binning", quantity="I(X;T)",
                     value=math.log(2), unit="nats", cap=math.log(8), n_samples=8, dims="3", params={"n_bins": 30})]
    p = write_results(tmp_path / "r.csv", rows, {"store_hash": "abc"})
    r = read_results(p)
    assert r.rows[0]["params"] == {"n_bins": 30} and r.provenance["store_hash"] == "abc"
    b = r.to_unit("bits")
    assert b.rows[0]["value"] == pytest.approx(1.0) and b.rows[0]["cap"] == pytest.approx(3.0)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="missing column"):
        read_results(tmp_path / "bad.csv")


def test_knn_kernels_match_dense():
    x = torch.randn(300, 4, dtype=torch.float64)
    for metric, p in (("max", float("inf")), ("l2", 2.0)):
        dk = kth_neighbor_distances(x, 3, metric=metric, chunk=37)
        dense = torch.cdist(x, x, p=p, compute_mode="donot_use_mm_for_euclid_dist")
        dense.fill_diagonal_(float("inf"))
        ref = dense.sort(dim=1).values[:, 2]
        assert torch.allclose(dk, ref, atol=1e-12)
        cnt = count_within(x, dk, metric=metric, chunk=50)
        assert torch.equal(cnt, (dense < dk[:, None]).sum(1))


def test_as_tensor_validation():
    assert as_tensor(np.arange(5)).shape == (5, 1)
    with pytest.raises(DataError, match="non-finite"):
        as_tensor(np.array([1.0, np.nan]))
    with pytest.raises(DataError, match=r"shape \(n_samples, n_features\)"):
        as_tensor(np.zeros((2, 2, 2)))


def test_estimate_unit_conversion():
    e = Estimate(value=math.log(4), unit="nats", quantity="mutual_information", estimator="x", cap=math.log(8))
    b = e.to("bits")
    assert b.value == pytest.approx(2.0) and b.cap == pytest.approx(3.0) and b.unit == "bits"


def test_cli_help_is_fast_and_torch_free():
    code = "import sys, ibscope.cli.main; print(json.dumps(sorted(m for m in ('torch','matplotlib','h5py') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_cli_error_text_is_printed_verbatim():
    """User text in errors (selectors like 'lstm[0]', ':abc:') is neither markup nor emoji."""
    import typer
    from typer.testing import CliRunner

    from ibscope.cli._common import guard

    app = typer.Typer()

    @app.command()
    @guard
    def boom() -> None:
        raise DataError("layer 'lstm[0]' on cuda:abc: failed [bold]", hint="try [red]x[/red]")

    res = CliRunner().invoke(app, [])
    assert res.exit_code == 4
    assert "layer 'lstm[0]' on cuda:abc: failed [bold]" in res.output and "try [red]x[/red]" in res.output
