"""Kolchinsky-Tracey pairwise-distance bounds on the information of a noisy representation.

Model (Saxe et al. 2018): T_noisy = T + N(0, sigma^2 I), X uniform over the n samples, so
T_noisy is an n-component Gaussian mixture and (Kolchinsky & Tracey 2017)

    I_upper(X;T) = -(1/n) sum_i log[(1/n) sum_j exp(-|t_i - t_j|^2 / (2 sigma^2))]   (KL)
    I_lower(X;T) = same with 4 sigma^2 in place of sigma^2                            (Bhattacharyya)

both in [0, log n]. For class labels Y, I(T;Y) = H(T) - sum_y p(y) H(T | Y=y) with the same
entropy bound on each side; that difference of two bounds is NOT itself a bound.

The sums run over row chunks: memory O(chunk x n), float64 log-sum-exp.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ibscope.errors import UsageError
from ibscope.estimators import _mi
from ibscope.estimators._knn import _auto_chunk, pairwise
from ibscope.estimators.base import ArrayLike, Estimate, PairEstimator, PairMixinBase
from ibscope.estimators.params import Boolean, Integer, OneOf, Real, param
from ibscope.estimators.registry import register, register_alias

REFERENCE = "Kolchinsky & Tracey 2017, Entropy 19(7):361; Saxe et al. 2018, ICLR"


def _float32_safe(t: torch.Tensor, variance: float) -> bool:
    """True when the centred data and 1 / variance sit well inside float32's range (squared
    distances neither overflow nor underflow; the hi/lo split keeps its precision)."""
    if t.numel() == 0:
        return False
    r = float((t - t.to(torch.float64).mean(0).to(t.dtype)).abs().max())
    scale = 0.5 / float(variance)
    return (r == 0.0 or 1e-15 <= r <= 1e15) and 1e-30 <= scale <= 1e30 and r * r * scale * t.shape[1] <= 1e36


def kde_terms(t: torch.Tensor, variance: float, chunk: int | None = None, precision: str = "auto") -> torch.Tensor:
    """Per-sample -log[(1/n) sum_j exp(-|t_i - t_j|^2 / (2 variance))] (float64, shape (n,)).

    ``precision``: "float64" (exact float64 distances, on any device), "float32" (CPU: squared
    distances in float32 from coordinate differences of the centred data, exp and sums in
    float64: ``_cpu.kde_log_sums``) or "auto" (float32 on CPU when numba is available, float64
    elsewhere, and for data or variances beyond float32's safe range). Measured error of the float32 path on the estimate: < 1e-6 relative on
    tests/test_knn_search.py's grid (d 1-100, sigma^2 1e-3-1, tanh and ReLU-like layers), and
    < 1e-8 nats absolute; typically 1e-9 relative."""
    n = t.shape[0]
    if precision == "auto":
        from ibscope.estimators import _cpu

        precision = "float32" if (t.device.type == "cpu" and _cpu.available() and _float32_safe(t, variance)) \
            else "float64"
    if precision == "float32":
        from ibscope.estimators import _cpu

        if t.device.type != "cpu":
            raise ValueError("kde_terms: precision='float32' is the CPU kernel; use 'float64' on other devices.")
        tc = t.to(torch.float64)
        centred = (tc - tc.mean(0)).numpy()  # smaller coordinates, smaller rounding to float32
        lse = _cpu.kde_log_sums(centred, 0.5 / variance, chunk=chunk or 1024)
        return torch.from_numpy(math.log(n) - lse)
    t = t.to(torch.float64)
    chunk = chunk or _auto_chunk(n, 1, 8)
    out = torch.empty(n, dtype=torch.float64, device=t.device)
    for s in range(0, n, chunk):
        # log-sum-exp in place. Exponents more than 60 below a row's maximum are clamped there:
        # each such term is < e^-60 = 9e-27 of the largest, far below float64 resolution even
        # summed over 10^8 samples, and skipping the deep underflow of exp() halves the time.
        a = pairwise(t[s:s + chunk], t, "sqeuclidean").mul_(-0.5 / variance)
        m = a.max(dim=1, keepdim=True).values
        a.sub_(m).clamp_(min=-60.0).exp_()
        out[s:s + chunk] = math.log(n) - (m.squeeze(1) + torch.log(a.sum(dim=1)))
    return out


#: largest one-hot matrix (samples x labellings x classes, float64: 64 MiB) used by kde_pass
ONEHOT_MAX_ENTRIES = 2 ** 23


def kde_pass(t: torch.Tensor, variance: float, label_sets: list[torch.Tensor],
             chunk: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """One pass over the kernel blocks: the per-sample terms of H(T) and, for every labelling
    in ``label_sets``, sum_y p(y) H(T | Y = y), by the KDE bound with ``variance`` (float64).

    Each block K_ij = exp(-|t_i - t_j|^2 / (2 variance)) is computed once (exponents below -60
    clamped there, as in :func:`kde_terms`: each such term is < 9e-27 of the self-term 1). Its
    row sums give H(T); its within-class sums give the conditional entropies, for all
    labellings at once (one matrix product with their one-hot codes when those hold at most
    ONEHOT_MAX_ENTRIES entries, else labelling by labelling). The labellings must have the same
    class sizes (permutations of one labelling do). A class of one sample contributes exactly
    0. Equals :func:`kde_terms` on all samples and on each class to round-off.
    """
    t = t.to(torch.float64)
    n = t.shape[0]
    chunk = chunk or _auto_chunk(n, 1, 8)
    terms = torch.empty(n, dtype=torch.float64, device=t.device)
    labs = torch.stack([c.to(t.device) for c in label_sets]) if label_sets else None  # (L, n)
    onehot = None
    if labs is not None:
        n_lab, n_cls = labs.shape[0], int(labs.max()) + 1
        log_counts = torch.log(torch.bincount(labs[0], minlength=n_cls).to(torch.float64).clamp_min(1.0))
        if n * n_lab * n_cls <= ONEHOT_MAX_ENTRIES:
            cols = labs + n_cls * torch.arange(n_lab, device=t.device)[:, None]
            onehot = torch.zeros((n, n_lab * n_cls), dtype=torch.float64, device=t.device)
            onehot.scatter_(1, cols.T.contiguous(), 1.0)
        cond = torch.zeros(n_lab, dtype=torch.float64, device=t.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k = pairwise(t[s:e], t, "sqeuclidean").mul_(-0.5 / variance).clamp_(min=-60.0).exp_()
        terms[s:e] = math.log(n) - torch.log(k.sum(dim=1))
        if labs is None:
            continue
        own = labs[:, s:e]  # (L, rows)
        if onehot is not None:
            within = (k @ onehot).reshape(e - s, n_lab, n_cls).gather(2, own.T.unsqueeze(2)).squeeze(2).T
        else:
            within = torch.stack([torch.where(c.unsqueeze(0) == o.unsqueeze(1), k, 0.0).sum(dim=1)
                                  for c, o in zip(labs, own)])
        cond += (log_counts[own] - torch.log(within)).sum(dim=1)
    return terms, ([] if labs is None else (cond / n).tolist())


#: the two Kolchinsky-Tracey bounds: KL ("upper") and Bhattacharyya ("lower")
BOUND = OneOf("upper", "lower")


class _KDEMixin(PairMixinBase):
    x_source: ClassVar[str] = "identity"
    bound: str = "upper"

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        # I = 0 for a constant side (also for chelombiev-kde, whose added noise would otherwise
        # be measured); two continuous sides stay a usage error
        return "zero" if any(not t.is_floating_point() for t in tensors) else None

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        """The representation the bound is computed on (float64); identity unless overridden."""
        return t

    @abc.abstractmethod
    def _variance(self, t: torch.Tensor) -> float:
        """The noise variance for activations ``t`` (each concrete estimator defines it)."""

    def _bound(self) -> str:
        return self.bound

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        return self.estimate_and_null(x, y, [])[0]

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        return self.estimate_and_null(x, y, permutations)[1]

    def estimate_and_null(self, x: ArrayLike, y: ArrayLike,
                          permutations: list[torch.Tensor]) -> tuple[Estimate, list[float]]:
        # the noise variance, every kernel block and H(T) do not depend on the labels: one pass
        # over the blocks gives the conditional entropies of the labels and of every permutation
        tx, ty = _mi.pair(self, x, y)
        split = _mi.split_discrete(self, tx, ty)
        if split is None:
            raise UsageError(
                f"{self.name}: one of x, y must be discrete (integer sample ids or class labels); both are continuous.",
                hint="The KDE bounds measure I(X;T) with X = sample identity, or I(T;Y) with class labels. "
                     "For two continuous variables use 'ksg' or 'gaussian'.",
            )
        t, lab, swapped = split
        t = self._prepare(t.to(torch.float64))
        var = float(self._variance(t))
        eff = var if self._bound() == "upper" else 4.0 * var
        c = _mi.codes(lab)
        n = t.shape[0]
        unique = int(torch.bincount(c).max()) == 1  # every sample its own class (sample ids): H(T|X) = 0
        # the rows of y are permuted; when the labels are x, the same pairs come from permuting
        # the labels by the inverse permutation
        perms = [torch.argsort(p) if swapped else p for p in permutations]
        sets = [] if unique else [c] + [c[p.to(c.device)] for p in perms]
        terms, conds = kde_pass(t, eff, sets)
        h = float(terms.mean())
        cond = 0.0 if unique else conds[0]
        stderr = float(terms.std() / math.sqrt(n)) if n > 1 and unique else None
        dims = (lab.shape[1], t.shape[1]) if swapped else (t.shape[1], lab.shape[1])
        e = self._make(h - cond, n=n, dims=dims, cap=_mi.entropy_codes(c), stderr=stderr,
                       extra={"noise_variance": var, "bound": self._bound(), "H_T_minus_noise": h})
        # permuting the ids of distinct samples changes nothing: the null is the value itself
        return e, ([h] * len(permutations) if unique else [h - v for v in conds[1:]])


@register
@dataclass(frozen=True)
class KDE(_KDEMixin, PairEstimator):
    """KDE pairwise-distance bound on I with Gaussian noise of variance sigma^2 (Saxe et al.).

    ``bound="upper"`` (KL) or ``"lower"`` (Bhattacharyya); ``noise_variance`` = sigma^2 in the
    units of the activations (Saxe et al.: 1e-3 for the 12-bit network, 1e-1 for MNIST).
    I(X;T) for n distinct inputs lies in [0, log n] (the cap).
    """

    noise_variance: float = param(1e-3, Real(gt=0))
    bound: str = param("upper", BOUND)

    name: ClassVar[str] = "kde"
    reference: ClassVar[str] = REFERENCE

    def _variance(self, t: torch.Tensor) -> float:
        return float(self.noise_variance)


@register
@dataclass(frozen=True)
class AdaptiveKDE(_KDEMixin, PairEstimator):
    """ibscope's adaptive KDE bound: sigma^2 scaled to each layer's activity.

    sigma^2 = relative_variance * s^2, with s = max |T| (``scale="max"``, the layer's range)
    or the mean per-unit standard deviation (``scale="std"``), recomputed for every layer and
    checkpoint. The resolved sigma^2 is in extra["noise_variance"].
    This is ibscope's own variant of the idea of Chelombiev et al. 2019 (a noise level that
    follows the layer's range). It is NOT their released procedure, which uses a fixed
    sigma^2 = 0.01 on |T + N(0, 0.01^2)|: that is ``chelombiev-kde``. The two can differ by
    several bits on the same layer (docs/estimators.md has measured examples).
    """

    relative_variance: float = param(1e-3, Real(gt=0))
    scale: str = param("max", OneOf("max", "std"))
    bound: str = param("upper", BOUND)

    name: ClassVar[str] = "adaptive-kde"
    reference: ClassVar[str] = ("ibscope variant (sigma^2 proportional to the layer's scale), after Chelombiev, "
                                "Houghton & O'Donnell 2019, ICLR; their released procedure is chelombiev-kde; "
                                + REFERENCE)

    def scale_invariant(self, arg: str) -> str | None:
        # sigma^2 follows the layer's own scale (max |T| or its std)
        return "global"

    def _variance(self, t: torch.Tensor) -> float:
        s = float(t.abs().max()) if self.scale == "max" else float(t.std(dim=0).mean()) if t.shape[0] > 1 else 0.0
        if s == 0.0:
            s = 1.0  # a constant layer: every distance is 0 and I = 0 for any sigma
        return float(self.relative_variance) * s * s


@register
@dataclass(frozen=True)
class ChelombievKDE(_KDEMixin, PairEstimator):
    """KDE bound as in Chelombiev et al.'s released code: fixed sigma^2 on |T + noise|.

    Procedure of ``calc_kde_info_for_layer`` (ivansche/adaptive_estimators): one draw of
    Gaussian noise of standard deviation ``perturbation_std`` (0.01) is added to the
    activations, the absolute value is taken (``absolute``), and the Kolchinsky-Tracey bound
    (``bound``: KL upper / Bhattacharyya lower) with the fixed ``noise_variance`` sigma^2 =
    0.01 is computed on the result; I(T;Y) = H(T) - sum_y p(y) H(T|y) from the same draw.
    Their code draws unseeded noise and supports two classes; here the draw is seeded
    (``seed``, on the CPU, so every device gets the same numbers) and any number of classes
    works (identical for two). Their code reports bits; ibscope nats.
    """

    noise_variance: float = param(0.01, Real(gt=0))
    perturbation_std: float = param(0.01, Real(ge=0))
    absolute: bool = param(True, Boolean())
    seed: int = param(0, Integer())
    bound: str = param("upper", BOUND)

    name: ClassVar[str] = "chelombiev-kde"
    reference: ClassVar[str] = ("Chelombiev, Houghton & O'Donnell 2019, ICLR (code: ivansche/adaptive_estimators, "
                                "calc_kde_info_for_layer); " + REFERENCE)

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        if self.perturbation_std > 0:
            g = torch.Generator(device="cpu").manual_seed(int(self.seed))
            noise = torch.randn(tuple(t.shape), generator=g, dtype=torch.float64)
            t = t + float(self.perturbation_std) * noise.to(t.device)
        return t.abs() if self.absolute else t

    def _variance(self, t: torch.Tensor) -> float:
        return float(self.noise_variance)


# the bound pinned in the name: registry aliases (results keep these names in their 'estimator' column)
register_alias("kde-upper", KDE, bound="upper",
               summary="KDE upper bound (KL pairwise distance) on I with noise variance sigma^2 (Saxe et al.).")
register_alias("kde-lower", KDE, bound="lower",
               summary="KDE lower bound (Bhattacharyya pairwise distance) on I with noise variance sigma^2.")
register_alias("adaptive-kde-upper", AdaptiveKDE, bound="upper",
               summary="Adaptive KDE upper bound (sigma^2 scaled to the layer's activity).")
register_alias("adaptive-kde-lower", AdaptiveKDE, bound="lower",
               summary="Adaptive KDE lower bound (sigma^2 scaled to the layer's activity).")
register_alias("chelombiev-kde-upper", ChelombievKDE, bound="upper",
               summary="Chelombiev et al.'s released KDE procedure, KL upper bound (fixed sigma^2 on |T + noise|).")
register_alias("chelombiev-kde-lower", ChelombievKDE, bound="lower",
               summary="Chelombiev et al.'s released KDE procedure, Bhattacharyya lower bound.")
