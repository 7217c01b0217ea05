"""Intrinsic dimension from nearest-neighbour distances: TwoNN and MLE (Levina-Bickel).

Both estimators:

* compute in float64 on the input's device, with the chunked k-NN kernel of
  ``_knn.kth_neighbor_distances`` (candidates by the fast matrix-multiply form, then the
  exact distances ``||x_i - x_j||`` recomputed by differences for those candidates, so
  near-duplicate points never get a zero or negative distance from cancellation);
* remove exact duplicate rows first (ReLU and quantised activations produce them; a
  single duplicate pair drives the harmonic-mean MLE to 0 and log(r2/r1) to infinity),
  with a warning that gives the count. ``dedupe=False`` turns duplicates into an error.

Unit: "dimensions". Both underestimate for large true dimension (d >~ 10) at practical n.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

from ibscope.errors import DataError
from ibscope.estimators._knn import kth_neighbor_distances
from ibscope.estimators.base import Estimate, Estimator, as_tensor
from ibscope.estimators.registry import register

#: extra candidates fetched by the fast (GEMM) distance pass before exact re-ranking
CANDIDATE_MARGIN = 8
#: bytes of float64 differences held at once during the exact re-ranking
REFINE_BYTES = 64 * 2**20


def deduplicate(x, *, who: str, dedupe: bool = True):
    """``x`` in float64 with exact duplicate rows removed; returns (x_unique, n_removed)."""
    import torch

    x64 = x.to(torch.float64)
    uniq = torch.unique(x64, dim=0)
    removed = int(x64.shape[0] - uniq.shape[0])
    if removed:
        if not dedupe:
            raise DataError(
                f"{who}: the data hold {removed} duplicate row(s) out of {x64.shape[0]}; identical points have "
                "nearest-neighbour distance 0, which makes the estimate degenerate.",
                hint=f"Keep the default dedupe=true (removes them with a warning), or pass distinct points.")
        warnings.warn(
            f"{who}: removed {removed} duplicate row(s) out of {x64.shape[0]} (identical points have "
            f"nearest-neighbour distance 0); estimating on the {uniq.shape[0]} distinct points.",
            RuntimeWarning, stacklevel=3)
    return uniq, removed


def knn_distances_exact(x64, k: int):
    """Sorted distances (n, k) from each row of float64 ``x64`` to its k nearest other rows.

    Candidates come from the chunked GEMM-form k-NN kernel (on centred data, to limit
    cancellation); the exact Euclidean distances of the k + margin candidates are then
    recomputed from coordinate differences and re-sorted.
    """
    import torch

    n, d = x64.shape
    xc = x64 - x64.mean(0)
    kk = min(k + CANDIDATE_MARGIN, n - 1)
    _, idx = kth_neighbor_distances(xc, kk, metric="sqeuclidean_mm", return_all=True, return_indices=True)
    out = torch.empty((n, k), dtype=torch.float64, device=x64.device)
    step = max(1, REFINE_BYTES // (8 * kk * max(1, d)))
    for s in range(0, n, step):
        e = min(n, s + step)
        diff = xc[idx[s:e]] - xc[s:e, None, :]
        dist = diff.square_().sum(-1).sqrt_()
        out[s:e] = torch.sort(dist, dim=1).values[:, :k]
    return out


class _IDMixin:
    def _prepare(self, x, k: int):
        t = as_tensor(x, name="x", estimator=self.name, allow_discrete=False)
        n0 = int(t.shape[0])
        xu, removed = deduplicate(t, who=self.name, dedupe=self.dedupe)
        n = int(xu.shape[0])
        if n < k + 2:
            raise DataError(
                f"{self.name}: needs at least {k + 2} distinct points; got {n}"
                + (f" ({removed} duplicates removed from {n0})." if removed else "."),
                hint="Use more probe samples (capture --max-samples) or a smaller k.")
        return xu, n0, removed


@register
@dataclass(frozen=True)
class TwoNN(_IDMixin, Estimator):
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
    Unit: dimensions. Reference: Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140.
    """

    discard_fraction: float = 0.1
    fit: str = "lsq"
    dedupe: bool = True

    name: ClassVar[str] = "twonn"
    kind: ClassVar[str] = "single"
    quantity: ClassVar[str] = "intrinsic_dimension"
    unit: ClassVar[str] = "dimensions"
    reference: ClassVar[str] = ("Facco, d'Errico, Rodriguez & Laio 2017, Estimating the intrinsic dimension of datasets "
                                "by a minimal neighborhood information, Sci. Rep. 7:12140")

    def validate(self) -> None:
        self._require(self.fit in ("lsq", "ml"), "fit", "'lsq' or 'ml'", self.fit)
        self._require(0.0 < self.discard_fraction < 1.0, "discard_fraction", "in (0, 1)", self.discard_fraction)

    def estimate(self, x) -> Estimate:
        import torch

        xu, n0, removed = self._prepare(x, 2)
        n = int(xu.shape[0])
        t = knn_distances_exact(xu, 2)
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
        return self._make(value, n=n0, dims=(int(xu.shape[1]),),
                          extra={"duplicates_removed": removed, "n_distinct": n, "n_fit": used})


@register
@dataclass(frozen=True)
class MLEIntrinsicDimension(_IDMixin, Estimator):
    """MLE intrinsic dimension (Levina-Bickel) from the k nearest-neighbour distances.

    Definition: per point, d_i = (k - 1) / sum_{j<k} log(T_k(i) / T_j(i)), T_j = distance
    to the j-th neighbour (``unbiased=True`` uses k - 2, Levina & Bickel's original).
    Aggregation (``aggregate``): "harmonic" (default; MacKay & Ghahramani's correction,
    1 / mean(1 / d_i), scikit-dimension comb='mle'), "mean" or "median" of the d_i.
    Default k = 20 (scikit-dimension's default). Reproduces scikit-dimension's regression
    fixture (3.341161830518472 for k=20) to 1e-12.
    Unit: dimensions. Reference: Levina & Bickel 2004, NeurIPS 17.
    """

    k: int = 20
    aggregate: str = "harmonic"
    unbiased: bool = False
    dedupe: bool = True

    name: ClassVar[str] = "mle-id"
    kind: ClassVar[str] = "single"
    quantity: ClassVar[str] = "intrinsic_dimension"
    unit: ClassVar[str] = "dimensions"
    reference: ClassVar[str] = ("Levina & Bickel 2004, Maximum likelihood estimation of intrinsic dimension, NeurIPS 17; "
                                "MacKay & Ghahramani 2005 (harmonic aggregation)")

    def validate(self) -> None:
        self._require(self.k >= (3 if self.unbiased else 2), "k", f">= {3 if self.unbiased else 2}", self.k)
        self._require(self.aggregate in ("harmonic", "mean", "median"), "aggregate", "'harmonic', 'mean' or 'median'",
                      self.aggregate)

    def estimate(self, x) -> Estimate:
        import torch

        xu, n0, removed = self._prepare(x, self.k)
        n = int(xu.shape[0])
        t = knn_distances_exact(xu, self.k)
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
        return self._make(value, n=n0, dims=(int(xu.shape[1]),),
                          extra={"duplicates_removed": removed, "n_distinct": n, "k": self.k})
