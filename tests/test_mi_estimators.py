"""Estimators against closed-form ground truth, hand-computed small cases and the anchors of
notes/anchor_checks.py. Tolerances are stated (and justified) next to each assertion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimators.binning import AdaptiveBinning, Binning
from ibscope.estimators.kde import KDE, AdaptiveKDE, kde_terms


def H(*p):
    p = np.asarray(p, float)
    p = p / p.sum()
    return float(-(p * np.log(p)).sum())


def gaussian_pair(n, d, rho, seed):
    """x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) e: I(X;Y) = -d/2 log(1 - rho^2) exactly."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1 - rho * rho) * rng.standard_normal((n, d))
    return x, y, -0.5 * d * math.log(1 - rho * rho)


# ---------------------------------------------------------------- continuous ground truth
@pytest.mark.parametrize("d,rho", [(1, 0.3), (3, 0.6), (5, 0.9)])
def test_gaussian_estimator_closed_form(d, rho):
    x, y, truth = gaussian_pair(5000, d, rho, seed=d)
    e = ibscope.mutual_information(x, y, method="gaussian")
    # the plug-in Gaussian MI has bias ~ d^2/(2n) <= 0.003 and sd ~ sqrt(2 d rho^2 / n) <= 0.04 here
    assert e.value == pytest.approx(truth, abs=0.06)
    # and it is exactly -1/2 sum log(1 - rho_i^2) over the sample canonical correlations
    zx, zy = x - x.mean(0), y - y.mean(0)
    qx, qy = np.linalg.qr(zx)[0], np.linalg.qr(zy)[0]
    cc = np.linalg.svd(qx.T @ qy, compute_uv=False)
    assert e.value == pytest.approx(-0.5 * np.log(1 - cc ** 2).sum(), abs=1e-9)


@pytest.mark.parametrize("d,rho", [(1, 0.6), (2, 0.8), (3, 0.5)])
def test_ksg_correlated_gaussians(d, rho):
    x, y, truth = gaussian_pair(2000, d, rho, seed=10 + d)
    e = ibscope.mutual_information(x, y, method="ksg", k=3)
    # KSG bias on low-dim Gaussians is < 0.03 nats at n=2000 (Kraskov et al. 2004, fig. 4);
    # stderr ~0.02-0.03: 0.1 is > 3 sd + bias
    assert e.value == pytest.approx(truth, abs=0.1)
    assert 0.005 < e.stderr < 0.06


def test_invertible_maps_preserve_mi():
    x, y, truth = gaussian_pair(2000, 2, 0.8, seed=3)
    a = np.array([[1.0, 0.5], [-0.3, 2.0]])  # invertible mixing within X
    fx = x @ a
    fy = y + 0.5 * np.tanh(y)  # smooth, strictly monotone per coordinate (slope in [1, 1.5])
    # I(f(X); g(Y)) = I(X;Y). KSG is only approximately invariant (neighbourhoods are distorted
    # at finite n): 0.1 nats = KSG bias + 3 sd as in test_ksg_correlated_gaussians
    assert ibscope.mutual_information(fx, fy, method="ksg").value == pytest.approx(truth, abs=0.1)
    # the Gaussian estimator is exactly invariant to invertible linear maps of each block
    g = ibscope.mutual_information(x, y, method="gaussian").value
    assert ibscope.mutual_information(fx, y @ a.T, method="gaussian").value == pytest.approx(g, abs=1e-9)


def test_independence_gives_zero():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2))
    lab = rng.integers(0, 4, 2000)
    # sd of KSG at I = 0 is ~0.01 at this n; the Gaussian estimator's bias is d^2/(2n) = 0.001
    assert abs(ibscope.mutual_information(x, y, method="ksg").value) < 0.04
    assert abs(ibscope.mutual_information(x, y, method="gaussian").value) < 0.01
    # plug-in I of 4 labels x 5 bins^1: Miller-Madow bias (K-1)(C-1)/(2n) = 0.003, sd ~0.003
    assert ibscope.mutual_information(x[:, :1], lab, method="binning", n_bins=5).value < 0.015
    assert abs(ibscope.mutual_information(x, lab, method="ksg").value) < 0.04


def test_gaussian_channel_anchor_values():
    """notes/anchor_checks.py, same RNG stream: S ~ N(0, I_2), n = 4000, sigma^2 = 0.25."""
    rng = np.random.default_rng(1)
    s = rng.standard_normal((4000, 2))
    tn = s + 0.5 * rng.standard_normal((4000, 2))
    ids = np.arange(4000)
    truth = 0.5 * 2 * math.log(1 + 1 / 0.25)  # 1.609
    up = ibscope.mutual_information(ids, s, method="kde-upper", noise_variance=0.25).value
    low = ibscope.mutual_information(ids, s, method="kde-lower", noise_variance=0.25).value
    # anchor values printed with 3 decimals in anchor_checks_out.txt
    assert up == pytest.approx(2.401, abs=5e-4) and low == pytest.approx(1.188, abs=5e-4)
    assert low < truth < up  # the Kolchinsky-Tracey pair brackets the true channel MI
    ksg = ibscope.mutual_information(s, tn, method="ksg", standardize=False, jitter=0.0).value
    assert ksg == pytest.approx(1.648, abs=5e-4)  # the anchor's cKDTree KSG-1, k = 3


# ---------------------------------------------------------------- discrete ground truth: T = X
def test_uniform_discrete_x_with_t_equal_x_gives_log_k():
    k, n = 8, 800
    lab = np.arange(n) % k
    t = (lab[:, None] * np.array([[3.0, -2.0]])).astype(np.float64)  # an injective code of X
    # plug-in estimators are exact here: every bin / kernel block is one class
    assert ibscope.mutual_information(lab, t, method="binning").value == pytest.approx(math.log(k), abs=1e-12)
    assert ibscope.mutual_information(lab, t, method="adaptive-binning").value == pytest.approx(math.log(k), abs=1e-12)
    # KDE: within-class distances 0, between-class >= 2 >> sigma = 0.01 (exp(-2e4) = 0)
    for m in ("kde-upper", "kde-lower"):
        assert ibscope.mutual_information(lab, t, method=m, noise_variance=1e-4).value == pytest.approx(math.log(k), abs=1e-12)
    for alpha in (1.01, 2.0):  # block Gram matrices: every Renyi entropy is log K
        r = ibscope.mutual_information(lab[:160], t[:160], method="renyi", alpha=alpha, sigma_y=0.01)
        assert r.value == pytest.approx(math.log(k), abs=1e-9)


# ---------------------------------------------------------------- binning: hand-computed cases
def test_binning_hand_computed():
    ids = np.arange(5)
    v = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    # 2 bins of width 0.5 over [0, 1]: {0, 0.1} | {0.5, 0.9, 1.0} (the maximum goes in the last bin)
    e = Binning(n_bins=2).estimate(ids, v)
    assert e.value == pytest.approx(H(2, 3), abs=1e-12)
    assert e.cap == pytest.approx(math.log(5), abs=1e-12)
    # outside a given range: into the edge bins, never wrapped (IDNNs maps all four to one bin)
    e = Binning(n_bins=4, range_min=-1.0, range_max=1.0).estimate(np.arange(4), np.array([-1.5, 1.0, 3.0, 7.0]))
    assert e.value == pytest.approx(H(1, 3), abs=1e-12) and e.extra["n_outside"] == 3
    # bin_width alone: ibsgd's unbounded floor(v / w) grid
    e = Binning(bin_width=0.07).estimate(np.arange(4), np.array([0.01, 0.06, 0.08, -0.01]))
    assert e.value == pytest.approx(H(2, 1, 1), abs=1e-12)
    # I(T;Y) = H(T) - H(T|Y) on a 2x2 table
    t = np.array([0.0, 0.0, 1.0, 1.0])
    assert Binning(n_bins=2).estimate(t, np.array([0, 1, 0, 1])).value == pytest.approx(0.0, abs=1e-12)
    e = Binning(n_bins=2).estimate(t, np.array([0, 0, 1, 1]))
    assert e.value == pytest.approx(math.log(2), abs=1e-12) and e.cap == pytest.approx(math.log(2))
    # rows are symbols: two units binned jointly
    tt = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert Binning(n_bins=2).estimate(np.arange(5), tt).value == pytest.approx(H(1, 1, 1, 2), abs=1e-12)


def test_adaptive_binning_equal_mass_edges():
    assert AdaptiveBinning(n_bins=4).estimate(np.arange(8), np.arange(8.0)).value == pytest.approx(math.log(4), abs=1e-12)
    # unique values u = [0, 1, 2]; 2 bins: edge u[floor(3/2)] = 1 -> {0} | {1, 2}: counts 6, 2
    v = np.array([0, 0, 0, 0, 0, 0, 1, 2], float)
    assert AdaptiveBinning(n_bins=2).estimate(np.arange(8), v).value == pytest.approx(H(6, 2), abs=1e-12)
    # per-call edges: a rescaled layer gives the same value (fixed bins would not)
    rng = np.random.default_rng(0)
    t = rng.standard_normal((300, 3))
    a = AdaptiveBinning(n_bins=5).estimate(np.arange(300), t).value
    assert AdaptiveBinning(n_bins=5).estimate(np.arange(300), 40 * t + 3).value == pytest.approx(a, abs=1e-12)


# ---------------------------------------------------------------- KDE: hand-computed and numpy reference
def test_kde_two_points_closed_form():
    d, s2 = 0.3, 0.01
    t = np.array([[0.0], [d]])
    up = KDE(noise_variance=s2).estimate(np.arange(2), t).value
    low = KDE(noise_variance=s2, bound="lower").estimate(np.arange(2), t).value
    assert up == pytest.approx(math.log(2) - math.log1p(math.exp(-d * d / (2 * s2))), abs=1e-12)
    assert low == pytest.approx(math.log(2) - math.log1p(math.exp(-d * d / (8 * s2))), abs=1e-12)
    assert KDE().estimate(np.arange(100), np.zeros((100, 3))).value == pytest.approx(0.0, abs=1e-12)
    far = np.arange(100)[:, None] * 100.0
    assert KDE(noise_variance=1.0).estimate(np.arange(100), far).value == pytest.approx(math.log(100), abs=1e-12)


def test_kde_matches_dense_numpy_reference_including_labels():
    rng = np.random.default_rng(2)
    t = rng.standard_normal((300, 4))
    lab = rng.integers(0, 3, 300)

    def f(a, var):  # full n x n reference: -(1/n) sum_i log (1/n) sum_j exp(-|ti-tj|^2 / 2var)
        d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        return -(logsumexp(-d2 / (2 * var), axis=1) - np.log(len(a))).mean()

    var = 0.5
    want = f(t, var) - sum((lab == c).mean() * f(t[lab == c], var) for c in range(3))
    # on CPU the estimator uses the float32-distance kernel (< 1e-6 relative, docs/estimators.md)
    assert KDE(noise_variance=var).estimate(t, lab).value == pytest.approx(want, rel=1e-6)
    assert float(kde_terms(torch.from_numpy(t), var, chunk=17, precision="float64").mean()) == pytest.approx(
        f(t, var), abs=1e-12)
    assert float(kde_terms(torch.from_numpy(t), var, chunk=17).mean()) == pytest.approx(f(t, var), rel=1e-6)
    # adaptive: sigma^2 = c * max|T|^2, so scaling T leaves the value unchanged
    a = AdaptiveKDE().estimate(np.arange(300), t)
    b = AdaptiveKDE().estimate(np.arange(300), 10 * t)
    assert b.value == pytest.approx(a.value, abs=1e-9)
    assert a.extra["noise_variance"] == pytest.approx(1e-3 * np.abs(t).max() ** 2)


# ---------------------------------------------------------------- other estimators
def test_renyi_matches_direct_eigen_computation():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 2))
    y = x[:, :1] + 0.5 * rng.standard_normal((60, 1))

    def gram(a, s):
        d2 = ((a[:, None] - a[None]) ** 2).sum(-1)
        k = np.exp(-d2 / (2 * s * s))
        return k / np.trace(k)

    def S(a, alpha):
        lam = np.clip(np.linalg.eigvalsh(a), 0, None)
        lam = lam / lam.sum()
        return np.log((lam ** alpha).sum()) / (1 - alpha)

    for alpha in (1.01, 2.0, 3.0):
        a, b = gram(x, 1.0), gram(y, 0.7)
        ab = a * b / np.trace(a * b)
        want = S(a, alpha) + S(b, alpha) - S(ab, alpha)
        e = ibscope.mutual_information(x, y, method="renyi", alpha=alpha, sigma_x=1.0, sigma_y=0.7)
        assert e.value == pytest.approx(want, abs=1e-9)
        assert 0 <= e.value <= e.cap == pytest.approx(math.log(60))


def test_compressed_recovers_dependence_in_leading_components():
    rng = np.random.default_rng(5)
    x, y, truth = gaussian_pair(2000, 2, 0.8, seed=6)
    # 8 low-variance nuisance columns: PCA to 2 dims keeps exactly the informative plane
    xs = np.hstack([3 * x, 0.05 * rng.standard_normal((2000, 8))])
    ys = np.hstack([3 * y, 0.05 * rng.standard_normal((2000, 8))])
    e = ibscope.mutual_information(xs, ys, method="compressed", latent_dim=2, k=5, compressor_x="pca",
                                   compressor_y="pca")
    assert e.extra["latent_dims"] == [2, 2] and e.dims == (10, 10)
    assert e.value == pytest.approx(truth, abs=0.12)  # KSG tolerance as above (k=5: a bit more bias)


def test_infonce_is_a_capped_held_out_lower_bound():
    x, y, truth = gaussian_pair(1200, 1, 0.9, seed=7)  # truth 0.830
    e = ibscope.mutual_information(x, y, method="infonce", steps=150, batch_size=64, hidden=32, embed=16, lr=3e-3)
    assert e.cap == pytest.approx(math.log(64))
    # a lower bound: above truth only by held-out sampling noise (2 x stderr); a trained critic
    # gets well above 0 (0.4 = half the truth after 150 steps)
    assert 0.4 < e.value < truth + 2 * e.stderr + 0.05
    assert e.extra["n_test"] == 360  # 30 % test split; determinism (seeding) is checked by test_mi_conformance


def test_caps_and_units():
    rng = np.random.default_rng(8)
    t = rng.standard_normal((200, 3))
    lab = rng.integers(0, 2, 200)
    e = ibscope.mutual_information(np.arange(200), t, method="kde-upper")
    assert e.cap == pytest.approx(math.log(200)) and e.value <= e.cap + 1e-12 and e.unit == "nats"
    e = ibscope.mutual_information(t, lab, method="binning")
    p = np.bincount(lab) / 200
    assert e.cap == pytest.approx(-(p * np.log(p)).sum()) and e.value <= e.cap + 1e-12
    assert e.to("bits").value == pytest.approx(e.value / math.log(2))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", ["ksg", "binning", "gaussian", "kde-upper", "renyi", "compressed"])
def test_nan_inf_rejected_with_numbers(method):
    x = np.random.default_rng(0).standard_normal((50, 2))
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[4, 0] = np.inf
    other = np.arange(50) if method.startswith("kde") or method == "binning" else x
    with pytest.raises(DataError, match=r"contains 2 non-finite value\(s\) \(NaN or inf\) out of 100"):
        ibscope.mutual_information(other, bad, method=method)


def test_bad_shapes_and_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"ksg: x and y must have the same number of samples. Got 10 and 9"):
        ibscope.mutual_information(rng.standard_normal(10), rng.standard_normal(9))
    with pytest.raises(DataError, match=r"ksg: 'x' must have shape \(n_samples, n_features\).*Got shape \(4, 3, 2\)"):
        ibscope.mutual_information(rng.standard_normal((4, 3, 2)), rng.standard_normal(4))
    with pytest.raises(DataError, match=r"ksg needs at least 6 samples \(k=5 neighbours.*Got 4"):
        ibscope.mutual_information(rng.standard_normal(4), rng.standard_normal(4), k=5)
    with pytest.raises(DataError, match=r"class 1 has 2 sample\(s\), but k=3 needs at least k\+1=4"):
        ibscope.mutual_information(rng.standard_normal(12), np.array([0] * 10 + [1] * 2))
    with pytest.raises(DataError, match=r"gaussian needs at least 6 samples"):
        ibscope.mutual_information(rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), method="gaussian")


def test_constant_columns():
    x, y, _ = gaussian_pair(300, 2, 0.7, seed=1)
    xc = np.hstack([x, np.full((300, 1), 5.0)])
    # a constant column carries no information: it is dropped and the value is unchanged
    for m in ("ksg", "gaussian"):
        a = ibscope.mutual_information(x, y, method=m)
        b = ibscope.mutual_information(xc, y, method=m)
        assert b.value == pytest.approx(a.value, abs=1e-12)
    assert ibscope.mutual_information(xc, y).extra["dropped_constant_x"] == [2]
    # a constant x (all rows identical) has no information: 0 exactly, by the degenerate-input rule
    with pytest.warns(RuntimeWarning, match=r"ksg: 'x' is constant \(all 300 rows identical\): the value is 0"):
        e = ibscope.mutual_information(np.ones((300, 3)), y)
    assert e.value == 0.0 and e.extra["constant"] == ["x"] and e.cap is None and e.saturated is None
    with pytest.raises(DataError, match=r"gaussian: the correlation matrix of x \(2 x 2\) is singular"):
        ibscope.mutual_information(np.hstack([x[:, :1], 2 * x[:, :1]]), y, method="gaussian")


def test_unknown_names_and_bad_parameters():
    x = np.zeros((10, 1))
    with pytest.raises(UsageError, match=r"Unknown estimator 'ksk'. Did you mean 'ksg'\?"):
        ibscope.mutual_information(x, x, method="ksk")
    with pytest.raises(UsageError, match=r"Estimator 'binning' has no parameter 'nbins'. Did you mean 'n_bins'\?"):
        ibscope.mutual_information(x, x, method="binning", nbins=3)
    with pytest.raises(UsageError, match=r"^The 'k' parameter of ksg must be an integer >= 1. Got 0 instead.$"):
        ibscope.mutual_information(x, x, k=0)
    with pytest.raises(UsageError, match=r"'norm' parameter of ksg must be 'max' or 'euclidean'. Got 'l1'"):
        ibscope.mutual_information(x, x, norm="l1")
    with pytest.raises(UsageError, match=r"'noise_variance' parameter of kde-upper must be a finite number > 0. Got -1.0"):
        ibscope.mutual_information(x, x, method="kde-upper", noise_variance=-1.0)
    with pytest.raises(UsageError, match=r"kde-upper: one of x, y must be discrete"):
        ibscope.mutual_information(np.random.rand(10, 1), np.random.rand(10, 1), method="kde-upper")
    with pytest.raises(UsageError, match=r"ksg: both x and y are discrete"):
        ibscope.mutual_information(np.arange(10), np.arange(10) % 2)
    with pytest.raises(UsageError, match=r"'range_min/range_max' parameter of binning must be given together"):
        ibscope.mutual_information(x, x, method="binning", range_min=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["binning", "adaptive-binning", "kde-upper", "adaptive-kde-lower", "gaussian",
                                    "renyi", "compressed", "chelombiev-binning", "chelombiev-kde-lower", "gcmi"])
def test_gpu_inputs_compute_on_the_gpu_and_agree(method):
    rng = np.random.default_rng(0)
    t = rng.standard_normal((400, 3))
    lab = rng.integers(0, 3, 400)
    cpu = ibscope.mutual_information(t, lab, method=method).value
    gpu = ibscope.mutual_information(torch.from_numpy(t).cuda(), torch.from_numpy(lab).cuda(), method=method).value
    assert gpu == pytest.approx(cpu, abs=1e-8)  # float64 on both devices; only summation order differs
