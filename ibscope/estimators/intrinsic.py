"""Intrinsic dimension from nearest-neighbour distances: TwoNN and MLE (Levina-Bickel).

Both estimators:

* compute exact float64 distances on the input's device (``knn_distances_exact``):
  candidates from the chunked k-NN kernel ``_knn.kth_neighbor_distances`` (fast GEMM form),
  certified against the GEMM's rounding-error bound, then the distances ``||x_i - x_j||``
  recomputed from coordinate differences, so near-duplicate points never get a zero or
  negative distance from cancellation;
* remove exact duplicate rows first (ReLU and quantised activations produce them; a
  single duplicate pair drives the harmonic-mean MLE to 0 and log(r2/r1) to infinity),
  with a warning that gives the count. ``dedupe=False`` turns duplicates into an error.

Unit: "dimensions". Both underestimate for large true dimension (d >~ 10) at practical n.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ibscope.errors import DataError
from ibscope.estimators import _knn
from ibscope.estimators._knn import kth_neighbor_distances
from ibscope.estimators.base import ArrayLike, Estimate, SingleEstimator, SingleMixinBase, as_tensor
from ibscope.estimators.params import Boolean, Integer, OneOf, Real, param
from ibscope.estimators.registry import register

if TYPE_CHECKING:
    import torch

#: extra candidates fetched by the fast (GEMM) distance pass before exact re-ranking
CANDIDATE_MARGIN = 8
#: bytes of float64 differences held at once during the exact re-ranking
REFINE_BYTES = 64 * 2**20


def deduplicate(x64: torch.Tensor, *, who: str, dedupe: bool = True) -> tuple[torch.Tensor, int]:
    """``x64`` with exact duplicate rows removed; returns (x_unique, n_removed).

    Warns with the count (or raises :class:`DataError` when ``dedupe`` is False).
    """
    import torch

    uniq = torch.unique(x64, dim=0)
    removed = int(x64.shape[0] - uniq.shape[0])
    if removed:
        if not dedupe:
            raise DataError(
                f"{who}: the data hold {removed} duplicate row(s) out of {x64.shape[0]}; identical points have "
                "nearest-neighbour distance 0, which makes the estimate degenerate.",
                hint="Keep the default dedupe=true (removes them with a warning), or pass distinct points.")
        warnings.warn(
            f"{who}: removed {removed} duplicate row(s) out of {x64.shape[0]} (identical points have "
            f"nearest-neighbour distance 0); estimating on the {uniq.shape[0]} distinct points.",
            RuntimeWarning, stacklevel=4)
    return uniq, removed


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Unit round-off of a GEMM in ``dtype``, allowing for TF32/bf16 float32 matmuls."""
    import torch

    if dtype == torch.float32:
        prec = torch.get_float32_matmul_precision()
        return {"highest": 2.0 ** -24, "high": 2.0 ** -11}.get(prec, 2.0 ** -8)
    return torch.finfo(dtype).eps / 2


def knn_distances_exact(x64: torch.Tensor, k: int, *, candidate_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sorted exact distances (n, k) from each row of float64 ``x64`` to its k nearest other rows.

    1. Candidates: the ``k + CANDIDATE_MARGIN`` nearest rows by the chunked GEMM-form k-NN
       kernel (``_knn.kth_neighbor_distances``) in ``candidate_dtype`` (float32 by default:
       twice the speed of a float64 GEMM), on centred data.
    2. Certification: the GEMM error on a squared distance is at most
       (D + 2) u (||x_i|| + ||x_j||)^2 (u = unit round-off). A row whose k-th and last
       candidates are separated by more than twice that bound provably has its k nearest
       neighbours among the candidates; other rows (near-ties at the precision of the
       GEMM) get exact distances to all rows.
    3. Exact float64 distances ||x_i - x_j|| of the candidates from coordinate
       differences (no cancellation: near-duplicates keep their tiny positive distances).
    """
    import torch

    n, d = x64.shape
    cdt = candidate_dtype or torch.float32
    xc = x64 - x64.mean(0)
    kk = min(k + CANDIDATE_MARGIN, n - 1)
    dg, idx = kth_neighbor_distances(xc.to(cdt), kk, metric="sqeuclidean_mm", return_all=True, return_indices=True)
    exact = torch.empty((n, kk), dtype=torch.float64, device=x64.device)
    step = max(1, REFINE_BYTES // (8 * kk * max(1, d)))
    buf = torch.empty((min(n, step) * kk, d), dtype=torch.float64, device=x64.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        g = torch.index_select(xc, 0, idx[s:e].reshape(-1), out=buf[:(e - s) * kk]).view(e - s, kk, d)
        g.sub_(xc[s:e].unsqueeze(1))
        exact[s:e] = torch.linalg.vector_norm(g, dim=-1)
    out = torch.sort(exact, dim=1).values[:, :k].contiguous()
    if kk < n - 1:  # with kk == n - 1 every other row is a candidate: nothing to certify
        norms = torch.linalg.vector_norm(xc, dim=1)
        bound = (d + 2) * _unit_roundoff(cdt) * (norms + norms.max()) ** 2
        unsure = ((dg[:, kk - 1].to(torch.float64) - dg[:, k - 1].to(torch.float64)) <= 2 * bound).nonzero().squeeze(1)
        if unsure.numel():
            full = kth_neighbor_distances(xc[unsure], k + 1, ref=xc, metric="l2", exclude_self=False, return_all=True)
            out[unsure] = full[:, 1:]  # column 0 is the row itself (distance exactly 0)
    return out


def knn_distances(x64: torch.Tensor, k: int, *, search: str = "auto",
                  who: str = "intrinsic dimension") -> tuple[torch.Tensor, str]:
    """(sorted exact distances (n, k) to the k nearest other rows, the search used).

    ``search``: "tree" (scipy's cKDTree, float64 distances from coordinate differences; CPU),
    "brute" (:func:`knn_distances_exact`, any device) or "auto" (the tree on CPU for at most
    ``_knn.KNN_TREE_MAX_DIMS`` features and n >= ``_knn.TREE_MIN_N``). Both are exact float64
    distances; they agree to a few units in the last place (the sums of squares are added in a
    different order), tested to 1e-12 relative."""
    import torch

    how = _knn.resolve_search(who, search, device=x64.device, n=x64.shape[0], dims=x64.shape[1],
                              max_tree_dims=_knn.KNN_TREE_MAX_DIMS)
    if how == "tree":
        d, _ = _knn.tree_knn(x64.cpu().numpy(), k, p=2.0)
        return torch.from_numpy(np.ascontiguousarray(d)), how
    return knn_distances_exact(x64, k), how


class _IDMixin(SingleMixinBase):
    if TYPE_CHECKING:
        search: str
        dedupe: bool

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        return "undefined"  # one point has no dimension: a DataError, never NaN

    def scale_invariant(self, arg: str) -> str | None:
        # ratios of neighbour distances: unchanged by one global scale
        return "global"

    def _neighbors(self, x: ArrayLike, k: int) -> tuple[torch.Tensor, int, int, int, int, str]:
        """Exact k-NN distances of the distinct rows; (distances, n_input, n_distinct, removed, d, search)."""
        t = as_tensor(x, name="x", estimator=self, allow_discrete=False)
        import torch

        n0, d = int(t.shape[0]), int(t.shape[1])
        if n0 < k + 2:
            raise DataError(f"{self.name}: needs at least {k + 2} distinct points; got {n0}.",
                            hint="Use more probe samples (capture --max-samples) or a smaller k.")
        x64 = t.to(torch.float64)
        dist, how = knn_distances(x64, k, search=self.search, who=self.name)
        removed, n = 0, n0
        if bool((dist[:, 0] == 0).any()):  # an exact zero distance means identical rows
            xu, removed = deduplicate(x64, who=self.name, dedupe=self.dedupe)
            n = int(xu.shape[0])
            if n < k + 2:
                raise DataError(
                    f"{self.name}: needs at least {k + 2} distinct points; got {n} ({removed} duplicates removed "
                    f"from {n0}).", hint="Use more probe samples (capture --max-samples) or a smaller k.")
            dist, _ = knn_distances(xu, k, search=how, who=self.name)
        return dist, n0, n, removed, d, how


@register
@dataclass(frozen=True)
class TwoNN(_IDMixin, SingleEstimator):
    """TwoNN intrinsic dimension from the ratio of 2nd to 1st nearest-neighbour distances.

    Definition: mu_i = r2(i) / r1(i) follows a Pareto law F(mu) = 1 - mu^(-d) on a
    d-dimensional manifold (locally uniform density).
    Convention (``fit``):
      * "lsq" (default): least-squares slope through the origin of -log(1 - F_emp) on log mu
        after discarding the largest ``discard_fraction`` of the mu (default 0.1), with
        F_emp(i) = i / N for i = 1..N(1 - f): scikit-dimension's TwoNN after its PR #28 (the
        older convention starting at 0/N gives different values at small N);
      * "ml": the maximum-likelihood estimate d = (N - 1) / sum_i log mu_i (DADApy
        algorithm='ml'), using all points.
    ``search``: "auto" | "brute" | "tree", the nearest-neighbour search (same distances).
    Unit: dimensions. Reference: Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140.
    """

    discard_fraction: float = param(0.1, Real(gt=0, lt=1))
    fit: str = param("lsq", OneOf("lsq", "ml"))
    dedupe: bool = param(True, Boolean())
    search: str = param("auto", OneOf(*_knn.SEARCHES))

    name: ClassVar[str] = "twonn"
    quantity: ClassVar[str] = "intrinsic_dimension"
    unit: ClassVar[str] = "dimensions"
    reference: ClassVar[str] = ("Facco, d'Errico, Rodriguez & Laio 2017, Estimating the intrinsic dimension of datasets "
                                "by a minimal neighborhood information, Sci. Rep. 7:12140")

    def estimate(self, x: ArrayLike) -> Estimate:
        import torch

        t, n0, n, removed, dim, how = self._neighbors(x, 2)
        logmu = torch.log(t[:, 1] / t[:, 0])
        if self.fit == "ml":
            s = float(logmu.sum())
            if s <= 0:
                raise DataError(f"{self.name}: every point has r2 == r1 (all log-ratios are 0); the ML estimate is "
                                "infinite. The data are a lattice or too coarsely quantised.")
            value = (n - 1) / s
            used = n
        else:
            keep = int(n * (1.0 - self.discard_fraction))
            if keep < 2:
                raise DataError(f"{self.name}: only {keep} ratios remain after discarding {self.discard_fraction:.0%} "
                                f"of {n} points.", hint="Use more samples or a smaller discard_fraction.")
            xs = torch.sort(logmu).values[:keep]
            f = torch.arange(1, keep + 1, dtype=torch.float64, device=xs.device) / n
            ys = -torch.log1p(-f)
            den = float(xs @ xs)
            if den <= 0:
                raise DataError(f"{self.name}: the kept log-ratios log(r2/r1) are all 0 (ties); the slope is "
                                "undefined. The data are a lattice or too coarsely quantised.")
            value = float(xs @ ys) / den
            used = keep
        return self._make(value, n=n0, dims=(dim,),
                          extra={"duplicates_removed": removed, "n_distinct": n, "n_fit": used,
                                 "search": how})


@register
@dataclass(frozen=True)
class MLEIntrinsicDimension(_IDMixin, SingleEstimator):
    """MLE intrinsic dimension (Levina-Bickel) from the k nearest-neighbour distances.

    Definition: per point, d_i = (k - 1) / sum_{j<k} log(T_k(i) / T_j(i)), T_j = distance
    to the j-th neighbour (``unbiased=True`` uses k - 2, Levina & Bickel's original).
    Aggregation (``aggregate``): "harmonic" (default; MacKay & Ghahramani's correction,
    1 / mean(1 / d_i), scikit-dimension comb='mle'), "mean" or "median" of the d_i.
    Default k = 20 (scikit-dimension's default). Reproduces scikit-dimension's regression
    fixture (3.341161830518472 for k=20) to 1e-12.
    ``search``: "auto" | "brute" | "tree", the nearest-neighbour search (same distances).
    Unit: dimensions. Reference: Levina & Bickel 2004, NeurIPS 17.
    """

    k: int = param(20, Integer(ge=2))
    aggregate: str = param("harmonic", OneOf("harmonic", "mean", "median"))
    unbiased: bool = param(False, Boolean())
    dedupe: bool = param(True, Boolean())
    search: str = param("auto", OneOf(*_knn.SEARCHES))

    name: ClassVar[str] = "mle-id"
    quantity: ClassVar[str] = "intrinsic_dimension"
    unit: ClassVar[str] = "dimensions"
    reference: ClassVar[str] = ("Levina & Bickel 2004, Maximum likelihood estimation of intrinsic dimension, NeurIPS 17; "
                                "MacKay & Ghahramani 2005 (harmonic aggregation)")

    def validate(self) -> None:
        self._require(self.k >= 3 or not self.unbiased, "k", "an integer >= 3 with unbiased=true", self.k)

    def estimate(self, x: ArrayLike) -> Estimate:
        import torch

        t, n0, n, removed, dim, how = self._neighbors(x, self.k)
        norm = self.k - (2 if self.unbiased else 1)
        inv = torch.log(t[:, -1:] / t[:, :-1]).sum(1) / norm  # = 1 / d_i
        if self.aggregate == "harmonic":
            m = float(inv.mean())
            if m <= 0:
                raise DataError(f"{self.name}: all k-NN distances are tied (T_j == T_k for every point); the "
                                "estimate is infinite. The data are a lattice or too coarsely quantised.")
            value = 1.0 / m
        else:
            di = torch.where(inv > 0, 1.0 / inv.clamp_min(1e-300), torch.full_like(inv, math.inf))
            if self.aggregate == "mean":
                value = float(di.mean())
            else:  # numpy's median: the mean of the two middle values for an even count
                v, h = torch.sort(di).values, n // 2
                value = float(v[h] if n % 2 else 0.5 * (v[h - 1] + v[h]))
            if not math.isfinite(value):
                raise DataError(f"{self.name}: some points have all k-NN distances tied, so their d_i is infinite "
                                f"and the {self.aggregate} is undefined.", hint="Use aggregate=harmonic.")
        return self._make(value, n=n0, dims=(dim,),
                          extra={"duplicates_removed": removed, "n_distinct": n, "k": self.k,
                                 "search": how})
