"""One rule for degenerate inputs, applied by every estimator.

A **constant** input is one whose rows are all identical (a dead ReLU layer, a layer stuck at
one value, labels of a single class). For it:

* mutual information is 0 exactly, whatever the other side: I(X;T) = I(T;Y) = 0;
* the entropy of a constant representation is 0, and so are the ranks of its (centred)
  spectrum: effective rank, participation ratio, stable rank, numerical rank, PCA dimension;
* the intrinsic dimension (TwoNN, MLE) and the spectral decay exponent (alpha-ReQ) of a single
  point do not exist: a :class:`~ibscope.errors.DataError` says so (``ibscope estimate`` then
  writes the row with an empty value and a note; never a silent NaN);
* measures of the *uncentred* matrix (``effective-rank`` with ``convention="sv"``,
  ``effective-encoding-dim``, ``coding-rate``, spectral measures with ``center=False``) keep
  their own value: a constant non-zero layer has exactly one direction there (rank 1), an
  all-zero layer has rank 0.

Each estimator declares which case it is in :meth:`Estimator.on_constant`;
``Estimator.__init_subclass__`` wraps every ``estimate`` method with
:func:`constant_estimate`, so built-ins and plug-ins follow the same rule. The value comes
with a ``RuntimeWarning`` naming the constant argument (``ibscope estimate`` puts it in the
row's note). The table in docs/estimators.md ("Degenerate inputs") lists the outcome per
estimator; ``tests/test_trust_core.py`` checks every registered estimator against it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ibscope.errors import DataError, IbscopeError

if TYPE_CHECKING:
    import torch

    from ibscope.estimators.base import Estimate, Estimator

#: where the rule is documented (named in warnings and errors)
DOC = "docs/estimators.md#degenerate-inputs"


def is_constant(t: torch.Tensor) -> bool:
    """True when the 2-D tensor ``t`` has at least two rows and all of them are identical."""
    return t.shape[0] >= 2 and bool((t == t[:1]).all())


def constant_estimate(est: Estimator, args: tuple[Any, ...]) -> Estimate | None:
    """The estimate of ``est`` for ``args`` when one of them is constant, else None.

    Returns an :class:`~ibscope.estimators.base.Estimate` with value 0 (``on_constant`` says
    ``"zero"``) or raises a :class:`DataError` (``"undefined"``); returns None when no input is
    constant, when the estimator computes the case itself, or when the inputs cannot be read
    (the estimator then raises its own error for them).
    """
    from ibscope.estimators.base import as_tensor

    if est.kind not in ("pair", "single") or len(args) != (2 if est.kind == "pair" else 1):
        return None
    names = ("x", "y")
    try:
        ts = [as_tensor(a, name=names[i], estimator=est, allow_discrete=est.kind == "pair")
              for i, a in enumerate(args)]
    except IbscopeError:
        return None  # the estimator reports bad input in its own words
    if len(ts) == 2 and ts[0].shape[0] != ts[1].shape[0]:
        return None
    got: Estimate | None = constant_from(est, ts, stacklevel=4)
    return got


def constant_from(est: Estimator, ts: Sequence[torch.Tensor], *, stacklevel: int = 3) -> Estimate | None:
    """:func:`constant_estimate` for inputs already converted by ``as_tensor`` (with the same
    ``name`` and ``allow_discrete``) and of equal length: for estimators that convert their
    inputs once and apply the rule themselves. ``stacklevel`` of the warning: 3 names the
    caller of the function that calls this one."""
    names = ("x", "y")
    const = [names[i] for i, t in enumerate(ts) if is_constant(t)]
    if not const:
        return None
    what = est.on_constant(*ts)
    if what is None:
        return None
    n = int(ts[0].shape[0])
    which = " and ".join(f"'{c}'" for c in const)
    if what == "undefined":
        raise DataError(
            f"{est.name}: {which} is constant (all {n} rows identical), and the {est.quantity.replace('_', ' ')} "
            f"of a single point is undefined.",
            hint=f"This is ibscope's rule for degenerate inputs ({DOC}); the layer has no variation "
                 "(e.g. every ReLU unit dead). Other measures give 0 for it.")
    if what != "zero":
        raise ValueError(f"{est.name}.on_constant returned {what!r}; expected 'zero', 'undefined' or None.")
    cap = est._constant_cap(*ts)
    dims = tuple(int(t.shape[1]) for t in ts)
    warnings.warn(
        f"{est.name}: {which} is constant (all {n} rows identical): the value is 0 exactly by ibscope's rule "
        f"for degenerate inputs ({DOC}).", RuntimeWarning, stacklevel=stacklevel)
    return est._make(0.0, n=n, dims=dims, cap=cap, extra={"constant": const})
