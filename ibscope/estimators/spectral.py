"""Spectral measures of one representation: effective rank, participation ratio, ...

All of them are computed from one shared float64 spectrum (``_linalg.spectrum``: the
eigenvalues of the smaller of Z^T Z and Z Z^T, on the input's device). Most are
``exp(H_alpha(p))`` for the normalised spectrum ``p_k = lambda_k / sum(lambda)`` (a Renyi
entropy of order alpha): alpha = 0 numerical rank, 1 effective rank, 2 participation ratio,
inf stable rank. So, for the same spectrum: exact rank >= effective rank >= participation
ratio >= stable rank.

Conventions that silently change values in other tools are explicit parameters here:
singular values vs covariance eigenvalues (``convention``), centring (``center``), and the
RankMe epsilon (``eps``, default 0: zeros are dropped instead of biased upwards).
Units: "dimensions" (ranks and dimensions), "exponent" (alpha-ReQ).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ibscope.errors import DataError
from ibscope.estimators._linalg import Spectrum, rank_tolerance, renyi_entropy, spectrum
from ibscope.estimators.base import ArrayLike, Estimate, SingleEstimator, SingleMixinBase, as_tensor
from ibscope.estimators.params import Boolean, Integer, OneOf, Real, param
from ibscope.estimators.registry import register

if TYPE_CHECKING:
    import torch

DIMENSIONS = "dimensions"
EXPONENT = "exponent"


class _SpectralMixin(SingleMixinBase):
    """Shared input handling: validate, compute the spectrum, handle the all-zero case.

    Every spectral measure describes one representation, in dimensions unless it says otherwise."""

    unit: ClassVar[str] = DIMENSIONS

    def scale_invariant(self, arg: str) -> str | None:
        # functions of the normalised spectrum (relative tolerances included); an absolute atol is not
        return "global" if not getattr(self, "atol", 0.0) else None

    def _centered(self) -> bool:
        return bool(getattr(self, "center", getattr(self, "convention", "cov") == "cov"))

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        # a constant layer has no variation: every centred rank is 0. Uncentred measures keep
        # their own value (a constant non-zero layer has one direction, an all-zero layer none).
        return "zero" if self._centered() else None

    def _constant_cap(self, *tensors: torch.Tensor) -> float | None:
        n, d = int(tensors[0].shape[0]), int(tensors[0].shape[1])
        return float(min(n - 1, d))

    def cap_name(self, quantity: str) -> str:
        return "the largest possible rank min(n - 1, d)" if self._centered() else "the largest possible rank min(n, d)"

    def _spectrum(self, x: ArrayLike, *, center: bool, method: str = "eigh") -> Spectrum:
        t = as_tensor(x, name="x", estimator=self, allow_discrete=False)
        if center and t.shape[0] < 2:
            raise DataError(f"{self.name}: a centred spectrum needs at least 2 samples. Got {t.shape[0]}.")
        return spectrum(t, center=center, method=method)

    def _degenerate(self, sp: Spectrum) -> bool:
        if float(sp.eigenvalues.sum()) > 0.0:
            return False
        warnings.warn(
            f"{self.name}: the representation is constant (zero variance over {sp.n} samples); "
            "its rank-type measures are 0.", RuntimeWarning, stacklevel=3)
        return True


def _erank(lam: torch.Tensor, eps: float, sp: Spectrum) -> float:
    """exp(Shannon entropy) of p = lam / sum(lam) (+ eps, the RankMe guard, if eps > 0).

    Without eps, values at or below the numerical-rank tolerance (``_linalg.rank_tolerance``)
    are zeros and dropped."""
    p = lam / lam.sum()
    if eps > 0:
        p = p + eps
        return float((-(p * p.log()).sum()).exp())
    return math.exp(renyi_entropy(p, 1.0, size=max(sp.n, sp.d)))


@register
@dataclass(frozen=True)
class EffectiveRank(_SpectralMixin, SingleEstimator):
    """Effective rank: exp of the Shannon entropy of the normalised spectrum (RankMe).

    Definition: erank(Z) = exp(-sum_k p_k log p_k), p_k = s_k / sum_j s_j.
    Convention (``convention``):
      * "cov" (default): s_k = eigenvalues of the covariance of the *centred* Z (PCA
        explained variances); the convention of reptrix and of "Tracing the Representation
        Geometry of Language Models" (Li et al. 2025).
      * "sv": s_k = singular values of the *raw, uncentred* Z, as published in RankMe
        (Garrido et al. 2023).
    The two differ on the same data (randn(1000, 1024): 613.4 vs 813.9).
    "sv" uses true singular values (blocked QR + SVD, ``_linalg.singular_values``), not
    square roots of Gram eigenvalues, so rank-deficient inputs match numpy's SVD to ~1e-12.
    ``eps``: RankMe adds 1e-7 to every p_k; the default 0 drops zeros instead (eps biases
    the value upwards: a flat spectrum on 64 of 100 dims gives 64.005 with 1e-7).
    Unit: dimensions; 1 <= erank <= min(n - 1, d) ("cov") or min(n, d) ("sv").
    """

    convention: str = param("cov", OneOf("cov", "sv"))
    eps: float = param(0.0, Real(ge=0, lt=1))

    name: ClassVar[str] = "effective-rank"
    quantity: ClassVar[str] = "effective_rank"
    reference: ClassVar[str] = ("Roy & Vetterli 2007, EUSIPCO; Garrido et al. 2023, RankMe, ICML (arXiv:2210.02885); "
                                "Agrawal et al. 2022 (reptrix)")

    def estimate(self, x: ArrayLike) -> Estimate:
        center = self.convention == "cov"
        sp = self._spectrum(x, center=center, method="eigh" if center else "svd")
        s = sp.eigenvalues if center else sp.singular_values
        value = 0.0 if self._degenerate(sp) else _erank(s, self.eps, sp)
        return self._make(value, n=sp.n, dims=(sp.d,), cap=float(sp.max_rank),
                          extra={"convention": self.convention, "centered": center})


@register
@dataclass(frozen=True)
class ParticipationRatio(_SpectralMixin, SingleEstimator):
    """Participation ratio: (sum lambda)^2 / sum lambda^2 of the covariance spectrum.

    Definition: PR = (tr C)^2 / ||C||_F^2 = exp(H_2(p)), the order-2 Renyi effective rank,
    lambda = covariance eigenvalues of Z (centred by default, ``center``).
    For an isotropic Gaussian PR ~ d / (1 + d/n); a flat spectrum on k dims gives k.
    Unit: dimensions, 1 <= PR <= min(n - 1, d).
    Reference: Gao et al. 2017 (bioRxiv 214262); skdim lPCA(ver='participation_ratio').
    """

    center: bool = param(True, Boolean())

    name: ClassVar[str] = "participation-ratio"
    quantity: ClassVar[str] = "participation_ratio"
    reference: ClassVar[str] = "Gao, Trautmann, Yu et al. 2017, A theory of multineuronal dimensionality (bioRxiv 214262)"

    def estimate(self, x: ArrayLike) -> Estimate:
        sp = self._spectrum(x, center=self.center)
        lam = sp.eigenvalues
        value = 0.0 if self._degenerate(sp) else float(lam.sum() ** 2 / (lam * lam).sum())
        return self._make(value, n=sp.n, dims=(sp.d,), cap=float(sp.max_rank), extra={"centered": self.center})


@register
@dataclass(frozen=True)
class StableRank(_SpectralMixin, SingleEstimator):
    """Stable rank: ||Z||_F^2 / ||Z||_2^2 = sum lambda / lambda_max.

    Definition: srank = sum_k sigma_k^2 / sigma_1^2 = exp(H_inf(p)), the order-infinity
    Renyi effective rank of the covariance spectrum (Z centred by default, ``center``).
    It is the most conservative of the family: srank <= participation ratio <= erank.
    Unit: dimensions, 1 <= srank <= min(n - 1, d).
    Reference: Rudelson & Vershynin 2007, J. ACM 54(4).
    """

    center: bool = param(True, Boolean())

    name: ClassVar[str] = "stable-rank"
    quantity: ClassVar[str] = "stable_rank"
    reference: ClassVar[str] = "Rudelson & Vershynin 2007, Sampling from large matrices, J. ACM 54(4)"

    def estimate(self, x: ArrayLike) -> Estimate:
        sp = self._spectrum(x, center=self.center)
        lam = sp.eigenvalues
        value = 0.0 if self._degenerate(sp) else float(lam.sum() / lam.max())
        return self._make(value, n=sp.n, dims=(sp.d,), cap=float(sp.max_rank), extra={"centered": self.center})


@register
@dataclass(frozen=True)
class NumericalRank(_SpectralMixin, SingleEstimator):
    """Numerical rank: the number of singular values above max(atol, rtol * sigma_max).

    Definition: rank = #{k : sigma_k > max(atol, rtol * sigma_1)}, sigma = singular values
    of Z (centred by default, ``center``), computed by float64 SVD (not via eigenvalues,
    so that small rtol is meaningful). The threshold never goes below the round-off floor
    sigma_1 * max(n, d) * eps (``_linalg.rank_tolerance``, numpy's default), so an exactly
    rank-r matrix reads r for any rtol.
    Convention: the tolerance is *relative* by default (rtol = 1e-4, above float32
    round-off, so a rank-r float32 representation reads r); an absolute atol alone (rtol = 0)
    is scale-dependent. torch.linalg.matrix_rank's default (rtol = max(n, d) * eps) counts
    noise directions: rank-5 signal + 1e-3 noise in R^50 reads 50 there, 5 at rtol = 1e-2.
    Unit: dimensions, 0 <= rank <= min(n - 1, d).
    """

    rtol: float = param(1e-4, Real(ge=0, lt=1))
    atol: float = param(0.0, Real(ge=0))
    center: bool = param(True, Boolean())

    name: ClassVar[str] = "numerical-rank"
    quantity: ClassVar[str] = "numerical_rank"
    reference: ClassVar[str] = "Golub & Van Loan, Matrix Computations, 4th ed., sec. 5.4.1 (numerical rank)"

    def validate(self) -> None:
        self._require(self.rtol > 0.0 or self.atol > 0.0, "rtol", "> 0 when atol is 0 (no tolerance at all)", self.rtol)

    def estimate(self, x: ArrayLike) -> Estimate:
        sp = self._spectrum(x, center=self.center, method="svd")
        s = sp.singular_values
        tol = max(self.atol, self.rtol * float(s.max()), rank_tolerance(float(s.max()), sp.n, sp.d))
        value = int((s > tol).sum())
        return self._make(value, n=sp.n, dims=(sp.d,), cap=float(sp.max_rank),
                          extra={"threshold": tol, "sigma_max": float(s.max()), "centered": self.center})


@register
@dataclass(frozen=True)
class PCADimension(_SpectralMixin, SingleEstimator):
    """PCA dimension: the fewest principal components explaining a fraction of the variance.

    Definition: k_f = min{k : sum_{i<=k} lambda_i / sum lambda >= f}, lambda = covariance
    eigenvalues (Z centred by default, ``center``), f = ``fraction`` (default 0.9).
    Note: skdim's lPCA(ver='ratio') defaults to f = 0.05, not 0.95; always state f.
    Unit: dimensions, 1 <= k_f <= min(n - 1, d) (0 for a constant representation).
    Reference: Jolliffe, Principal Component Analysis, 2nd ed. 2002, sec. 6.1.1.
    """

    fraction: float = param(0.9, Real(gt=0, le=1))
    center: bool = param(True, Boolean())

    name: ClassVar[str] = "pca-dim"
    quantity: ClassVar[str] = "pca_dimension"
    reference: ClassVar[str] = "Jolliffe 2002, Principal Component Analysis (2nd ed.), sec. 6.1.1"

    def estimate(self, x: ArrayLike) -> Estimate:
        import torch

        sp = self._spectrum(x, center=self.center)
        lam = sp.eigenvalues
        if self._degenerate(sp):
            value = 0
        else:
            c = torch.cumsum(lam, 0) / lam.sum()
            # relative slack of 1e-12 so that an exactly reached fraction counts (k/10 sums)
            value = int((c < self.fraction * (1.0 - 1e-12)).sum()) + 1
            value = min(value, sp.rank)
        return self._make(value, n=sp.n, dims=(sp.d,), cap=float(sp.max_rank),
                          extra={"fraction": self.fraction, "centered": self.center})


@register
@dataclass(frozen=True)
class AlphaReQ(_SpectralMixin, SingleEstimator):
    """alpha-ReQ: the power-law decay exponent of the covariance eigenspectrum.

    Definition: fit lambda_k ~ c * k^(-alpha) to the normalised covariance eigenvalues
    over ranks fit_start..fit_end (1-based, inclusive) by weighted least squares of
    log lambda_k on [-log k, 1] with weights 1/k (the Stringer & Pachitariu fit used by
    Agrawal et al. and Li et al.). Default window: ranks 12..100 (Li et al. 2025, i.e.
    np.arange(11, 100)); reptrix uses ranks 11..100 (fit_start=11).
    Larger alpha = faster decay = more anisotropic ("compression-seeking") representation.
    ``extra`` holds the intercept and the R^2 of the fit on the window.
    Unit: exponent (dimensionless). Needs min(n - 1, d) >= fit_end non-zero eigenvalues.
    """

    fit_start: int = param(12, Integer(ge=1))
    fit_end: int = param(100, Integer(ge=3))
    center: bool = param(True, Boolean())

    name: ClassVar[str] = "alpha-req"
    quantity: ClassVar[str] = "alpha_req"
    unit: ClassVar[str] = EXPONENT
    reference: ClassVar[str] = ("Agrawal et al. 2022, alpha-ReQ, NeurIPS; Stringer et al. 2019, Nature 571; "
                                "Li et al. 2025, Tracing the Representation Geometry of Language Models")

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        return "undefined" if self.center else None  # no spectrum to fit a decay to

    def validate(self) -> None:
        self._require(self.fit_end >= self.fit_start + 2, "fit_end", f">= fit_start + 2 = {self.fit_start + 2}",
                      self.fit_end)

    def estimate(self, x: ArrayLike) -> Estimate:
        import torch

        sp = self._spectrum(x, center=self.center)
        lam = sp.eigenvalues
        nz = sp.rank  # eigenvalues above the numerical-rank tolerance (_linalg.rank_tolerance)
        if nz < self.fit_end:
            raise DataError(
                f"{self.name}: the fit window ends at rank {self.fit_end}, but the spectrum has only {nz} non-zero "
                f"eigenvalues (n={sp.n} samples, d={sp.d} features).",
                hint=f"Use more samples/features, or lower the window: --param {self.name}.fit_end=N "
                     f"(and fit_start) with N <= {nz}.")
        p = lam / lam.sum()
        k = torch.arange(self.fit_start, self.fit_end + 1, dtype=torch.float64, device=lam.device)
        y = p[self.fit_start - 1:self.fit_end].log()
        xmat = torch.stack([-k.log(), torch.ones_like(k)], 1)
        w = 1.0 / k
        a = xmat.T @ (xmat * w[:, None])
        b = xmat.T @ (w * y)
        coef = torch.linalg.solve(a, b)
        alpha, intercept = float(coef[0]), float(coef[1])
        resid = y - xmat @ coef
        ss_tot = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
        return self._make(alpha, n=sp.n, dims=(sp.d,),
                          extra={"intercept": intercept, "r2": r2, "fit_start": self.fit_start, "fit_end": self.fit_end})


@register
@dataclass(frozen=True)
class EffectiveEncodingDimension(_SpectralMixin, SingleEstimator):
    """Effective encoding dimension (EED): exp entropy of the spectrum of H^T H / N.

    Definition: EED = exp(-sum p_k log p_k), p_k = lambda_k / sum lambda, lambda =
    eigenvalues of Sigma = H^T H / N, with H the (n x d) representation *uncentred* by
    default, as the definition is written (``center=True`` gives the covariance version,
    which equals effective-rank with convention 'cov'). ``extra['normalized']`` = EED / d.
    Unit: dimensions, 1 <= EED <= min(n, d).
    Reference: Awadhiya 2025, The Inductive Bottleneck (arXiv:2512.07331).
    """

    center: bool = param(False, Boolean())

    name: ClassVar[str] = "effective-encoding-dim"
    quantity: ClassVar[str] = "effective_encoding_dimension"
    reference: ClassVar[str] = "Awadhiya 2025, The Inductive Bottleneck (arXiv:2512.07331)"

    def estimate(self, x: ArrayLike) -> Estimate:
        sp = self._spectrum(x, center=self.center)
        value = 0.0 if self._degenerate(sp) else _erank(sp.eigenvalues, 0.0, sp)
        return self._make(value, n=sp.n, dims=(sp.d,), cap=float(sp.max_rank),
                          extra={"normalized": value / sp.d, "centered": self.center})
