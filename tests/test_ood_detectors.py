"""OOD detectors: Mahalanobis against the chi-squared oracle and scikit-learn, Ledoit-Wolf against
scikit-learn, k-NN against scikit-learn / faiss / a float64 brute force; memory and data guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ibscope.errors import DataError, UsageError
from ibscope.ood import KNNDetector, MahalanobisDetector, compute_metrics, ledoit_wolf


def _oracle(d: int, delta: float) -> dict[str, float]:
    """ID ~ N(0, S), OOD ~ N(mu, S) with Mahalanobis shift delta: MD^2 ~ chi2(d) vs ncx2(d, delta^2).
    Same formulas as notes/ood_bench/chi2_oracle.py."""
    xs = np.linspace(0, 400, 400001)
    return {
        "auroc": float(np.trapezoid(stats.chi2.pdf(xs, d) * stats.ncx2.sf(xs, d, delta**2), xs)),
        "fpr95_id_positive": float(stats.ncx2.cdf(stats.chi2.ppf(0.95, d), d, delta**2)),
        "fpr95_openood": float(stats.chi2.sf(stats.ncx2.ppf(0.05, d, delta**2), d)),
    }


def _gaussians(d, n_fit, n_test, delta, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)     # S = A A^T, well conditioned
    fit = rng.standard_normal((n_fit, d)) @ a.T
    test = rng.standard_normal((n_test, d)) @ a.T
    shift = a @ (np.eye(d)[0] * delta)                             # ||A^-1 shift|| = delta
    ood = rng.standard_normal((n_test, d)) @ a.T + shift
    return fit, test, ood


def test_oracle_values_match_the_research_note():
    # notes/ood_bench/chi2_oracle_out.txt (d = 16)
    o = _oracle(16, 3.0)
    assert o["auroc"] == pytest.approx(0.8210, abs=2e-4)
    assert o["fpr95_id_positive"] == pytest.approx(0.6013, abs=2e-4)
    assert o["fpr95_openood"] == pytest.approx(0.6709, abs=2e-4)


@pytest.mark.parametrize("delta", [2.0, 4.0])
@pytest.mark.parametrize("covariance", ["empirical", "ledoit-wolf"])
def test_mahalanobis_reaches_chi2_oracle(delta, covariance):
    d, n_test = 16, 6000
    fit, test, ood = _gaussians(d, 20000, n_test, delta, seed=int(delta))
    det = MahalanobisDetector(covariance=covariance).fit(fit)
    m = compute_metrics(det.score(test), det.score(ood))
    o = _oracle(d, delta)
    # n_test = 6000 per set: SE(AUROC) <= 0.006, SE(FPR95) ~ 0.006-0.01 including the threshold's own
    # sampling error; n_fit = 20,000 makes the fitted covariance error negligible (d / n < 1e-3).
    # Tolerances are ~3 SE.
    assert m["auroc"] == pytest.approx(o["auroc"], abs=0.02)
    assert m["fpr95_id_positive"] == pytest.approx(o["fpr95_id_positive"], abs=0.035)
    assert m["fpr95_openood"] == pytest.approx(o["fpr95_openood"], abs=0.035)
    # and the squared distances of ID test points follow chi2(d): mean d, variance 2d
    d2 = det.score(test) ** 2
    assert d2.mean() == pytest.approx(d, rel=0.03)                 # SE of the mean = sqrt(2d/n) ~ 0.07 (0.5%)
    if covariance == "ledoit-wolf":
        assert det.settings()["shrinkage"] < 0.01                   # n >> d: almost no shrinkage


def test_mahalanobis_matches_sklearn_empirical_covariance():
    from sklearn.covariance import EmpiricalCovariance

    fit, test, ood = _gaussians(12, 300, 50, 2.0, seed=3)
    det = MahalanobisDetector(covariance="empirical").fit(fit)
    ref = np.sqrt(EmpiricalCovariance().fit(fit).mahalanobis(np.r_[test, ood]))
    np.testing.assert_allclose(det.score(np.r_[test, ood]), ref, rtol=1e-9)


def test_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 30)) @ rng.standard_normal((30, 30))
    cov, a = ledoit_wolf(torch.from_numpy(x - x.mean(0)))
    ref = LedoitWolf().fit(x)
    assert a == pytest.approx(ref.shrinkage_, rel=1e-10)
    np.testing.assert_allclose(cov.numpy(), ref.covariance_, rtol=1e-10, atol=1e-12)


def test_class_conditional_is_min_over_classes_with_tied_covariance():
    rng = np.random.default_rng(5)
    d, n = 6, 400
    y = rng.integers(0, 3, n)
    means = rng.standard_normal((3, d)) * 4
    x = means[y] + rng.standard_normal((n, d)) @ np.diag(np.linspace(0.5, 2, d))
    q = rng.standard_normal((30, d)) * 5
    det = MahalanobisDetector(covariance="empirical", class_conditional=True).fit(x, y)
    # slow reference: class means, pooled within-class MLE covariance, explicit inverse, loop over classes
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    xc = x - mu[y]
    prec = np.linalg.inv(xc.T @ xc / n)
    ref = np.array([min(np.sqrt((v - mu[c]) @ prec @ (v - mu[c])) for c in range(3)) for v in q])
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-9)
    assert det.settings()["n_classes"] == 3


def test_class_conditional_needs_labels():
    with pytest.raises(UsageError, match="needs class labels"):
        MahalanobisDetector(class_conditional=True).fit(np.random.default_rng(0).standard_normal((50, 3)))


def test_shrinkage_beats_empirical_when_n_is_close_to_d():
    # n_fit = 45 for d = 40: the empirical covariance is nearly singular and over-fits; Ledoit-Wolf
    # recovers part of the separation. Averaged over 5 draws (measured: 0.60 vs 0.69).
    emp, lw = [], []
    for seed in range(5):
        fit, test, ood = _gaussians(40, 45, 1500, 3.0, seed=100 + seed)
        for det, acc in ((MahalanobisDetector(covariance="empirical"), emp), (MahalanobisDetector(covariance="ledoit-wolf"), lw)):
            det.fit(fit)
            acc.append(compute_metrics(det.score(test), det.score(ood))["auroc"])
    assert np.mean(lw) > np.mean(emp) + 0.04


def test_auto_covariance_choice_is_recorded():
    rng = np.random.default_rng(6)
    few = MahalanobisDetector().fit(rng.standard_normal((50, 10)))
    many = MahalanobisDetector().fit(rng.standard_normal((500, 10)))
    assert few.settings()["covariance"] == "ledoit-wolf" and "n_fit=50 < 10" in few.settings()["covariance_reason"]
    assert many.settings()["covariance"] == "empirical"
    dead = rng.standard_normal((500, 10))
    dead[:, 3] = 0.0                                              # a dead ReLU unit: singular empirical covariance
    auto = MahalanobisDetector().fit(dead)
    assert auto.settings()["covariance"] == "ledoit-wolf"
    assert auto.settings()["covariance_reason"] == "auto: empirical covariance singular"
    with pytest.raises(DataError, match="singular"):
        MahalanobisDetector(covariance="empirical").fit(dead)
    # an explicit ridge makes the empirical covariance usable and is recorded
    assert MahalanobisDetector(covariance="empirical", ridge=1e-3).fit(dead).settings()["ridge"] == 1e-3


def test_too_few_samples_for_covariance():
    with pytest.raises(DataError, match="Too few in-distribution samples.*10 fit samples.*20 features"):
        MahalanobisDetector(covariance="empirical").fit(np.random.default_rng(0).standard_normal((10, 20)))
    with pytest.raises(DataError, match="Too few"):
        MahalanobisDetector(covariance="ledoit-wolf").fit(np.ones((1, 3)))


def test_memory_guard_refuses_before_allocating():
    det = MahalanobisDetector(covariance="ledoit-wolf")               # default limit 4 GiB
    x = np.zeros((3, 50_000), dtype=np.float32)                       # the covariance would need 56 GiB
    with pytest.raises(UsageError, match=r"needs about 55\.9 GiB.*limit is 4\.0 GiB") as ei:
        det.fit(x)
    assert "pca" in ei.value.hint and "knn" in ei.value.hint
    with pytest.raises(UsageError, match="limit is 0.0 GiB"):
        MahalanobisDetector(memory_limit="1MB").fit(np.zeros((3, 400)))
    with pytest.raises(UsageError, match="Cannot read memory size"):
        MahalanobisDetector(memory_limit="lots")


def test_nan_features_and_dim_mismatch_are_data_errors():
    x = np.random.default_rng(0).standard_normal((100, 4))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        MahalanobisDetector().fit(bad)
    with pytest.raises(DataError, match="non-finite"):
        KNNDetector(k=3).fit(x).score(bad)
    with pytest.raises(DataError, match="have 3 dims; the detector was fitted on 4"):
        MahalanobisDetector().fit(x).score(x[:, :3])
    with pytest.raises(DataError, match="have 5 dims; the detector was fitted on 4"):
        KNNDetector(k=3).fit(x).score(np.c_[x, x[:, :1]])


@pytest.mark.parametrize("normalize", [True, False])
def test_knn_matches_sklearn_and_float64_brute_force(normalize):
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(7)
    ref, q = rng.standard_normal((800, 24)), rng.standard_normal((120, 24)) * 1.3
    k = 7
    det = KNNDetector(k=k, normalize=normalize, chunk=50).fit(ref)     # several chunks
    r, qq = ref, q
    if normalize:
        r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    brute = np.sort(np.sqrt(((qq[:, None, :] - r[None]) ** 2).sum(-1)), axis=1)[:, k - 1]
    sk = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(r).kneighbors(qq)[0][:, -1]
    s = det.score(q)
    # float32 GEMM-form distances: ~1e-6 relative; the float64 path agrees to round-off
    np.testing.assert_allclose(s, brute, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(s, sk, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(KNNDetector(k=k, normalize=normalize, dtype="float64").fit(ref).score(q), brute, rtol=1e-10)


def test_knn_faiss_backend_matches_torch():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(8)
    ref, q = rng.standard_normal((1000, 32)), rng.standard_normal((200, 32))
    a = KNNDetector(k=10, backend="faiss").fit(ref)
    b = KNNDetector(k=10, backend="torch").fit(ref)
    assert a.settings()["backend"] == "faiss"
    np.testing.assert_allclose(a.score(q), b.score(q), rtol=1e-5, atol=1e-5)


def test_knn_parameter_errors():
    with pytest.raises(UsageError, match="'k' parameter of knn must be an integer >= 1. Got 0"):
        KNNDetector(k=0)
    with pytest.raises(UsageError, match="Unknown k-NN backend 'fiass'. Did you mean 'faiss'"):
        KNNDetector(backend="fiass")
    with pytest.raises(DataError, match="k=50 nearest neighbours need at least 50 fit samples; got 10"):
        KNNDetector(k=50).fit(np.random.default_rng(0).standard_normal((10, 3)))
    with pytest.raises(UsageError, match="not fitted"):
        KNNDetector(k=1).score(np.zeros((2, 2)))
    with pytest.raises(UsageError, match="Unknown covariance estimator 'ledoit'"):
        MahalanobisDetector(covariance="ledoit")


def test_all_zero_rows_do_not_give_nan_under_l2_normalisation():
    # dead-ReLU samples (all zeros) stay zero vectors instead of NaN (eps inside max(||x||, 1e-12))
    x = np.random.default_rng(9).random((50, 5))
    x[0] = 0.0
    s = KNNDetector(k=3).fit(x).score(np.r_[x[:3], np.zeros((1, 5))])
    assert np.all(np.isfinite(s))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detectors_on_gpu_match_cpu():
    fit, test, _ = _gaussians(16, 3000, 500, 2.0, seed=10)
    for cls, kw in ((MahalanobisDetector, {}), (KNNDetector, {"k": 10})):
        cpu = cls(device="cpu", **kw).fit(fit).score(test)
        gpu_det = cls(device="cuda", **kw).fit(fit)
        assert gpu_det.settings()["device"].startswith("cuda")
        np.testing.assert_allclose(gpu_det.score(test), cpu, rtol=1e-4, atol=1e-4)
        # a tensor already on the GPU is scored on its own device (device=None)
        t = torch.as_tensor(fit, device="cuda")
        np.testing.assert_allclose(cls(**kw).fit(t).score(torch.as_tensor(test, device="cuda")), cpu, rtol=1e-4, atol=1e-4)
