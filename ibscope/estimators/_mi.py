"""Shared helpers of the mutual-information estimators (plug-in entropies, input checks).

All entropies are in nats and accumulated in float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import torch

from ibscope.errors import DataError, UsageError
from ibscope.estimators._fast import row_codes
from ibscope.estimators.base import ArrayLike, Estimator, as_tensor, check_pair, is_discrete


def pair(est: Estimator, x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert ``x``, ``y`` to 2-D tensors on ``x``'s device."""
    tx = as_tensor(x, name="x", estimator=est)
    ty = as_tensor(y, name="y", estimator=est)
    return check_pair(tx, ty, est.name)


def codes(t: torch.Tensor) -> torch.Tensor:
    """One int64 symbol per row of a discrete (n, d) tensor (equal rows -> equal symbol): the
    rank of the row among the distinct rows, as ``torch.unique(t, dim=0, return_inverse=True)``
    numbers them, computed by :func:`ibscope.estimators._fast.row_codes` (~40x faster)."""
    return row_codes(t)


def entropy_codes(c: torch.Tensor, compact: bool = False) -> float:
    """Plug-in (maximum-likelihood) entropy of the symbols ``c`` in nats. ``compact``: every
    symbol 0..max occurs (as :func:`codes` numbers them), so no count is zero."""
    return entropy_counts(torch.bincount(c), no_zeros=compact)


def entropy_counts(counts: torch.Tensor, no_zeros: bool = False) -> float:
    """Plug-in entropy (nats) of the symbol counts ``counts`` (zeros are skipped; ``no_zeros``:
    the caller knows there are none)."""
    counts = counts.to(torch.float64)
    if not no_zeros:
        counts = counts[counts > 0]
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def joint_codes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    nb = int(b.max()) + 1
    return codes((a * nb + b).reshape(-1, 1))


#: joint codes spread over at most this many values (or 8 n) are counted with a bincount
_DENSE_JOINT = 1 << 16


def joint_entropy(a: torch.Tensor, b: torch.Tensor, ha: float | None = None, hb: float | None = None,
                  ka: int | None = None, kb: int | None = None) -> float:
    """``entropy_codes(joint_codes(a, b))`` of two symbol sequences (each numbered 0..k-1 with
    every symbol present, as :func:`codes` numbers them), bit for bit, with less work: the
    entropy needs only the counts of the pairs, in the order of their codes (a bincount of
    the raw pair codes when they are dense, a sorted count otherwise). When every symbol of
    one side occurs once (sample ids), every pair is distinct and H(A, B) is that side's
    entropy ``ha`` / ``hb`` (the same n counts of 1). ``ka``/``kb``: the numbers of symbols
    when known."""
    n = int(a.shape[0])
    ka = int(a.max()) + 1 if ka is None else ka
    kb = int(b.max()) + 1 if kb is None else kb
    if ka == n and ha is not None:
        return ha
    if kb == n and hb is not None:
        return hb
    joint = a * kb + b
    if ka * kb <= max(8 * n, _DENSE_JOINT):
        return entropy_counts(torch.bincount(joint, minlength=1))
    return entropy_counts(torch.unique(joint, sorted=True, return_counts=True)[1])


def plugin_mi(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(I(A;B), H(A), H(B)) of two symbol sequences, plug-in, nats."""
    ha, hb = entropy_codes(a), entropy_codes(b)
    hab = entropy_codes(joint_codes(a, b))
    return ha + hb - hab, ha, hb


class IntegerValuedWarning(RuntimeWarning):
    """A float input of a continuous estimator holds only integer values in some columns."""


def warn_integer_valued(est: Estimator, t: torch.Tensor, name: str) -> int:
    """Warn when columns of the float tensor ``t`` that vary hold only integer values.

    Token ids, category codes, counts or binary pixels stored as floats are used as
    coordinates of a continuous space by k-NN, kernel and covariance estimators: distances
    between ids mean nothing, and tied distances make k-NN estimates measure the jitter.
    Returns the number of such columns (constant columns are not counted).
    """
    if not t.is_floating_point() or t.shape[0] < 2:
        return 0
    varying = ~(t == t[:1]).all(dim=0)
    integral = (t == torch.round(t)).all(dim=0) & varying
    k = int(integral.sum())
    if k:
        nv = int(varying.sum())
        warnings.warn(
            f"{est.name}: {k} of {nv} varying column(s) of '{name}' hold only integer values (token ids, category "
            f"codes, counts or binary pixels?); {est.name} treats them as coordinates of a continuous space, where "
            "distances between ids mean nothing and tied values bias the estimate. Pass categories as an integer "
            "array (discrete), embed token ids first, or use an estimator for discrete data ('binning').",
            IntegerValuedWarning, stacklevel=4)
    return k


def continuous(est: Estimator, t: torch.Tensor, name: str, *, standardize: bool, dtype: torch.dtype = torch.float64,
               drop_constant: bool = True, warn_integers: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Float copy of a continuous variable with constant columns removed (optionally z-scored).

    A constant column carries no information about anything, so removing it leaves every
    mutual information unchanged; it would otherwise make standardisation divide by zero.
    Returns (tensor, indices of the dropped columns). Raises DataError when no column varies.
    Warns (:class:`IntegerValuedWarning`) when varying columns hold only integer values
    (``warn_integers``; see :func:`warn_integer_valued`).
    """
    if warn_integers:
        warn_integer_valued(est, t, name)
    t = t.to(dtype)
    dropped: list[int] = []
    if drop_constant and t.shape[0] > 1:
        const = (t == t[:1]).all(dim=0)
        if bool(const.all()):
            raise DataError(
                f"{est.name}: every column of '{name}' is constant ({t.shape[1]} column(s), {t.shape[0]} samples); "
                "there is no variation to estimate information from.",
                hint="Check the layer (e.g. all ReLU units dead) or the probe set.",
            )
        if bool(const.any()):
            dropped = [int(i) for i in torch.nonzero(const).reshape(-1).tolist()]
            t = t[:, ~const]
    if standardize:
        sd = t.std(dim=0, unbiased=True) if t.shape[0] > 1 else torch.ones(t.shape[1], dtype=t.dtype, device=t.device)
        t = (t - t.mean(dim=0)) / sd
    return t, dropped


def one_hot(c: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Symbols -> one-hot columns without the last class (C - 1 columns, full rank)."""
    k = int(c.max()) + 1
    oh = torch.nn.functional.one_hot(c, k).to(dtype)
    return oh[:, : max(1, k - 1)]


def require_samples(est: Estimator, n: int, need: int, why: str) -> None:
    if n < need:
        raise DataError(f"{est.name} needs at least {need} samples ({why}). Got {n}.")


def check_choice(est: Estimator, param: str, value: object, choices: Collection[object]) -> None:
    if value not in choices:
        raise UsageError(
            f"The '{param}' parameter of {est.name} must be one of {list(choices)}. Got {value!r} instead.")


def both_discrete_error(est: Estimator) -> UsageError:
    return UsageError(
        f"{est.name}: both x and y are discrete (integer arrays), but this estimator needs a continuous side.",
        hint="Use the 'binning' estimator (plug-in entropy) for two discrete variables, or pass floats.",
    )


def split_discrete(est: Estimator, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """Return (t, labels, swapped): ``t`` continuous, ``labels`` discrete; error otherwise."""
    dx, dy = is_discrete(x), is_discrete(y)
    if dx and dy:
        raise both_discrete_error(est)
    if not dx and not dy:
        return None
    return (y, x, True) if dx else (x, y, False)



def copula_normalize(t: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Rank-Gaussianise every column of a continuous (n, d) tensor: z = Phi^-1(rank / (n + 1)).

    Ranks are 1..n within each column; tied values get distinct ranks in a seeded random order
    (a per-column random permutation, drawn on the CPU so every device gets the same result).
    Every column becomes exactly the n normal scores, so the result depends on the data only
    through the ranks (invariant to any increasing map of any column). Float64, on t's device.
    Returns (z, the largest fraction of tied values in a column).
    """
    n, d = t.shape
    t = t.to(torch.float64)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.argsort(torch.rand((n, d), generator=g, dtype=torch.float64), dim=0).to(t.device)  # one per column
    idx = torch.argsort(torch.gather(t, 0, perm), dim=0, stable=True)
    order = torch.gather(perm, 0, idx)                      # row indices of each column, sorted by value
    ranks = torch.empty((n, d), dtype=torch.float64, device=t.device)
    ranks.scatter_(0, order, torch.arange(1, n + 1, dtype=torch.float64, device=t.device)[:, None].expand(n, d))
    sorted_vals = torch.gather(t, 0, order)
    tied = float((sorted_vals[1:] == sorted_vals[:-1]).sum(0).max()) / n if n > 1 else 0.0
    return torch.special.ndtri(ranks / (n + 1)), tied
