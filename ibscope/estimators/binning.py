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
import collections
import functools
import hashlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ibscope.estimators import _fast, _mi
from ibscope.estimators import nulls as _nulls
from ibscope.estimators.base import (
    ArrayLike,
    Estimate,
    Estimator,
    PairEstimator,
    PairMixinBase,
    as_tensor,
    check_pair,
    is_discrete,
)
from ibscope.estimators.degenerate import constant_from
from ibscope.estimators.params import Integer, OneOf, Real, param
from ibscope.estimators.registry import register

#: largest contingency table (symbols of x times symbols of y times permutations) that the
#: permutation null counts in one bincount; larger ones are counted permutation by permutation
NULL_TABLE_CELLS = 2 ** 22  # 32 MiB of int64 counts


class Side(NamedTuple):
    """One prepared side of a binning estimate (see :meth:`_BinningMixin.side`)."""

    t: torch.Tensor      # the converted (n, d) input
    sym: torch.Tensor    # one int64 symbol per row
    outside: int         # values outside [range_min, range_max]
    h: float             # plug-in entropy of the symbols, nats
    k: int               # number of symbols (they are 0..k-1)


#: prepared sides kept for reuse by ``estimate`` (inputs of at most SIDE_CACHE_BYTES each)
SIDE_CACHE_ENTRIES = 8
SIDE_CACHE_BYTES = 1 << 22  # 4 MiB: hashing costs ~0.5 ms per MiB, far less than binning it
#: (estimator class, its parameters as (name, repr) pairs, "torch"/"numpy", dtype, shape, SHA-256 of the bytes)
_SideKey = tuple[type[Estimator], tuple[tuple[str, str], ...], str, str, tuple[int, ...], bytes]
_SIDES: collections.OrderedDict[_SideKey, Side] = collections.OrderedDict()
_SIDE_LOCK = threading.Lock()


def _side_key(est: Estimator, v: ArrayLike) -> _SideKey | None:
    """A key for the prepared side of ``v``: the estimator's class and parameters, and the
    dtype, shape and SHA-256 of the bytes of a numpy array or CPU tensor of a numeric dtype of
    at most SIDE_CACHE_BYTES; None for anything else (not cached). Equal bytes, dtype and
    shape convert and bin to the same side, so a hit gives what a fresh computation gives."""
    import numpy as np

    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.dtype in (torch.bfloat16, torch.complex32) or v.is_complex():
            return None
        kind, dtype = "torch", str(v.dtype)
        try:
            arr = v.detach().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError):
            return None
    elif isinstance(v, np.ndarray):
        kind, dtype, arr = "numpy", v.dtype.str, v
    else:
        return None
    if arr.dtype.kind not in "biuf" or arr.nbytes > SIDE_CACHE_BYTES or arr.ndim > 2:
        return None
    arr = np.ascontiguousarray(arr)
    digest = hashlib.sha256(arr.data.cast("B")).digest() if arr.size else b""
    params = tuple(sorted((k, repr(val)) for k, val in est.params().items()))
    return type(est), params, kind, dtype, tuple(arr.shape), digest


class _BinningMixin(PairMixinBase):
    x_source: ClassVar[str] = "identity"
    #: work linear in the input: problems with fewer elements than this run on one torch thread
    #: (``ibscope.mutual_information`` / ``ibscope estimate``; see ibscope.estimators._fast.few_threads)
    serial_below: ClassVar[int] = _fast.SERIAL_ELEMENTS

    @abc.abstractmethod
    def _bin(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Bin the activations ``t``: (symbols per row, number of bins) (each concrete estimator defines it)."""

    def _symbols(self, t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """One symbol per row (codes, numbered 0..k-1), k, and the number of values outside the
        range."""
        if is_discrete(t):
            return (*_fast.row_codes_count(t), 0)
        b, o = self._bin(t)
        return (*_fast.row_codes_count(b, self._bin_spans(t)), o)

    def _bin_spans(self, t: torch.Tensor) -> list[int] | None:
        """[k] * width when every bin index of ``t`` lies in [0, k) by construction (saves
        finding each column's range), else None."""
        return None

    @staticmethod
    def _mi_from(ha: float, hb: float, a: torch.Tensor, b: torch.Tensor) -> float:
        mi = ha + hb - _mi.joint_entropy(a, b, ha, hb)
        return max(mi, 0.0) if abs(mi) < 1e-12 else mi

    # The estimate is computed from two prepared sides (a converted tensor, its symbols, the
    # values outside the range, its plug-in entropy). ``estimate`` converts each input once and
    # applies the rule for constant inputs itself (so the base class does not convert them a
    # second time); ``ibscope estimate`` prepares the side that is the same for every cell of a
    # store (the sample ids or the labels) once per store and reuses it (:meth:`estimate_sides`).
    def side(self, v: ArrayLike, name: str = "x") -> Side:
        """Convert ``v`` as argument ``name`` (``as_tensor``) and bin it: all that the estimate
        needs of one side, reusable with any other side of the same length and device."""
        return self._side(as_tensor(v, name=name, estimator=self))

    def _side(self, t: torch.Tensor) -> Side:
        sym, k, outside = self._symbols(t)
        return Side(t, sym, outside, _mi.entropy_codes(sym, compact=True), k)

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        a, b = self._cached_side(x, "x"), self._cached_side(y, "y")
        tx, ty = check_pair(a.t, b.t, self.name)
        if ty is not b.t:  # y follows x's device
            b = self._side(ty)
        got = constant_from(self, (tx, ty))
        if got is not None:
            return got
        return self._estimate(a, b, stacklevel=3)

    estimate._ibscope_degenerate_rule = True  # type: ignore[attr-defined]  # the rule is applied above, on the converted inputs

    def _cached_side(self, v: ArrayLike, name: str) -> Side:
        """:meth:`side` of ``v``, reusing the side of an input with the same bytes (see
        :func:`_side_key`): a notebook that computes I(X;T) and I(T;Y) of a layer with the same
        ids and labels in every cell bins the layer once and the ids and labels once."""
        key = _side_key(self, v)
        if key is not None:
            with _SIDE_LOCK:
                got = _SIDES.get(key)
                if got is not None:
                    _SIDES.move_to_end(key)
                    return got
        side = self.side(v, name)
        if key is not None:
            # a private copy: the converted tensor may share memory with the caller's array,
            # which may be changed in place after this call
            kept = side._replace(t=side.t.clone())
            with _SIDE_LOCK:
                _SIDES[key] = kept
                while len(_SIDES) > SIDE_CACHE_ENTRIES:
                    _SIDES.popitem(last=False)
        return side

    def estimate_sides(self, a: Side, b: Side, null_permutations: int = 0, null_seed: int = 0,
                       perms: list[torch.Tensor] | None = None) -> Estimate:
        """The estimate of the prepared sides ``a`` (x) and ``b`` (y) (:meth:`side`), with its
        permutation null when ``null_permutations`` > 0: the same Estimate, warnings and null
        as ``estimate(x, y)`` and ``with_null(est, x, y, N, seed)``. ``perms``: the null's
        permutations when the caller already drew them (``nulls.permutations(n, N, seed)``)."""
        tx, ty = check_pair(a.t, b.t, self.name)
        if ty is not b.t:  # another device: y follows x, as in estimate()
            b = self._side(ty)
        got = constant_from(self, (tx, ty))
        if not null_permutations:
            return got if got is not None else self._estimate(a, b, stacklevel=3)
        if got is not None:  # permuting a constant changes nothing: the null is 0
            return _nulls.attach(self, got, [0.0] * null_permutations, null_permutations, null_seed)
        if perms is None:
            perms = _nulls.permutations(int(tx.shape[0]), null_permutations, null_seed)
        e = self._estimate(a, b, stacklevel=3)
        return _nulls.attach(self, e, self._null(a.sym, b.sym, a.h, b.h, perms), null_permutations, null_seed)

    def _estimate(self, a: Side, b: Side, stacklevel: int = 4) -> Estimate:
        tx, ty, sx, sy, ox, oy, ha, hb = a.t, b.t, a.sym, b.sym, a.outside, b.outside, a.h, b.h
        mi = ha + hb - _mi.joint_entropy(sx, sy, ha, hb, a.k, b.k)
        mi = max(mi, 0.0) if abs(mi) < 1e-12 else mi
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
                    f"[{float(t.min()):.4g}, {float(t.max()):.4g}]).", RuntimeWarning, stacklevel=stacklevel)
        return self._make(
            mi, n=tx.shape[0], dims=(tx.shape[1], ty.shape[1]), cap=cap,
            extra={"H_x": ha, "H_y": hb, "n_symbols_x": a.k, "n_symbols_y": b.k, "n_outside": ox + oy},
        )

    def _prepared(self, x: ArrayLike, y: ArrayLike) -> tuple[Side, Side]:
        tx, ty = _mi.pair(self, x, y)
        return self._side(tx), self._side(ty)

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        a, b = self._prepared(x, y)
        return self._null(a.sym, b.sym, a.h, b.h, permutations)

    def estimate_and_null(self, x: torch.Tensor, y: torch.Tensor,
                          permutations: list[torch.Tensor]) -> tuple[Estimate, list[float]]:
        # the bins and both marginal entropies do not depend on the pairing: computed once for both
        a, b = self._prepared(x, y)
        return self._estimate(a, b), self._null(a.sym, b.sym, a.h, b.h, permutations)

    def _null(self, sx: torch.Tensor, sy: torch.Tensor, ha: float, hb: float,
              permutations: list[torch.Tensor]) -> list[float]:
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


#: an equally spaced grid of edges: (origin, 1 / spacing, lower edge per index, upper edge per index)
_Grid = tuple[float, float, torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=64)
def _edge_tables(lo: float, hi: float, n_bins: int, dtype: torch.dtype,
                 device: str) -> tuple[torch.Tensor, _Grid | None, tuple[float, float]]:
    """What binning against IDNNs-style edges needs, computed once per setting: the edges
    ``linspace(lo, hi, n_bins + 1)`` rounded to float32 (in ``dtype``), and when they lie on an
    equally spaced grid (every edge within a quarter of the spacing of its grid point), the
    grid (origin, 1 / spacing) and the edge tables for the arithmetic digitize; else None.
    Also the exact thresholds of "below lo" and "above hi" for values of ``dtype``."""
    import numpy as np

    e32 = np.linspace(lo, hi, n_bins + 1).astype(np.float32)
    e = e32.astype(np.float64).tolist()
    edges = torch.tensor(e, dtype=dtype, device=device)
    m = n_bins
    w = (e[-1] - e[0]) / m
    grid: _Grid | None = None
    if w > 0 and all(b > a for a, b in zip(e, e[1:])) and max(abs(v - (e[0] + k * w)) for k, v in enumerate(e)) < w / 4:
        inf = torch.tensor([math.inf], dtype=dtype, device=device)
        below = torch.cat([-inf, edges, inf])   # below[k] = edges[k - 1]: the lower edge of digitize index k
        above = torch.cat([edges, inf, inf])    # above[k] = edges[k]: the upper edge of index k
        grid = (e[0], 1.0 / w, below, above)
    # v < lo and v > hi for values of ``dtype``: a float32 v is below the float64 lo exactly when
    # it is below the smallest float32 >= lo (and above hi when above the largest float32 <= hi)
    if dtype == torch.float32:
        with np.errstate(over="ignore"):
            c_lo, c_hi = np.float32(lo), np.float32(hi)
        if float(c_lo) < lo:
            c_lo = np.nextafter(c_lo, np.float32(np.inf))
        if float(c_hi) > hi:
            c_hi = np.nextafter(c_hi, np.float32(-np.inf))
        thresholds = (float(c_lo), float(c_hi))
    else:
        thresholds = (lo, hi)
    return edges, grid, thresholds


def _digitize(t: torch.Tensor, edges: torch.Tensor, grid: _Grid | None) -> torch.Tensor:
    """``torch.searchsorted(edges, t, right=True)`` (int64) for edges on an equally spaced
    ``grid`` (:func:`_edge_tables`) in O(1) per value: the index from arithmetic on the grid,
    then one comparison with the real edge on each side. The arithmetic index is off by at
    most one (every edge lies within a quarter of the spacing of its grid point), which the two
    comparisons fix, so the result is exact. Without a grid: searchsorted."""
    t = t.contiguous()
    if grid is None:
        return torch.searchsorted(edges, t, right=True)
    lo, inv_w, below, above = grid
    m = edges.numel() - 1
    # int32 indices and index_select: the cheapest gather of the edges on CPU
    # floor((t - lo) / w) + 1 as floor((t - (lo - w)) / w); the rounding either way is fixed below
    k = torch.sub(t, lo - 1.0 / inv_w).mul_(inv_w).floor_().clamp_(0, m + 1).to(torch.int32)
    k -= torch.lt(t, below.index_select(0, k.view(-1)).view_as(k)).to(torch.int32)
    k += torch.ge(t, above.index_select(0, k.view(-1)).view_as(k)).to(torch.int32)
    return k.to(torch.int64)


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

    def _bin_spans(self, t: torch.Tensor) -> list[int] | None:
        if self.bin_width is not None:
            return None
        # n_bins clamped bins: [0, n_bins); IDNNs-style edges: digitize indices [0, n_bins + 1]
        return [self.n_bins if self.outside == "clamp" else self.n_bins + 2] * int(t.shape[1])

    def _bin(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
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

    def _bin_edges(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """'separate' / 'idnns': explicit float32 edges linspace(lo, hi, n_bins + 1), digitize semantics."""
        assert self.range_min is not None and self.range_max is not None  # validate(): outside needs the range
        lo, hi = float(self.range_min), float(self.range_max)
        # float32 values compare with the float32 edges exactly as their float64 copies do
        x = t if t.dtype == torch.float32 else t.to(torch.float64)
        edges, grid, (c_lo, c_hi) = _edge_tables(lo, hi, self.n_bins, x.dtype, str(x.device))
        outside = int(torch.lt(x, c_lo).sum()) + int(torch.gt(x, c_hi).sum())
        # idx k: edges[k-1] <= v < edges[k]; 0 below the first edge, n_bins + 1 at or above the last
        idx = _digitize(x, edges, grid)
        if self.outside == "idnns":  # bins[0 - 1] = bins[-1]: below the range wraps to the top symbol
            idx.masked_fill_(idx == 0, self.n_bins + 1)
        return idx, outside


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

    def _bin(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
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

    def _bin(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
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
