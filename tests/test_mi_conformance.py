"""The public conformance check: every built-in MI estimator passes; broken plug-ins fail
with a list of what is wrong (and exit code 5 through the error class)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from ibscope.errors import EXIT_PLUGIN
from ibscope.estimators import available, create
from ibscope.estimators.base import Estimator, as_tensor
from ibscope.estimators.conformance import ConformanceError, check_estimator

MINE = ["binning", "adaptive-binning", "kde", "kde-upper", "kde-lower", "adaptive-kde", "adaptive-kde-upper",
        "adaptive-kde-lower", "ksg", "gaussian", "compressed", "infonce", "renyi", "chelombiev-binning",
        "chelombiev-kde", "chelombiev-kde-upper", "chelombiev-kde-lower", "gcmi", "mine", "smile"]


@pytest.mark.parametrize("name", MINE)
def test_builtin_estimators_conform(name):
    cls = available()[name]
    # through the registry: an alias (kde-lower) is its class with the bound pinned and its own name
    est = create(name, steps=20, batch_size=32) if name in ("infonce", "mine", "smile") else create(name)
    assert est.name == name
    passed = check_estimator(est, n=200)
    assert "deterministic" in passed and "numpy and torch agree" in passed and "rejects NaN" in passed
    assert "parameter constraints" in passed and "estimator name" in passed
    assert cls.kind == "pair" and cls.unit == "nats" and cls.reference


class NotFrozen(Estimator):
    """Not decorated: its hyper-parameter is a plain, mutable attribute."""

    name: ClassVar[str] = "not-frozen"

    def __init__(self, k: int = 1):
        object.__setattr__(self, "k", k)

    def estimate(self, x, y):
        return self._make(0.0, n=len(x), dims=(1, 1))


@dataclass(frozen=True)
class Sloppy(Estimator):
    """Wrong estimator name in its Estimate, random output, accepts NaN, ignores params."""

    name: ClassVar[str] = "sloppy"
    scale: float = 1.0

    def estimate(self, x, y):
        from ibscope.estimators.base import Estimate

        return Estimate(value=random.random(), unit="nats", quantity="mutual_information", estimator="other",
                        params={}, n_samples=len(x) - 1)


@dataclass(frozen=True)
class Good(Estimator):
    """A correct toy plug-in: the Gaussian MI of the first columns."""

    name: ClassVar[str] = "toy-corr"
    reference: ClassVar[str] = "toy"
    shrink: float = 0.0

    def estimate(self, x, y):
        tx = as_tensor(x, name="x", estimator=self.name).double()
        ty = as_tensor(y, name="y", estimator=self.name).double()
        r = float(np.corrcoef(tx[:, 0].numpy(), ty[:, 0].numpy())[0, 1]) * (1 - self.shrink)
        return self._make(-0.5 * np.log(1 - r * r), n=tx.shape[0], dims=(tx.shape[1], ty.shape[1]))


def test_good_plugin_passes():
    assert len(check_estimator(Good)) >= 15


def test_broken_plugins_fail_with_a_list():
    with pytest.raises(ConformanceError) as info:
        check_estimator(NotFrozen)
    assert "frozen dataclass" in str(info.value) and info.value.exit_code == EXIT_PLUGIN
    with pytest.raises(ConformanceError) as info:
        check_estimator(Sloppy)
    msg = str(info.value)
    for part in ("estimator name: Estimate.estimator='other', name='sloppy'", "params: Estimate.params={}",
                 "n_samples: Estimate.n_samples=299, given 300", "deterministic", "rejects NaN"):
        assert part in msg, msg
    with pytest.raises(ConformanceError, match="is not a subclass"):
        check_estimator(int)
