"""`run_ood` / `ibscope ood` end to end: real stores, outputs, no leakage, error paths,
and a small model really trained on scikit-learn's digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.ood import auroc, read_scores, run_ood
from ibscope.ood.features import FeaturePipeline, parse_reduction
from ibscope.store import StoreWriter

runner = CliRunner()
SHAS = ["a" * 64, "b" * 64]


def write_store(path: Path, feats: list[np.ndarray], labels=None, layer: str = "feat", raw_shape=None) -> Path:
    """A store with one shard per entry of ``feats`` (checkpoints at epochs 1, 2, ...)."""
    n, d = feats[0].shape
    w = StoreWriter(path, config={"run": "r", "split": path.name}, sample_ids=np.arange(100, 100 + n), labels=labels,
                    layers={layer: {"raw_shape": list(raw_shape or [d]), "dims": d, "reduction": "none"}})
    for i, x in enumerate(feats):
        with w.checkpoint(epoch=i + 1, step=None, path=f"ck{i}.pt", sha256=SHAS[i]) as sh:
            sh.append(layer, np.asarray(x, dtype=np.float32))
    return path


@pytest.fixture(scope="module")
def gauss_stores(tmp_path_factory):
    """fit / test / two OOD sets, d = 8, two checkpoints (the second more separated)."""
    root = tmp_path_factory.mktemp("gauss")
    rng = np.random.default_rng(0)
    d = 8

    def draw(n, shift=0.0, scale=1.0):
        return [rng.standard_normal((n, d)) * scale + s for s in (shift, 2 * shift)]

    y = rng.integers(0, 2, 600)
    paths = {
        "fit": write_store(root / "fit", draw(600), labels=y),
        "test": write_store(root / "test", draw(300)),
        "shift": write_store(root / "shift", draw(300, shift=1.0)),
        "wide": write_store(root / "wide", draw(300, scale=2.0)),
    }
    return paths


def _cli(args: list) -> "object":
    return runner.invoke(app, ["ood", *[str(a) for a in args]])


@pytest.mark.slow
def test_cli_grid_writes_metrics_scores_figures_and_report(gauss_stores, tmp_path):
    p = gauss_stores
    out = tmp_path / "out"
    res = _cli(["--fit", p["fit"], "--test", p["test"], "--ood", f"shift={p['shift']}", "--ood", f"wide={p['wide']}",
                "--layer", "feat", "-d", "mahalanobis,knn", "--k", "5,20", "-r", "std+pca:3", "-r", "std+pca:8",
                "--checkpoint", "all", "--bootstrap", "50", "-o", out])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "ood_metrics.json").read_text())
    rows = doc["results"]
    # 2 checkpoints x 2 reductions x (1 mahalanobis + 2 k) x 2 OOD sets
    assert len(rows) == 2 * 2 * 3 * 2
    need = {"detector", "reduction", "layer", "checkpoint", "epoch", "ood_set", "auroc", "aupr_in", "aupr_out",
            "fpr95_id_positive", "fpr95_openood", "detection_accuracy", "threshold", "flagged_fraction",
            "auroc_ci_low", "auroc_ci_high", "fpr95_openood_ci_low", "id_flagged_fraction"}
    assert need <= set(rows[0])
    assert {r["epoch"] for r in rows} == {1, 2}
    assert set(doc) >= {"results", "figures", "provenance"}
    prov = doc["provenance"]
    assert set(prov["inputs"]) == {"fit", "test", "shift", "wide"}
    assert prov["settings"]["validation"].startswith("random 0.2")
    for f in doc["figures"]:
        assert (out / f).stat().st_size > 5000, f            # rendered PNGs, paths relative to the JSON
    names = {Path(f).name for f in doc["figures"]}
    assert {"auroc_vs_k.png", "auroc_vs_components.png", "auroc_vs_checkpoint.png", "embedding_2d.png"} <= names
    assert (out / "report.md").read_text().count("| mahalanobis|") == 2 * 2 * 2
    assert "FPR95 (OOD pos., OpenOOD v1.5)" in (out / "report.html").read_text()
    assert not list(out.rglob("*.tmp*"))

    # per-sample scores reproduce the JSON metrics; the threshold comes from the validation split
    scores = read_scores(out / "ood_scores.h5")
    for r in rows[:6] + rows[-6:]:
        sc = scores[f"checkpoint_{r['checkpoint']}"][r["config"]]
        assert auroc(sc["test"], sc[r["ood_set"]]) == pytest.approx(r["auroc"], abs=1e-12)
        assert np.mean(sc["val"] > r["threshold"]) <= 0.05 + 1e-12
        assert np.mean(sc[r["ood_set"]] > r["threshold"]) == pytest.approx(r["flagged_fraction"])
        assert r["auroc_ci_low"] <= r["auroc"] <= r["auroc_ci_high"]
    ids = scores["checkpoint_0"]["sample_ids"]
    np.testing.assert_array_equal(ids["test"], np.arange(100, 400))
    assert len(ids["fit"]) == 480 and len(ids["val"]) == 120 and not set(ids["fit"]) & set(ids["val"])
    # a shift doubled at the second checkpoint is easier to detect for the Mahalanobis detector
    md = {r["checkpoint"]: r["auroc"] for r in rows if r["config"] == "mahalanobis|std+pca:8" and r["ood_set"] == "shift"}
    assert md[1] > md[0] + 0.1


def test_separate_validation_store_and_class_conditional(gauss_stores, tmp_path):
    p = gauss_stores
    doc = run_ood(p["fit"], p["test"], {"shift": p["shift"]}, "feat", detectors=["mahalanobis"], val=p["test"],
                  class_conditional=True, covariance="empirical", n_bootstrap=0, out_dir=tmp_path, figures=False,
                  progress=False)
    r = doc["results"][0]
    assert r["n_fit"] == 600 and r["n_val"] == 300                 # the whole fit store is fitted
    assert r["val_flagged_fraction"] == r["id_flagged_fraction"] <= 0.05   # val is the test store here
    assert r["auroc_ci_low"] is None
    fitted = doc["fitted"][0]["detector"]
    assert fitted["class_conditional"] and fitted["n_classes"] == 2


def test_reductions_are_fitted_on_the_fit_split_only(gauss_stores, tmp_path):
    """Changing the OOD set must not change anything fitted: the ID test scores stay identical
    for standardisation and PCA. A pipeline fitted on fit + test + OOD data would move.
    (UMAP's data flow is checked by the spy test below: a real UMAP run costs ~30 s of numba
    compilation, more than this file's time budget.)"""
    p = gauss_stores
    kw = dict(detectors=["mahalanobis", "knn"], ks=[5], reductions=["std", "std+pca:3"], n_bootstrap=0,
              figures=False, progress=False, checkpoint=0)
    a = run_ood(p["fit"], p["test"], {"o": p["shift"]}, "feat", out_dir=tmp_path / "a", **kw)
    b = run_ood(p["fit"], p["test"], {"o": p["wide"]}, "feat", out_dir=tmp_path / "b", **kw)
    sa, sb = read_scores(tmp_path / "a" / "ood_scores.h5"), read_scores(tmp_path / "b" / "ood_scores.h5")
    for cid in sa["checkpoint_0"]:
        if cid == "sample_ids":
            continue
        np.testing.assert_array_equal(sa["checkpoint_0"][cid]["test"], sb["checkpoint_0"][cid]["test"])
        np.testing.assert_array_equal(sa["checkpoint_0"][cid]["val"], sb["checkpoint_0"][cid]["val"])
    assert {r["reduction"] for r in a["results"]} == {"std", "std+pca:3"}
    assert all(f["feature"]["fitted_on"] == "fit split only" for f in a["fitted"] + b["fitted"])
    # the same PCA as scikit-learn fitted on the fit rows alone
    from sklearn.decomposition import PCA

    from ibscope.store import open_store

    x = open_store(p["fit"]).activations(0, "feat").astype(np.float64)
    pipe = FeaturePipeline("std+pca:3").fit(x)
    xs = (x - x.mean(0)) / x.std(0)
    ref = PCA(3, svd_solver="full").fit(xs)
    y = np.random.default_rng(1).standard_normal((20, 8)) * 3
    np.testing.assert_allclose(np.abs(pipe.transform(y)), np.abs(ref.transform((y - x.mean(0)) / x.std(0))), rtol=1e-8, atol=1e-10)


def test_umap_fit_sees_only_fit_rows(monkeypatch):
    """Spy on umap.UMAP: fit() must receive exactly the fit rows; other sets only go to transform()."""
    import umap

    seen = {}

    class Spy:
        def __init__(self, **kw):
            seen["kw"] = kw

        def fit(self, x):
            seen["fit"] = np.array(x)
            self.embedding_ = x[:, :2]
            return self

        def transform(self, x):
            seen.setdefault("transform", []).append(np.array(x))
            return x[:, :2]

    monkeypatch.setattr(umap, "UMAP", Spy)
    rng = np.random.default_rng(2)
    fit, other = rng.standard_normal((30, 4)), rng.standard_normal((10, 4)) + 5
    pipe = FeaturePipeline("umap:2", seed=7)
    pipe.fit(fit)
    pipe.transform(other)
    np.testing.assert_array_equal(seen["fit"], fit)
    np.testing.assert_array_equal(seen["transform"][0], other)
    assert seen["kw"]["random_state"] == 7 and seen["kw"]["n_components"] == 2


def test_pooling_uses_the_raw_map_shape():
    import torch

    rng = np.random.default_rng(3)
    maps = rng.standard_normal((5, 4, 3, 3))
    flat = maps.reshape(5, -1)
    avg = FeaturePipeline("avgpool", raw_shape=(4, 3, 3)).fit(flat).transform(flat)
    mx = FeaturePipeline("maxpool+std", raw_shape=(4, 3, 3)).fit(flat)
    np.testing.assert_allclose(avg, torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(maps), 1).reshape(5, 4).numpy())
    assert mx.settings()["dims_out"] == 4
    from ibscope.errors import DataError, UsageError

    with pytest.raises(UsageError, match="needs the layer's raw output shape"):
        FeaturePipeline("avgpool").fit(flat)
    with pytest.raises(DataError, match=r"raw output shape \(4, 2, 2\) has 16 values, but the stored features have 36"):
        FeaturePipeline("avgpool", raw_shape=(4, 2, 2)).fit(flat)
    with pytest.raises(UsageError, match="Unknown reduction step 'pcaa'.*Did you mean 'pca'"):
        parse_reduction("std+pcaa:4")
    with pytest.raises(UsageError, match="Pooling must be the first step"):
        parse_reduction("std+avgpool")
    with pytest.raises(UsageError, match=r"'pca:50' asks for more components than the fit split allows: min\(n_fit=5, dims=36\)"):
        FeaturePipeline("pca:50").fit(flat)


# ----------------------------------------------------------------------------------------------
# error paths through the CLI: message + exit code, and no output file left behind


def test_cli_error_paths(gauss_stores, tmp_path):
    p = gauss_stores
    rng = np.random.default_rng(4)
    narrow = write_store(tmp_path / "narrow", [rng.standard_normal((50, 7))] * 2)
    nan = rng.standard_normal((50, 8))
    nan[3, 1] = np.nan
    nanstore = write_store(tmp_path / "nan", [nan, nan])
    tiny = write_store(tmp_path / "tiny", [rng.standard_normal((10, 8))] * 2)
    nolab = write_store(tmp_path / "nolab", [rng.standard_normal((200, 8))] * 2)
    wide = write_store(tmp_path / "widefeat", [rng.standard_normal((20, 3000))] * 2)
    other = StoreWriter(tmp_path / "otherck", config={}, sample_ids=np.arange(50), labels=None,
                        layers={"feat": {"raw_shape": [8]}})
    with other.checkpoint(epoch=9, step=None, path="x.pt", sha256="c" * 64) as sh:
        sh.append("feat", rng.standard_normal((50, 8)))
    base = ["--fit", p["fit"], "--test", p["test"], "--layer", "feat", "--bootstrap", "0", "--no-figures", "-q"]
    cases = [
        (["--ood", f"n={narrow}"], 4, "different feature dims across the stores (fit: 8, test: 8, n: 7)"),
        (["--ood", f"n={nanstore}"], 4, "non-finite feature value(s) (NaN or inf) in layer 'feat'"),
        (["--ood", f"o={p['shift']}", "-d", "mahalanobs"], 2, "Unknown OOD detector 'mahalanobs'. Did you mean 'mahalanobis'?"),
        (["--ood", "shift"], 2, "--ood expects NAME=STORE. Got 'shift'"),
        (["--ood", f"test={p['shift']}"], 2, "OOD set name 'test' is reserved"),
        (["--ood", f"o={tmp_path / 'missing'}"], 4, "OOD 'o' store: Activation store not found"),
        (["--ood", f"o={p['shift']}", "--layer", "feet"], 2, "Layer 'feet' is not in the fit store"),
        (["--ood", f"o={p['shift']}", "-r", "pca:0"], 2, "the number of components must be >= 1"),
        (["--ood", f"o={p['shift']}", "--checkpoint", "5"], 2, "Checkpoint index 5 is out of range: the fit store holds 2"),
        (["--ood", f"o={p['shift']}", "--k", "ten"], 2, "--k expects integers. Got 'ten'"),
        (["--ood", f"o={p['shift']}", "--device", "tpu"], 2, "--device expects auto, cpu or cuda:N"),
        (["--ood", f"o={other.dir}"], 4, "has no capture of the fit store's checkpoint 1 (epoch 2"),
    ]
    for i, (extra, code, msg) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = _cli([*base, *extra, "-o", out])
        assert res.exit_code == code, (extra, res.output)
        assert msg in " ".join(res.output.split()), (extra, res.output)
        assert "Traceback" not in res.output
        assert not (out / "ood_metrics.json").exists() and not (out / "ood_scores.h5").exists()
    # data-dependent refusals with their own fit stores
    for fit, extra, code, msg in [
        (tiny, ["-d", "mahalanobis", "--covariance", "empirical"], 4,
         "Too few in-distribution samples for an empirical covariance: 8 fit samples for 8 features; need at least 9"),
        (nolab, ["--class-conditional"], 2, "Class-conditional Mahalanobis needs class labels"),
        (wide, ["-d", "mahalanobis", "--memory-limit", "50MB"], 2, "Mahalanobis on 3000 features needs about 0.2 GiB"),
    ]:
        out = tmp_path / f"outf{code}{len(msg)}"
        res = _cli(["--fit", fit, "--test", fit, "--ood", f"o={fit}", "--layer", "feat", "-q", "--no-figures", *extra,
                    "-o", out])
        assert res.exit_code == code, res.output
        assert msg in " ".join(res.output.split()), res.output
        assert not (out / "ood_metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# a real model: an MLP trained on digits 0-4 for a few seconds, captured with ibscope.capture


def _mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


@pytest.mark.slow
def test_digits_model_held_out_classes_and_transformed_digits(tmp_path):
    import torch
    from sklearn.datasets import load_digits

    from ibscope.capture import capture

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    xid, yid, x_near, y_near = x[y < 5], y[y < 5], x[y >= 5], y[y >= 5]
    ntr = int(0.6 * len(xid))
    xtr, ytr, xte, yte = xid[:ntr], yid[:ntr], xid[ntr:], yid[ntr:]
    torch.manual_seed(0)
    net = _mlp()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(150):                                            # full-batch, ~1 s on CPU
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    assert acc > 0.95
    ck = tmp_path / "ck.pt"
    torch.save({"epoch": 1, "state_dict": net.state_dict(), "accuracy": acc, "loss": float(loss.detach())}, ck)
    sets = {"fit": (xtr, ytr), "test": (xte, yte), "heldout": (x_near, y_near),
            "inverted": (1.0 - xte, yte), "noise": (rng.uniform(0, 1, xte.shape).astype(np.float32), yte)}
    stores = {name: capture(_mlp, [ck], (a, b.astype(np.int64)), ["3=penultimate"], tmp_path / name, split=name,
                            progress=False) for name, (a, b) in sets.items()}
    doc = run_ood(stores["fit"], stores["test"], {n: stores[n] for n in ("heldout", "inverted", "noise")}, "penultimate",
                  detectors=["mahalanobis", "knn"], ks=[10], class_conditional=True, n_bootstrap=100,
                  out_dir=tmp_path / "ood", figures=False, progress=False)
    au = {(r["detector"], r["ood_set"]): r for r in doc["results"]}
    # Stated AUROCs for this 64-64-32-5 MLP (measured 0.97-1.00 for transformed digits, 0.89 / 0.97 for
    # held-out classes): transformed digits (far OOD) >= 0.95 with both detectors; held-out classes
    # (near OOD) >= 0.85 with class-conditional Mahalanobis and >= 0.9 with k-NN.
    for det in ("mahalanobis", "knn"):
        for far in ("inverted", "noise"):
            assert au[(det, far)]["auroc"] >= 0.95, (det, far, au[(det, far)]["auroc"])
    assert au[("mahalanobis", "heldout")]["auroc"] >= 0.85
    assert au[("knn", "heldout")]["auroc"] >= 0.90
    # near OOD is harder than far OOD; the validation threshold carries over to ID test data (~5% flagged)
    assert au[("mahalanobis", "heldout")]["auroc"] < au[("mahalanobis", "noise")]["auroc"]
    for r in doc["results"]:
        assert r["id_flagged_fraction"] <= 0.12
    assert doc["fitted"][0]["detector"]["covariance"] == "ledoit-wolf"  # dead ReLU units -> auto switched


def test_pooling_of_unreduced_conv_maps_through_run_ood(tmp_path):
    # stores of raw (C=4, 3x3) maps, flattened as capture stores them with --reduce none
    rng = np.random.default_rng(11)
    fit = rng.standard_normal((300, 4, 3, 3))
    test = rng.standard_normal((200, 4, 3, 3))
    ood = rng.standard_normal((200, 4, 3, 3)) + np.array([2.0, 0, 0, 0])[None, :, None, None]  # channel 0 shifted
    stores = {n: write_store(tmp_path / n, [a.reshape(len(a), -1)], raw_shape=[4, 3, 3])
              for n, a in (("fit", fit), ("test", test), ("ood", ood))}
    doc = run_ood(stores["fit"], stores["test"], {"shifted": stores["ood"]}, "feat", detectors=["mahalanobis"],
                  reductions=["avgpool", "maxpool+std"], n_bootstrap=0, out_dir=tmp_path / "o", figures=False,
                  progress=False)
    by = {r["reduction"]: r for r in doc["results"]}
    assert by["avgpool"]["dims_in"] == 36 and by["avgpool"]["dims_used"] == 4
    # channel means of 9 unit-variance pixels have sd 1/3: a shift of 2 is 6 sd -> near-perfect separation
    assert by["avgpool"]["auroc"] > 0.99
    assert by["maxpool+std"]["auroc"] > 0.9
    assert doc["provenance"]["settings"]["raw_shape"] == [4, 3, 3]


def test_figure_data_is_what_was_computed():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from ibscope.ood.figures import config_figure, draw_histograms, embedding_2d

    rng = np.random.default_rng(12)
    sets = {"val": rng.standard_normal(200), "test": rng.standard_normal(300), "far": rng.standard_normal(250) + 2}
    fig, ax = plt.subplots()
    heights = draw_histograms(ax, sets, threshold=1.5, bins=30)
    width = (max(map(np.max, sets.values())) - min(map(np.min, sets.values()))) / 30
    for name, h in heights.items():
        assert h.sum() * width == pytest.approx(1.0)             # densities integrate to one
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [1.5]  # the threshold line
    plt.close(fig)
    fig = config_figure(sets, 1.5, ["far"], "t")
    roc_ax = fig.axes[1]
    fpr, tpr = roc_ax.get_lines()[0].get_data()
    ref_fpr, ref_tpr, _ = roc_curve(np.r_[np.zeros(300), np.ones(250)], np.r_[sets["test"], sets["far"]],
                                    drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)        # the same ROC points as sklearn, OOD positive
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    plt.close(fig)
    feats = {"fit": rng.standard_normal((100, 5)) * [5, 3, 1, 1, 1], "ood": rng.standard_normal((40, 5)) + 10}
    emb = embedding_2d(feats)
    np.testing.assert_allclose(emb["fit"].mean(0), 0.0, atol=1e-12)   # centred with the fit split's statistics
    assert emb["ood"].shape == (40, 2) and np.abs(emb["ood"].mean(0)).max() > 1.0
