"""Matrix-based Renyi alpha-order mutual information (Sanchez Giraldo, Rao & Principe 2015).

Gram matrices K (Gaussian kernel of width sigma for continuous data, the delta kernel
1[y_i = y_j] for discrete data) are normalised to A = K / tr K, and

    S_alpha(A) = 1/(1 - alpha) log sum_i lambda_i(A)^alpha,
    I_alpha(A;B) = S_alpha(A) + S_alpha(B) - S_alpha(A o B / tr(A o B))   (o: Hadamard product)

in nats, bounded by log n (the cap). alpha = 1 is the von Neumann (Shannon) limit; alpha = 2
needs no eigendecomposition (sum lambda^2 = |A|_F^2). The eigendecomposition is O(n^3): above
``max_samples`` samples a seeded random subset of that size is used (recorded in extra).
The default kernel width is the median pairwise Euclidean distance (median heuristic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ibscope.estimators import _mi
from ibscope.estimators._knn import pairwise
from ibscope.estimators._linalg import nonzero
from ibscope.estimators.base import ArrayLike, Estimate, PairEstimator, is_discrete
from ibscope.estimators.params import Integer, Real, param
from ibscope.estimators.registry import register


def renyi_entropy(a: torch.Tensor, alpha: float) -> float:
    """S_alpha of a trace-1 PSD matrix, nats."""
    if alpha == 2.0:
        return -math.log(float((a * a).sum()))
    lam = torch.linalg.eigvalsh(a).clamp(min=0)
    lam = lam / lam.sum()
    if alpha == 1.0:
        lam = nonzero(lam, lam.numel(), lam.numel())  # round-off zeros (_linalg.rank_tolerance)
        return float(-(lam * lam.log()).sum())
    return float(torch.log((lam ** alpha).sum()) / (1.0 - alpha))


@register
@dataclass(frozen=True)
class Renyi(PairEstimator):
    """Matrix-based Renyi alpha-entropy MI (Giraldo et al. 2015); not Shannon MI for alpha != 1.

    ``alpha`` > 0 (1.01 as in Wickstroem et al.; 1 = von Neumann limit; 2 = fast Frobenius
    path); ``sigma_x``/``sigma_y`` Gaussian kernel widths (None: median pairwise distance);
    ``max_samples`` above which a seeded subset (``seed``) is used. Cap: log n.
    """

    alpha: float = param(1.01, Real(gt=0))
    sigma_x: float | None = param(None, Real(gt=0), optional=True)
    sigma_y: float | None = param(None, Real(gt=0), optional=True)
    max_samples: int = param(2000, Integer(ge=2))
    seed: int = param(0, Integer())

    name: ClassVar[str] = "renyi"
    reference: ClassVar[str] = "Sanchez Giraldo, Rao & Principe 2015, IEEE Trans. Inf. Theory 61(1):535"
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # the default width is the median pairwise distance, so K depends on d / sigma only
        return "global" if (self.sigma_x if arg == "x" else self.sigma_y) is None else None

    def _gram(self, t: torch.Tensor, sigma: float | None, name: str) -> tuple[torch.Tensor, float | None]:
        if is_discrete(t):
            c = _mi.codes(t)
            k = (c[:, None] == c[None, :]).to(torch.float64)
            return k / k.trace(), None
        _mi.warn_integer_valued(self, t, name)
        t = t.to(torch.float64)
        d2 = pairwise(t, t, "sqeuclidean")
        if sigma is None:
            n = t.shape[0]
            off = d2[~torch.eye(n, dtype=torch.bool, device=t.device)]
            sigma = float(off.sqrt().median())
            if sigma == 0.0:
                sigma = 1.0  # all rows identical: the Gram matrix is all ones for any width
        k = torch.exp(-d2 / (2.0 * float(sigma) ** 2))
        return k / k.trace(), float(sigma)

    def _constant_cap(self, *tensors: torch.Tensor) -> float | None:
        return math.log(min(int(tensors[0].shape[0]), self.max_samples))

    def cap_name(self, quantity: str) -> str:
        return "log n"

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        tx, ty = _mi.pair(self, x, y)
        if tx.shape[0] > self.max_samples or tx.shape[0] < 2:
            # a permuted y meets another random subset of x: re-estimate each permutation
            return super().null_values(tx, ty, permutations)
        # both Gram matrices and S(A), S(B) are computed once: permuting y permutes B's rows and
        # columns, which leaves its spectrum unchanged; only the joint entropy is recomputed
        a, _ = self._gram(tx, self.sigma_x, "x")
        b, _ = self._gram(ty, self.sigma_y, "y")
        al = float(self.alpha)
        sa, sb = renyi_entropy(a, al), renyi_entropy(b, al)
        out = []
        for p in permutations:
            p = p.to(b.device)
            ab = a * b[p][:, p]
            out.append(sa + sb - renyi_entropy(ab / ab.trace(), al))
        return out

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        tx, ty = _mi.pair(self, x, y)
        n0 = tx.shape[0]
        _mi.require_samples(self, n0, 2, "a Gram matrix needs two samples")
        extra: dict[str, Any] = {}
        if n0 > self.max_samples:
            g = torch.Generator(device="cpu").manual_seed(int(self.seed))
            idx = torch.randperm(n0, generator=g)[: self.max_samples].to(tx.device)
            tx, ty = tx[idx], ty[idx]
            extra["subsampled_from"] = n0
        a, sx = self._gram(tx, self.sigma_x, "x")
        b, sy = self._gram(ty, self.sigma_y, "y")
        ab = a * b
        ab = ab / ab.trace()
        al = float(self.alpha)
        mi = renyi_entropy(a, al) + renyi_entropy(b, al) - renyi_entropy(ab, al)
        n = tx.shape[0]
        extra.update(sigma_x=sx, sigma_y=sy)
        return self._make(mi, n=n, dims=(tx.shape[1], ty.shape[1]), cap=math.log(n), extra=extra)
