"""Binning estimators: fixed-width bins (Shwartz-Ziv & Tishby 2017) and equal-mass bins
(entropy-based adaptive binning, Chelombiev, Houghton & O'Donnell 2019).

Every continuous value is replaced by its bin index, each row of bin indices becomes one
discrete symbol, and I(A;B) = H(A) + H(B) - H(A,B) with plug-in entropies (nats). With X the
sample identity (n distinct ids) this is I(X;T) = H(T_binned) <= log n, the literature's
quantity; with Y class labels it is H(T) - H(T|Y) <= H(Y). Integer inputs are already
discrete and are used as they are.

Values outside an explicit range go into the first or last bin (they are never wrapped
around, unlike the reference code's ``digitize`` on a fixed [-1, 1] grid); how many did so
is reported in ``Estimate.extra["n_outside"]`` and in a warning (``ibscope estimate`` puts it
in the row's note).
"""

from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ibscope.estimators import _mi
from ibscope.estimators.base import Estimate, Estimator, is_discrete
from ibscope.estimators.registry import register


#: largest contingency table (symbols of x times symbols of y times permutations) that the
#: permutation null counts in one bincount; larger ones are counted permutation by permutation
NULL_TABLE_CELLS = 2 ** 22  # 32 MiB of int64 counts


class _BinningMixin:
    x_source: ClassVar[str] = "identity"

    @abc.abstractmethod
    def _bin(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Bin the activations ``t``: (symbols per row, number of bins) (each concrete estimator defines it)."""

    def _symbols(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One symbol per row (codes) and the number of values clamped into an edge bin."""
        if is_discrete(t):
            return _mi.codes(t), 0
        b, o = self._bin(t)
        return _mi.codes(b), o

    @staticmethod
    def _mi_from(ha: float, hb: float, a: torch.Tensor, b: torch.Tensor) -> float:
        mi = ha + hb - _mi.entropy_codes(_mi.joint_codes(a, b))
        return max(mi, 0.0) if abs(mi) < 1e-12 else mi

    def estimate(self, x, y) -> Estimate:
        return self._estimate(*self._prepared(x, y))

    def _prepared(self, x, y):
        tx, ty = _mi.pair(self, x, y)
        (sx, ox), (sy, oy) = self._symbols(tx), self._symbols(ty)
        return tx, ty, sx, sy, ox, oy, _mi.entropy_codes(sx), _mi.entropy_codes(sy)

    def _estimate(self, tx, ty, sx, sy, ox, oy, ha, hb) -> Estimate:
        mi = self._mi_from(ha, hb, sx, sy)
        dx, dy = is_discrete(tx), is_discrete(ty)
        cap = None
        if dx != dy:  # the discrete side bounds the information: log n for ids, H(Y) for labels
            cap = ha if dx else hb
        elif dx and dy:
            cap = min(ha, hb)
        for name, t, o in (("x", tx, ox), ("y", ty, oy)):
            if o:
                lo, hi = getattr(self, "range_min", None), getattr(self, "range_max", None)
                warnings.warn(
                    f"{self.name}: n_outside = {o} of {t.numel()} values of '{name}' ({100.0 * o / t.numel():.1f}%) "
                    f"lie outside [range_min, range_max] = [{lo:g}, {hi:g}] and were clamped into the first or last "
                    f"bin (observed range [{float(t.min()):.4g}, {float(t.max()):.4g}]).",
                    RuntimeWarning, stacklevel=4)
        return self._make(
            mi, n=tx.shape[0], dims=(tx.shape[1], ty.shape[1]), cap=cap,
            extra={"H_x": ha, "H_y": hb, "n_symbols_x": int(sx.max()) + 1,
                   "n_symbols_y": int(sy.max()) + 1, "n_outside": ox + oy},
        )

    def null_values(self, x, y, permutations) -> list[float]:
        _, _, sx, sy, _, _, ha, hb = self._prepared(x, y)
        return self._null(sx, sy, ha, hb, permutations)

    def estimate_and_null(self, x, y, permutations):
        # the bins and both marginal entropies do not depend on the pairing: computed once for both
        prep = self._prepared(x, y)
        return self._estimate(*prep), self._null(prep[2], prep[3], prep[6], prep[7], permutations)

    def _null(self, sx, sy, ha, hb, permutations) -> list[float]:
        # the joint entropies of all permutations come from one bincount of their contingency
        # tables (symbols x symbols per permutation) when those fit in NULL_TABLE_CELLS
        ka, kb, n = int(sx.max()) + 1, int(sy.max()) + 1, int(sx.shape[0])
        cells = ka * kb
        if cells * len(permutations) > NULL_TABLE_CELLS:
            return [self._mi_from(ha, hb, sx, sy[p.to(sy.device)]) for p in permutations]
        perm = torch.stack([p.to(sy.device) for p in permutations])  # (N, n)
        joint = sx.unsqueeze(0) * kb + sy[perm] + cells * torch.arange(len(permutations), device=sy.device)[:, None]
        counts = torch.bincount(joint.reshape(-1), minlength=cells * len(permutations)).to(torch.float64)
        counts = counts.reshape(len(permutations), cells)
        hab = math.log(n) - torch.special.xlogy(counts, counts).sum(dim=1) / n
        return [max(v, 0.0) if abs(v) < 1e-12 else v for v in (ha + hb - hab).tolist()]


@register
@dataclass(frozen=True)
class Binning(_BinningMixin, Estimator):
    """Fixed-width binning, plug-in entropies (Shwartz-Ziv & Tishby 2017; Saxe et al. 2018).

    ``n_bins`` equal-width bins over [range_min, range_max] (default: the layer's own minimum
    and maximum, pooled over all units). ``bin_width`` instead fixes the width: with no range
    the bins are floor(v / bin_width) (ibsgd's unbounded grid); with a range they start at
    range_min. Values outside a given range go into the first/last bin (counted in
    extra["n_outside"]). I(X;T) on n distinct inputs equals H(T_binned) <= log n (the cap).
    """

    n_bins: int = 30
    bin_width: float | None = None
    range_min: float | None = None
    range_max: float | None = None

    name: ClassVar[str] = "binning"
    reference: ClassVar[str] = "Shwartz-Ziv & Tishby 2017, arXiv:1703.00810"

    def scale_invariant(self, arg: str) -> str | None:
        # n_bins over the pooled range: bins follow the data; an explicit width or range does not
        return "global" if self.bin_width is None and self.range_min is None else None

    def validate(self) -> None:
        self._require(isinstance(self.n_bins, int) and not isinstance(self.n_bins, bool) and self.n_bins >= 1,
                      "n_bins", "an integer >= 1", self.n_bins)
        self._require(self.bin_width is None or (isinstance(self.bin_width, (int, float)) and self.bin_width > 0),
                      "bin_width", "a number > 0 (or None)", self.bin_width)
        self._require((self.range_min is None) == (self.range_max is None), "range_min/range_max",
                      "given together (or both None)", (self.range_min, self.range_max))
        if self.range_min is not None:
            self._require(float(self.range_min) < float(self.range_max), "range_min", "smaller than range_max",
                          (self.range_min, self.range_max))

    def _bin(self, t):
        t = t.to(torch.float64)
        if self.bin_width is not None and self.range_min is None:
            return torch.floor(t / float(self.bin_width)).to(torch.int64), 0
        if self.range_min is not None:
            lo, hi = float(self.range_min), float(self.range_max)
            outside = int(((t < lo) | (t > hi)).sum())
        else:
            lo, hi = float(t.min()), float(t.max())
            outside = 0
        if self.bin_width is not None:
            w = float(self.bin_width)
            nb = max(1, int(torch.ceil(torch.tensor((hi - lo) / w)).item()))
        else:
            nb = self.n_bins
            w = (hi - lo) / nb
        if w <= 0:  # a constant layer: one bin
            return torch.zeros_like(t, dtype=torch.int64), outside
        b = torch.floor((t - lo) / w).clamp_(0, nb - 1)
        return b.to(torch.int64), outside


@register
@dataclass(frozen=True)
class AdaptiveBinning(_BinningMixin, Estimator):
    """Equal-mass (entropy-based adaptive) binning per layer and checkpoint (Chelombiev et al. 2019).

    The sorted unique values u of the variable (all units pooled) give the edges
    u[floor(k |u| / n_bins)], k = 0..n_bins-1, so every bin holds about the same number of
    distinct values; edges are recomputed for every call (every layer and checkpoint).
    """

    n_bins: int = 30

    name: ClassVar[str] = "adaptive-binning"
    reference: ClassVar[str] = "Chelombiev, Houghton & O'Donnell 2019, ICLR, arXiv:1902.09037"

    def scale_invariant(self, arg: str) -> str | None:
        # equal-mass edges from the pooled sorted values
        return "global"

    def validate(self) -> None:
        self._require(isinstance(self.n_bins, int) and not isinstance(self.n_bins, bool) and self.n_bins >= 1,
                      "n_bins", "an integer >= 1", self.n_bins)

    def _bin(self, t):
        u = torch.unique(t.reshape(-1))  # sorted
        m = u.numel()
        idx = torch.div(torch.arange(1, self.n_bins, device=t.device) * m, self.n_bins, rounding_mode="floor")
        inner = u[idx.clamp(max=m - 1)].contiguous()
        b = torch.searchsorted(inner, t.contiguous(), right=True)
        return b.to(torch.int64), 0
