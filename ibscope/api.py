"""The Python API for notebooks and scripts."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from ibscope.errors import UsageError
from ibscope.estimators import registry
from ibscope.estimators.base import Estimate

#: where saturation, caps and nulls are explained
TRUST_DOC = "docs/trust.md"


def integral_float_labels(t, name: str = "y", who: str = ""):
    """``t`` as int64 class labels when it is a float tensor holding only integer values, else None.

    The one rule for labels saved as floats (``y = (x > 0).astype(np.float32)``): they are the
    same classes as the integers, so ``capture``, ``estimate`` and the API read them as int64
    (with a warning) instead of as a continuous variable.
    """
    import torch

    if not t.is_floating_point() or t.numel() == 0 or not bool(torch.isfinite(t).all()):
        return None
    if not bool((t == torch.round(t)).all()) or float(t.abs().max()) >= 2.0 ** 62:
        return None
    from ibscope._labels import MIN_PER_CLASS, integral_values_are_classes

    vals = torch.unique(t)
    if not integral_values_are_classes(int(vals.numel()), int(t.shape[0])):
        return None  # a rounded continuous target (fewer than MIN_PER_CLASS samples per value): stays continuous
    shown = ", ".join(f"{float(v):g}" for v in vals[:5]) + (", ..." if vals.numel() > 5 else "")
    warnings.warn(
        f"{who}'{name}' holds floats ({str(t.dtype).replace('torch.', '')}) with only integer values "
        f"({vals.numel()} distinct: {shown}); they are read as discrete class labels (int64), the same classes as "
        f"integer labels (integer-valued floats with more than n/{MIN_PER_CLASS} distinct values stay continuous). "
        "For a continuous target pass discrete_y=False.", RuntimeWarning, stacklevel=3)
    return t.to(torch.int64)


def mutual_information(x, y, method: str = "ksg", *, null_permutations: int = 0, null_seed: int | None = None,
                       discrete_y: bool | None = None, **params: Any) -> Estimate:
    """Estimate I(X;Y) in nats with estimator ``method``.

    ``x`` and ``y`` are numpy arrays or torch tensors of shape (n, d) (1-D means (n, 1)).
    Integer arrays are treated as discrete (e.g. class labels). Computation runs on the
    tensors' device. ``params`` are the estimator's hyper-parameters (see
    ``ibscope estimators``). Returns an :class:`~ibscope.Estimate`; ``.value`` is in nats.

    ``discrete_y``: None (default) reads a float ``y`` of one column whose values are all
    integers, next to a continuous ``x``, as int64 class labels (labels saved as 0.0/1.0),
    with a warning; True makes ``y`` discrete whatever its dtype (each distinct row one
    class); False keeps a float ``y`` continuous.

    ``null_permutations=N`` also estimates the permutation null: the estimate with the rows
    of one side permuted N times (seeded), in ``null_mean``, ``null_std`` (nats) and
    ``p_value`` = (1 + #{null >= value}) / (N + 1); None when N = 0. The seed is
    ``null_seed``; without it, ``seed`` (for an estimator that has its own ``seed`` parameter,
    such as ksg, that value seeds both the estimator and the permutations; for the others
    ``seed`` is the permutations' seed), else 0. See :mod:`ibscope.estimators.nulls`.

    A value within 1 % of its cap (H(Y), log n, log batch) is flagged ``saturated`` and
    warned about: the estimator cannot show more at this n and width (see docs/trust.md).

    Speed (docs/estimate.md, "Speed"): an estimator whose work is linear in its input (the
    binning family) runs a problem of fewer than ``ibscope.estimators._fast.SERIAL_ELEMENTS``
    numbers on one torch thread (restored afterwards); the binning family keeps the prepared
    side (bins, symbols, entropy) of the last few inputs of up to 4 MiB, keyed by a SHA-256 of
    their bytes, so I(X;T) and I(T;Y) of one layer bin it once, and the ids and labels are
    prepared once for all layers. Values are the same as without.
    """
    from ibscope.estimators._fast import few_threads, row_codes
    from ibscope.estimators.base import as_tensor
    from ibscope.estimators.nulls import check_settings, with_null

    cls = registry.get(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    seed = params.get("seed") if "seed" in fields else params.pop("seed", None)
    if null_seed is None:
        null_seed = registry.coerce_param(cls, "seed", seed) if "seed" in fields and seed is not None else seed
        null_seed = 0 if null_seed is None else null_seed
    if null_permutations:
        check_settings(null_permutations, null_seed)
    else:
        check_settings(null_permutations, 0)
    if discrete_y not in (None, True, False):
        raise UsageError(f"discrete_y must be None, True or False. Got {discrete_y!r}.")
    est = registry.create(method, **params)
    if est.kind != "pair":
        raise UsageError(f"Estimator '{method}' measures one representation ({est.quantity}); use ibscope.measure().")
    # a small problem of an estimator whose work is linear in its input runs on one torch thread
    # (waking the thread pool for each small operation costs more than it saves)
    with few_threads(_elements(x) + _elements(y), getattr(est, "serial_below", 0)):
        if discrete_y or (discrete_y is None and _may_be_float(y) and _width(y) in (1, None)):
            ty = as_tensor(y, name="y", estimator=method)
            if discrete_y and ty.is_floating_point():
                y = row_codes(ty)  # the rank of each distinct row: torch.unique(dim=0)'s numbering
            elif discrete_y is None and ty.is_floating_point() and ty.shape[1] == 1 and \
                    as_tensor(x, name="x", estimator=method).is_floating_point():
                labels = integral_float_labels(ty, "y", f"{method}: ")  # labels saved as 0.0/1.0
                if labels is not None:
                    y = labels
        e = with_null(est, x, y, null_permutations, null_seed) if null_permutations else est.estimate(x, y)
    if e.saturated:
        warnings.warn(
            f"{method}: the estimate {e.value:.4g} nats is within 1% of its cap {e.cap:.4g} nats (n = {e.n_samples}): "
            "saturated. At this n and width the estimator cannot show more, and the value may be its bias rather "
            f"than information; compare it with a permutation null (null_permutations=10). See {TRUST_DOC}.",
            RuntimeWarning, stacklevel=2)
    return e


def _width(a) -> int | None:
    """The number of columns of a numpy array or tensor ``a`` as (n, d) (1-D: 1), None when not
    known without converting it."""
    shape = getattr(a, "shape", None)  # torch.Size is a tuple
    if not isinstance(shape, tuple):
        return None
    if len(shape) == 1:
        return 1
    return int(shape[1]) if len(shape) == 2 else None


def _may_be_float(a) -> bool:
    """False when ``a`` is certainly not a float array (an integer or bool numpy array or
    tensor: nothing to read as labels), True otherwise, without converting or checking it."""
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        return True
    is_float = getattr(a, "is_floating_point", None)
    if callable(is_float):  # a tensor
        return bool(is_float())
    return getattr(dtype, "kind", "f") in "fc"


def _elements(a) -> int:
    """How many numbers ``a`` holds (a tensor, an array, or anything numpy reads)."""
    if hasattr(a, "numel"):
        return int(a.numel())
    size = getattr(a, "size", None)
    if isinstance(size, int):
        return size
    import numpy as np

    try:
        return int(np.size(a))
    except Exception:  # unreadable input: the estimator reports it in its own words
        return 0


def measure(x, method: str = "effective-rank", **params: Any) -> Estimate:
    """Compute a single-representation measure (effective rank, intrinsic dimension, ...)."""
    est = registry.create(method, **params)
    if est.kind == "pair":
        raise UsageError(f"Estimator '{method}' needs two variables; use ibscope.mutual_information(x, y, method={method!r}).")
    from ibscope.estimators._fast import few_threads

    with few_threads(_elements(x), getattr(est, "serial_below", 0)):
        return est.estimate(x)
