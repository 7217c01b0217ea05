"""The shared input conversion: non-numeric arrays, NaN/inf and values of extreme magnitude
give ibscope's own errors naming the argument; scale-invariant estimators rescale instead."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import ibscope
from ibscope.errors import DataError
from ibscope.estimators import registry
from ibscope.estimators.base import Estimator

RNG = np.random.default_rng(0)
X = RNG.standard_normal((200, 2))
LABELS = (X[:, 0] > 0).astype(np.int64)
Y = X + 0.5 * RNG.standard_normal((200, 2))
BIG = np.full((200, 2), np.finfo(np.float64).max) * np.random.default_rng(1).random((200, 2))  # cases/fuzz_min.py


def test_string_arrays_are_data_errors_naming_the_argument():
    with pytest.raises(DataError) as ei:
        ibscope.measure(np.array([["a", "b"]] * 200), method="effective-rank")
    assert ei.value.exit_code == 4
    assert ei.value.message == ("effective-rank: 'x' must be a numeric array (float, integer or bool). "
                                "Got dtype <U1 (strings).")
    assert "np.unique(x, return_inverse=True)[1]" in ei.value.hint
    with pytest.raises(DataError, match=r"binning: 'y' must be a numeric array .* Got dtype <U1 \(strings\)"):
        ibscope.mutual_information(X, np.array(["a", "b"] * 100), method="binning")


@pytest.mark.parametrize("bad, what", [
    (np.array([[1, "a"]] * 10, dtype=object), "object (Python objects)"),
    (X[:10] + 1j, "complex128 (complex numbers)"),
    (torch.ones(10, 2, dtype=torch.complex64), "torch.complex64 (complex numbers)"),
    (np.array(["2024-01-01"] * 10, dtype="datetime64[D]"), "datetime64[D] (dates)"),
    (np.array([b"x"] * 10), "|S1 (byte strings)"),
    (np.zeros(10, dtype=[("a", "f8")]), "(structured records)"),
])
def test_non_numeric_dtypes(bad, what):
    for call in (lambda: ibscope.measure(bad, method="twonn"),
                 lambda: ibscope.mutual_information(X[:10], bad, method="ksg")):
        with pytest.raises(DataError) as ei:
            call()
        assert what in ei.value.message and "must be a numeric array" in ei.value.message


def test_ragged_lists_are_data_errors():
    with pytest.raises(DataError, match="'x' cannot be read as an array"):
        ibscope.measure([[1.0, 2.0], [3.0]], method="effective-rank")


def test_bool_is_discrete_where_it_means_something_and_refused_where_not():
    flags = LABELS.astype(bool)
    a = ibscope.mutual_information(X, flags, method="binning").value
    b = ibscope.mutual_information(X, LABELS, method="binning").value
    assert a == b and a > 0.3
    with pytest.raises(DataError, match=r"local-rank: 's' must be a numeric array \(float or integer\). Got dtype bool"):
        ibscope.measure(np.ones((5, 3), dtype=bool), method="local-rank")


def test_unsigned_and_half_inputs_convert_exactly():
    assert ibscope.mutual_information(X, LABELS.astype(np.uint16), method="binning").value == \
        ibscope.mutual_information(X, LABELS, method="binning").value
    h = X.astype(np.float16)
    assert ibscope.measure(h, method="effective-rank").value == ibscope.measure(h.astype(np.float32),
                                                                                method="effective-rank").value


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs(poison):
    x = X.copy()
    x[3, 1] = poison
    with pytest.raises(DataError, match=r"mle-id: 'x' contains 1 non-finite value\(s\) \(NaN or inf\) out of 400"):
        ibscope.measure(x, method="mle-id")
    with pytest.raises(DataError, match=r"gaussian: 'y' contains 1 non-finite"):
        ibscope.mutual_information(X, x, method="gaussian")


def test_empty_feature_axis():
    with pytest.raises(DataError, match=r"'x' has no features \(shape \(5, 0\)\)"):
        ibscope.measure(np.zeros((5, 0)), method="effective-rank")


# ------------------------------------------------------------------------------------------
# extreme magnitudes

def _invariant_cases():
    out = []
    for name, cls in registry.available().items():
        params = ({"steps": 20, "batch_size": 16} if name in ("infonce", "mine", "smile")
                  else {"ae_steps": 50} if name == "compressed" else {})
        est = registry.create(name, **params)
        if est.scale_invariant("x") is not None:
            out.append((name, params))
    return out


def _value(name, params, x):
    est = registry.create(name, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if est.kind == "pair":
            return est.estimate(x, Y if name not in ("binning", "adaptive-binning", "adaptive-kde", "adaptive-kde-upper",
                                                     "adaptive-kde-lower") else LABELS).value
        if est.kind == "jacobian":
            return est.estimate(np.abs(x)).value
        return est.estimate(x).value


@pytest.mark.parametrize("name, params", _invariant_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_scale_invariant_estimators_rescale_extreme_inputs(name, params):
    x = np.c_[X, X[:, :1] * 0.3 + 0.1 * RNG.standard_normal((200, 1))]
    if name == "alpha-req":
        x = np.random.default_rng(3).standard_normal((200, 120)) @ np.diag(np.arange(1, 121) ** -1.0)
    ref = _value(name, params, x)
    assert math.isfinite(ref)
    for scale in (2.0 ** 900, 2.0 ** -900, 2.0 ** 60, 2.0 ** -60):  # powers of two: the same numbers, exactly
        assert _value(name, params, x * scale) == pytest.approx(ref, rel=1e-12, abs=1e-12), scale
    for scale in (1e300, 1e-300):
        assert _value(name, params, x * scale) == pytest.approx(ref, rel=1e-6, abs=1e-9), scale


@pytest.mark.slow
def test_fuzz_min_values_near_float64_max():
    """cases/store_and_runs/fuzz_min.py: renyi raised a torch linear-algebra error, twonn and mle-id gave NaN."""
    e = 2.0 ** -1023
    r = ibscope.mutual_information(X, BIG, method="renyi")
    assert math.isfinite(r.value) and r.value == pytest.approx(
        ibscope.mutual_information(X, BIG * e, method="renyi").value, rel=1e-12)
    for m in ("twonn", "mle-id"):
        v = ibscope.measure(BIG, method=m).value
        assert math.isfinite(v) and v == pytest.approx(ibscope.measure(BIG * e, method=m).value, rel=1e-12)
        assert 1.0 < v < 3.0  # two uniform coordinates: dimension about 2


def test_ksg_rescales_each_column_on_its_own():
    mixed = np.c_[X[:, :1] * 2.0 ** 900, X[:, 1:] * 2.0 ** -900]
    assert ibscope.mutual_information(mixed, Y, method="ksg").value == pytest.approx(
        ibscope.mutual_information(X, Y, method="ksg").value, rel=1e-12)


def test_scale_dependent_estimators_refuse_overflowing_values():
    with pytest.raises(DataError) as ei:
        ibscope.mutual_information(X * 1e300, LABELS, method="kde")
    msg = ei.value.message
    assert "kde: 'x' has values up to" in msg and "overflow float64" in msg and "depends on the scale" in msg
    with pytest.raises(DataError, match="renyi: 'x' has values up to .* overflow"):
        ibscope.mutual_information(X * 1e300, Y, method="renyi", sigma_x=1.0)
    # inside the safe range they compute as before: far-apart points, I = H(labels)
    v = ibscope.mutual_information(X * 1e100, LABELS, method="kde").value
    hy = -sum(p * math.log(p) for p in np.bincount(LABELS) / len(LABELS))
    assert v == pytest.approx(hy, rel=1e-9)


@dataclass(frozen=True)
class _NaNEstimator(Estimator):
    name: ClassVar[str] = "nan-test"
    kind: ClassVar[str] = "single"

    def estimate(self, x):
        return self._make(float("nan"), n=len(x), dims=(1,))


def test_a_nan_result_is_never_returned_silently():
    with pytest.raises(DataError, match="nan-test: the computation gave NaN on 4 finite samples"):
        _NaNEstimator().estimate([1.0, 2.0, 3.0, 4.0])
