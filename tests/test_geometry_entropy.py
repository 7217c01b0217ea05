"""Matrix-based Renyi entropy and the MCR^2 coding rate: closed forms, a numpy reference,
saturation, kernel-width rules, invariances and error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimators import registry


def clusters(sizes, dim=6, spread=1e-4, sep=10.0, seed=0):
    rs = np.random.RandomState(seed)
    centers = np.eye(dim)[: len(sizes)] * sep
    return np.vstack([centers[j] + spread * rs.randn(s, dim) for j, s in enumerate(sizes)])


def renyi_ref(x, sigma, alpha):
    """Slow reference: dense Gaussian Gram, eigvalsh, the published formula (nats)."""
    k = np.exp(-cdist(x, x, "sqeuclidean") / (2 * sigma ** 2))
    lam = np.clip(np.linalg.eigvalsh(k / np.trace(k)), 0, None)
    lam = lam[lam > 0]
    if alpha == 1:
        return float(-(lam * np.log(lam)).sum())
    return float(np.log((lam ** alpha).sum()) / (1 - alpha))


@pytest.mark.parametrize("alpha", [1.01, 1.0, 2.0, 3.0])
def test_equal_clusters_give_log_c(alpha):
    # c tight (spread 1e-4), well separated (distance 14) clusters with sigma = 1: the kernel is
    # block-diagonal all-ones up to exp(-1e-8) and exp(-100) terms, so H = log c to ~1e-6
    # (the note measures 2.0000 bits for c = 4); tolerance 1e-5 nats.
    x = clusters([50, 50, 50, 50])
    est = ibscope.measure(x, "matrix-entropy", alpha=alpha, sigma=1.0)
    assert est.value == pytest.approx(math.log(4), abs=1e-5)
    assert est.unit == "nats" and est.cap == pytest.approx(math.log(200))
    assert est.to("bits").value == pytest.approx(2.0, abs=2e-5)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_unequal_clusters_give_renyi_entropy_of_sizes(alpha):
    # block-diagonal all-ones K with blocks n_j: spectrum of A is (n_j / N), so H_alpha(A) is the
    # Renyi entropy of the cluster proportions (alpha >= 1 here: for alpha < 1 the ~1e-9
    # eigenvalues left by the 1e-4 intra-cluster spread weigh in as lambda^alpha)
    sizes = [10, 30, 60]
    p = np.array(sizes) / 100
    want = -(p * np.log(p)).sum() if alpha == 1 else np.log((p ** alpha).sum()) / (1 - alpha)
    got = ibscope.measure(clusters(sizes), "matrix-entropy", alpha=alpha, sigma=1.0).value
    assert got == pytest.approx(want, abs=1e-5)


def test_identity_kernel_saturates_at_log_n_with_warning():
    x = np.eye(64) * 100.0  # distinct points, sigma << distances: K = I, H = log 64
    with pytest.warns(RuntimeWarning, match="saturated"):
        est = ibscope.measure(x, "matrix-entropy", alpha=2.0, sigma=1.0)
    assert est.value == pytest.approx(math.log(64), abs=1e-9)
    assert est.extra["saturation"] == pytest.approx(1.0)


def test_one_point_repeated_has_zero_entropy():
    assert ibscope.measure(np.zeros((30, 3)) + 5.0, "matrix-entropy", sigma=1.0).value == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("alpha", [1.01, 1.0, 2.0])
def test_matches_dense_numpy_reference(alpha):
    x = np.random.RandomState(1).randn(120, 5)
    got = ibscope.measure(x, "matrix-entropy", alpha=alpha, sigma=1.3).value
    assert got == pytest.approx(renyi_ref(x, 1.3, alpha), rel=1e-9)


def test_kernel_width_rules():
    # Silverman with the sqrt(d) normalisation, on standardised data (tr Cov = d):
    # sigma = 0.8 * sqrt(3) * 500^(-1/7) = 0.5703 (the note's value)
    rs = np.random.RandomState(2)
    z = rs.randn(500, 3)
    z = (z - z.mean(0)) / z.std(0, ddof=1)
    est = ibscope.measure(z, "matrix-entropy", alpha=2.0)  # alpha 2: no eigendecomposition needed
    assert est.extra["sigma"] == pytest.approx(0.8 * math.sqrt(3) * 500 ** (-1 / 7), rel=1e-12)
    assert est.extra["sigma"] == pytest.approx(0.5703, abs=1e-4)
    # the rule scales with the data, so the entropy is scale invariant
    assert ibscope.measure(10 * z, "matrix-entropy", alpha=2.0).value == pytest.approx(est.value, rel=1e-9)
    # median heuristic: sigma = median pairwise distance
    x = rs.randn(80, 4)
    d = cdist(x, x)[np.triu_indices(80, 1)]
    med = ibscope.measure(x, "matrix-entropy", sigma_rule="median")
    assert med.extra["sigma"] == pytest.approx(np.median(d), rel=1e-12)
    assert med.value == pytest.approx(renyi_ref(x, np.median(d), 1.01), rel=1e-9)


def test_kernel_width_median_needs_the_squared_distances():
    from ibscope.estimators.entropy import kernel_width

    x = torch.tensor(np.random.RandomState(3).randn(6, 2))
    sq = torch.cdist(x, x) ** 2
    # the median of the 15 pairwise distances (numpy's convention), from the squared distances given
    assert kernel_width(x, "median", 0.8, sq) == pytest.approx(float(np.median(torch.pdist(x).numpy())), rel=1e-12)
    with pytest.raises(ValueError, match="rule 'median' needs sqdist"):
        kernel_width(x, "median", 0.8)


def test_linear_kernel_is_log_effective_rank_of_normalised_rows():
    # Skean et al.'s MBE: linear kernel on centred, L2-normalised rows; for alpha = 1 it is the
    # log of the effective rank of those rows (same non-zero spectrum, computed on either side)
    rs = np.random.RandomState(3)
    for shape in ((200, 15), (15, 200)):
        x = rs.randn(*shape) @ np.diag(np.linspace(1, 0.1, shape[1])) + 2.0
        z = x - x.mean(0)
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        s = np.linalg.svd(z, compute_uv=False) ** 2
        p = s[s > 1e-12] / s.sum()
        est = ibscope.measure(x, "matrix-entropy", kernel="linear", alpha=1.0)
        assert est.value == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
        assert est.cap == pytest.approx(math.log(min(shape)))


def test_coding_rate_orthogonal_axes_closed_form():
    # m unit vectors cycling over k orthogonal axes in R^d: Z^T Z = (m/k) I_k, so
    # R = k/2 log(1 + d / (k eps^2)); note: d=32, m=320, k=4, eps^2=0.5 -> 5.666427
    d, m, k = 32, 320, 4
    z = np.zeros((m, d))
    z[np.arange(m), np.arange(m) % k] = 1.0
    est = ibscope.measure(z, "coding-rate", eps_sq=0.5)
    assert est.value == pytest.approx(k / 2 * math.log(1 + d / (k * 0.5)), rel=1e-12)
    assert est.value == pytest.approx(5.666427, abs=1e-6)
    assert est.unit == "nats" and est.quantity == "coding_rate"
    # fewer samples than dimensions uses the m x m side (Sylvester): same closed form
    assert ibscope.measure(z[:20], "coding-rate", eps_sq=2.0).value == pytest.approx(
        k / 2 * math.log(1 + d / (k * 2.0)), rel=1e-12)
    # rows are normalised first: scaling rows changes nothing unless normalize=false
    scaled = z * np.arange(1, m + 1)[:, None]
    assert ibscope.measure(scaled, "coding-rate").value == pytest.approx(est.value, rel=1e-12)
    assert ibscope.measure(scaled, "coding-rate", normalize=False).value > est.value + 1.0


@pytest.mark.parametrize("shape", [(150, 20), (20, 150)])
def test_coding_rate_matches_slogdet_reference(shape):
    x = np.random.RandomState(4).randn(*shape)
    m, d = shape
    for normalize in (True, False):
        z = x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x
        want = 0.5 * np.linalg.slogdet(np.eye(d) + d / (m * 0.5) * z.T @ z)[1]
        assert ibscope.measure(x, "coding-rate", normalize=normalize).value == pytest.approx(want, rel=1e-10)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(8, 40), d=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_invariant_to_rotation_and_permutation(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    perm = torch.randperm(n, generator=g)
    for name, p in (("matrix-entropy", {}), ("matrix-entropy", {"kernel": "linear", "alpha": 2.0}),
                    ("coding-rate", {})):
        base = ibscope.measure(x, name, **p).value
        for v in (x @ q, x[perm]):
            assert ibscope.measure(v, name, **p).value == pytest.approx(base, rel=1e-8, abs=1e-10), name


def test_errors():
    with pytest.raises(UsageError, match="'kernel' parameter of matrix-entropy must be 'gaussian' or 'linear'"):
        ibscope.measure(np.zeros((4, 2)), "matrix-entropy", kernel="rbf")
    with pytest.raises(UsageError, match="'sigma' parameter of matrix-entropy must be a finite number > 0 or None. Got -1.0"):
        ibscope.measure(np.zeros((4, 2)), "matrix-entropy", sigma=-1.0)
    with pytest.raises(UsageError, match="'eps_sq' parameter of coding-rate must be a finite number > 0"):
        ibscope.measure(np.zeros((4, 2)), "coding-rate", eps_sq=0.0)
    with pytest.raises(DataError, match="n = 50 exceeds max_samples = 40") as ei:
        ibscope.measure(np.random.RandomState(0).randn(50, 3), "matrix-entropy", max_samples=40)
    assert "--max-samples" in ei.value.hint
    with pytest.raises(DataError, match="kernel width from the 'median' rule is 0: more than half of the pairs") as ei:
        ibscope.measure(np.r_[np.ones((9, 3)), np.zeros((1, 3))], "matrix-entropy", sigma_rule="median")
    assert "sigma=S" in ei.value.hint
    # a constant representation has entropy 0 for any width (degenerate-input rule)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert ibscope.measure(np.ones((10, 3)), "matrix-entropy").value == 0.0
    for name, unit in (("matrix-entropy", "nats"), ("coding-rate", "nats")):
        info = registry.describe(registry.get(name))
        assert info["unit"] == unit and info["kind"] == "single" and info["reference"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_input_device_cuda():
    x = torch.randn(300, 8, dtype=torch.float64)
    for name in ("matrix-entropy", "coding-rate"):
        assert ibscope.measure(x.cuda(), name).value == pytest.approx(ibscope.measure(x, name).value, rel=1e-9)
