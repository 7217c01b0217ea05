"""Reading every estimate against chance (issue 12, core): permutation nulls, saturation at the
cap, one rule for degenerate (constant) inputs, float labels with integer values, integer-valued
inputs to continuous estimators, and a fixed binning range that clamps values.

Tolerances, and why:

* Nulls on independent data. Permuting one side of independent (x, y) leaves their joint
  distribution unchanged, so the estimate and the N permuted estimates are exchangeable draws
  of one distribution: the value lies within 3 null standard deviations of the null mean
  (Chebyshev: with probability >= 8/9 whatever the distribution, ~0.997 for a normal one), and
  the p-value is uniform on {1/(N+1), ..., 1}. All data and permutations are seeded, so the
  checks are deterministic; the 1e-9 nats added covers estimators whose null is exactly the
  value (std 0: saturated plug-in estimates).
* Shared-work nulls against re-estimation: the same arithmetic in another order (sums over
  blocks, one GEMM for all permutations), so agreement to 1e-9 nats on values of order 1.
* Closed forms: the Gaussian pair with I = -1/2 log(1 - rho^2) per dimension; a constant input
  has I = 0 and centred rank 0 exactly (compared with ==).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import ibscope
from ibscope.errors import DataError, UsageError
from ibscope.estimate import cell_key, code_version, null_setting, run_estimate, summary_lines
from ibscope.estimators import registry
from ibscope.estimators._mi import IntegerValuedWarning
from ibscope.estimators.base import Estimate, Estimator, is_saturated
from ibscope.estimators.nulls import permutations, summarize, with_null
from ibscope.results import read_results
from ibscope.store import StoreWriter, open_store

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Ran:
    """What a command left: exit code, stdout and stderr (named as subprocess.run's)."""

    returncode: int
    stdout: str
    stderr: str


def ib(*args):
    """``ibscope ARGS`` in this process (typer's CliRunner): the exit code and the streams a user
    gets. An exception that escaped the command's error handling fails the test."""
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.exception, res.output)
    return Ran(res.exit_code, res.stdout, res.stderr)


def flat(text: str) -> str:
    return " ".join(text.split())


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def gaussian_pair(n, d, rho, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, d))
    return x, y, -0.5 * d * math.log(1 - rho ** 2)


# ------------------------------------------------------------------------------------------ nulls
#: (estimator, params, kind of y): "labels" = balanced binary labels, "cont" = a continuous y
NULL_CASES = [("binning", {}, "labels"), ("adaptive-binning", {}, "labels"), ("kde-upper", {"noise_variance": 0.1}, "labels"),
              ("kde-lower", {"noise_variance": 0.1}, "labels"), ("ksg", {}, "labels"), ("ksg", {}, "cont"),
              ("gaussian", {}, "cont"), ("gcmi", {}, "cont"), ("renyi", {"alpha": 2.0}, "cont"),
              ("compressed", {"latent_dim": 2, "compressor_x": "pca"}, "cont")]


@pytest.mark.parametrize("name,params,kind", NULL_CASES, ids=[f"{c[0]}-{c[2]}" for c in NULL_CASES])
def test_null_on_independent_data_contains_the_value(name, params, kind):
    rng = np.random.default_rng(11)
    n, N = 400, 19
    t = rng.standard_normal((n, 3))
    y = rng.integers(0, 2, n) if kind == "labels" else rng.standard_normal((n, 2))
    e = quiet(ibscope.mutual_information, t, y, method=name, null_permutations=N, null_seed=3, **params)
    assert e.extra["null_permutations"] == N and e.extra["null_seed"] == 3
    assert abs(e.value - e.null_mean) <= 3 * e.null_std + 1e-9, e
    assert e.p_value >= 0.05, e
    # p = (1 + #{null >= value}) / (N + 1): a whole number of 1/(N+1) steps
    assert e.p_value * (N + 1) == pytest.approx(round(e.p_value * (N + 1)), abs=1e-9)


@pytest.mark.parametrize("name,params", [("ksg", {}), ("gaussian", {}), ("renyi", {"alpha": 2.0}),
                                         ("compressed", {"latent_dim": 2, "compressor_x": "pca"}),
                                         ("kde-upper", {"noise_variance": 0.1}), ("binning", {"n_bins": 4})])
def test_null_on_dependent_data_is_far_below_the_value(name, params):
    n, N = 400, 19
    if name in ("kde-upper", "binning"):  # estimators that need a discrete side: labels that T predicts
        rng = np.random.default_rng(5)
        y = rng.integers(0, 2, n)
        x = rng.standard_normal((n, 2)) + 3.0 * y[:, None]
    else:
        x, y, _ = gaussian_pair(n, 2, 0.8, seed=5)  # I = 1.02 nats
    e = quiet(ibscope.mutual_information, x, y, method=name, null_permutations=N, **params)
    assert e.value - e.null_mean > max(0.2, 10 * e.null_std), e
    assert e.p_value == pytest.approx(1 / (N + 1))


def test_gaussian_null_against_closed_form():
    # the value matches the closed form; the null of the Gaussian estimate of independent
    # Gaussians has mean ~ d^2 / (2 n) (chi-square: n * 2 * I ~ chi2 with d_x * d_y dof)
    x, y, truth = gaussian_pair(2000, 2, 0.6, seed=2)
    e = ibscope.mutual_information(x, y, method="gaussian", null_permutations=40, null_seed=1)
    assert e.value == pytest.approx(truth, abs=4 * 0.02)  # sd of the estimate at n = 2000 is ~0.02
    assert e.null_mean == pytest.approx(2 * 2 / (2 * 2000), rel=0.5)


def test_nulls_are_reproducible_under_a_seed():
    rng = np.random.default_rng(0)
    t, y = rng.standard_normal((300, 2)), rng.integers(0, 3, 300)
    for m in ("binning", "ksg", "kde-upper"):
        a = quiet(ibscope.mutual_information, t, y, method=m, null_permutations=8, null_seed=7)
        b = quiet(ibscope.mutual_information, torch.from_numpy(t), torch.from_numpy(y), method=m,
                  null_permutations=8, null_seed=7)
        c = quiet(ibscope.mutual_information, t, y, method=m, null_permutations=8, null_seed=8)
        assert (a.null_mean, a.null_std, a.p_value) == (b.null_mean, b.null_std, b.p_value)
        assert a.null_mean != c.null_mean and a.value == c.value
    # permutations depend only on (n, N, seed)
    assert all(torch.equal(p, q) for p, q in zip(permutations(50, 3, 1), permutations(50, 3, 1)))


@pytest.mark.slow
def test_shared_work_nulls_equal_re_estimation():
    """Every estimator that shares work between the estimate and its null (binning, KDE, KSG,
    gaussian, renyi, compressed) gives the same null as re-estimating each permuted pair."""
    rng = np.random.default_rng(4)
    n = 240
    t = torch.from_numpy(rng.standard_normal((n, 3)))
    wide = torch.from_numpy(rng.standard_normal((n, 5)))
    lab = torch.from_numpy(rng.integers(0, 3, n))
    ids = torch.arange(n)
    perms = permutations(n, 4, 9)
    cases = [("binning", {}, t, lab), ("binning", {"bin_width": 0.5}, ids, t), ("adaptive-binning", {}, t, lab),
             ("kde-upper", {"noise_variance": 0.2}, t, lab), ("kde-lower", {"noise_variance": 0.2}, lab, t),
             ("adaptive-kde-upper", {}, t, lab), ("kde", {}, ids, t), ("ksg", {}, t, lab), ("ksg", {}, wide, t),
             ("ksg", {"algorithm": 2, "norm": "euclidean"}, t, wide), ("gaussian", {}, t, wide), ("gaussian", {}, t, lab),
             ("renyi", {}, t, wide), ("renyi", {"max_samples": 100}, t, lab),
             ("compressed", {"latent_dim": 2, "compressor_x": "pca"}, wide, t),
             ("compressed", {"latent_dim": 2, "compressor_x": "pca", "mi_step": "kl"}, wide, lab),
             ("infonce", {"steps": 2, "batch_size": 8, "hidden": 4, "embed": 2}, t, lab), ("gcmi", {}, t, wide),
             ("chelombiev-kde-upper", {}, t, lab), ("chelombiev-binning", {}, t, lab)]
    for name, params, x, y in cases:
        est = registry.create(name, **params)
        shared = quiet(est.null_values, x, y, perms)
        again = [quiet(est.estimate, x, y[p]).value for p in perms]
        assert shared == pytest.approx(again, abs=1e-9), (name, params)
        e, nulls = quiet(est.estimate_and_null, x, y, perms)
        assert e.value == pytest.approx(quiet(est.estimate, x, y).value, abs=1e-12) and nulls == pytest.approx(shared)
    # KDE's one-GEMM path and its labelling-by-labelling fallback agree
    import ibscope.estimators.kde as kde

    est = registry.create("kde-upper", noise_variance=0.2)
    fast = est.null_values(t, lab, perms)
    old, kde.ONEHOT_MAX_ENTRIES = kde.ONEHOT_MAX_ENTRIES, 0
    try:
        assert est.null_values(t, lab, perms) == pytest.approx(fast, abs=1e-12)
    finally:
        kde.ONEHOT_MAX_ENTRIES = old
    # binning's one-bincount path and its table-by-table fallback agree
    import ibscope.estimators.binning as binning

    est = registry.create("binning")
    fast = est.null_values(t, lab, perms)
    old, binning.NULL_TABLE_CELLS = binning.NULL_TABLE_CELLS, 1
    try:
        assert est.null_values(t, lab, perms) == pytest.approx(fast, abs=1e-12)
    finally:
        binning.NULL_TABLE_CELLS = old


def test_p_value_formula_and_units():
    # p = (1 + #{null >= value}) / (N + 1); nulls equal to the value within round-off count as >=
    assert summarize(1.0, [0.1, 0.2, 0.3]) == (pytest.approx(0.2), pytest.approx(0.1), 0.25)
    assert summarize(1.0, [1.0 - 1e-13, 2.0, 0.0])[2] == 0.75
    assert summarize(0.5, [0.7])[1] is None  # one permutation: no standard deviation
    x, y, _ = gaussian_pair(300, 1, 0.5, seed=0)
    e = ibscope.mutual_information(x, y, null_permutations=5)
    b = e.to("bits")
    assert b.null_mean == pytest.approx(e.null_mean / math.log(2)) and b.null_std == pytest.approx(e.null_std / math.log(2))
    assert b.p_value == e.p_value
    plain = ibscope.mutual_information(x, y)
    assert (plain.null_mean, plain.null_std, plain.p_value) == (None, None, None)


def test_null_seed_and_settings_in_the_api():
    rng = np.random.default_rng(1)
    t, y = rng.standard_normal((200, 2)), rng.integers(0, 2, 200)
    # binning has no seed of its own: seed= is the permutations' seed
    a = quiet(ibscope.mutual_information, t, y, method="binning", null_permutations=6, seed=4)
    b = quiet(ibscope.mutual_information, t, y, method="binning", null_permutations=6, null_seed=4)
    assert a.null_mean == b.null_mean and a.params == registry.create("binning").params()
    # ksg has one: it seeds the jitter and, without null_seed, the permutations; null_seed wins
    k4 = ibscope.mutual_information(t, y, null_permutations=6, seed=4)
    assert k4.params["seed"] == 4 and k4.extra["null_seed"] == 4
    assert ibscope.mutual_information(t, y, null_permutations=6, seed=4, null_seed=2).extra["null_seed"] == 2
    for bad in (-1, 2.5, True):
        with pytest.raises(UsageError, match="null_permutations must be an integer >= 0"):
            ibscope.mutual_information(t, y, null_permutations=bad)
    with pytest.raises(UsageError, match="The null's seed must be an integer. Got 'x'"):
        ibscope.mutual_information(t, y, null_permutations=2, null_seed="x")
    with pytest.raises(UsageError, match="needs two variables"):
        with_null(registry.create("effective-rank"), t, y, 3)


# ------------------------------------------------------------------------------------------ saturation
def test_saturation_flags_on_independent_labels_in_100_dims():
    """The issue's first case: T independent of Y in 100 dimensions. The plug-in estimators sit
    at H(Y) (saturated) and their value cannot be told from the null; KSG is not saturated."""
    rng = np.random.default_rng(0)
    n = 1000
    y = rng.integers(0, 2, n)
    t = rng.standard_normal((n, 100))
    hy = -sum(p * math.log(p) for p in np.bincount(y) / n)
    for m in ("binning", "adaptive-binning", "kde-upper", "kde-lower", "adaptive-kde-upper"):
        with pytest.warns(RuntimeWarning, match=rf"{m}: the estimate .* is within 1% of its cap .* saturated"):
            e = ibscope.mutual_information(t, y, method=m, null_permutations=9)
        assert e.cap == pytest.approx(hy, abs=1e-12) and e.saturated is True
        assert e.value >= 0.99 * hy and abs(e.value - e.null_mean) <= 3 * e.null_std + 1e-9 and e.p_value >= 0.5
    e = ibscope.mutual_information(t, y, method="ksg")
    assert e.saturated is False and e.cap == pytest.approx(hy)
    assert ibscope.mutual_information(t[:, :3], t[:, 3:5], method="gaussian").saturated is None  # no cap, no flag


def test_saturation_rule_and_caps():
    assert is_saturated(0.99, 1.0) and is_saturated(1.2, 1.0) and not is_saturated(0.989, 1.0)
    assert is_saturated(0.0, 0.0) is None and is_saturated(1.0, None) is None  # a cap of 0 leaves nothing to see
    # plug-in I(X;T) with X = n distinct ids: cap log n, reached by an injective layer
    n = 256
    e = quiet(ibscope.mutual_information, np.arange(n), np.arange(n, dtype=float)[:, None] * 10, method="binning",
              n_bins=n)
    assert e.cap == pytest.approx(math.log(n)) and e.saturated is True
    # InfoNCE: the cap is log(batch_size) and the flag follows it
    est = registry.create("infonce", steps=2, batch_size=8, hidden=4, embed=2)
    x, y, _ = gaussian_pair(64, 1, 0.9, seed=0)
    e = est.estimate(x, y)
    assert e.cap == pytest.approx(math.log(8)) and e.saturated == (e.value >= 0.99 * math.log(8))
    assert est.cap_name("I(X;T)") == "log batch" and est.cap_name("I(T;Y)") == "min(log batch, H(Y))"
    assert registry.create("binning").cap_name("I(X;T)") == "log n"
    assert registry.create("binning").cap_name("I(T;Y)") == "H(Y)"
    # the flag is for information: a rank at the layer's width is a fact about the layer, not a limit
    z = np.linalg.qr(np.random.default_rng(0).standard_normal((50, 50)))[0][:, :4] * 7.0
    pr = ibscope.measure(z, "participation-ratio")
    assert pr.value >= 0.99 * pr.cap and pr.cap == 4.0 and pr.saturated is None
    # ... but an entropy at its cap log n is the kernel width's limit
    assert quiet(ibscope.measure, np.eye(30) * 100, "matrix-entropy", sigma=0.1).saturated is True


# ------------------------------------------------------------------------------------------ degenerate inputs
#: the degenerate-input table of docs/estimators.md: (constant non-zero layer, all-zero layer)
#: "zero" = 0 exactly with a warning; "undefined" = DataError; a number = the estimator's own value
D = 3
DEGENERATE = {
    "binning": ("zero", "zero"), "adaptive-binning": ("zero", "zero"), "kde": ("zero", "zero"),
    "kde-upper": ("zero", "zero"), "kde-lower": ("zero", "zero"), "adaptive-kde": ("zero", "zero"),
    "adaptive-kde-upper": ("zero", "zero"), "adaptive-kde-lower": ("zero", "zero"), "ksg": ("zero", "zero"),
    "chelombiev-binning": ("zero", "zero"), "chelombiev-kde": ("zero", "zero"), "chelombiev-kde-upper": ("zero", "zero"),
    "chelombiev-kde-lower": ("zero", "zero"), "gcmi": ("zero", "zero"),
    "gaussian": ("zero", "zero"), "compressed": ("zero", "zero"), "infonce": ("zero", "zero"), "renyi": ("zero", "zero"),
    "mine": ("zero", "zero"), "smile": ("zero", "zero"),
    "effective-rank": ("zero", "zero"), "participation-ratio": ("zero", "zero"), "stable-rank": ("zero", "zero"),
    "numerical-rank": ("zero", "zero"), "pca-dim": ("zero", "zero"), "matrix-entropy": ("zero", "zero"),
    "alpha-req": ("undefined", "undefined"), "twonn": ("undefined", "undefined"), "mle-id": ("undefined", "undefined"),
    # uncentred measures: a constant non-zero layer has one direction
    "effective-encoding-dim": (1.0, 0.0), "coding-rate": (0.5 * math.log(1 + D / 0.5), 0.0),
}


@pytest.mark.parametrize("name", sorted(registry.available()))
def test_degenerate_input_table_estimator_by_estimator(name):
    cls = registry.get(name)
    if cls.kind == "jacobian":  # local-rank: all-zero Jacobian spectra have rank 0
        assert ibscope.measure(np.zeros((6, 3)), name).value == 0.0
        return
    assert name in DEGENERATE, f"{name} is missing from the degenerate-input table"
    fast = {"steps": 2, "batch_size": 8, "hidden": 4, "embed": 2} if name in ("infonce", "mine", "smile") else {}
    est = registry.create(name, **fast)
    n = 40
    rng = np.random.default_rng(0)
    for layer, want in zip((np.full((n, D), 2.5), np.zeros((n, D))), DEGENERATE[name]):
        if cls.kind == "pair":
            others = [rng.integers(0, 2, n), np.arange(n)] + ([rng.standard_normal((n, 2))] if name not in (
                "binning", "adaptive-binning") and "kde" not in name else [])
            calls = [(layer, o) for o in others] + [(o, layer) for o in others]
        else:
            calls = [(layer,)]
        for args in calls:
            if want == "undefined":
                with pytest.raises(DataError, match=r"'x' is constant \(all 40 rows identical\), and the .* of a single "
                                                    r"point is undefined"):
                    est.estimate(*args)
            elif want == "zero":
                with pytest.warns(RuntimeWarning, match=r"is constant \(all 40 rows identical\): the value is 0 "
                                                        r"exactly by ibscope's rule for degenerate inputs"):
                    e = est.estimate(*args)
                assert e.value == 0.0 and e.extra["constant"], (name, args)
                assert e.saturated in (None, False) or e.cap == 0.0
            else:
                e = quiet(est.estimate, *args)  # 1e-5: eigh resolves the zero eigenvalues to ~1e-16 lambda_max
                assert e.value == pytest.approx(want, abs=1e-5), name
    # a constant input to an estimator that needs variation on that side never returns NaN
    if cls.kind == "pair":
        assert quiet(est.estimate, rng.standard_normal((n, 2)), np.zeros(n, dtype=int)).value == 0.0  # one class: H(Y) = 0


def test_uncentred_conventions_and_plug_ins_follow_the_rule():
    c = np.full((30, 4), 3.0)
    # RankMe's singular values (uncentred) see one direction in a constant non-zero layer; the centred view sees none
    # (1e-5: the shared eigh spectrum resolves singular values to ~1e-8 sigma_max, see _linalg.spectrum)
    assert quiet(ibscope.measure, c, "effective-rank", convention="sv").value == pytest.approx(1.0, abs=1e-5)
    assert quiet(ibscope.measure, c, "effective-rank").value == 0.0
    assert quiet(ibscope.measure, c, "numerical-rank", center=False).value == 1

    @dataclass(frozen=True)
    class PlugMI(Estimator):
        """A plug-in MI estimator that would crash on a constant input."""

        name: ClassVar[str] = "plug-mi-test"
        reference: ClassVar[str] = "test"

        def estimate(self, x, y):
            raise AssertionError("never reached for a constant input")

    with pytest.warns(RuntimeWarning, match="plug-mi-test: 'x' is constant"):
        assert PlugMI().estimate(c, np.arange(30)).value == 0.0


def test_docs_table_lists_every_registered_estimator():
    text = (ROOT / "docs" / "estimators.md").read_text()
    section = text[text.index("## Degenerate inputs"):]
    section = section[:section.index("\n## ", 5)]
    for name in registry.available():
        assert f"`{name}`" in section, f"{name} missing from the degenerate-input table of docs/estimators.md"


# ------------------------------------------------------------------------------------------ labels and inputs
def test_float_labels_are_discrete_in_the_api():
    rng = np.random.default_rng(3)
    t = rng.standard_normal((300, 2))
    yi = (t[:, 0] > 0).astype(np.int64)
    for m in ("binning", "kde-upper", "ksg"):
        ref = quiet(ibscope.mutual_information, t, yi, method=m)
        with pytest.warns(RuntimeWarning, match=r"'y' holds floats \(float32\) with only integer values \(2 distinct: "
                                                r"0, 1\); they are read as discrete class labels"):
            got = ibscope.mutual_information(t, yi.astype(np.float32), method=m)
        assert got.value == ref.value and got.cap == ref.cap
    # opt out: a float y stays continuous (KSG-1 instead of Ross)
    cont = quiet(ibscope.mutual_information, t, yi.astype(float), discrete_y=False)
    assert cont.extra["method"] == "KSG-1"
    # opt in: any float y becomes classes (one per distinct row)
    forced = quiet(ibscope.mutual_information, t, np.where(yi == 1, 0.25, 0.75), method="binning", discrete_y=True)
    assert forced.value == pytest.approx(quiet(ibscope.mutual_information, t, yi, method="binning").value, abs=1e-12)


def test_capture_stores_integral_float_labels_as_int64(tmp_path):
    from ibscope.capture import capture

    src = "import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 3), nn.Tanh())\n"
    (tmp_path / "m.py").write_text(src)
    torch.manual_seed(0)
    torch.save({"epoch": 1, "state_dict": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()).state_dict()},
               tmp_path / "e1.pt")
    x = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    np.savez(tmp_path / "p.npz", x=x, y=(x[:, 0] > 0).astype(np.float32))
    with pytest.warns(RuntimeWarning, match=r"probe labels are floats \(float32\) with only integer values "
                                            r"\(2 distinct: 0, 1\); they are stored as int64 class labels"):
        out = capture(f"{tmp_path / 'm.py'}:make", str(tmp_path / "e1.pt"), tmp_path / "p.npz", ["1"],
                      tmp_path / "acts", progress=False)
    st = open_store(out)
    assert st.labels.dtype == np.int64 and np.array_equal(st.labels, (x[:, 0] > 0).astype(np.int64))
    # continuous targets stay floats
    np.savez(tmp_path / "q.npz", x=x, y=x[:, 0])
    out2 = capture(f"{tmp_path / 'm.py'}:make", str(tmp_path / "e1.pt"), tmp_path / "q.npz", ["1"],
                   tmp_path / "acts2", progress=False)
    assert open_store(out2).labels.dtype == np.float32


def _store(path, labels, acts, inputs=None, epochs=(1,)):
    n = len(labels)
    w = StoreWriter(path, config={"run": "r"}, sample_ids=np.arange(n), labels=labels, layers={"a": {}},
                    inputs=inputs)
    for e in epochs:
        with w.checkpoint(epoch=e, step=None, path=f"c{e}.pt", sha256=str(e) * 64) as s:
            s.append("a", acts(e))
    return path


def test_estimate_reads_float_labels_of_an_old_store_as_classes(tmp_path):
    rng = np.random.default_rng(2)
    t = rng.standard_normal((120, 3)).astype(np.float32)
    y = (t[:, 0] > 0).astype(np.int64)
    old = _store(tmp_path / "old", y.astype(np.float32), lambda e: t)  # a store captured before the fix
    new = _store(tmp_path / "new", y, lambda e: t)
    with pytest.warns(RuntimeWarning, match=r"Store '.*old': 'Y \(the labels\)' holds floats .* read as discrete"):
        a = run_estimate(old, tmp_path / "a.csv", ["binning", "kde-upper"], progress=False, null_permutations=0)
    b = run_estimate(new, tmp_path / "b.csv", ["binning", "kde-upper"], progress=False, null_permutations=0)
    va = {(r["estimator"], r["quantity"]): r["value"] for r in a.rows}
    assert va == {(r["estimator"], r["quantity"]): r["value"] for r in b.rows}
    assert a.provenance["labels_read"] == {"r/probe": "float labels with integer values read as int64 class labels"}
    # the way labels were read is part of the I(T;Y) rows' key
    ka = {r["quantity"]: r["key"] for r in a.rows if r["estimator"] == "binning"}
    kb = {r["quantity"]: r["key"] for r in b.rows if r["estimator"] == "binning"}
    assert ka["I(T;Y)"] != kb["I(T;Y)"]


def test_integer_valued_inputs_to_continuous_estimators_warn():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (300, 16)).astype(np.float64)  # token ids used as coordinates
    t = rng.standard_normal((300, 4))
    for m, kw in (("ksg", {}), ("gaussian", {}), ("gcmi", {}), ("renyi", {}), ("compressed", {"compressor_x": "pca"})):
        with pytest.warns(IntegerValuedWarning, match=rf"{m}: 16 of 16 varying column\(s\) of 'x' hold only integer "
                                                      r"values"):
            quiet_ok = ibscope.mutual_information(ids, t, method=m, **kw)
        assert math.isfinite(quiet_ok.value)
    mixed = np.c_[ids[:, :3], t]
    with pytest.warns(IntegerValuedWarning, match=r"3 of 7 varying column\(s\)"):
        ibscope.mutual_information(mixed, t)
    # integer arrays are discrete by design, and one-hot codes of labels are not coordinates: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegerValuedWarning)
        ibscope.mutual_information(t, rng.integers(0, 3, 300), method="gaussian")
        ibscope.mutual_information(t, rng.integers(0, 3, 300))


def test_binning_range_that_clamps_values_says_so(tmp_path):
    rng = np.random.default_rng(0)
    relu = np.maximum(0, 8 * rng.standard_normal((200, 3)))  # most positive values far above 1
    outside = int((relu > 1).sum())
    with pytest.warns(RuntimeWarning, match=rf"binning: n_outside = {outside} of 600 values of 'y' \(.*%\) lie outside "
                                            r"\[range_min, range_max\] = \[-1, 1\] and were clamped"):
        e = ibscope.mutual_information(np.arange(200), relu, method="binning", range_min=-1, range_max=1)
    assert e.extra["n_outside"] == outside
    st = _store(tmp_path / "s", rng.integers(0, 2, 200), lambda ep: relu.astype(np.float32))
    res = run_estimate(st, tmp_path / "r.csv", ["binning"], {"binning": {"range_min": -1, "range_max": 1}},
                       progress=False)
    for r in res.rows:
        assert r["value"] is not None and f"n_outside = {outside} of 600 values of T" in r["note"], r
        assert r["note"].startswith(f"binning {r['quantity']} at layer 'a', checkpoint 0 (epoch 1): ")
    lines = summary_lines(res)
    assert any("2 row(s) have a value and a warning in their note" in x for x in lines), lines


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three checkpoints of a 4-unit layer on 160 samples: I(T;Y) high at epoch 3, none at epoch 1."""
    d = tmp_path_factory.mktemp("nullstore")
    rng = np.random.default_rng(0)
    n = 160
    x = rng.standard_normal((n, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    noise = rng.standard_normal((n, 4))

    def acts(e):
        w = (e - 1) / 2.0  # epoch 1: independent of x; epoch 3: T carries x[:, 0]
        return (w * 3 * x[:, [0, 0, 1, 1]] + (1 - w) * noise).astype(np.float32)

    return _store(d / "acts", y, acts, inputs=x, epochs=(1, 2, 3))


@pytest.mark.slow
def test_cli_fills_null_and_saturation_columns(store, tmp_path):
    out = tmp_path / "r.csv"
    r = ib("estimate", store, "-o", out, "-e", "binning", "-e", "ksg", "-e", "effective-rank", "--null-permutations",
           "9", "--null-seed", "5", "-q")
    assert r.returncode == 0, r.stderr
    res = read_results(out)
    for row in res.rows:
        has_null = row["quantity"] == "I(T;Y)" or (row["estimator"] == "ksg" and row["quantity"] == "I(X;T)")
        cols = (row["null_mean"], row["null_std"], row["p_value"])
        assert all(c is not None for c in cols) if has_null else cols == (None, None, None), row
        assert (row["saturated"] is None) == (row["cap"] is None or row["unit"] != "nats"), row
        if row["saturated"] is not None:
            assert row["saturated"] == (row["value"] >= 0.99 * row["cap"])
    # the CLI's numbers are the API's, with the same seed
    st = open_store(store)
    ks = res.filter(estimator="ksg", quantity="I(T;Y)", epoch=3).rows[0]
    api = ibscope.mutual_information(st.activations(2, "a"), st.labels, null_permutations=9, null_seed=5)
    assert (ks["value"], ks["null_mean"], ks["null_std"], ks["p_value"]) == pytest.approx(
        (api.value, api.null_mean, api.null_std, api.p_value), abs=1e-12)
    assert ks["p_value"] == pytest.approx(0.1)  # dependent: p = 1/(N+1)
    ind = res.filter(estimator="ksg", quantity="I(T;Y)", epoch=1).rows[0]
    assert abs(ind["value"] - ind["null_mean"]) <= 3 * ind["null_std"] + 1e-9
    prov = json.loads(out.with_name("r.provenance.json").read_text())
    assert prov["null"]["permutations"] == 9 and prov["null"]["seed"] == 5
    sat = prov["saturation"]["binning"]
    assert sat["I(X;T)"]["cap"] == "log n" and sat["I(T;Y)"]["cap"] == "H(Y)" and sat["I(T;Y)"]["cells"] == 3
    err = flat(r.stderr)
    k = sat["I(X;T)"]["saturated"]
    assert k >= 1 and f"binning: {k} of 3 I(X;T) cells at the cap log n" in err
    assert "at this n and width the estimator cannot see compression; see docs/trust.md" in err
    # a new seed or N recomputes the rows with a null, and only those
    again = run_estimate(store, out, ["binning", "ksg", "effective-rank"], progress=False, null_permutations=9,
                         null_seed=5)
    assert again.provenance["cells_computed"] == 0
    other = run_estimate(store, out, ["binning", "ksg", "effective-rank"], progress=False, null_permutations=9,
                         null_seed=6)
    assert other.provenance["cells_computed"] == 3  # every (checkpoint, layer) cell: its I(T;Y) and ksg I(X;T) rows
    kept = {(r["epoch"], r["estimator"], r["quantity"]): r["key"] for r in res.rows}
    for row in other.rows:
        same = kept[(row["epoch"], row["estimator"], row["quantity"])] == row["key"]
        assert same == (null_setting(row["estimator"], row["quantity"], row["params"], 9, 5) is None), row
    # 0 turns the null off; a bad N is a usage error
    off = run_estimate(store, tmp_path / "off.csv", ["binning"], progress=False, null_permutations=0)
    assert all(r["p_value"] is None for r in off.rows)
    r = ib("estimate", store, "-o", tmp_path / "bad.csv", "--null-permutations", "-1", "-q")
    assert r.returncode == 2 and "--null-permutations must be an integer >= 0" in flat(r.stderr)


def test_null_setting_and_key():
    assert null_setting("binning", "I(T;Y)", {}, 10, 0) == {"permutations": 10, "seed": 0}
    assert null_setting("binning", "I(X;T)", {"x_source": "identity"}, 10, 0) is None  # permuting ids changes nothing
    assert null_setting("ksg", "I(X;T)", {"x_source": "inputs"}, 10, 0) is not None
    assert null_setting("effective-rank", "effective_rank", {}, 10, 0) is None
    assert null_setting("binning", "I(T;Y)", {}, 0, 0) is None
    base = dict(config_hash="c", probe_hash="p", checkpoint_sha256="s", layer="a", estimator="binning",
                quantity="I(T;Y)", params={}, code=code_version("binning"))
    assert cell_key(**base) == cell_key(**base, null=None)  # rows without a null keep their old keys
    assert cell_key(**base, null={"permutations": 10, "seed": 0}) != cell_key(**base, null={"permutations": 10, "seed": 1})


def test_help_explains_the_options():
    r = ib("estimate", "--help")
    text = flat(r.stdout)
    for want in ("--null-permutations", "--null-seed", "p_value", "saturated", "docs/trust.md"):
        assert want in text, want


@pytest.mark.slow
def test_config_keys(tmp_path, store):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("estimators: [binning]\nnull_permutations: 3\nnull_seed: 2\n")
    r = ib("estimate", store, "-o", tmp_path / "r.csv", "-c", cfg, "-q")
    assert r.returncode == 0, r.stderr
    prov = json.loads((tmp_path / "r.provenance.json").read_text())
    assert prov["null"] == {**prov["null"], "permutations": 3, "seed": 2}
    # the run config (ibscope run / demo) has the same keys, validated
    from ibscope.pipeline import load_config

    minimal = {"model": {"factory": "ibscope.demo.models:ib_net"}, "data": {"task": "twelve-bit"}, "train": {"epochs": 5}}
    cfg, _, _ = load_config(minimal)
    assert cfg.estimate.null_permutations is None and cfg.estimate.null_seed is None
    cfg, _, _ = load_config({**minimal, "estimate": {"null_permutations": 0, "null_seed": 4}})
    assert cfg.estimate.null_permutations == 0 and cfg.estimate.null_seed == 4
    with pytest.raises(UsageError, match="'estimate.null_permutations' must be >= 0"):
        load_config({**minimal, "estimate": {"null_permutations": -2}})


def test_estimate_dataclass_defaults():
    e = Estimate(value=1.0, unit="nats", quantity="mutual_information", estimator="x")
    assert (e.null_mean, e.null_std, e.p_value, e.saturated) == (None, None, None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nulls_on_cuda_match_cpu():
    rng = np.random.default_rng(0)
    t, lab = torch.from_numpy(rng.standard_normal((300, 3))), torch.from_numpy(rng.integers(0, 2, 300))
    for m in ("binning", "kde-upper", "ksg", "gaussian", "renyi"):
        y = lab if m != "gaussian" and m != "renyi" else torch.from_numpy(rng.standard_normal((300, 2)))
        cpu = quiet(ibscope.mutual_information, t, y, method=m, null_permutations=5)
        gpu = quiet(ibscope.mutual_information, t.cuda(), y.cuda(), method=m, null_permutations=5)
        assert (gpu.value, gpu.null_mean, gpu.p_value) == pytest.approx((cpu.value, cpu.null_mean, cpu.p_value),
                                                                         abs=1e-6), m


def test_rounded_continuous_target_stays_continuous():
    """Integer-valued floats with more distinct values than n / 5 are a rounded continuous
    target, not classes: KSG (not Ross) reads them, and the result is close to the continuous one."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2000, 1))
    y = np.round(100 * (x + 0.5 * rng.standard_normal((2000, 1))))
    assert np.unique(y).size > 2000 / 5
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = ibscope.mutual_information(x, y, method="ksg")
    assert not [w for w in said if "class labels" in str(w.message)]
    ref = quiet(ibscope.mutual_information, x, y, method="ksg", discrete_y=False)
    assert got.value == ref.value and got.extra["method"] == "KSG-1"
    # closed form for the unrounded pair: -0.5 log(1 - rho^2), rho^2 = 1 / 1.25; rounding to 1/100 loses little
    assert got.value == pytest.approx(-0.5 * np.log(1 - 1 / 1.25), abs=0.05)
    # few distinct values per sample count: still classes
    with pytest.warns(RuntimeWarning, match="read as discrete class labels"):
        ibscope.mutual_information(x, np.round(np.clip(x, -2, 2)), method="binning")


def test_infonce_cap_with_class_labels_is_min_of_log_batch_and_entropy():
    from ibscope.estimators import registry

    rng = np.random.default_rng(4)
    t = rng.standard_normal((900, 2)).astype(np.float32)
    y = (t[:, 0] > 0).astype(np.int64)
    e = quiet(ibscope.mutual_information, t, y, method="infonce", batch_size=32, steps=60, eval_every=20)
    p = np.bincount(y) / y.size
    h = float(-(p * np.log(p)).sum())
    assert h < np.log(32)
    assert e.cap == pytest.approx(h, abs=1e-12)
    assert registry.get("infonce")().cap_name("I(T;Y)") == "min(log batch, H(Y))"
    # continuous pair: log batch
    e2 = quiet(ibscope.mutual_information, t[:, :1], t[:, 1:], method="infonce", batch_size=32, steps=60,
               eval_every=20)
    assert e2.cap == pytest.approx(np.log(32), abs=1e-12)


def test_within_null_counts_a_value_equal_to_its_null_up_to_rounding():
    from ibscope.trust import within_null

    row = {"value": 0.6931300143240229, "null_mean": 0.6931300143240193, "null_std": 0.0, "p_value": 1.0}
    assert within_null(row) is True
    assert within_null(dict(row, value=0.6931300143240193 + 1e-6)) is False
    assert within_null(dict(row, value=0.70, null_std=0.01)) is True
    assert within_null(dict(row, value=0.72, null_std=0.01)) is False
