"""The Python API for notebooks and scripts."""

from __future__ import annotations

from typing import Any

from ibscope.errors import UsageError
from ibscope.estimators import registry
from ibscope.estimators.base import Estimate


def mutual_information(x, y, method: str = "ksg", **params: Any) -> Estimate:
    """Estimate I(X;Y) in nats with estimator ``method``.

    ``x`` and ``y`` are numpy arrays or torch tensors of shape (n, d) (1-D means (n, 1)).
    Integer arrays are treated as discrete (e.g. class labels). Computation runs on the
    tensors' device. ``params`` are the estimator's hyper-parameters (see
    ``ibscope estimators``). Returns an :class:`~ibscope.Estimate`; ``.value`` is in nats.
    """
    est = registry.create(method, **params)
    if est.kind != "pair":
        raise UsageError(f"Estimator '{method}' measures one representation ({est.quantity}); use ibscope.measure().")
    return est.estimate(x, y)


def measure(x, method: str = "effective-rank", **params: Any) -> Estimate:
    """Compute a single-representation measure (effective rank, intrinsic dimension, ...)."""
    est = registry.create(method, **params)
    if est.kind == "pair":
        raise UsageError(f"Estimator '{method}' needs two variables; use ibscope.mutual_information(x, y, method={method!r}).")
    return est.estimate(x)
