"""Gaussian-copula MI (gcmi): closed-form ground truth, invariance, an independent numpy
re-implementation of Ince et al.'s procedure, the continuous-discrete form, and errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import ndtri, psi

import ibscope
import ibscope.estimators
from ibscope.errors import DataError, UsageError


def gaussian_pairs(n, dx, dy, rhos, seed):
    """(x, y) with cov(x_i, y_i) = rho_i, unit variances, then a random rotation on each side."""
    rng = np.random.default_rng(seed)
    k = len(rhos)
    zx = rng.standard_normal((n, dx))
    e = rng.standard_normal((n, dy))
    y = e.copy()
    r = np.asarray(rhos)
    y[:, :k] = r * zx[:, :k] + np.sqrt(1 - r ** 2) * e[:, :k]
    qx = np.linalg.qr(rng.standard_normal((dx, dx)))[0]
    qy = np.linalg.qr(rng.standard_normal((dy, dy)))[0]
    return zx @ qx.T, y @ qy.T, float(-0.5 * np.log1p(-r ** 2).sum()), float((r ** 2).sum())


# --- an independent numpy re-implementation of Ince et al.'s gcmi_cc / gcmi_model_cd -----------

def copnorm_np(a):
    ranks = np.argsort(np.argsort(a, axis=0, kind="stable"), axis=0) + 1.0
    return ndtri(ranks / (a.shape[0] + 1.0))


def ent_g_np(a, bias=True):
    """Entropy (nats) of a Gaussian fit to the rows of a, with Ince et al.'s bias correction."""
    n, d = a.shape
    a = a - a.mean(0)
    c = a.T @ a / (n - 1)
    h = 0.5 * np.linalg.slogdet(c)[1] + 0.5 * d * (math.log(2 * math.pi) + 1)
    if bias:
        h -= d * 0.5 * (math.log(2) - math.log(n - 1)) + 0.5 * psi((n - np.arange(1, d + 1)) / 2).sum()
    return h


def gcmi_cc_np(x, y, bias=True):
    a, b = copnorm_np(x), copnorm_np(y)
    return ent_g_np(a, bias) + ent_g_np(b, bias) - ent_g_np(np.hstack([a, b]), bias)


def gcmi_cd_np(x, lab, bias=True):
    a = copnorm_np(x)
    h = ent_g_np(a, bias)
    for c in np.unique(lab):
        h -= np.mean(lab == c) * ent_g_np(a[lab == c], bias)
    return h


@pytest.mark.parametrize("dx,dy,rhos", [(1, 1, [0.5]), (1, 1, [0.9]), (3, 3, [0.7, 0.5, 0.3]),
                                        (5, 5, [0.6] * 5), (25, 25, [0.8, 0.8]), (25, 25, [0.2] * 25)])
def test_gaussian_ground_truth(dx, dy, rhos):
    # Gaussian data: gcmi is the Gaussian MI of the normal scores, exact up to sampling error.
    # Tolerance: 4 standard deviations of the sampling error, sd = sqrt(sum rho^2 / n) (delta
    # method for -1/2 log(1 - r^2): var = rho^2 / n per canonical pair), plus 0.01 for the rank
    # transform (normal scores are not exactly the Gaussian values). Averaged over 3 seeds.
    n = 5000
    vals, truth, s2 = [], None, None
    for seed in range(3):
        x, y, truth, s2 = gaussian_pairs(n, dx, dy, rhos, seed)
        vals.append(ibscope.mutual_information(x, y, method="gcmi").value)
    sd = math.sqrt(s2 / n / 3)
    assert np.mean(vals) == pytest.approx(truth, abs=4 * sd + 0.01)


def test_bias_correction_removes_the_high_dimensional_bias():
    # independent 25 + 25 dims, n = 500: the plug-in Gaussian MI is biased upwards by about
    # dx dy / (2 n) = 0.625 nats; the corrected estimate is within sampling error of 0 (sd of
    # the estimate under independence ~ sqrt(dx dy / 2) / n = 0.035; 4 sd).
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((500, 25)), rng.standard_normal((500, 25))
    raw = ibscope.mutual_information(x, y, method="gcmi", bias_correction=False).value
    fixed = ibscope.mutual_information(x, y, method="gcmi").value
    assert raw == pytest.approx(0.625, abs=0.15)
    assert abs(fixed) < 0.14
    assert fixed < 0 or fixed < raw  # reported as it is, negative values included


def test_matches_numpy_reimplementation_of_the_paper():
    # no ties, so the seeded tie-breaking plays no part: equal to round-off
    x, y, _, _ = gaussian_pairs(3000, 4, 3, [0.7, 0.4, 0.2], 5)
    x = np.c_[np.exp(x[:, :2]), x[:, 2:] ** 3]
    for bias in (True, False):
        got = ibscope.mutual_information(x, y, method="gcmi", bias_correction=bias).value
        assert got == pytest.approx(gcmi_cc_np(x, y, bias), abs=1e-10)
    lab = (x[:, 0] > 1).astype(int) + (y[:, 1] > 0).astype(int)
    got = ibscope.mutual_information(x, lab, method="gcmi")
    assert got.value == pytest.approx(gcmi_cd_np(x, lab), abs=1e-10)
    assert got.cap == pytest.approx(-sum(p * math.log(p) for p in np.bincount(lab) / len(lab)))
    assert ibscope.mutual_information(lab, x, method="gcmi").value == pytest.approx(got.value, abs=1e-12)


def test_invariant_to_increasing_maps_of_each_column():
    x, y, _, _ = gaussian_pairs(2000, 3, 2, [0.8, 0.5], 1)
    base = ibscope.mutual_information(x, y, method="gcmi").value
    xt = np.c_[np.exp(x[:, 0]), x[:, 1] ** 3, np.arctan(5 * x[:, 2])]
    yt = np.c_[1 / (1 + np.exp(-y[:, 0])), 7.0 * y[:, 1] - 3.0]
    assert ibscope.mutual_information(xt, yt, method="gcmi").value == pytest.approx(base, abs=1e-12)


def test_continuous_discrete_is_a_lower_bound():
    # X | Y = c ~ N(mu_c, 1), three equiprobable classes; the true I(X;Y) by quadrature.
    from scipy import integrate, stats

    mus = np.array([-2.0, 0.0, 2.0])

    def integrand(v):
        p = stats.norm.pdf(v, mus) / 3
        return float((p * np.log(p / p.sum())).sum())

    truth = integrate.quad(integrand, -12, 12, limit=200)[0] + math.log(3)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, 20000)
    x = mus[lab] + rng.standard_normal(20000)
    got = ibscope.mutual_information(x, lab, method="gcmi").value
    # sd of the estimate ~ 0.006 at n = 20,000; the copula of a mixture is not Gaussian, so
    # gcmi reads below the truth (the paper's lower bound), here by ~0.1 nats
    assert truth - 0.2 < got < truth + 0.02


def test_blind_to_dependence_without_correlation():
    # documented limitation: Y = X^2 (symmetric X) has no correlation of normal scores
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000)
    y = x ** 2 + 0.1 * rng.standard_normal(4000)
    assert abs(ibscope.mutual_information(x, y, method="gcmi").value) < 0.02
    assert ibscope.mutual_information(x, y, method="ksg").value > 0.8


def test_ties_are_broken_by_a_seed_with_a_warning():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((1000, 2)), 0.0)          # ~50 % zeros: dead-ReLU-like
    y = x @ rng.standard_normal((2, 2)) + 0.5 * rng.standard_normal((1000, 2))
    with pytest.warns(RuntimeWarning, match="tied values"):
        a = ibscope.mutual_information(x, y, method="gcmi", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = ibscope.mutual_information(x, y, method="gcmi", seed=0)
        c = ibscope.mutual_information(x, y, method="gcmi", seed=1)
    assert a.value == b.value and a.value != c.value and abs(a.value - c.value) < 0.05
    assert a.extra["tied_fraction_x"] > 0.4


def test_constant_and_duplicate_columns():
    x, y, _, _ = gaussian_pairs(1000, 2, 2, [0.7, 0.3], 2)
    base = ibscope.mutual_information(x, y, method="gcmi").value
    x2 = np.c_[x, np.full(1000, 3.0), np.exp(x[:, 0])]     # a constant and a monotone copy of column 0
    e = ibscope.mutual_information(x2, y, method="gcmi")
    assert e.value == pytest.approx(base, abs=1e-12)
    assert e.extra["dropped_constant_x"] == [2] and e.extra["duplicate_columns_x"] == 1


def test_runs_on_the_input_device_and_in_float64():
    x, y, _, _ = gaussian_pairs(500, 2, 2, [0.5, 0.5], 3)
    a = ibscope.mutual_information(torch.from_numpy(x).float(), torch.from_numpy(y).float(), method="gcmi").value
    b = ibscope.mutual_information(x.astype(np.float32), y.astype(np.float32), method="gcmi").value
    assert a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_agrees():
    x, y, _, _ = gaussian_pairs(3000, 5, 5, [0.6] * 5, 4)
    lab = (x[:, 0] > 0).astype(np.int64)
    for other in (y, lab):
        cpu = ibscope.mutual_information(x, other, method="gcmi").value
        gpu = ibscope.mutual_information(torch.from_numpy(x).cuda(), torch.from_numpy(other).cuda(),
                                         method="gcmi").value
        assert gpu == pytest.approx(cpu, abs=1e-9)


def test_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"gcmi needs at least 12 samples \(more samples than the 5\+5"):
        ibscope.mutual_information(rng.standard_normal((11, 5)), rng.standard_normal((11, 5)), method="gcmi")
    lab = np.r_[np.zeros(50, int), np.ones(3, int)]
    with pytest.raises(DataError, match=r"every class needs more than 3 samples.*class 1: 3 sample"):
        ibscope.mutual_information(rng.standard_normal((53, 2)), lab, method="gcmi")
    with pytest.raises(UsageError, match="both x and y are discrete"):
        ibscope.mutual_information(lab, lab, method="gcmi")
    with pytest.raises(DataError, match="non-finite"):
        ibscope.mutual_information(np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0, 3.0]), method="gcmi")
    with pytest.warns(RuntimeWarning, match=r"gcmi: 'x' is constant \(all 20 rows identical\): the value is 0"):
        assert ibscope.mutual_information(np.ones((20, 2)), rng.standard_normal((20, 1)), method="gcmi").value == 0.0
    with pytest.raises(UsageError, match=r"'bias_correction' parameter of gcmi must be"):
        ibscope.mutual_information(rng.standard_normal(20), rng.standard_normal(20), method="gcmi",
                                   bias_correction="maybe")
    with pytest.raises(UsageError, match=r"'bias_correction' parameter of gcmi must be true or false. Got 1"):
        ibscope.estimators.create("gcmi", bias_correction=1)
