"""CPU kernels for the brute-force neighbour searches (numba, compiled on first use).

Why: torch's ``cdist(p=inf)`` vectorises each pair's loop over the d coordinates (one horizontal
reduction per pair), which runs at about 1 G pair-dims/s whatever the dtype; and ``torch.topk`` on
CPU costs more than the matrix multiply that feeds it for k-NN at d <= 64. The kernels here put
the reference rows in the SIMD lanes instead (coordinates stored transposed, (d, n) contiguous):
each step is a subtract, an absolute value and a max over contiguous reference points, four
coordinates per pass over a row buffer that stays in the L1/L2 cache. Measured here (one core,
float64): 3.6-3.9 G pair-dims/s against 0.85 for ``torch.cdist(p=inf)`` (benchmarks/bench_ksg.py
prints the figure of each run).

Every kernel is exact: the max-norm of float64 coordinates is computed from the same
differences ``|a - b|`` as torch and scipy, so the KSG counts are identical, bit for bit, to
the torch path (on any device) and to the KD-tree path (tests/test_knn_search.py). Memory is
O(threads x n) (one distance row per thread), never n x n.

Threads: the kernels run on ``torch.get_num_threads()`` threads (numba's own pool), so a
limit set for torch (``torch.set_num_threads``, ``--jobs``) also holds here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy.typing as npt
    import torch

#: the kernels' inline helpers, numba dispatchers defined by ``_kernels()`` (module globals: see there)
maxnorm_row_ref: Any
maxnorm_row: Any
select_k: Any

#: rows handled by one parallel task (amortises the per-task row buffers)
_ROWS_PER_TASK = 16


@functools.cache
def available() -> bool:
    """True when numba can be imported (it ships with ibscope's umap-learn dependency)."""
    try:
        import numba  # noqa: F401
    except Exception:  # pragma: no cover - an environment without numba falls back to torch
        return False
    return True


def _threads() -> int:
    import numba
    import torch

    nt = max(1, min(int(torch.get_num_threads()), int(numba.config.NUMBA_NUM_THREADS)))
    numba.set_num_threads(nt)
    return nt


@functools.cache
def _kernels() -> dict[str, Any]:
    """Compile (or load from numba's cache) the kernels once per process. The values are numba
    dispatchers (untyped to mypy: numba's module is skipped); arrays are float32 or float64,
    except the int64 counts and indices."""
    # The inline helpers are module globals, not closure cells of the kernels that call them:
    # numba's cache key hashes a kernel's closure variables, and a dispatcher pickles with a
    # per-process id, so kernels closing over a helper missed the cache in every new process
    # (several seconds of compilation per process, and one more cache entry each time).
    global maxnorm_row_ref, maxnorm_row, select_k
    import numba
    from numba import prange

    # numba is untyped to mypy (its module is skipped): a typed name for its decorator, whose
    # result (a dispatcher compiled on first call) is Any
    njit: Callable[..., Callable[[Callable[..., None]], Any]] = numba.njit
    opts = dict(cache=True, boundscheck=False, fastmath=True, nogil=True)

    @njit(inline="always", **opts)
    def maxnorm_row_ref(qT: np.ndarray, i: int, rT: np.ndarray, out: np.ndarray) -> None:
        """out[j] = max_t |q[i, t] - r[j, t]| (qT (d, m), rT (d, n))."""
        d, n = rT.shape
        q0 = qT[0, i]
        for j in range(n):
            out[j] = abs(q0 - rT[0, j])
        t = 1
        while t + 3 < d:
            qa = qT[t, i]
            qb = qT[t + 1, i]
            qc = qT[t + 2, i]
            qd = qT[t + 3, i]
            for j in range(n):
                out[j] = max(max(out[j], abs(qa - rT[t, j])),
                             max(max(abs(qb - rT[t + 1, j]), abs(qc - rT[t + 2, j])), abs(qd - rT[t + 3, j])))
            t += 4
        while t < d:
            qa = qT[t, i]
            for j in range(n):
                out[j] = max(out[j], abs(qa - rT[t, j]))
            t += 1

    @njit(inline="always", **opts)
    def maxnorm_row(xT: np.ndarray, i: int, out: np.ndarray) -> None:
        """out[j] = max_t |x[i, t] - x[j, t]| for every j (xT is (d, n)): the query is row i of x."""
        maxnorm_row_ref(xT, i, xT, out)

    @njit(inline="always", **opts)
    def select_k(row: np.ndarray, k: int, skip: int, vals: np.ndarray, idx: npt.NDArray[np.int64]) -> None:
        """The k smallest of row (index ``skip`` left out; -1: none), ascending, into vals/idx.

        Among equal values the lower index comes first; the inputs are finite."""
        for q in range(k):
            vals[q] = np.inf
            idx[q] = -1
        worst = np.inf
        n = row.shape[0]
        for j in range(n):
            v = row[j]
            if v < worst and j != skip:
                p = k - 1
                while p > 0 and vals[p - 1] > v:
                    vals[p] = vals[p - 1]
                    idx[p] = idx[p - 1]
                    p -= 1
                vals[p] = v
                idx[p] = j
                worst = vals[k - 1]

    @njit(parallel=True, **opts)
    def ksg(xT: np.ndarray, yT: np.ndarray, k: int, variant: int, nx_out: npt.NDArray[np.int64],
            ny_out: npt.NDArray[np.int64]) -> None:
        """KSG-1 (variant 1) or KSG-2 (variant 2) counts with the max-norm in each block."""
        n = xT.shape[1]
        ntask = (n + 15) // 16
        for b in prange(ntask):
            dx = np.empty(n, xT.dtype)
            dy = np.empty(n, xT.dtype)
            dz = np.empty(n, xT.dtype)
            vals = np.empty(k, xT.dtype)
            idx = np.empty(k, np.int64)
            for i in range(b * 16, min(n, b * 16 + 16)):
                maxnorm_row(xT, i, dx)
                maxnorm_row(yT, i, dy)
                for j in range(n):
                    dz[j] = max(dx[j], dy[j])
                select_k(dz, k, i, vals, idx)
                if variant == 1:
                    eps = vals[k - 1]
                    cx = 0
                    cy = 0
                    for j in range(n):
                        cx += dx[j] < eps
                        cy += dy[j] < eps
                    s = 1 if eps > 0 else 0  # the point itself (distance 0) is counted when 0 < eps
                    nx_out[i] = cx - s
                    ny_out[i] = cy - s
                else:
                    ex = dx[idx[0]]
                    ey = dy[idx[0]]
                    for q in range(1, k):
                        ex = max(ex, dx[idx[q]])
                        ey = max(ey, dy[idx[q]])
                    cx = 0
                    cy = 0
                    for j in range(n):
                        cx += dx[j] <= ex
                        cy += dy[j] <= ey
                    nx_out[i] = cx - 1
                    ny_out[i] = cy - 1

    @njit(parallel=True, **opts)
    def kth_maxnorm(xT: np.ndarray, k: int, out: np.ndarray) -> None:
        """Distance from each point to its k-th nearest other point (max-norm)."""
        n = xT.shape[1]
        ntask = (n + 15) // 16
        for b in prange(ntask):
            row = np.empty(n, xT.dtype)
            vals = np.empty(k, xT.dtype)
            idx = np.empty(k, np.int64)
            for i in range(b * 16, min(n, b * 16 + 16)):
                maxnorm_row(xT, i, row)
                select_k(row, k, i, vals, idx)
                out[i] = vals[k - 1]

    @njit(parallel=True, **opts)
    def count_maxnorm(xT: np.ndarray, radius: np.ndarray, out: npt.NDArray[np.int64]) -> None:
        """#{j != i : max-norm(x_i, x_j) < radius[i]} (strict)."""
        n = xT.shape[1]
        ntask = (n + 15) // 16
        for b in prange(ntask):
            row = np.empty(n, xT.dtype)
            for i in range(b * 16, min(n, b * 16 + 16)):
                maxnorm_row(xT, i, row)
                r = radius[i]
                c = 0
                for j in range(n):
                    c += row[j] < r
                out[i] = c - (1 if r > 0 else 0)

    @njit(parallel=True, **opts)
    def merge_k(block: np.ndarray, col0: int, skip0: int, vals: np.ndarray, idx: npt.NDArray[np.int64]) -> None:
        """Merge the columns of ``block`` (m, nb), which are columns col0.. of the full row, into the
        running k smallest (vals, idx) (m, k) ascending; row i leaves out column skip0 + i."""
        m, nb = block.shape
        k = vals.shape[1]
        for i in prange(m):
            skip = skip0 + i - col0 if skip0 >= 0 else -1
            vi = vals[i]
            ii = idx[i]
            worst = vi[k - 1]
            row = block[i]
            for j in range(nb):
                v = row[j]
                if v < worst and j != skip:
                    p = k - 1
                    while p > 0 and vi[p - 1] > v:
                        vi[p] = vi[p - 1]
                        ii[p] = ii[p - 1]
                        p -= 1
                    vi[p] = v
                    ii[p] = col0 + j
                    worst = vi[k - 1]

    @njit(parallel=True, **opts)
    def smallest_k(block: np.ndarray, k: int, skip0: int, vals_out: np.ndarray,
                   idx_out: npt.NDArray[np.int64]) -> None:
        """Row-wise k smallest of a (m, n) block, ascending; row i leaves out column skip0 + i
        (skip0 < 0: leaves out nothing)."""
        m = block.shape[0]
        for i in prange(m):
            skip = skip0 + i if skip0 >= 0 else -1
            select_k(block[i], k, skip, vals_out[i], idx_out[i])

    @njit(parallel=True, **opts)
    def sqeuclidean_block(qT: np.ndarray, rT: np.ndarray, out: np.ndarray) -> None:
        """out[i, j] = sum_t (q[i, t] - r[j, t])^2 in the dtype of the inputs (difference form:
        no cancellation, relative error <= (d + 1) u)."""
        d, n = rT.shape
        m = qT.shape[1]
        for i in prange(m):
            q0 = qT[0, i]
            for j in range(n):
                v = q0 - rT[0, j]
                out[i, j] = v * v
            t = 1
            while t + 1 < d:
                qa = qT[t, i]
                qb = qT[t + 1, i]
                for j in range(n):
                    a = qa - rT[t, j]
                    c = qb - rT[t + 1, j]
                    out[i, j] += a * a + c * c
                t += 2
            if t < d:
                qa = qT[t, i]
                for j in range(n):
                    a = qa - rT[t, j]
                    out[i, j] += a * a

    @njit(parallel=True, **opts)
    def scaled_sqeuclidean_block(qh: npt.NDArray[np.float32], ql: npt.NDArray[np.float32],
                                 rh: npt.NDArray[np.float32], rl: npt.NDArray[np.float32], c: np.float32,
                                 out: npt.NDArray[np.float32]) -> None:
        """out[i, j] = c * sum_t (q[i, t] - r[j, t])^2 in float32 from the two-float32 split of
        each coordinate (x = hi + lo): the difference (qh - rh) + (ql - rl) keeps the float64
        coordinates' precision, so even tiny distances between large coordinates have relative
        error ~ u_32, not u_32 |x| / |x_i - x_j| as with plain float32 coordinates."""
        d, n = rh.shape
        m = qh.shape[1]
        for i in prange(m):
            for j in range(n):
                out[i, j] = 0.0
            for t in range(d):
                qa = qh[t, i]
                qb = ql[t, i]
                for j in range(n):
                    v = (qa - rh[t, j]) + (qb - rl[t, j])
                    out[i, j] += v * v
            for j in range(n):
                out[i, j] *= c

    return dict(scaled_sqeuclidean_block=scaled_sqeuclidean_block, merge_k=merge_k, ksg=ksg, kth_maxnorm=kth_maxnorm, count_maxnorm=count_maxnorm, smallest_k=smallest_k,
                sqeuclidean_block=sqeuclidean_block, maxnorm_row_ref=maxnorm_row_ref)


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def ksg_counts(x: np.ndarray, y: np.ndarray, k: int, variant: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(n_x, n_y) per point of KSG-1 (strict counts below the joint k-th neighbour distance) or
    KSG-2 (counts <= the marginal extents of the k joint neighbours), max-norm in each block.

    ``x`` (n, d_x) and ``y`` (n, d_y) are float arrays of one dtype."""
    _threads()
    n = x.shape[0]
    nx = np.empty(n, np.int64)
    ny = np.empty(n, np.int64)
    _kernels()["ksg"](_t(x), _t(y.astype(x.dtype, copy=False)), int(k), int(variant), nx, ny)
    return nx, ny


def kth_maxnorm(x: np.ndarray, k: int) -> np.ndarray:
    """Max-norm distance from each row of ``x`` to its k-th nearest other row."""
    _threads()
    out = np.empty(x.shape[0], x.dtype)
    _kernels()["kth_maxnorm"](_t(x), int(k), out)
    return out


def count_maxnorm(x: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """#{j != i : max-norm distance < radius[i]} for each row i of ``x``."""
    _threads()
    out = np.empty(x.shape[0], np.int64)
    _kernels()["count_maxnorm"](_t(x), np.ascontiguousarray(radius, dtype=x.dtype), out)
    return out


def smallest_k(block: np.ndarray, k: int, skip0: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise k smallest values of ``block`` (m, n) and their column indices, ascending
    (row i leaves out column ``skip0 + i`` when ``skip0 >= 0``). Linear in n per row, where
    ``torch.topk`` on CPU is several times slower at k >= 10."""
    _threads()
    m = block.shape[0]
    vals = np.empty((m, k), block.dtype)
    idx = np.empty((m, k), np.int64)
    _kernels()["smallest_k"](np.ascontiguousarray(block), int(k), int(skip0), vals, idx)
    return vals, idx


def knn_gemm(q: torch.Tensor, r: torch.Tensor, k: int, *, exclude_self: bool, q_chunk: int = 512,
             r_chunk: int = 4096) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """k smallest squared-distance *ranks* of rows of ``r`` for each row of ``q`` (torch CPU
    float tensors), GEMM form: returns (vals (m, k) = ||r_j||^2 - 2 q.r_j, ascending, float;
    idx (m, k) int64). Add ||q_i||^2 to get squared distances.

    Blocks of q_chunk x r_chunk are small enough to stay in the cache between the matrix multiply
    (torch, BLAS) and the selection (numba, one pass, running top-k merged block by block), so the
    search costs little more than the GEMM itself. With ``exclude_self`` (q is r) row i skips column i.
    """
    import torch

    _threads()
    m, n = q.shape[0], r.shape[0]
    rn = (r * r).sum(1)
    vals = np.full((m, k), np.inf, dtype=np.float32 if q.dtype == torch.float32 else np.float64)
    idx = np.full((m, k), -1, dtype=np.int64)
    merge = _kernels()["merge_k"]
    buf = torch.empty((min(q_chunk, m), min(r_chunk, n)), dtype=q.dtype)
    for s in range(0, m, q_chunk):
        e = min(m, s + q_chunk)
        for c in range(0, n, r_chunk):
            ce = min(n, c + r_chunk)
            blk = buf[: e - s, : ce - c]
            torch.addmm(rn[c:ce].unsqueeze(0), q[s:e], r[c:ce].T, alpha=-2.0, out=blk)
            merge(blk.numpy(), c, s if exclude_self else -1, vals[s:e], idx[s:e])
    return vals, idx


def kde_log_sums(t: np.ndarray, scale: float, chunk: int = 1024) -> np.ndarray:
    """log sum_j exp(-scale * |t_i - t_j|^2) for every row i of ``t`` (n, d), float64 (n,).

    Squared distances in float32 from coordinate differences of the hi/lo float32 split of the
    float64 coordinates (no GEMM cancellation, no loss from rounding the coordinates: relative
    error ~ (d + 2) u_32 on each squared distance),
    exp and sums in float64 (numpy's SIMD exp). The self term exp(0) = 1 is
    the largest of every row, so no max-shift is needed and the sum is >= 1. Rows in chunks:
    memory O(chunk x n) float32."""
    _threads()
    t = np.ascontiguousarray(t, dtype=np.float64)
    hi = t.astype(np.float32)
    hT, lT = _t(hi), _t((t - hi).astype(np.float32))
    n = t.shape[0]
    out = np.empty(n, np.float64)
    buf = np.empty((min(chunk, n), n), np.float32)
    b64 = np.empty((min(chunk, n), n), np.float64)
    kern = _kernels()["scaled_sqeuclidean_block"]
    c = np.float32(-scale)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        blk = buf[: e - s]
        kern(np.ascontiguousarray(hT[:, s:e]), np.ascontiguousarray(lT[:, s:e]), hT, lT, c, blk)
        ex = np.exp(blk, out=b64[: e - s], dtype=np.float64)  # float64 exp of the float32 exponents (6x smaller error than expf)
        out[s:e] = np.log(ex.sum(axis=1))
    return out


def sqeuclidean_block(q: np.ndarray, r: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distances (m, n) from coordinate differences, in the inputs' dtype."""
    _threads()
    if out is None:
        out = np.empty((q.shape[0], r.shape[0]), q.dtype)
    _kernels()["sqeuclidean_block"](_t(q), _t(r), out)
    return out
