"""Fast paths for small, cheap estimates: unique rows without ``torch.unique(dim=0)`` and one
torch thread for problems too small to share.

Why (measured on the 2-core CPU of issue 17, the demo's binning workload, 4,096 samples):

* ``torch.unique(t, dim=0, return_inverse=True)`` on a (4096, 10) int64 tensor costs 5-18 ms
  (it sorts rows with a generic comparator); numbering the rows through integer codes costs
  about 0.2 ms. :func:`row_codes` gives exactly the same numbers (the rank of each row among the
  distinct rows in lexicographic order, as ``torch.unique(dim=0)`` returns them).
* every torch operation on more than 32,768 elements is split over the intra-op thread pool;
  on a tensor of ~40,000 elements waking the pool costs more than the work, and on a loaded
  machine (more runnable threads than cores) far more: 9.9 s at 2 threads against 2.0 s at 1
  for the 65-cell workload. :func:`few_threads` runs such a problem on one thread and restores
  the setting afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: a per-column code range up to this is used as it is (value - min); wider columns are
#: numbered through their distinct values first, so a combined code never overflows int64
_DIRECT_RANGE = 1 << 31
#: combined codes stay below this (int64 without sign trouble)
_CODE_LIMIT = 1 << 62
#: codes spread over at most this many times n are compacted with a bincount, not a sort
_DENSE_FACTOR = 8


def _compact(c: torch.Tensor, lo: int | None = None, hi: int | None = None) -> tuple[torch.Tensor, int]:
    """(rank of each value of the int64 1-D tensor ``c`` among its distinct values, #distinct):
    the inverse of ``torch.unique(c, sorted=True, return_inverse=True)``. ``lo``/``hi``: bounds
    of the values when the caller knows them (saves a pass)."""
    n = c.numel()
    if lo is None or hi is None:
        lo, hi = int(c.min()), int(c.max())
    span = hi - lo + 1
    if span <= max(_DENSE_FACTOR * n, 1 << 16):
        shifted = c - lo if lo else c
        present = torch.bincount(shifted, minlength=span) > 0
        rank = torch.cumsum(present, 0)
        rank -= 1
        return rank.index_select(0, shifted), int(rank[-1]) + 1
    u, inv = torch.unique(c, sorted=True, return_inverse=True)
    return inv.reshape(-1), int(u.numel())


def _column_codes(col: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Order-preserving int64 codes of one column and their number of possible values."""
    if not col.is_floating_point() and not col.is_complex():
        lo, hi = int(col.min()), int(col.max())  # Python ints: hi - lo cannot overflow
        if hi - lo < _DIRECT_RANGE:
            c = col.to(torch.int64)
            return (c - lo if lo else c), hi - lo + 1
        c = col.to(torch.int64)
        return _compact(c)
    u, inv = torch.unique(col, sorted=True, return_inverse=True)
    return inv.reshape(-1).to(torch.int64), int(u.numel())


def _mixed_radix(c: torch.Tensor, spans: list[int]) -> tuple[torch.Tensor, int]:
    """Combine the order-preserving column codes ``c`` (n, d), column j in [0, spans[j]), into
    one int64 code per row (first column most significant) and its number of possible values,
    compacting whenever the product of the ranges would leave int64."""
    acc, k = None, 1
    j, d = 0, len(spans)
    while j < d:
        # the longest run of columns from j whose product of ranges fits: one multiply-add pass
        e, kb = j, 1
        while e < d and kb * spans[e] < _CODE_LIMIT:
            kb *= spans[e]
            e += 1
        if e == j:  # one column alone is too wide (cannot happen for spans <= 2**31)
            raise AssertionError("column code range too wide")
        if e - j == 1:
            block = c[:, j]
        else:
            strides, s = [], 1
            for span in reversed(spans[j:e]):
                strides.append(s)
                s *= span
            block = (c[:, j:e] * torch.tensor(strides[::-1], dtype=torch.int64, device=c.device)).sum(1)
        if acc is None:
            acc, k = block, kb
        else:
            if k * kb >= _CODE_LIMIT:
                acc, k = _compact(acc)  # k <= n now
            if k * kb >= _CODE_LIMIT:
                block, kb = _compact(block)
            acc = acc * kb + block
            k *= kb
        j = e
    assert acc is not None  # at least one column
    return acc, k


def row_codes(t: torch.Tensor, spans: list[int] | None = None) -> torch.Tensor:
    """See :func:`row_codes_count` (the symbols only)."""
    return row_codes_count(t, spans)[0]


def row_codes_count(t: torch.Tensor, spans: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """One int64 symbol per row of the (n, d) tensor ``t``: the rank of the row among the
    distinct rows in lexicographic order, exactly ``torch.unique(t, dim=0, return_inverse=True)[1]``
    (equal rows get equal symbols, the first column is the most significant; -0.0 equals 0.0).

    Each column becomes order-preserving integer codes (value - min for integers of a narrow
    range, the rank among its distinct values otherwise); the columns are combined in mixed
    radix while the product of their ranges fits int64 (one multiply-add pass over a block of
    columns), and the combined code is compacted to ranks (a bincount when dense, a 1-D sort
    otherwise). O(n d) plus at most a few 1-D sorts, on the tensor's device.

    ``spans``: for an integer ``t`` whose column j is known to hold values in [0, spans[j])
    (bin indices), skips finding each column's range; the symbols are the same.
    Returns (symbols, number of distinct rows).
    """
    if t.ndim == 1:
        t = t.reshape(-1, 1)
    n, d = t.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=t.device), 0
    integer = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    if integer and spans is not None and len(spans) == d and max(spans) <= _DIRECT_RANGE:
        acc, k = _mixed_radix(t.to(torch.int64), list(spans))
        return _compact(acc, 0, k - 1)
    if integer:
        if d == 1:
            lo, hi = torch.aminmax(t)
            lo_l, hi_l = [int(lo)], [int(hi)]
        else:
            lo, hi = torch.aminmax(t, dim=0)
            lo_l, hi_l = lo.tolist(), hi.tolist()
        spans = [b - a + 1 for a, b in zip(lo_l, hi_l)]  # Python ints: no overflow
        if max(spans) <= _DIRECT_RANGE:
            c = t.to(torch.int64)
            if any(lo_l):
                c = c - lo.to(torch.int64)
            if d == 1:
                return _compact(c.reshape(-1), 0, spans[0] - 1)
            acc, k = _mixed_radix(c, spans)
            return _compact(acc, 0, k - 1)
    cols = [_column_codes(t[:, j]) for j in range(d)]
    c = torch.stack([cc for cc, _ in cols], dim=1)
    acc, k = _mixed_radix(c, [k for _, k in cols])
    return _compact(acc, 0, k - 1)


# ----------------------------------------------------------------------------- threads
#: problems with fewer elements than this run on one torch thread inside few_threads
#: (benchmarks/bench_overhead.py --threads measures the crossover; see docs/estimate.md "Speed")
SERIAL_ELEMENTS = 1 << 20

_lock = threading.Lock()
_depth = 0
_saved = 0


@contextlib.contextmanager
def few_threads(elements: int, limit: int = SERIAL_ELEMENTS) -> Iterator[None]:
    """Run the block on one torch thread when the problem has fewer than ``limit`` elements
    (and torch uses more than one); the thread count is restored on exit, also after an error.

    For work linear in the input (binning, plug-in entropies): below about a million elements
    waking the intra-op pool for each small operation costs more than it saves. Nested uses
    and uses from several Python threads share one saved setting, restored when the last one
    leaves. Has no effect on a GPU's kernels (only CPU threads are changed).
    """
    global _depth, _saved
    if elements >= limit:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            if _saved > 1:
                torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved > 1 and torch.get_num_threads() == 1:
                torch.set_num_threads(_saved)
