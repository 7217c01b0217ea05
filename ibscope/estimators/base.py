"""The estimator contract: frozen dataclasses in, :class:`Estimate` out.

An estimator is a frozen dataclass whose fields are its hyper-parameters, with class
attributes that describe it, and one method:

* ``kind = "pair"``: ``estimate(x, y) -> Estimate`` (e.g. mutual information I(X;Y));
* ``kind = "single"``: ``estimate(x) -> Estimate`` (e.g. effective rank of one layer);
* ``kind = "jacobian"``: ``estimate(s) -> Estimate`` where ``s`` holds per-sample Jacobian
  singular values ``(n_samples, r)`` as stored by ``ibscope capture --jacobian-samples``.

Inputs are torch tensors of shape ``(n_samples, n_features)`` (1-D means one feature).
Integer dtypes mean *discrete* variables (class labels, sample ids); floating dtypes mean
continuous ones. Computation happens on the tensors' own device. Information is returned
in nats.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ibscope.errors import DataError, UsageError

NATS = "nats"
BITS = "bits"
LN2 = math.log(2.0)


@dataclass(frozen=True)
class Estimate:
    """One estimated number with everything needed to interpret it.

    ``value`` is a float in ``unit`` (nats for information). ``cap`` is the theoretical
    maximum where one applies (``log n`` for plug-in I(X;T) on n distinct inputs).
    ``extra`` holds estimator-specific details (e.g. both KDE bounds, a rank distribution).
    """

    value: float
    unit: str
    quantity: str
    estimator: str
    params: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 0
    dims: tuple[int, ...] = ()
    stderr: float | None = None
    cap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, unit: str) -> "Estimate":
        """Return a copy converted to ``unit`` ('nats' or 'bits'); other units unchanged."""
        f = conversion_factor(self.unit, unit)
        scale = (lambda v: None if v is None else v * f)
        return dataclasses.replace(
            self, value=self.value * f, unit=unit, stderr=scale(self.stderr), cap=scale(self.cap)
        )

    def __float__(self) -> float:
        return float(self.value)


def conversion_factor(src: str, dst: str) -> float:
    """Multiplicative factor from unit ``src`` to unit ``dst`` (nats <-> bits)."""
    if src == dst:
        return 1.0
    if src == NATS and dst == BITS:
        return 1.0 / LN2
    if src == BITS and dst == NATS:
        return LN2
    raise UsageError(f"Cannot convert from unit '{src}' to '{dst}'. Expected 'nats' or 'bits'.")


@dataclass(frozen=True)
class Estimator(abc.ABC):
    """Base class. Subclasses are ``@dataclass(frozen=True)`` with hyper-parameter fields."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "pair"  # "pair" | "single" | "jacobian"
    quantity: ClassVar[str] = "mutual_information"
    unit: ClassVar[str] = NATS
    reference: ClassVar[str] = ""
    #: for `ibscope estimate`: what X is when computing I(X;T) with a pair estimator:
    #: "identity" (the sample index, discrete; plug-in estimators) or "inputs" (the probe inputs).
    x_source: ClassVar[str] = "inputs"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check hyper-parameters; raise :class:`UsageError` naming the bad one."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @abc.abstractmethod
    def estimate(self, *tensors) -> Estimate:
        """Compute the estimate (see the module docstring for the signature per ``kind``)."""

    # helpers for subclasses -------------------------------------------------------------
    def _make(self, value: float, *, n: int, dims: tuple[int, ...], **kw) -> Estimate:
        return Estimate(
            value=float(value), unit=kw.pop("unit", self.unit), quantity=kw.pop("quantity", self.quantity),
            estimator=self.name, params=self.params(), n_samples=int(n), dims=tuple(int(d) for d in dims), **kw,
        )

    def _require(self, cond: bool, param: str, expected: str, got: Any) -> None:
        if not cond:
            raise UsageError(f"The '{param}' parameter of {self.name or type(self).__name__} must be {expected}. Got {got!r} instead.")


def as_tensor(a, *, name: str = "x", estimator: str = "", allow_discrete: bool = True):
    """Convert numpy/torch/list input to a 2-D torch tensor ``(n, d)`` and validate it.

    1-D input becomes ``(n, 1)``. Integer and bool inputs stay integer (discrete). Floating
    input is checked for NaN/inf. Raises :class:`DataError` with the numbers involved.
    """
    import numpy as np
    import torch

    who = f"{estimator}: " if estimator else ""
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        arr = np.asarray(a)
        if arr.dtype == object:
            raise DataError(f"{who}'{name}' must be a numeric array. Got dtype object.")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    if t.ndim == 1:
        t = t.reshape(-1, 1)
    if t.ndim != 2:
        raise DataError(
            f"{who}'{name}' must have shape (n_samples, n_features) or (n_samples,). Got shape {tuple(t.shape)}.",
            hint="Flatten or pool higher-dimensional activations first (capture does this with --reduce).",
        )
    if t.shape[0] == 0:
        raise DataError(f"{who}'{name}' has no samples (shape {tuple(t.shape)}).")
    if t.is_floating_point() or t.is_complex():
        if t.is_complex():
            raise DataError(f"{who}'{name}' must be real-valued. Got dtype {t.dtype}.")
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            nb = int(bad.sum())
            raise DataError(f"{who}'{name}' contains {nb} non-finite value(s) (NaN or inf) out of {t.numel()}.")
    elif not allow_discrete:
        t = t.to(torch.float64)
    return t


def is_discrete(t) -> bool:
    """True for integer tensors (labels, ids): the library's marker of a discrete variable."""
    return not t.is_floating_point()


def check_pair(x, y, estimator: str):
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{estimator}: x and y must have the same number of samples. Got {x.shape[0]} and {y.shape[0]}.")
    if x.device != y.device:
        y = y.to(x.device)
    return x, y
