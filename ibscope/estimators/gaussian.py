"""Gaussian (closed-form) mutual information from covariances.

I(X;Y) = 1/2 [log det R_xx + log det R_yy - log det R] with R the sample correlation matrix
of (X, Y); exact for jointly Gaussian data and, for any data, the MI of the Gaussian with the
same covariance (blind to nonlinear dependence). Equals -1/2 sum_i log(1 - rho_i^2) over the
canonical correlations. Integer (discrete) inputs are one-hot encoded (C - 1 columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ibscope.errors import DataError
from ibscope.estimators import _mi
from ibscope.estimators.base import Estimate, Estimator, is_discrete
from ibscope.estimators.registry import register


def _logdet(est, m: torch.Tensor, what: str) -> float:
    sign, val = torch.linalg.slogdet(m)
    if float(sign) <= 0 or not bool(torch.isfinite(val)):
        raise DataError(
            f"{est.name}: the correlation matrix of {what} ({m.shape[0]} x {m.shape[0]}) is singular: some columns are "
            "linear combinations of others.",
            hint="Pass ridge=1e-6 (adds to the diagonal), or reduce the dimension first ('compressed').",
        )
    return float(val)


@register
@dataclass(frozen=True)
class Gaussian(Estimator):
    """Closed-form Gaussian MI from the correlation matrix (exact for Gaussian data).

    ``ridge`` is added to the diagonal of every correlation matrix (0 = exact). Constant
    columns are dropped; discrete inputs are one-hot encoded.
    """

    ridge: float = 0.0

    name: ClassVar[str] = "gaussian"
    reference: ClassVar[str] = "Cover & Thomas 2006, eq. 8.56 (Gaussian channel); canonical correlations"
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # correlations only
        return "column"

    def validate(self) -> None:
        self._require(isinstance(self.ridge, (int, float)) and self.ridge >= 0, "ridge", "a number >= 0", self.ridge)

    def _cols(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if is_discrete(t):
            t = _mi.one_hot(_mi.codes(t))
        t, _ = _mi.continuous(self, t, name, standardize=True)
        return t

    def estimate(self, x, y) -> Estimate:
        tx, ty = _mi.pair(self, x, y)
        if is_discrete(tx) and is_discrete(ty):
            raise _mi.both_discrete_error(self)
        n = tx.shape[0]
        a, b = self._cols(tx, "x"), self._cols(ty, "y")
        da, db = a.shape[1], b.shape[1]
        _mi.require_samples(self, n, da + db + 1, f"more samples than the {da}+{db} dimensions of x and y")
        z = torch.cat([a, b], dim=1)
        r = (z.T @ z) / (n - 1)
        r = r + float(self.ridge) * torch.eye(da + db, dtype=r.dtype, device=r.device)
        mi = 0.5 * (_logdet(self, r[:da, :da], "x") + _logdet(self, r[da:, da:], "y") - _logdet(self, r, "(x, y)"))
        return self._make(max(mi, 0.0), n=n, dims=(tx.shape[1], ty.shape[1]))
