"""Entropy-like measures of one representation: matrix-based Renyi entropy, MCR^2 coding rate.

Both are computed in float64 on the input's device and returned in nats.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ibscope.errors import DataError
from ibscope.estimators._knn import pairwise
from ibscope.estimators._linalg import renyi_entropy, second_moment, spectrum
from ibscope.estimators.base import NATS, ArrayLike, Estimate, SingleEstimator, as_tensor
from ibscope.estimators.params import Boolean, Integer, OneOf, Real, param
from ibscope.estimators.registry import register

if TYPE_CHECKING:
    import torch

#: rows of the n x n kernel matrix filled per block
_KERNEL_BLOCK = 1024


def kernel_width(x64: torch.Tensor, rule: str, gamma: float, sqdist: torch.Tensor | None = None) -> float:
    """Gaussian kernel width sigma by ``rule`` for float64 data ``x64`` (n, d).

    * "silverman": sigma = gamma * n^(-1/(4+d)) * sqrt(tr Cov(x)); for standardised features
      (tr Cov = d) this is the rule gamma * sqrt(d) * n^(-1/(4+d)) of IPDL / Tapia & Estevez,
      and it scales with the data instead of assuming unit variance.
    * "median": sigma = median of the pairwise distances between distinct rows (the median
      heuristic; ``gamma`` is not used), from ``sqdist``, the (n, n) squared distances of the rows.
    """
    import torch

    n, d = x64.shape
    if rule == "silverman":
        tr = float(x64.var(dim=0, unbiased=True).sum()) if n > 1 else 0.0
        width: float = gamma * n ** (-1.0 / (4 + d)) * math.sqrt(tr)  # typeshed: int ** float is Any
        return width
    if rule == "median":
        if n < 2:
            return 0.0
        if sqdist is None:
            raise ValueError("kernel_width: rule 'median' needs sqdist, the (n, n) squared distances; got None.")
        # The off-diagonal entries of the symmetric matrix hold every pair twice, which leaves
        # the median of the pairs unchanged; the diagonal is set to +inf so it sorts last.
        # No index copy of the n(n-1)/2 pairs is made.
        sqdist.fill_diagonal_(math.inf)
        flat = sqdist.reshape(-1)
        m = n * (n - 1)  # finite entries; the median of the pairs is at ranks m/2 and m/2 + 1
        lo = float(torch.kthvalue(flat, m // 2).values)
        hi = float(torch.kthvalue(flat, m // 2 + 1).values)
        sqdist.fill_diagonal_(0.0)
        return 0.5 * (math.sqrt(lo) + math.sqrt(hi))  # numpy's median convention
    raise ValueError(rule)


@register
@dataclass(frozen=True)
class MatrixEntropy(SingleEstimator):
    """Matrix-based Renyi alpha-entropy of one representation (nats).

    Definition: S_alpha(A) = 1/(1 - alpha) * log sum_i lambda_i(A)^alpha, with A = K / tr K
    the normalised Gram matrix of a kernel on the n samples; alpha -> 1 is the von Neumann
    entropy -sum lambda log lambda (used exactly when alpha == 1).
    Kernel (``kernel``):
      * "gaussian" (default): K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)); sigma = ``sigma``
        if given, else ``sigma_rule`` ("silverman": gamma * n^(-1/(4+d)) * sqrt(tr Cov x),
        gamma = 0.8; "median": the median pairwise distance). 0 <= S <= log n; it
        saturates at log n when sigma is small next to the spread of the points (a warning
        says so; ``extra['saturation']`` = S / log n).
        Cost O(n^2 d + n^3), memory n^2 float64; n is limited by ``max_samples``.
      * "linear": K = Z Z^T of the centred, row-L2-normalised Z (Skean et al.'s MBE, computed
        on the smaller of the n x n and d x d sides); 0 <= S <= log min(n, d).
    c tight, well-separated equal clusters give log c for every alpha.
    Default alpha = 1.01 (the literature default; alpha = 1 is the von Neumann branch).
    Unit: nats. Reference: Sanchez Giraldo, Rao & Principe 2015, IEEE Trans. Inf. Theory 61(1).
    """

    alpha: float = param(1.01, Real(ge=0))
    kernel: str = param("gaussian", OneOf("gaussian", "linear"))
    #: None: from sigma_rule
    sigma: float | None = param(None, Real(gt=0), optional=True)
    sigma_rule: str = param("silverman", OneOf("silverman", "median"))
    gamma: float = param(0.8, Real(gt=0))
    max_samples: int = param(10000, Integer(ge=2))

    name: ClassVar[str] = "matrix-entropy"
    quantity: ClassVar[str] = "matrix_entropy"
    unit: ClassVar[str] = NATS
    reference: ClassVar[str] = ("Sanchez Giraldo, Rao & Principe 2015, Measures of entropy from data using infinitely "
                                "divisible kernels, IEEE Trans. Inf. Theory 61(1); Skean et al. 2025 (linear kernel)")

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        return "zero"  # K is all ones (Gaussian) or 0 (linear, centred): entropy 0 for any width

    def _constant_cap(self, *tensors: torch.Tensor) -> float | None:
        n, d = int(tensors[0].shape[0]), int(tensors[0].shape[1])
        return math.log(max(1, min(n, d))) if self.kernel == "linear" else math.log(n)

    def cap_name(self, quantity: str) -> str:
        return "log min(n, d)" if self.kernel == "linear" else "log n"

    def scale_invariant(self, arg: str) -> str | None:
        # rule-based widths (silverman, median) scale with the data; the linear kernel row-normalises
        return "global" if self.kernel == "linear" or self.sigma is None else None

    def estimate(self, x: ArrayLike) -> Estimate:
        import torch

        t = as_tensor(x, name="x", estimator=self, allow_discrete=False)
        n, d = t.shape
        extra: dict[str, Any] = {"kernel": self.kernel}
        if self.kernel == "linear":
            sp = spectrum(t, center=True, row_normalize=True)
            lam = sp.eigenvalues
            cap = math.log(max(1, min(n, d)))
            h = renyi_entropy(lam / lam.sum(), self.alpha, size=max(n, d)) if float(lam.sum()) > 0 else 0.0
        else:
            if n > self.max_samples:
                raise DataError(
                    f"{self.name}: the Gaussian-kernel entropy needs an n x n eigendecomposition; n = {n} exceeds "
                    f"max_samples = {self.max_samples} ({8 * n * n / 2**30:.1f} GiB of float64).",
                    hint=f"Capture fewer probe samples (--max-samples), raise --param {self.name}.max_samples=N, "
                         f"or use kernel=linear (cost set by min(n, d)).")
            x64 = t.to(torch.float64)
            x64 = x64 - x64.mean(0)
            sq = torch.empty((n, n), dtype=torch.float64, device=t.device)
            for s in range(0, n, _KERNEL_BLOCK):
                sq[s:s + _KERNEL_BLOCK] = pairwise(x64[s:s + _KERNEL_BLOCK], x64, "sqeuclidean_mm")
            sq.fill_diagonal_(0.0)
            sigma = float(self.sigma) if self.sigma is not None else kernel_width(x64, self.sigma_rule, self.gamma, sq)
            extra["sigma"] = sigma
            if not sigma > 0:  # (a constant representation never gets here: its entropy is 0)
                raise DataError(f"{self.name}: the kernel width from the '{self.sigma_rule}' rule is 0: more than "
                                f"half of the pairs of its {n} samples are identical points.",
                                hint=f"Pass a width explicitly: --param {self.name}.sigma=S.")
            a = sq.mul_(-0.5 / sigma ** 2).exp_().div_(n)  # A = K / tr K, tr K = n
            if self.alpha == 2.0:  # exact without eigendecomposition: sum lambda^2 = ||A||_F^2
                h = -math.log(float((a * a).sum()))
            else:
                lam = torch.linalg.eigvalsh(a).clamp_min(0.0)
                h = renyi_entropy(lam, self.alpha)
            cap = math.log(n)
        h = max(0.0, h)
        extra["saturation"] = h / cap if cap > 0 else 0.0
        if self.kernel == "gaussian" and cap > 0 and h >= 0.99 * cap:
            warnings.warn(
                f"{self.name}: the entropy ({h:.4g} nats) is within 1% of its maximum log n = {cap:.4g} (n = {n}): "
                f"it is saturated and no longer tracks the geometry (the kernel width {extra['sigma']:.4g} is "
                "small next to the distances between points; pass a larger --param matrix-entropy.sigma=S).",
                RuntimeWarning, stacklevel=2)
        return self._make(h, n=n, dims=(d,), cap=cap, extra=extra)


@register
@dataclass(frozen=True)
class CodingRate(SingleEstimator):
    """Coding rate R(Z, eps) of MCR^2: bits-per-sample to code Z up to distortion eps (nats).

    Definition: R(Z, eps) = 1/2 logdet(I_d + d / (m eps^2) Z^T Z) for m samples (rows of
    Z) in d dimensions; computed on the smaller side via det(I_d + c Z^T Z) =
    det(I_m + c Z Z^T), in float64 (Cholesky-based slogdet).
    Convention: ``eps_sq`` is eps^2 (the 'eps' argument of the reference MCR^2 code is also
    eps^2; default 0.5 as in its supervised setup); rows are L2-normalised first when
    ``normalize`` (default, as MCR^2 features are), so R depends only on directions.
    Known answer: m unit vectors cycling over k orthogonal axes give k/2 log(1 + d/(k eps^2)).
    R grows with m and d: compare only at fixed m, d and eps.
    Unit: nats. Reference: Yu, Chan, You, Song & Ma 2020, Learning diverse and discriminative
    representations via the principle of maximal coding rate reduction, NeurIPS 33.
    """

    eps_sq: float = param(0.5, Real(gt=0))
    normalize: bool = param(True, Boolean())

    name: ClassVar[str] = "coding-rate"
    quantity: ClassVar[str] = "coding_rate"
    unit: ClassVar[str] = NATS
    reference: ClassVar[str] = ("Yu, Chan, You, Song & Ma 2020, Learning Diverse and Discriminative Representations via "
                                "the Principle of Maximal Coding Rate Reduction, NeurIPS 33 (arXiv:2006.08558)")

    def scale_invariant(self, arg: str) -> str | None:
        # rows are L2-normalised first when normalize
        return "global" if self.normalize else None

    def estimate(self, x: ArrayLike) -> Estimate:
        import torch

        t = as_tensor(x, name="x", estimator=self, allow_discrete=False)
        m, d = t.shape
        g, _side = second_moment(t, center=False, row_normalize=self.normalize)
        c = d / (m * self.eps_sq)
        mat = torch.eye(g.shape[0], dtype=torch.float64, device=g.device) + c * g
        sign, logdet = torch.linalg.slogdet(mat)
        if float(sign) <= 0:  # cannot happen for PSD g in exact arithmetic
            raise DataError(f"{self.name}: I + c Z^T Z is not positive definite (round-off); check the input scale.")
        return self._make(0.5 * float(logdet), n=m, dims=(d,), extra={"eps_sq": self.eps_sq})
