"""Estimators: mutual information and single-representation measures (see base.py)."""

from ibscope.estimators.base import Estimate, Estimator
from ibscope.estimators.registry import available, create, get, register

__all__ = ["Estimate", "Estimator", "available", "create", "get", "register"]
