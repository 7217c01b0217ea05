"""Permutation nulls: what an estimator reports when the two sides are independent.

Permuting the rows of one side keeps both marginal distributions and destroys every
dependence between them, so the estimate on permuted data is a draw from the estimator's
value *under independence* at this n, width and setting: its finite-sample bias (plug-in
I(T;Y) on nearly injective layers sits at H(Y) whatever the labels), not information.

:func:`with_null` re-estimates with N seeded permutations and returns the estimate with

* ``null_mean``, ``null_std``: mean and standard deviation (``ddof=1``; None for N = 1) of
  the N null values, in the unit of ``value``;
* ``p_value`` = (1 + #{null >= value}) / (N + 1) (Phipson & Smyth 2010: never 0; the
  smallest possible p is 1 / (N + 1)). Null values equal to the value within round-off
  (relative 1e-9) count as >=, so a value that cannot be told from its null gets p = 1.

Permutations are drawn on the CPU from ``torch.Generator().manual_seed(seed)``: the same
seed, N and n give the same permutations on every device. Estimators share work between the
estimate and the permutations in :meth:`~ibscope.estimators.base.Estimator.null_values`
(binning bins once; KDE computes each kernel block once for all permutations; KSG computes
the distances of the unpermuted side once; Renyi and gaussian compute each side's Gram or
correlation matrix once); the others re-estimate N times.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from ibscope.errors import UsageError

if TYPE_CHECKING:
    import torch

    from ibscope.estimators.base import ArrayLike, Estimate, Estimator

#: null values within this relative distance of the value count as >= it (ties from round-off)
TIE_TOLERANCE = 1e-9


def check_settings(null_permutations: Any, seed: Any) -> tuple[int, int]:
    """Validate N (an integer >= 0) and the seed (an integer); UsageError naming the bad one."""
    if isinstance(null_permutations, bool) or not isinstance(null_permutations, int) or null_permutations < 0:
        raise UsageError(f"null_permutations must be an integer >= 0 (0 = no null). Got {null_permutations!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"The null's seed must be an integer. Got {seed!r}.")
    return null_permutations, seed


def permutations(n: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` seeded permutations of ``range(n)`` (int64 CPU tensors)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return [torch.randperm(n, generator=g) for _ in range(count)]


def summarize(value: float, nulls: list[float]) -> tuple[float, float | None, float]:
    """(null_mean, null_std, p_value) of the null values ``nulls`` for the estimate ``value``."""
    n = len(nulls)
    mean = math.fsum(nulls) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in nulls) / (n - 1)) if n > 1 else None
    tol = TIE_TOLERANCE * max(1.0, abs(value))
    above = sum(1 for v in nulls if v >= value - tol)
    return mean, std, (1 + above) / (n + 1)


def with_null(est: Estimator, x: ArrayLike, y: ArrayLike, null_permutations: int, seed: int = 0,
              estimate: Estimate | None = None) -> Estimate:
    """``est.estimate(x, y)`` with its permutation null (see the module docstring).

    ``estimate``: the estimate of (x, y) when already computed. Returns it unchanged when
    ``null_permutations`` is 0. A constant side gives the null 0 exactly (permuting changes
    nothing; see :mod:`ibscope.estimators.degenerate`). The estimator's warnings are given
    once, by the estimate; the permuted estimates are computed silently.
    """
    from ibscope.estimators.base import as_tensor, check_pair

    null_permutations, seed = check_settings(null_permutations, seed)
    if est.kind != "pair":
        raise UsageError(f"A permutation null needs two variables; '{est.name}' measures one representation.")
    if null_permutations == 0:
        return estimate if estimate is not None else est.estimate(x, y)
    from ibscope.estimators.degenerate import constant_estimate

    e = estimate if estimate is not None else constant_estimate(est, (x, y))
    if e is not None and e.extra.get("constant"):  # permuting a constant changes nothing: the null is 0
        nulls = [0.0] * null_permutations
    else:
        tx = as_tensor(x, name="x", estimator=est)
        ty = as_tensor(y, name="y", estimator=est)
        tx, ty = check_pair(tx, ty, est.name)
        perms = permutations(int(tx.shape[0]), null_permutations, seed)
        if e is None:
            e, nulls = est.estimate_and_null(tx, ty, perms)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nulls = est.null_values(tx, ty, perms)
    return attach(est, e, nulls, null_permutations, seed)


def attach(est: Estimator, e: Estimate, nulls: list[float], null_permutations: int, seed: int) -> Estimate:
    """``e`` with the null of the values ``nulls`` (one per permutation): null_mean, null_std,
    p_value and the settings in ``extra``, as :func:`with_null` returns it."""
    import dataclasses

    nulls = [float(v) for v in nulls]
    if len(nulls) != null_permutations or not all(math.isfinite(v) for v in nulls):
        raise RuntimeError(f"{est.name}.null_values returned {len(nulls)} value(s) for {null_permutations} "
                           f"permutations, or a non-finite value: {nulls[:5]}")
    mean, std, p = summarize(e.value, nulls)
    extra = dict(e.extra, null_permutations=null_permutations, null_seed=seed)
    return dataclasses.replace(e, null_mean=mean, null_std=std, p_value=p, extra=extra)
