"""ibscope: information planes, representation geometry and OOD reports for PyTorch runs.

Public API (imported lazily so that ``import ibscope`` stays light)::

    ibscope.mutual_information(x, y, method="ksg", **params) -> Estimate   # nats
    ibscope.measure(x, method="effective-rank", **params) -> Estimate
    ibscope.Estimate, ibscope.open_store(path), ibscope.read_results(path)
"""

from __future__ import annotations

from ibscope._version import __version__

__all__ = ["__version__", "Estimate", "mutual_information", "measure", "open_store", "read_results"]


def __getattr__(name: str):
    if name == "Estimate":
        from ibscope.estimators.base import Estimate

        return Estimate
    if name in ("mutual_information", "measure"):
        from ibscope import api

        return getattr(api, name)
    if name == "open_store":
        from ibscope.store import open_store

        return open_store
    if name == "read_results":
        from ibscope.results import read_results

        return read_results
    raise AttributeError(f"module 'ibscope' has no attribute {name!r}")
