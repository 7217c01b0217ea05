"""Binning estimators: fixed-width bins (Shwartz-Ziv & Tishby 2017) and equal-mass bins
(entropy-based adaptive binning, Chelombiev, Houghton & O'Donnell 2019).

Every continuous value is replaced by its bin index, each row of bin indices becomes one
discrete symbol, and I(A;B) = H(A) + H(B) - H(A,B) with plug-in entropies (nats). With X the
sample identity (n distinct ids) this is I(X;T) = H(T_binned) <= log n, the literature's
quantity; with Y class labels it is H(T) - H(T|Y) <= H(Y). Integer inputs are already
discrete and are used as they are.

Values outside an explicit range go into the first or last bin by default (``outside=
"clamp"``); ``"separate"`` gives values at or above the top edge one symbol of their own and
values below the bottom edge another; ``"idnns"`` reproduces the reference code of
Shwartz-Ziv & Tishby (IDNNs: ``bins[digitize(v, bins) - 1]`` on float32 edges), where values
at or above the top edge get a symbol of their own and values below the bottom edge wrap
around into that same symbol. How many values lay outside the range is reported in
``Estimate.extra["n_outside"]`` and in a warning (``ibscope estimate`` puts it in the row's
note).

``chelombiev-binning`` is the entropy-based adaptive binning of Chelombiev et al.'s released
code; ``adaptive-binning`` is ibscope's variant of it (see their docstrings for the difference).
"""

from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ibscope.estimators import _mi
from ibscope.estimators.base import Estimate, PairEstimator, PairMixinBase, is_discrete
from ibscope.estimators.params import Integer, OneOf, Real, param
from ibscope.estimators.registry import register

#: largest contingency table (symbols of x times symbols of y times permutations) that the
#: permutation null counts in one bincount; larger ones are counted permutation by permutation
NULL_TABLE_CELLS = 2 ** 22  # 32 MiB of int64 counts


class _BinningMixin(PairMixinBase):
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
                went = {"separate": "were given two symbols of their own (above and below the range)",
                        "idnns": "took IDNNs' symbols (one extra symbol at or above the top edge, into which the "
                                 "values below the bottom edge wrap around)"}.get(
                    getattr(self, "outside", "clamp"), "were clamped into the first or last bin")
                warnings.warn(
                    f"{self.name}: n_outside = {o} of {t.numel()} values of '{name}' ({100.0 * o / t.numel():.1f}%) "
                    f"lie outside [range_min, range_max] = [{lo:g}, {hi:g}] and {went} (observed range "
                    f"[{float(t.min()):.4g}, {float(t.max()):.4g}]).", RuntimeWarning, stacklevel=4)
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
class Binning(_BinningMixin, PairEstimator):
    """Fixed-width binning, plug-in entropies (Shwartz-Ziv & Tishby 2017; Saxe et al. 2018).

    ``n_bins`` equal-width bins over [range_min, range_max] (default: the layer's own minimum
    and maximum, pooled over all units). ``bin_width`` instead fixes the width: with no range
    the bins are floor(v / bin_width) (ibsgd's unbounded grid); with a range they start at
    range_min; the unbounded grid divides in the activations' own precision (float32 for a
    store), as ibsgd's ``np.floor(d / binsize)`` does. Values outside a given range (counted
    in extra["n_outside"]): ``outside="clamp"`` puts them into the first/last bin;
    ``"separate"`` gives values >= range_max one extra symbol and values < range_min another;
    ``"idnns"`` is IDNNs' ``bins[np.digitize(v, bins) - 1]`` with ``bins`` = the n_bins + 1
    edges rounded to float32: bins are [e_k, e_(k+1)), values >= range_max form one extra
    symbol, and values < range_min wrap around into that same symbol (IDNNs'
    ``linspace(-1, 1, 30)`` is n_bins=29 with outside="idnns"). "separate"/"idnns" need a range
    and n_bins (not bin_width). I(X;T) on n distinct inputs equals H(T_binned) <= log n (the cap).
    """

    n_bins: int = param(30, Integer(ge=1))
    bin_width: float | None = param(None, Real(gt=0), optional=True)
    range_min: float | None = param(None, Real(), optional=True)
    range_max: float | None = param(None, Real(), optional=True)
    outside: str = param("clamp", OneOf("clamp", "separate", "idnns"))

    name: ClassVar[str] = "binning"
    reference: ClassVar[str] = "Shwartz-Ziv & Tishby 2017, arXiv:1703.00810"

    def scale_invariant(self, arg: str) -> str | None:
        # n_bins over the pooled range: bins follow the data; an explicit width or range does not
        return "global" if self.bin_width is None and self.range_min is None else None

    def validate(self) -> None:
        self._require((self.range_min is None) == (self.range_max is None), "range_min/range_max",
                      "given together (or both None)", (self.range_min, self.range_max))
        if self.range_min is not None and self.range_max is not None:
            self._require(float(self.range_min) < float(self.range_max), "range_min", "smaller than range_max",
                          (self.range_min, self.range_max))
        if self.outside != "clamp":
            self._require(self.range_min is not None and self.bin_width is None, "outside",
                          "'clamp' unless range_min/range_max are given and bin_width is not "
                          "(the other rules are about the edges of a fixed range)", self.outside)

    def _bin(self, t):
        if self.bin_width is not None and self.range_min is None:
            # ibsgd: np.floor(d / binsize) with d float32 divides in float32. The float64 quotient
            # rounded to t's dtype is that correctly rounded division (double rounding is exact
            # for a division when 53 >= 2p + 2), whatever torch does with a scalar divisor.
            w = float(torch.tensor(float(self.bin_width), dtype=t.dtype))
            q = (t.to(torch.float64) / w).to(t.dtype)
            return torch.floor(q).to(torch.int64), 0
        if self.outside != "clamp":
            return self._bin_edges(t)
        t = t.to(torch.float64)
        if self.range_min is not None:
            assert self.range_max is not None  # validate(): given together
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

    def _bin_edges(self, t):
        """'separate' / 'idnns': explicit float32 edges linspace(lo, hi, n_bins + 1), digitize semantics."""
        import numpy as np

        assert self.range_min is not None and self.range_max is not None  # validate(): outside needs the range
        lo, hi = float(self.range_min), float(self.range_max)
        edges = torch.from_numpy(np.linspace(lo, hi, self.n_bins + 1).astype(np.float32).astype(np.float64))
        t = t.to(torch.float64)
        outside = int(((t < lo) | (t > hi)).sum())
        # idx k: edges[k-1] <= v < edges[k]; 0 below the first edge, n_bins + 1 at or above the last
        idx = torch.searchsorted(edges.to(t.device), t.contiguous(), right=True)
        if self.outside == "idnns":  # bins[0 - 1] = bins[-1]: below the range wraps to the top symbol
            idx = torch.where(idx == 0, torch.full_like(idx, self.n_bins + 1), idx)
        return idx.to(torch.int64), outside


@register
@dataclass(frozen=True)
class AdaptiveBinning(_BinningMixin, PairEstimator):
    """Equal-mass binning per layer and checkpoint (ibscope's variant of Chelombiev et al.'s EBAB).

    The sorted unique values u of the variable (all units pooled) give the n_bins - 1 inner
    edges u[floor(k |u| / n_bins)], k = 1..n_bins-1, so every bin holds about the same number
    of distinct values; edges are recomputed for every call (every layer and checkpoint).
    Differs from Chelombiev et al.'s released code (``chelombiev-binning``) in two places:
    exact zeros (dead ReLU units) are pooled with the smallest values instead of forming a bin
    of their own, and the maximum is not a bin of its own; it needs no activation-dependent
    lower edge. Up to ~0.16 bits apart on ReLU layers.
    """

    n_bins: int = param(30, Integer(ge=1))

    name: ClassVar[str] = "adaptive-binning"
    reference: ClassVar[str] = ("ibscope variant of the entropy-based adaptive binning of Chelombiev, Houghton & "
                                "O'Donnell 2019, ICLR, arXiv:1902.09037 (their procedure: chelombiev-binning)")

    def scale_invariant(self, arg: str) -> str | None:
        # equal-mass edges from the pooled sorted values
        return "global"

    def _bin(self, t):
        u = torch.unique(t.reshape(-1))  # sorted
        m = u.numel()
        idx = torch.div(torch.arange(1, self.n_bins, device=t.device) * m, self.n_bins, rounding_mode="floor")
        inner = u[idx.clamp(max=m - 1)].contiguous()
        b = torch.searchsorted(inner, t.contiguous(), right=True)
        return b.to(torch.int64), 0


#: Chelombiev et al.'s lower edge for tanh-like layers (-1.000001 in their set_up_bins)
TANH_LOW = -1.000001


@register
@dataclass(frozen=True)
class ChelombievBinning(_BinningMixin, PairEstimator):
    """Entropy-based adaptive binning (EBAB) as in Chelombiev et al.'s released code.

    Per call (layer and checkpoint), with u the sorted unique values of the layer (all units
    pooled) other than ``low``: edges e = [low, u[int(k * (|u| / n_bins))] for k = 0..n_bins-1,
    u[-1]], rounded to float32, and every value v gets the symbol of e[digitize(v, e) - 1]
    (``set_up_bins(..., per_layer_bins=True, maxentropy=True)`` and ``calc_information_sampling``
    of ivansche/adaptive_estimators). So: [low, u[0]) holds only exact ``low`` values (the zeros
    of dead ReLU units when low = 0), n_bins equal-count bins follow, the maximum u[-1] is a bin
    of its own, and values below ``low`` wrap around into the maximum's bin (their digitize).
    ``low``: their code uses 0 for ReLU/softplus networks and -1.000001 for tanh; None (the
    default) picks 0 when the layer has no negative value and -1.000001 otherwise.
    """

    n_bins: int = param(30, Integer(ge=1))
    #: None: 0 for non-negative layers, -1.000001 otherwise
    low: float | None = param(None, Real(), optional=True)

    name: ClassVar[str] = "chelombiev-binning"
    reference: ClassVar[str] = ("Chelombiev, Houghton & O'Donnell 2019, Adaptive estimators show information "
                                "compression in deep neural networks, ICLR (code: ivansche/adaptive_estimators)")

    def _bin(self, t):
        import numpy as np

        t = t.to(torch.float64)
        low = float(self.low) if self.low is not None else (0.0 if float(t.min()) >= 0.0 else TANH_LOW)
        u = torch.unique(t.reshape(-1))
        u = u[u != low]
        m = u.numel()
        if m:
            # int(k * (m / n_bins)) in float64, as their code computes it
            idx = torch.from_numpy((np.arange(self.n_bins) * (m / self.n_bins)).astype(np.int64)).to(u.device)
            edges = torch.cat([torch.tensor([low], dtype=torch.float64, device=u.device), u[idx], u[-1:]])
        else:
            edges = torch.tensor([low], dtype=torch.float64, device=t.device)
        edges = edges.to(torch.float32).to(torch.float64)  # their bins.astype(np.float32)
        idx = torch.searchsorted(edges, t.contiguous(), right=True)
        idx = torch.where(idx == 0, torch.full_like(idx, edges.numel()), idx)  # bins[-1]: wrap to the top
        # the symbol is the edge value bins[idx - 1] itself, so edges equal after rounding (or
        # repeated when |u| < n_bins) give one symbol, as in their code
        return edges[idx - 1], 0
