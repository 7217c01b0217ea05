"""Spectral estimators: closed-form spectra, published reference values, a numpy reference,
invariances (hypothesis), conventions and error paths."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimators import registry
from ibscope.estimators._linalg import renyi_entropy, second_moment, spectrum

SPECTRAL = ["effective-rank", "participation-ratio", "stable-rank", "numerical-rank", "pca-dim",
            "effective-encoding-dim"]


def with_spectrum(lam: np.ndarray) -> np.ndarray:
    """Data (2d x d) whose centred Z^T Z has exactly the eigenvalues ``lam`` (times 2):
    rows +sqrt(lam_k) e_k and -sqrt(lam_k) e_k, so the column means are exactly 0."""
    z = np.diag(np.sqrt(lam))
    return np.vstack([z, -z])


# closed-form values from the spectrum itself (formulas, not the code under test)
def erank_formula(lam):
    p = lam[lam > 0] / lam.sum()
    return math.exp(-(p * np.log(p)).sum())


def pr_formula(lam):
    return lam.sum() ** 2 / (lam ** 2).sum()


def pca_formula(lam, f):
    c = np.cumsum(lam) / lam.sum()
    return int(np.argmax(c >= f - 1e-12) + 1)


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_power_law_spectra_closed_form(a):
    d = 128
    lam = np.arange(1, d + 1, dtype=float) ** (-a)
    x = with_spectrum(lam)
    # float64 throughout: the only error is eigh round-off (~1e-13 relative), so 1e-9 is generous
    assert ibscope.measure(x, "effective-rank").value == pytest.approx(erank_formula(lam), rel=1e-9)
    assert ibscope.measure(x, "participation-ratio").value == pytest.approx(pr_formula(lam), rel=1e-9)
    assert ibscope.measure(x, "stable-rank").value == pytest.approx(lam.sum() / lam[0], rel=1e-9)
    for f in (0.5, 0.9, 0.95):
        assert ibscope.measure(x, "pca-dim", fraction=f).value == pca_formula(lam, f)
    # an exact power law is fitted exactly by the log-log regression, whatever the window
    assert ibscope.measure(x, "alpha-req").value == pytest.approx(a, abs=1e-9)
    est = ibscope.measure(x, "alpha-req", fit_start=3, fit_end=40)
    assert est.value == pytest.approx(a, abs=1e-9) and est.extra["r2"] == pytest.approx(1.0, abs=1e-12)
    assert est.unit == "exponent" and est.quantity == "alpha_req"


def test_power_law_infinite_d_limit():
    # lambda_k = k^-2: PR -> (pi^2/6)^2 / (pi^4/90) = 2.5 as d -> inf; the tail beyond d=128
    # changes sum(lambda) by ~1/128, so PR is within 2% of 2.5 (2.476 at d = 128).
    lam = np.arange(1, 129, dtype=float) ** -2.0
    assert ibscope.measure(with_spectrum(lam), "participation-ratio").value == pytest.approx(2.5, rel=0.02)


@pytest.mark.parametrize("k", [1, 7, 64])
def test_flat_spectrum_gives_k(k):
    lam = np.r_[np.ones(k), np.zeros(100 - k)]
    x = with_spectrum(lam)
    for name in ("effective-rank", "participation-ratio", "stable-rank", "effective-encoding-dim"):
        assert ibscope.measure(x, name).value == pytest.approx(k, rel=1e-9), name
    assert ibscope.measure(x, "numerical-rank").value == k
    assert ibscope.measure(x, "pca-dim", fraction=1.0).value == k
    assert ibscope.measure(x, "pca-dim", fraction=0.5).value == math.ceil(k / 2)


def test_rankme_epsilon_bias_is_opt_in():
    # the note's measured value: RankMe's eps = 1e-7 on a flat spectrum over 64 of 100 dims
    lam = np.r_[np.ones(64), np.zeros(36)]
    x = with_spectrum(lam)
    assert ibscope.measure(x, "effective-rank").value == pytest.approx(64.0, abs=1e-9)
    assert ibscope.measure(x, "effective-rank", eps=1e-7).value == pytest.approx(64.005, abs=5e-4)


@pytest.mark.slow
def test_published_reference_values_reptrix():
    # reptrix tests pin 613.4726 (RankMe, covariance eigenvalues, eps 1e-7) and alpha 0.148936
    # (ranks 11..100) for torch.manual_seed(0); torch.randn(1000, 1024). reptrix runs sklearn PCA
    # on float32 data; we compute in float64, so allow 1e-3 absolute (we agree to ~1e-4).
    torch.manual_seed(0)
    x = torch.randn(1000, 1024)
    assert ibscope.measure(x, "effective-rank", eps=1e-7).value == pytest.approx(613.4726, abs=1e-3)
    assert ibscope.measure(x, "alpha-req", fit_start=11).value == pytest.approx(0.148936, abs=1e-5)


def test_rankme_singular_value_convention_matches_numpy():
    # Garrido et al.: p_k = sigma_k / sum sigma of the raw, uncentred matrix; on the same data
    # it reads higher than the covariance convention (note: 813.9 vs 613.4 on randn(1000, 1024))
    x = np.random.RandomState(9).randn(200, 60) + 1.0
    s = np.linalg.svd(x, compute_uv=False)
    sv = ibscope.measure(x, "effective-rank", convention="sv").value
    assert sv == pytest.approx(erank_formula(s), rel=1e-9)
    z = np.random.RandomState(9).randn(300, 100)
    assert ibscope.measure(z, "effective-rank", convention="sv").value > ibscope.measure(z, "effective-rank").value


def numpy_reference(name, x, **kw):
    """Slow reference: every measure from a full numpy SVD of the (centred) data."""
    x = np.asarray(x, dtype=np.float64)
    center = kw.get("center", name not in ("effective-encoding-dim",))
    z = x - x.mean(0) if center else x
    s = np.linalg.svd(z, compute_uv=False)
    lam = s ** 2
    if name == "effective-rank":
        return erank_formula(lam)
    if name == "participation-ratio":
        return pr_formula(lam)
    if name == "stable-rank":
        return lam.sum() / lam.max()
    if name == "numerical-rank":
        return int((s > kw.get("rtol", 1e-4) * s[0]).sum())
    if name == "pca-dim":
        return pca_formula(lam, kw.get("fraction", 0.9))
    if name == "effective-encoding-dim":
        return erank_formula(lam)
    raise KeyError(name)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])  # both sides of the shared kernel
@pytest.mark.parametrize("name", SPECTRAL)
def test_matches_numpy_svd_reference(name, shape):
    rs = np.random.RandomState(1)
    n, d = shape
    # anisotropic low-rank-ish data with an offset (centring matters)
    x = rs.randn(n, 12) @ rs.randn(12, d) * np.linspace(3, 0.1, d) + 0.01 * rs.randn(n, d) + 5.0
    got = ibscope.measure(x, name).value
    assert got == pytest.approx(numpy_reference(name, x), rel=1e-8)


def test_shared_kernel_blocks_and_sides(monkeypatch):
    # small block size forces many accumulation steps; the result must not change
    import ibscope.estimators._linalg as lin

    rs = np.random.RandomState(2)
    for shape in ((257, 31), (31, 257)):
        x = torch.from_numpy(rs.randn(*shape) + 3.0)
        ref = spectrum(x, center=True, method="svd").eigenvalues
        monkeypatch.setattr(lin, "BLOCK_BYTES", 8 * 40)
        small = spectrum(x, center=True, row_normalize=False).eigenvalues
        monkeypatch.undo()
        assert torch.allclose(small, ref, rtol=1e-9, atol=1e-9 * float(ref[0]))
        m, side = second_moment(x)
        assert side == ("features" if shape[1] <= shape[0] else "samples")
        assert m.shape[0] == min(shape)


def test_isotropic_gaussian_on_subspace():
    # r-dim isotropic Gaussian embedded in R^D by an orthonormal map: exact rank r; the
    # other measures approach r as n >> r (PR ~ r / (1 + r/n) for a sample covariance).
    rs = np.random.RandomState(3)
    n, r, dd = 4000, 6, 50
    q, _ = np.linalg.qr(rs.randn(dd, r))
    x = rs.randn(n, r) @ q.T
    assert ibscope.measure(x, "numerical-rank").value == r
    er = ibscope.measure(x, "effective-rank").value
    pr = ibscope.measure(x, "participation-ratio").value
    # sampling error of the eigenvalues is ~ sqrt(2/n) ~ 2%: 3% tolerance on erank and PR
    assert er <= r and er == pytest.approx(r, rel=0.03)
    assert pr == pytest.approx(r / (1 + r / n), rel=0.03)
    assert ibscope.measure(x, "stable-rank").value <= pr <= er


def test_numerical_rank_tolerance_conventions():
    # note: rank-5 signal + 1e-3 noise in R^50 -> 5 at rtol 1e-2, all 50 at a tiny tolerance
    rs = np.random.RandomState(0)
    z = rs.randn(5000, 5) @ rs.randn(5, 50) + 1e-3 * rs.randn(5000, 50)
    assert ibscope.measure(z, "numerical-rank", rtol=1e-2).value == 5
    assert ibscope.measure(z, "numerical-rank", rtol=1e-8).value == 50
    # absolute tolerance only: scale-dependent by design
    assert ibscope.measure(z, "numerical-rank", rtol=0.0, atol=1e6).value == 0
    # a rank-3 float32 representation reads 3 at the default relative tolerance
    x32 = torch.from_numpy((rs.randn(400, 3) @ rs.randn(3, 64)).astype(np.float32))
    assert ibscope.measure(x32, "numerical-rank").value == 3


def test_eed_is_uncentred_and_normalised():
    rs = np.random.RandomState(4)
    x = rs.randn(500, 20) + 10.0  # a large mean dominates the uncentred second moment
    eed = ibscope.measure(x, "effective-encoding-dim")
    assert eed.value == pytest.approx(numpy_reference("effective-encoding-dim", x), rel=1e-9)
    assert eed.value < 3.0  # one direction (the mean) dominates H^T H / N
    assert eed.extra["normalized"] == pytest.approx(eed.value / 20)
    centred = ibscope.measure(x, "effective-encoding-dim", center=True).value
    assert centred == pytest.approx(ibscope.measure(x, "effective-rank").value, rel=1e-12)


def test_renyi_order_chain_and_helper():
    rs = np.random.RandomState(5)
    lam = torch.from_numpy(np.sort(rs.rand(30) ** 3)[::-1].copy())
    p = lam / lam.sum()
    h = [renyi_entropy(p, a) for a in (0.0, 0.5, 1.0, 2.0, math.inf)]
    assert all(h[i] >= h[i + 1] - 1e-12 for i in range(len(h) - 1))
    assert h[0] == pytest.approx(math.log(30))
    assert h[-1] == pytest.approx(-math.log(float(p.max())))
    assert h[3] == pytest.approx(-math.log(float((p * p).sum())))


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(n=st.integers(6, 40), d=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_invariant_to_rotation_permutation_and_scale(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.2, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    perm = torch.randperm(n, generator=g)
    variants = [x @ q, x[perm], 3.7 * x]
    for name in SPECTRAL + ["alpha-req"]:
        params = {"fit_start": 1, "fit_end": 3} if name == "alpha-req" else {}
        if name == "alpha-req" and min(n - 1, d) < 3:
            continue
        base = ibscope.measure(x, name, **params).value
        for v in variants[:2] + ([variants[2]] if name != "effective-encoding-dim" else []):
            assert ibscope.measure(v, name, **params).value == pytest.approx(base, rel=1e-7, abs=1e-9), name


def test_bounds_and_metadata():
    rs = np.random.RandomState(6)
    x = rs.randn(30, 80)  # n < d: centred rank cap is n - 1 = 29
    for name in ("effective-rank", "participation-ratio", "stable-rank", "numerical-rank"):
        est = ibscope.measure(x, name)
        assert est.cap == 29 and 1 <= est.value <= 29, name
        assert est.unit == "dimensions" and est.n_samples == 30 and est.dims == (80,)
        assert est.estimator == name
    assert ibscope.measure(x, "numerical-rank").value == 29
    assert ibscope.measure(x, "effective-rank", convention="sv").cap == 30


def test_constant_representation_is_zero_with_warning():
    x = np.ones((20, 5))
    with pytest.warns(RuntimeWarning, match="constant"):
        assert ibscope.measure(x, "effective-rank").value == 0.0
    with pytest.warns(RuntimeWarning, match="constant"):
        assert ibscope.measure(x, "pca-dim").value == 0
    assert ibscope.measure(x, "numerical-rank").value == 0


def test_integer_input_is_treated_as_float():
    x = np.random.RandomState(7).randint(0, 5, size=(50, 4))
    assert ibscope.measure(x, "participation-ratio").value == pytest.approx(
        numpy_reference("participation-ratio", x), rel=1e-9)


@pytest.mark.parametrize("name,params,match", [
    ("effective-rank", {"convention": "raw"}, "'convention' parameter of effective-rank must be 'cov' or 'sv'"),
    ("pca-dim", {"fraction": 1.5}, "'fraction' parameter of pca-dim must be a finite number in \\(0, 1\\]"),
    ("alpha-req", {"fit_start": 50, "fit_end": 51}, "'fit_end' parameter of alpha-req must be >= fit_start \\+ 2"),
    ("numerical-rank", {"rtol": 0.0}, "'rtol' parameter of numerical-rank must be > 0 when atol is 0"),
    ("effective-rank", {"eps": -1.0}, "'eps' parameter"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(UsageError, match=match):
        ibscope.measure(np.zeros((5, 2)), name, **params)


def test_bad_data():
    with pytest.raises(DataError, match="fit window ends at rank 100.*only 19 non-zero") as ei:
        ibscope.measure(np.random.RandomState(0).randn(20, 50), "alpha-req")
    assert "fit_end" in ei.value.hint
    with pytest.raises(DataError, match="1 non-finite"):
        ibscope.measure(np.array([[1.0, np.nan], [2.0, 3.0]]), "effective-rank")
    with pytest.raises(DataError, match="at least 2 samples"):
        ibscope.measure(np.ones((1, 3)), "participation-ratio")
    with pytest.raises(DataError, match="shape"):
        ibscope.measure(np.ones((4, 3, 2)), "stable-rank")


def test_registered_with_docs_and_units():
    units = {"effective-rank": "dimensions", "participation-ratio": "dimensions", "stable-rank": "dimensions",
             "numerical-rank": "dimensions", "pca-dim": "dimensions", "alpha-req": "exponent",
             "effective-encoding-dim": "dimensions"}
    for name, unit in units.items():
        info = registry.describe(registry.get(name))
        assert info["kind"] == "single" and info["unit"] == unit
        assert info["reference"] and info["summary"]
        doc = registry.get(name).__doc__
        assert "Definition" in doc and "Unit" in doc


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_input_device_cuda():
    x = torch.randn(500, 64, dtype=torch.float64)
    for name in SPECTRAL + ["alpha-req"]:
        p = {"fit_start": 2, "fit_end": 30} if name == "alpha-req" else {}
        cpu = ibscope.measure(x, name, **p).value
        gpu = ibscope.measure(x.cuda(), name, **p).value
        assert gpu == pytest.approx(cpu, rel=1e-9), name


def test_no_warning_on_regular_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ibscope.measure(np.random.RandomState(8).randn(50, 5), "effective-rank")


# --- numerics: true singular values and one numerical-rank rule (issue 13, item 5) -------------

def exact_low_rank(n, d, s, seed=0, centred=True):
    """U diag(s) V^T with orthonormal U (orthogonal to the ones vector when ``centred``) and V."""
    rs = np.random.default_rng(seed)
    k = len(s)
    m = np.c_[np.ones(n), rs.standard_normal((n, k))] if centred else rs.standard_normal((n, k))
    q, _ = np.linalg.qr(m)
    u = q[:, 1:k + 1] if centred else q[:, :k]
    v, _ = np.linalg.qr(rs.standard_normal((d, k)))
    return u @ np.diag(s) @ v.T


@pytest.mark.parametrize("shape,s", [((200, 12), [4.0, 2.0, 1.0, 1.0]),      # the reptrix#16 case
                                     ((60, 500), [9.0, 3.0, 1.0, 0.5, 0.1]),    # wide: sample side
                                     ((3000, 64), list(np.geomspace(10, 1e-3, 20)))])
def test_rankme_sv_is_true_singular_values(shape, s):
    # closed form from the known singular values, and numpy's SVD of the same matrix: the
    # tolerance 1e-9 relative is the issue's; what remains is LAPACK round-off (~1e-14).
    # sqrt of Gram eigenvalues gave 3e-7 (rank-4 case) to 3e-6 here.
    z = exact_low_rank(*shape, np.array(s), centred=False)
    s = np.array(s)
    closed = math.exp(-((s / s.sum()) * np.log(s / s.sum())).sum())
    sv_np = np.linalg.svd(z, compute_uv=False)
    sv_np = sv_np[sv_np > sv_np[0] * max(shape) * np.finfo(float).eps]
    ref = erank_formula(sv_np)
    got = ibscope.measure(z, "effective-rank", convention="sv").value
    assert got == pytest.approx(closed, rel=1e-9)
    assert got == pytest.approx(ref, rel=1e-9)
    # float32 input is measured as the float32 matrix it is (its rounding adds singular values
    # of ~1e-8 sigma_max, real ones), computed in float64: as numpy's float64 SVD of it
    z32 = z.astype(np.float32)
    got32 = ibscope.measure(z32, "effective-rank", convention="sv").value
    s32 = np.linalg.svd(z32.astype(np.float64), compute_uv=False)
    assert got32 == pytest.approx(erank_formula(s32[s32 > s32[0] * max(shape) * np.finfo(float).eps]), rel=1e-9)


def test_blocked_qr_singular_values_match_numpy(monkeypatch):
    import ibscope.estimators._linalg as lin

    rs = np.random.RandomState(3)
    for shape in ((257, 31), (31, 257)):
        x = rs.randn(*shape) @ np.diag(np.geomspace(1, 1e-6, shape[1])) + 2.0
        ref = np.linalg.svd(x - x.mean(0), compute_uv=False)
        monkeypatch.setattr(lin, "BLOCK_BYTES", 8 * 40)   # many blocks of the TSQR
        got = lin.singular_values(torch.from_numpy(x), center=True).numpy()
        monkeypatch.undo()
        # absolute error a few eps * sigma_max, as numpy's own SVD
        assert np.max(np.abs(got - ref)) <= 1e-13 * ref[0]


@pytest.mark.parametrize("seed", range(5))
def test_rank_of_centred_wide_matrix_is_n_minus_1(seed):
    # centring removes one direction from n < d samples: the n x n Gram has an eigenvalue
    # that is 0 up to round-off (sometimes +1e-15). The shared rule counts n - 1 everywhere.
    x = np.random.RandomState(seed).randn(20, 50)
    sp = spectrum(torch.from_numpy(x), center=True)
    assert sp.rank == 19 == np.linalg.matrix_rank(x - x.mean(0))
    assert ibscope.measure(x, "numerical-rank", rtol=1e-15).value == 19
    assert ibscope.measure(x, "pca-dim", fraction=1.0).value == 19
    with pytest.raises(DataError, match="only 19 non-zero"):
        ibscope.measure(x, "alpha-req", fit_start=2, fit_end=20)
    assert ibscope.measure(x, "alpha-req", fit_start=2, fit_end=19).value > 0


def test_rank_tolerance_helper():
    from ibscope.estimators._linalg import nonzero, numerical_rank, rank_tolerance

    assert rank_tolerance(2.0, 10, 30) == 2.0 * 30 * np.finfo(float).eps
    assert rank_tolerance(1.0, 4, 4, torch.float32) == 4 * np.finfo(np.float32).eps
    lam = torch.tensor([5.0, 1.0, 1e-10, 5 * 30 * 2.2e-16, 0.0], dtype=torch.float64)
    assert numerical_rank(lam, 10, 30) == 3          # 1e-10 counts; the round-off-sized one does not
    assert nonzero(torch.zeros(3, dtype=torch.float64), 3, 3).numel() == 0
    # exact-rank matrices of every shape: the helper agrees with numpy's matrix_rank
    for n, d, r in ((50, 10, 3), (10, 50, 7), (100, 100, 1)):
        z = exact_low_rank(n, d, np.geomspace(1, 1e-4, r), seed=r, centred=False)
        assert spectrum(torch.from_numpy(z), center=False).rank == r == np.linalg.matrix_rank(z)
        assert spectrum(torch.from_numpy(z), center=False, method="svd").rank == r
