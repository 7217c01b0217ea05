"""Kraskov-Stoegbauer-Grassberger k-NN mutual information, and Ross (2014) for a discrete side.

KSG-1 (default): joint metric |z - z'| = max(|x - x'|, |y - y'|); eps_i = distance from z_i to
its k-th neighbour in the joint space; n_x(i) = #{j != i : |x_i - x_j| < eps_i} (strict);

    I = psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >

KSG-2 (``algorithm=2``): eps_x(i), eps_y(i) = extents of the k joint neighbours in each
marginal, n_x counts |x_i - x_j| <= eps_x(i); I = psi(k) - 1/k + psi(N) - < psi(n_x) + psi(n_y) >.

Ross (2014), continuous T and discrete Y: the k-th neighbour radius r_i is found within the
sample's class, m_i = #{j != i, any class : |t_i - t_j| < r_i};
I = psi(N) + psi(k) - < psi(N_{y_i}) > - < psi(m_i + 1) >.

The within-block norm is the max-norm (``norm="max"``, Kraskov's and NPEET's convention) or
Euclidean (``norm="euclidean"``, bmi's convention; matmul-fast); the joint space is always
the max of the two block norms. Each row chunk computes the two marginal distance blocks
once and derives the joint distances, the k-th neighbour and both counts from them, so memory
is O(chunk x n) and no n x n matrix exists. Digamma sums are float64; the standard error is
std(per-point terms) / sqrt(N). Tied distances (duplicated rows, e.g. dead ReLU units) are
broken by a seeded jitter of relative size ``jitter``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ibscope.errors import DataError
from ibscope.estimators import _cpu, _knn, _mi
from ibscope.estimators._knn import _auto_chunk, count_within, kth_neighbor_distances
from ibscope.estimators.base import ArrayLike, Estimate, PairEstimator
from ibscope.estimators.params import Boolean, Integer, OneOf, Real, param
from ibscope.estimators.registry import register

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _block(q: torch.Tensor, r: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "max":
        return torch.cdist(q, r, p=float("inf"))
    return torch.cdist(q, r, p=2.0)  # matmul mode for large blocks


def _counts_torch(x: torch.Tensor, y: torch.Tensor, k: int, algorithm: int, norm: str,
                  chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_x, n_y) per point by chunked brute force in torch (any device)."""
    n = x.shape[0]
    dev = x.device
    chunk = chunk or min(512, _auto_chunk(n, 3, x.element_size()))  # small blocks stay in cache
    nxs = torch.empty(n, dtype=torch.int64, device=dev)
    nys = torch.empty(n, dtype=torch.int64, device=dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dx = _block(x[s:e], x, norm)
        dy = _block(y[s:e], y, norm)
        dz = torch.maximum(dx, dy)
        rows = torch.arange(e - s, device=dev)
        dz[rows, rows + s] = float("inf")  # the point itself is not a neighbour
        vals, idx = torch.topk(dz, k, dim=1, largest=False)
        del dz
        if algorithm == 1:
            eps = vals[:, k - 1:k]
            self_in = (eps[:, 0] > 0).to(torch.int32)  # the self-distance 0 counts when 0 < eps
            nx = (dx < eps).sum(dim=1, dtype=torch.int32) - self_in  # int32 sums are ~1.5x faster
            ny = (dy < eps).sum(dim=1, dtype=torch.int32) - self_in
        else:
            ex = dx.gather(1, idx).amax(dim=1, keepdim=True)
            ey = dy.gather(1, idx).amax(dim=1, keepdim=True)
            nx = (dx <= ex).sum(dim=1, dtype=torch.int32) - 1
            ny = (dy <= ey).sum(dim=1, dtype=torch.int32) - 1
        nxs[s:e] = nx
        nys[s:e] = ny
    return nxs, nys


def _counts_tree(x: torch.Tensor, y: torch.Tensor, k: int, algorithm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_x, n_y) per point with scipy's cKDTree, max-norm (NPEET's and scikit-learn's algorithm)."""
    import numpy as np

    xn = x.detach().cpu().to(torch.float64).numpy()
    yn = y.detach().cpu().to(torch.float64).numpy()
    inf = float("inf")
    dist, idx = _knn.tree_knn(np.hstack([xn, yn]), k, p=inf)
    if algorithm == 1:
        eps = dist[:, k - 1]
        nx = _knn.tree_count(xn, eps, p=inf, strict=True)
        ny = _knn.tree_count(yn, eps, p=inf, strict=True)
    else:  # extents of the k joint neighbours in each block, counts <= them
        ex = np.abs(xn[idx] - xn[:, None, :]).max(axis=2).max(axis=1)
        ey = np.abs(yn[idx] - yn[:, None, :]).max(axis=2).max(axis=1)
        nx = _knn.tree_count(xn, ex, p=inf, strict=False)
        ny = _knn.tree_count(yn, ey, p=inf, strict=False)
    return torch.from_numpy(nx), torch.from_numpy(ny)


def _counts_cpu(x: torch.Tensor, y: torch.Tensor, k: int, algorithm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_x, n_y) per point by the numba brute-force kernel (CPU, max-norm)."""
    nx, ny = _cpu.ksg_counts(x.detach().numpy(), y.detach().numpy(), k, algorithm)
    return torch.from_numpy(nx), torch.from_numpy(ny)


def ksg_search(x: torch.Tensor, y: torch.Tensor, norm: str = "max", search: str = "auto", who: str = "ksg") -> str:
    """The neighbour search KSG uses for these inputs: 'tree' or 'brute' (see _knn.resolve_search)."""
    return _knn.resolve_search(who, search, device=x.device, n=x.shape[0], dims=x.shape[1] + y.shape[1],
                               max_tree_dims=_knn.ksg_tree_max_dims(x.shape[0]), tree_ok=(norm == "max"),
                               why_not="the KD-tree search needs norm='max' (the joint max of two Euclidean "
                                       "norms is not a metric the tree supports)")


def ksg_terms(x: torch.Tensor, y: torch.Tensor, k: int, algorithm: int = 1, norm: str = "max",
              chunk: int | None = None, search: str = "auto") -> torch.Tensor:
    """Per-point KSG terms (float64, shape (N,)); their mean is the estimate in nats.

    ``search``: 'auto', 'brute' or 'tree' (see :func:`ksg_search`). Every path yields the same
    counts n_x, n_y (max-norm distances are exact), hence identical terms; the terms are always
    computed here, in float64 on ``x``'s device, from those counts."""
    n = x.shape[0]
    dev = x.device
    how = ksg_search(x, y, norm, search)
    if how == "tree":
        nx, ny = _counts_tree(x, y, k, algorithm)
    elif dev.type == "cpu" and norm == "max" and x.dtype in (torch.float32, torch.float64) and _cpu.available() \
            and chunk is None:
        nx, ny = _counts_cpu(x, y, k, algorithm)
    else:
        nx, ny = _counts_torch(x, y, k, algorithm, norm, chunk)
    nx, ny = nx.to(dev), ny.to(dev)
    dig: Callable[[torch.Tensor], torch.Tensor] = torch.special.digamma  # untyped in torch (Any)
    f64 = torch.float64
    base = float(dig(torch.tensor(float(k), dtype=f64))) + float(dig(torch.tensor(float(n), dtype=f64)))
    if algorithm == 1:
        return base - (dig((nx + 1).to(f64)) + dig((ny + 1).to(f64)))
    return (base - 1.0 / k) - (dig(nx.to(f64)) + dig(ny.to(f64)))


def ross_terms(t: torch.Tensor, labels: torch.Tensor, k: int, norm: str = "max", est_name: str = "ksg",
               search: str = "auto") -> torch.Tensor:
    """Per-point terms of Ross's (2014) continuous-discrete estimator (float64, shape (N,))."""
    n = t.shape[0]
    metric = "max" if norm == "max" else "l2"
    counts = torch.bincount(labels)
    small = torch.nonzero((counts > 0) & (counts < k + 1)).reshape(-1).tolist()
    if small:
        c0 = small[0]
        raise DataError(
            f"{est_name} (Ross estimator, discrete y): class {c0} has {int(counts[c0])} sample(s), but k={k} needs "
            f"at least k+1={k + 1} per class ({len(small)} class(es) are too small).",
            hint="Lower k, merge rare classes, or use 'binning'/'kde' when y is a sample identity.",
        )
    how = _knn.resolve_search(est_name, search, device=t.device, n=n, dims=t.shape[1],
                              max_tree_dims=_knn.ksg_tree_max_dims(n), tree_ok=(norm == "max"),
                              why_not="the KD-tree search needs norm='max'")
    numba_ok = (how == "brute" and t.device.type == "cpu" and norm == "max" and _cpu.available()
                and t.dtype in (torch.float32, torch.float64))
    radius = torch.empty(n, dtype=t.dtype, device=t.device)
    classes = torch.nonzero(counts).reshape(-1).tolist()
    if how == "tree" or numba_ok:
        tn = t.detach().cpu().numpy() if numba_ok else t.detach().cpu().to(torch.float64).numpy()
        lab = labels.cpu().numpy()
        rad = tn[:, 0].copy()
        for c in classes:
            sel = lab == c
            if how == "tree":
                rad[sel] = _knn.tree_knn(tn[sel], k)[0][:, k - 1]
            else:
                rad[sel] = _cpu.kth_maxnorm(tn[sel], k)
        counted = _knn.tree_count(tn, rad) if how == "tree" else _cpu.count_maxnorm(tn, rad)
        m = torch.from_numpy(counted).to(t.device)
    else:
        for c in classes:
            mask = labels == c
            radius[mask] = kth_neighbor_distances(t[mask], k, metric=metric)
        m = count_within(t, radius, metric=metric, strict=True)
    dig: Callable[[torch.Tensor], torch.Tensor] = torch.special.digamma  # untyped in torch (Any)
    f64 = torch.float64
    base = float(dig(torch.tensor(float(n), dtype=f64))) + float(dig(torch.tensor(float(k), dtype=f64)))
    return base - dig(counts[labels].to(f64)) - dig((m + 1).to(f64))


def ksg_null_terms(x: torch.Tensor, y: torch.Tensor, k: int, permutations: list[torch.Tensor], algorithm: int = 1,
                   norm: str = "max", chunk: int | None = None) -> list[float]:
    """KSG estimates (nats) of (x, y[p]) for every permutation p, sharing the x-side distances.

    The distance block of ``x`` is computed once per row chunk for all permutations; the
    block of the permuted ``y`` is the block of rows p[chunk] with its columns reordered by
    p. Pass the cheaper (narrower) side as ``y``. Equal to :func:`ksg_terms` on
    ``(x, y[p])`` per permutation, term by term.
    """
    n = x.shape[0]
    dev = x.device
    chunk = chunk or min(512, _auto_chunk(n, 3, x.element_size()))
    dig: Callable[[torch.Tensor], torch.Tensor] = torch.special.digamma  # untyped in torch (Any)
    base = float(dig(torch.tensor(float(k), dtype=torch.float64))) + float(dig(torch.tensor(float(n), dtype=torch.float64)))
    if algorithm == 2:
        base -= 1.0 / k
    perms = [p.to(dev) for p in permutations]
    sums = [0.0] * len(perms)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dx = _block(x[s:e], x, norm)
        rows = torch.arange(e - s, device=dev)
        for i, p in enumerate(perms):
            dy = _block(y[p[s:e]], y, norm)[:, p]
            dz = torch.maximum(dx, dy)
            dz[rows, rows + s] = float("inf")
            vals, idx = torch.topk(dz, k, dim=1, largest=False)
            del dz
            if algorithm == 1:
                eps = vals[:, k - 1:k]
                self_in = (eps[:, 0] > 0).to(torch.int32)
                nx = (dx < eps).sum(dim=1, dtype=torch.int32) - self_in
                ny = (dy < eps).sum(dim=1, dtype=torch.int32) - self_in
                t = dig((nx + 1).to(torch.float64)) + dig((ny + 1).to(torch.float64))
            else:
                ex = dx.gather(1, idx).amax(dim=1, keepdim=True)
                ey = dy.gather(1, idx).amax(dim=1, keepdim=True)
                nx = (dx <= ex).sum(dim=1, dtype=torch.int32) - 1
                ny = (dy <= ey).sum(dim=1, dtype=torch.int32) - 1
                t = dig(nx.to(torch.float64)) + dig(ny.to(torch.float64))
            sums[i] += float((base - t).sum())
    return [v / n for v in sums]


def ross_null_terms(t: torch.Tensor, label_sets: list[torch.Tensor], k: int, norm: str = "max",
                    chunk: int | None = None) -> list[float]:
    """Ross (2014) estimates (nats) for every labelling in ``label_sets``, sharing the distances.

    Each block of distances between rows of ``t`` is computed once; the k-th neighbour
    within the class and the counts over all classes are taken from it for every labelling.
    Every labelling must have the same class sizes (permutations of one labelling do), each
    at least k + 1. Equal to :func:`ross_terms` per labelling.
    """
    n = t.shape[0]
    dev = t.device
    metric = "max" if norm == "max" else "l2"
    chunk = chunk or min(512, _auto_chunk(n, t.shape[1] if metric == "max" else 1, t.element_size()))
    from ibscope.estimators._knn import pairwise

    dig: Callable[[torch.Tensor], torch.Tensor] = torch.special.digamma  # untyped in torch (Any)
    f64 = torch.float64
    labs = [c.to(dev) for c in label_sets]
    counts = torch.bincount(labs[0])
    base = float(dig(torch.tensor(float(n), dtype=f64))) + float(dig(torch.tensor(float(k), dtype=f64)))
    sums = [0.0] * len(labs)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = pairwise(t[s:e], t, metric)
        rows = torch.arange(e - s, device=dev)
        for i, c in enumerate(labs):
            own = c[s:e]
            within = torch.where(c.unsqueeze(0) == own.unsqueeze(1), d, torch.full((), float("inf"), dtype=d.dtype,
                                                                                   device=dev))
            within[rows, rows + s] = float("inf")  # the point itself is not a neighbour
            r = torch.topk(within, k, dim=1, largest=False).values[:, k - 1]
            del within
            m = (d < r.unsqueeze(1)).sum(dim=1) - (r > 0).to(torch.int64)
            sums[i] += float((base - dig(counts[own].to(f64)) - dig((m + 1).to(f64))).sum())
    return [v / n for v in sums]


@register
@dataclass(frozen=True)
class KSG(PairEstimator):
    """Kraskov k-NN mutual information (KSG-1, or KSG-2), Ross (2014) for discrete y.

    ``k`` neighbours (Kraskov: 3-10; small k for high MI); ``algorithm`` 1 or 2; ``standardize``
    z-scores every column first (makes the estimate invariant to per-column scale);
    ``jitter`` relative noise added (seeded by ``seed``) to break tied distances; ``norm`` the
    within-block norm ("max" or "euclidean"); ``precision`` of the distances. Constant columns
    are dropped (they carry no information). stderr = std(per-point terms)/sqrt(N).
    ``copula`` rank-Gaussianises every continuous column first (Phi^-1(rank / (n + 1)), ties in
    a seeded random order): the MI is unchanged by these increasing maps, and KSG works better
    on Gaussian-like marginals than on skewed or heavy-tailed ones (and becomes invariant to
    any increasing map of any column).
    ``search`` the neighbour search: "auto" (a KD-tree on CPU with the max-norm where it is
    faster: joint dims d_x + d_y <= 2 + 1.2 log2(n / 2000), brute force otherwise), "brute" (chunked brute force on the data's device) or
    "tree" (scipy's cKDTree, CPU, max-norm). Every search gives the same counts, hence the same
    value; only the time differs (docs/estimate.md, "Speed").
    """

    k: int = param(3, Integer(ge=1))
    algorithm: int = param(1, OneOf(1, 2))
    standardize: bool = param(True, Boolean())
    jitter: float = param(1e-10, Real(ge=0))
    seed: int = param(0, Integer())
    norm: str = param("max", OneOf("max", "euclidean"))
    precision: str = param("float64", OneOf(*_DTYPES))
    copula: bool = param(False, Boolean())
    search: str = param("auto", OneOf(*_knn.SEARCHES))

    name: ClassVar[str] = "ksg"
    reference: ClassVar[str] = "Kraskov, Stoegbauer & Grassberger 2004, PRE 69:066138; Ross 2014, PLoS ONE 9:e87357"
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # every column is z-scored (or rank-Gaussianised) first; without that the joint max-norm mixes scales
        return "column" if (self.standardize or self.copula) else None

    def _prep(self, t: torch.Tensor, name: str, salt: int) -> tuple[torch.Tensor, list[int]]:
        if self.copula:
            t, dropped = _mi.continuous(self, t, name, standardize=False, dtype=torch.float64)
            t, _tied = _mi.copula_normalize(t, seed=int(self.seed) * 1000003 + 17 * salt)
        else:
            t, dropped = _mi.continuous(self, t, name, standardize=self.standardize, dtype=torch.float64)
        if self.jitter > 0:
            g = torch.Generator(device="cpu").manual_seed(int(self.seed) * 1000003 + salt)
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)
            scale = 1.0 if self.standardize else max(1.0, float(t.abs().mean()))
            t = t + float(self.jitter) * scale * noise
        return t.to(_DTYPES[self.precision]), dropped

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        tx, ty = _mi.pair(self, x, y)
        n = tx.shape[0]
        _mi.require_samples(self, n, self.k + 1, f"k={self.k} neighbours plus the point itself")
        split = _mi.split_discrete(self, tx, ty)
        extra: dict[str, Any] = {}
        cap = None
        if split is None:
            cx, dropx = self._prep(tx, "x", 1)
            cy, dropy = self._prep(ty, "y", 2)
            terms = ksg_terms(cx, cy, self.k, self.algorithm, self.norm, search=self.search)
            extra.update(dropped_constant_x=dropx, dropped_constant_y=dropy, method=f"KSG-{self.algorithm}",
                         search=ksg_search(cx, cy, self.norm, self.search, self.name))
        else:
            t, lab, swapped = split
            ct, dropt = self._prep(t, "y" if swapped else "x", 1)
            c = _mi.codes(lab)
            terms = ross_terms(ct, c, self.k, self.norm, self.name, search=self.search)
            cap = _mi.entropy_codes(c)
            extra.update(dropped_constant=dropt, method="Ross-2014",
                         search=_knn.resolve_search(self.name, self.search, device=ct.device, n=ct.shape[0],
                                                    dims=ct.shape[1], max_tree_dims=_knn.ksg_tree_max_dims(ct.shape[0]),
                                                    tree_ok=self.norm == "max"))
        value = float(terms.mean())
        stderr = float(terms.std() / math.sqrt(n)) if n > 1 else None
        return self._make(value, n=n, dims=(tx.shape[1], ty.shape[1]), stderr=stderr, cap=cap, extra=extra)

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        # I = 0 for a constant side; two discrete sides stay a usage error
        return "zero" if any(t.is_floating_point() for t in tensors) else None

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        # the jitter, the standardisation and the distances of the side that is not permuted
        # are computed once (Ross: all of them, with the labels permuted)
        tx, ty = _mi.pair(self, x, y)
        _mi.require_samples(self, tx.shape[0], self.k + 1, f"k={self.k} neighbours plus the point itself")
        split = _mi.split_discrete(self, tx, ty)
        if split is None:
            cx, _ = self._prep(tx, "x", 1)
            cy, _ = self._prep(ty, "y", 2)
            if cx.shape[1] < cy.shape[1]:  # permute the narrower side: its distances are recomputed
                # (x permuted by the inverse of p pairs the same rows as y permuted by p)
                return ksg_null_terms(cy, cx, self.k, [torch.argsort(p) for p in permutations], self.algorithm,
                                      self.norm)
            return ksg_null_terms(cx, cy, self.k, permutations, self.algorithm, self.norm)
        t, lab, swapped = split
        ct, _ = self._prep(t, "y" if swapped else "x", 1)
        c = _mi.codes(lab)
        counts = torch.bincount(c)
        if bool(((counts > 0) & (counts < self.k + 1)).any()):
            ross_terms(ct, c, self.k, self.norm, self.name)  # raises the class-size error
        perms = [torch.argsort(p) if swapped else p for p in permutations]  # labels = x: the inverse
        return ross_null_terms(ct, [c[p.to(c.device)] for p in perms], self.k, self.norm)
