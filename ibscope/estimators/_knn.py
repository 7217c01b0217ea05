"""Chunked k-nearest-neighbour kernels in torch, shared by KSG, intrinsic dimension and OOD.

Memory is O(chunk x n): the n x n distance matrix is never materialised. Distances are
computed in the dtype of the inputs (pass float64 where sums of logs or ties matter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

import torch

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: rows of the query block; chunk * n_ref distances are held at once
DEFAULT_CHUNK = 1024


def _auto_chunk(n_ref: int, d: int, itemsize: int, budget_bytes: int = 256 * 2**20) -> int:
    # a block holds chunk x n_ref distances (plus a chunk x n_ref x d temporary for max-norm)
    per_row = max(1, n_ref * itemsize * (d if d > 1 else 1))
    return int(max(16, min(8192, budget_bytes // per_row)))


def _cpu_ok() -> bool:
    from ibscope.estimators import _cpu

    return _cpu.available()


def pairwise(q: torch.Tensor, r: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distances between rows of ``q`` (m, d) and ``r`` (n, d): 'l2', 'sqeuclidean' or 'max'
    (exact, vectorised), or 'l2_mm' / 'sqeuclidean_mm' (matrix-multiply form, fast)."""
    if metric == "max":
        return torch.cdist(q, r, p=float("inf"))
    if metric in ("l2_mm", "sqeuclidean_mm"):
        # GEMM form ||q||^2 + ||r||^2 - 2 q.r (what sklearn brute and faiss use): ~20x faster
        # than the exact mode at d >= 64, absolute error ~eps * ||q||^2 on squared distances.
        # one fused GEMM (-2 q.r + ||r||^2) plus in-place ops: ~2x fewer passes over the block
        d = torch.addmm((r * r).sum(1).unsqueeze(0), q, r.T, alpha=-2.0)
        d.add_((q * q).sum(1, keepdim=True)).clamp_min_(0.0)
        return d.sqrt_() if metric == "l2_mm" else d
    if metric in ("l2", "sqeuclidean"):
        # ||q||^2 + ||r||^2 - 2 q.r is fast (a matmul) but loses precision; cdist with the
        # 'donot_use_mm' mode is exact and still vectorised.
        d = torch.cdist(q, r, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
        return d * d if metric == "sqeuclidean" else d
    raise ValueError(f"Unknown metric '{metric}'. Expected 'l2', 'sqeuclidean', 'l2_mm', 'sqeuclidean_mm' or 'max'.")


@overload
def kth_neighbor_distances(
    x: torch.Tensor, k: int, *, ref: torch.Tensor | None = ..., metric: str = ..., exclude_self: bool = ...,
    chunk: int | None = ..., return_all: bool = ..., return_indices: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def kth_neighbor_distances(
    x: torch.Tensor, k: int, *, ref: torch.Tensor | None = ..., metric: str = ..., exclude_self: bool = ...,
    chunk: int | None = ..., return_all: bool = ..., return_indices: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def kth_neighbor_distances(
    x: torch.Tensor,
    k: int,
    *,
    ref: torch.Tensor | None = None,
    metric: str = "l2",
    exclude_self: bool = True,
    chunk: int | None = None,
    return_all: bool = False,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Distance from each row of ``x`` to its k-th nearest row of ``ref`` (default: ``x``).

    With ``exclude_self`` (only meaningful when ``ref`` is ``x``) the point itself is not a
    neighbour. Returns shape (m,), or (m, k) with all k smallest distances sorted ascending
    when ``return_all``. With ``return_indices`` returns ``(distances, indices)``, the
    indices (int64, same shape) of those neighbours in ``ref``.
    """
    same = ref is None
    r = x if ref is None else ref
    m, n = x.shape[0], r.shape[0]
    kk = k + (1 if (same and exclude_self) else 0)
    if kk > n:
        raise ValueError(f"k={k} needs at least {kk} reference points; got {n}.")
    chunk = chunk or _auto_chunk(n, x.shape[1] if metric == "max" else 1, x.element_size())
    out = torch.empty((m, k) if return_all else (m,), dtype=x.dtype, device=x.device)
    out_idx = torch.empty(out.shape, dtype=torch.int64, device=x.device) if return_indices else None
    # On CPU the row-wise selection runs in numba (one linear pass; torch.topk costs as much as
    # the GEMM at d <= 64). For the GEMM forms the per-row constant ||q||^2 is added after the
    # selection: x -> fl(x + c) is monotone, so the k-th value is the same as adding it first.
    fast = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and _cpu_ok()
    gemm = metric in ("l2_mm", "sqeuclidean_mm")
    rn = (r * r).sum(1).unsqueeze(0) if (fast and gemm) else None
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        if fast:
            from ibscope.estimators import _cpu

            if rn is not None:  # the GEMM forms
                d = torch.addmm(rn, x[s:e], r.T, alpha=-2.0)
            else:
                d = pairwise(x[s:e], r, metric)
            v, i = _cpu.smallest_k(d.numpy(), k, s if (same and exclude_self) else -1)
            vals, ind = torch.from_numpy(v), torch.from_numpy(i)
            if gemm:
                vals.add_((x[s:e] * x[s:e]).sum(1, keepdim=True)).clamp_min_(0.0)
                if metric == "l2_mm":
                    vals.sqrt_()
            out[s:e] = vals if return_all else vals[:, k - 1]
            if out_idx is not None:
                out_idx[s:e] = ind if return_all else ind[:, k - 1]
            continue
        d = pairwise(x[s:e], r, metric)
        if same and exclude_self:
            idx = torch.arange(s, e, device=x.device)
            d[idx - s, idx] = float("inf")
        vals, ind = torch.topk(d, k, dim=1, largest=False)
        out[s:e] = vals if return_all else vals[:, k - 1]
        if out_idx is not None:
            out_idx[s:e] = ind if return_all else ind[:, k - 1]
    return (out, out_idx) if return_indices else out


def count_within(
    x: torch.Tensor,
    radius: torch.Tensor,
    *,
    metric: str = "max",
    strict: bool = True,
    exclude_self: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """For each row i of ``x``, the number of rows j != i with dist(x_i, x_j) < radius_i.

    ``strict=False`` counts ``<=``. Returns an int64 tensor of shape (n,).
    """
    n = x.shape[0]
    chunk = chunk or _auto_chunk(n, x.shape[1] if metric == "max" else 1, x.element_size())
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = pairwise(x[s:e], x, metric)
        rad = radius[s:e].unsqueeze(1)
        c = (d < rad) if strict else (d <= rad)
        cnt = c.sum(dim=1)
        if exclude_self:  # the point itself is at distance 0: counted when 0 < r (or 0 <= r)
            cnt = cnt - ((radius[s:e] > 0).to(torch.int64) if strict else 1)
        out[s:e] = cnt
    return out


# --- choice of the neighbour search -------------------------------------------------------------
#
# "brute": chunked brute force (torch on any device; on CPU the numba kernels of _cpu.py where they
# apply). "tree": scipy's cKDTree (CPU only; exact, float64). "auto": the tree where it is faster,
# by the crossovers below, measured on this project's 2-core CPU with benchmarks/bench_ksg.py,
# bench_geometry.py and bench_ood.py (docs/estimate.md, "Speed"). A KD-tree's cost grows with the
# (intrinsic) dimension; brute force's with n^2: the tree wins at small dims and large n.

SEARCHES = ("auto", "brute", "tree")

def ksg_tree_max_dims(n: int) -> float:
    """KSG / Ross (max-norm): the tree is used for joint dimension d_x + d_y <= this.

    Measured crossover (tree time = brute time; Gaussian data, intrinsic = ambient dimension, so
    conservative for real layers whose intrinsic dimension is lower): joint dims 2 at n = 2,000,
    4-5 at n = 10,000, 7-8 at n = 50,000; the tree's n log n against brute force's n^2 moves it
    up by about 1.2 dims per doubling of n."""
    import math

    return 2.0 + 1.2 * math.log2(max(n, 1) / 2000.0)

#: intrinsic dimension (TwoNN/MLE) and k-NN OOD: the tree for feature dims <= this
KNN_TREE_MAX_DIMS = 8
#: below this many points either search takes milliseconds: brute force (no tree build)
TREE_MIN_N = 1000


def check_search(who: str, search: object) -> None:
    """UsageError (exit 2) unless ``search`` is one of SEARCHES."""
    if search not in SEARCHES:
        from ibscope.errors import UsageError

        raise UsageError(f"The 'search' parameter of {who} must be one of {list(SEARCHES)}. Got {search!r} instead.",
                         hint="'auto' picks a KD-tree at small dimensions on CPU and brute force otherwise.")


def resolve_search(who: str, search: str, *, device: torch.device | str, n: int, dims: int, max_tree_dims: float,
                   tree_ok: bool = True, why_not: str = "") -> str:
    """'tree' or 'brute' for a search over ``n`` points of ``dims`` coordinates on ``device``.

    An explicit 'tree' on a GPU tensor, or where ``tree_ok`` is False, is a UsageError naming
    the reason (trees run on the CPU only; brute force runs everywhere)."""
    check_search(who, search)
    on_cpu = torch.device(device).type == "cpu"
    if search == "tree":
        from ibscope.errors import UsageError

        if not on_cpu:
            raise UsageError(f"{who}: search='tree' runs on the CPU only (scipy's KD-tree); the data are on {device}.",
                             hint="Use search='auto' or 'brute' (brute force runs on the GPU).")
        if not tree_ok:
            raise UsageError(f"{who}: search='tree' is not available here: {why_not}.",
                             hint="Use search='auto' or 'brute'.")
        return "tree"
    if search == "brute":
        return "brute"
    return "tree" if (on_cpu and tree_ok and n >= TREE_MIN_N and dims <= max_tree_dims) else "brute"


def _workers(n: int = 1 << 30) -> int:
    """Threads for a cKDTree query over n points: scipy starts its threads on every call, which
    costs more than it saves below ~20,000 queries."""
    return max(1, int(torch.get_num_threads())) if n >= 20000 else 1


def _strict(r: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Radii for '<' counts with a '<=' ball query: the next float below r (0 stays 0)."""
    import numpy as np

    return np.nextafter(r, 0.0)


def tree_knn(x: npt.ArrayLike, k: int, *, p: float = float("inf"),
             ref: npt.ArrayLike | None = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """(distances (m, k), indices (m, k)) of the k nearest rows of ``ref`` (default: ``x``, the
    point itself left out) by scipy's cKDTree in float64 with the Minkowski p-norm, ascending.

    ``x``/``ref`` are numpy float arrays. With ``ref`` None, k + 1 neighbours are found and the
    point itself removed (when duplicates tie with it at distance 0, one 0 is removed, which
    leaves the same distances)."""
    import numpy as np
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=np.float64)
    if ref is not None:
        r = np.asarray(ref, dtype=np.float64)
        dist, idx = cKDTree(r).query(x, k, p=p, workers=_workers(len(x)))
        return dist.reshape(len(x), k), idx.reshape(len(x), k)
    dist, idx = cKDTree(x).query(x, k + 1, p=p, workers=_workers(len(x)))
    n = len(x)
    own = idx == np.arange(n)[:, None]
    # rows where the point itself is not among the k+1 returned (more than k duplicates): drop the last
    missing = ~own.any(axis=1)
    own[missing, k] = True
    keep = ~own
    return dist[keep].reshape(n, k), idx[keep].reshape(n, k)


def tree_count(x: npt.ArrayLike, radius: npt.ArrayLike, *, p: float = float("inf"), strict: bool = True,
               tree: Any = None) -> npt.NDArray[np.int64]:
    """#{j != i : dist(x_i, x_j) < radius_i} (``<=`` when not ``strict``) by cKDTree, int64.
    ``tree``: a cKDTree of ``x`` already built (scipy is untyped)."""
    import numpy as np
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=np.float64)
    radius = np.asarray(radius, dtype=np.float64)
    t = tree if tree is not None else cKDTree(x)
    r = _strict(radius) if strict else radius
    c: npt.NDArray[np.int64] = t.query_ball_point(x, r, p=p, return_length=True, workers=_workers(len(x))).astype(np.int64) - 1
    if strict:
        c[radius <= 0] = 0  # nothing is strictly closer than 0 (the ball of radius 0 holds the point)
    return c
