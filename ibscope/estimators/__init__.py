"""Estimators: mutual information and single-representation measures (see base.py).

The contract (:class:`PairEstimator`, :class:`SingleEstimator`, :class:`JacobianEstimator`,
:class:`Estimate`), the declared parameter constraints (:func:`param` and the constraint types)
and the registry (:func:`available`, :func:`get`, :func:`create`, :func:`register`,
:func:`register_alias`). Importing this package imports no estimator module: the registry
loads them on first use.
"""

from ibscope.estimators.base import (
    ArrayLike,
    Estimate,
    Estimator,
    JacobianEstimator,
    Kind,
    PairEstimator,
    SingleEstimator,
    kind_of,
)
from ibscope.estimators.params import Boolean, Constraint, Integer, OneOf, OrNone, Real, constraints, param
from ibscope.estimators.registry import Alias, aliases, available, create, describe, get, register, register_alias

__all__ = [
    "Alias",
    "ArrayLike",
    "Boolean",
    "Constraint",
    "Estimate",
    "Estimator",
    "Integer",
    "JacobianEstimator",
    "Kind",
    "OneOf",
    "OrNone",
    "PairEstimator",
    "Real",
    "SingleEstimator",
    "aliases",
    "available",
    "constraints",
    "create",
    "describe",
    "get",
    "kind_of",
    "param",
    "register",
    "register_alias",
]
