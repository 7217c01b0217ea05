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
from ibscope.estimators.base import ArrayLike, Estimate, Estimator, PairEstimator, is_discrete
from ibscope.estimators.params import Real, param
from ibscope.estimators.registry import register


def _logdet(est: Estimator, m: torch.Tensor, what: str) -> float:
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
class Gaussian(PairEstimator):
    """Closed-form Gaussian MI from the correlation matrix (exact for Gaussian data).

    ``ridge`` is added to the diagonal of every correlation matrix (0 = exact). Constant
    columns are dropped; discrete inputs are one-hot encoded.
    """

    ridge: float = param(0.0, Real(ge=0))

    name: ClassVar[str] = "gaussian"
    reference: ClassVar[str] = "Cover & Thomas 2006, eq. 8.56 (Gaussian channel); canonical correlations"
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # correlations only
        return "column"

    def _cols(self, t: torch.Tensor, name: str) -> torch.Tensor:
        discrete = is_discrete(t)
        if discrete:
            t = _mi.one_hot(_mi.codes(t))
        t, _ = _mi.continuous(self, t, name, standardize=True, warn_integers=not discrete)
        return t

    def _sides(self, x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tx, ty = _mi.pair(self, x, y)
        if is_discrete(tx) and is_discrete(ty):
            raise _mi.both_discrete_error(self)
        a, b = self._cols(tx, "x"), self._cols(ty, "y")
        da, db = a.shape[1], b.shape[1]
        _mi.require_samples(self, tx.shape[0], da + db + 1, f"more samples than the {da}+{db} dimensions of x and y")
        return tx, ty, a, b

    def _mi(self, a: torch.Tensor, b: torch.Tensor, lx: float, ly: float) -> float:
        n, da, db = a.shape[0], a.shape[1], b.shape[1]
        z = torch.cat([a, b], dim=1)
        r = (z.T @ z) / (n - 1)
        r = r + float(self.ridge) * torch.eye(da + db, dtype=r.dtype, device=r.device)
        return max(0.5 * (lx + ly - _logdet(self, r, "(x, y)")), 0.0)

    def _marginal_logdets(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        out = []
        for m, what in ((a, "x"), (b, "y")):
            r = (m.T @ m) / (m.shape[0] - 1)
            r = r + float(self.ridge) * torch.eye(m.shape[1], dtype=r.dtype, device=r.device)
            out.append(_logdet(self, r, what))
        return out[0], out[1]

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        tx, ty, a, b = self._sides(x, y)
        lx, ly = self._marginal_logdets(a, b)
        return self._make(self._mi(a, b, lx, ly), n=tx.shape[0], dims=(tx.shape[1], ty.shape[1]))

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        # I = 0 for a constant side; two discrete sides stay a usage error
        return "zero" if any(t.is_floating_point() for t in tensors) else None

    def _constant_cap(self, *tensors: torch.Tensor) -> float | None:
        return None  # the Gaussian estimate has no cap

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        # the columns of each side and their correlation determinants are computed once
        _, _, a, b = self._sides(x, y)
        lx, ly = self._marginal_logdets(a, b)
        return [self._mi(a, b[p.to(b.device)], lx, ly) for p in permutations]
