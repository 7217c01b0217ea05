"""The estimator contract: frozen dataclasses in, :class:`Estimate` out.

An estimator is a frozen dataclass whose fields are its hyper-parameters (each declares what
it accepts, see :mod:`ibscope.estimators.params`), with class attributes that describe it,
and one method whose signature its base class fixes:

* :class:`PairEstimator`: ``estimate(x, y) -> Estimate`` (e.g. mutual information I(X;Y));
* :class:`SingleEstimator`: ``estimate(x) -> Estimate`` (e.g. effective rank of one layer);
* :class:`JacobianEstimator`: ``estimate(s) -> Estimate`` where ``s`` holds per-sample Jacobian
  singular values ``(n_samples, r)`` as stored by ``ibscope capture --jacobian-samples``.

``kind`` ("pair", "single", "jacobian") is derived from that base (:func:`kind_of`); it is what
result tables and listings show. Plug-ins written against the older contract (a direct
subclass of :class:`Estimator` with a ``kind`` class attribute) keep working; the registry warns
that they should move to a typed base.

Inputs are torch tensors of shape ``(n_samples, n_features)`` (1-D means one feature).
Integer dtypes mean *discrete* variables (class labels, sample ids); floating dtypes mean
continuous ones. Computation happens on the tensors' own device. Information is returned
in nats.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeAlias, runtime_checkable

from ibscope.errors import DataError, UsageError
from ibscope.estimators.params import check_params, message
from ibscope.units import BITS as BITS  # re-exported: ibscope.estimators.base keeps its names
from ibscope.units import LN2 as LN2
from ibscope.units import NATS as NATS
from ibscope.units import conversion_factor as conversion_factor

if TYPE_CHECKING:
    import torch

#: what ``estimate`` accepts: a torch tensor, a numpy array or anything ``numpy.asarray`` reads
#: (nested lists); converted and checked by :func:`as_tensor`
ArrayLike: TypeAlias = Any
Kind = Literal["pair", "single", "jacobian"]
KINDS: tuple[Kind, ...] = ("pair", "single", "jacobian")


@dataclass(frozen=True)
class Estimate:
    """One estimated number with everything needed to interpret it.

    ``value`` is a float in ``unit`` (nats for information). ``cap`` is the theoretical
    maximum where one applies (``log n`` for plug-in I(X;T) on n distinct inputs, ``H(Y)``
    for I(T;Y) with discrete labels, ``log batch`` for InfoNCE). ``saturated`` is True when an
    information estimate (nats or bits) lies within 1 % of its cap (:data:`SATURATION_TOLERANCE`):
    the estimator cannot show more at this n and width; None without a positive cap and for
    measures in other units (a rank at the layer's width is a fact about the layer).
    ``null_mean``, ``null_std`` (in ``unit``) and ``p_value`` describe a permutation null (``ibscope.mutual_information(...,
    null_permutations=N)``, :func:`ibscope.estimators.nulls.with_null`): the estimate
    recomputed with the rows of one side permuted N times, and
    p = (1 + #{null >= value}) / (N + 1); None when no null was computed.
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
    null_mean: float | None = None
    null_std: float | None = None
    p_value: float | None = None
    saturated: bool | None = None

    def to(self, unit: str) -> Estimate:
        """Return a copy converted to ``unit`` ('nats' or 'bits'); other units unchanged."""
        f = conversion_factor(self.unit, unit)

        def scale(v: float | None) -> float | None:
            return None if v is None else v * f

        return dataclasses.replace(
            self, value=self.value * f, unit=unit, stderr=scale(self.stderr), cap=scale(self.cap),
            null_mean=scale(self.null_mean), null_std=scale(self.null_std),
        )

    def __float__(self) -> float:
        return float(self.value)


#: an estimate is *saturated* when it lies within this fraction of its cap
SATURATION_TOLERANCE = 0.01


def is_saturated(value: float | None, cap: float | None) -> bool | None:
    """True when ``value`` is within 1 % of ``cap`` (or above it), False below, None without a
    positive cap (a cap of 0, e.g. H(Y) of a single class, leaves nothing to see). The same rule
    as :func:`ibscope.trust.is_saturated` for results rows."""
    if value is None or cap is None or not math.isfinite(float(cap)) or float(cap) <= 0:
        return None
    return bool(float(value) >= float(cap) - SATURATION_TOLERANCE * abs(float(cap)))


#: typed base -> kind (filled below, once the bases exist)
_TYPED_BASES: dict[type, Kind] = {}


@dataclass(frozen=True)
class Estimator(abc.ABC):
    """Base class of every estimator; subclass :class:`PairEstimator`, :class:`SingleEstimator`
    or :class:`JacobianEstimator`, as a ``@dataclass(frozen=True)`` whose fields are the
    hyper-parameters (declared with :func:`ibscope.estimators.params.param`).

    ``name`` is the registered name. An instance built through a registry alias
    (``registry.create("kde-upper")``) carries the alias as its ``name``, so that its estimates,
    messages and result rows say what the user asked for.
    """

    name: ClassVar[str] = ""
    #: "pair" | "single" | "jacobian": set by the typed base (see :func:`kind_of`)
    kind: ClassVar[str] = "pair"
    quantity: ClassVar[str] = "mutual_information"
    unit: ClassVar[str] = NATS
    reference: ClassVar[str] = ""
    #: for `ibscope estimate`: what X is when computing I(X;T) with a pair estimator:
    #: "identity" (the sample index, discrete; plug-in estimators) or "inputs" (the probe inputs).
    x_source: ClassVar[str] = "inputs"

    def __post_init__(self) -> None:
        check_params(self, self.name or type(self).__name__)  # the constraints declared on the fields
        self.validate()  # rules between fields

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # kind follows the typed base; a class that declares another kind is a mistake
        base_kind = next((k for b, k in _TYPED_BASES.items() if issubclass(cls, b)), None)
        if base_kind is not None:
            if "kind" in cls.__dict__ and cls.__dict__["kind"] != base_kind:
                raise TypeError(f"{cls.__qualname__} subclasses the {base_kind} estimator base but declares "
                                f"kind = {cls.__dict__['kind']!r}; remove the kind attribute.")
            cls.kind = base_kind
        # One rule for degenerate inputs, for every estimator (built-in or plug-in): its
        # ``estimate`` is wrapped once so that a constant input (all rows identical) is answered
        # by :func:`ibscope.estimators.degenerate.constant_estimate` according to
        # :meth:`on_constant`, before the estimator's own code runs.
        fn = getattr(cls, "estimate", None)
        if fn is None or getattr(fn, "__isabstractmethod__", False) or getattr(fn, "_ibscope_degenerate_rule", False):
            return

        @functools.wraps(fn)
        def estimate(self: Estimator, *tensors: Any, **kw: Any) -> Estimate:
            from ibscope.estimators.degenerate import constant_estimate

            if not kw:
                got: Estimate | None = constant_estimate(self, tensors)
                if got is not None:
                    return got
            result: Estimate = fn(self, *tensors, **kw)
            return result

        estimate._ibscope_degenerate_rule = True  # type: ignore[attr-defined]  # a marker on the function object
        cls.estimate = estimate  # type: ignore[method-assign]  # wrapped once, at class creation

    def validate(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Check rules between hyper-parameters (each field's declared constraint is checked
        before); raise :class:`UsageError` naming the bad one (:meth:`_require`)."""

    def params(self) -> dict[str, Any]:
        """The hyper-parameters: field name -> value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @abc.abstractmethod
    def estimate(self, *tensors: Any, **kw: Any) -> Estimate:
        """Compute the estimate (the typed bases fix the signature per ``kind``)."""

    def scale_invariant(self, arg: str) -> str | None:
        """How the value reacts when input ``arg`` ("x", "y" or "s") is multiplied by c > 0.

        ``"column"``: unchanged even with a different c for each column; ``"global"``:
        unchanged for one c over the whole array; ``None`` (the default): it changes, because
        the estimator uses an absolute scale (a noise variance, kernel width, bin width or
        absolute tolerance). :func:`as_tensor` uses this for float inputs of extreme magnitude:
        they are rescaled by powers of two (exact) when the value allows it (see
        :data:`RESCALE_EXPONENT`), and refused with a :class:`DataError` saying they overflow
        when the value depends on the scale and they leave float64's safe range
        (:data:`SAFE_EXPONENT`).
        """
        return None

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        """What this estimator gives when an input is constant (all rows identical).

        Called with the converted input tensors (``(x, y)`` for a pair estimator, ``(x,)`` for a
        single-representation measure) when one of them is constant. Returns

        * ``"zero"``: the value is 0 exactly (no information; no variation, so rank 0 and
          entropy 0): :func:`ibscope.estimators.degenerate.constant_estimate` returns it
          without running the estimator;
        * ``"undefined"``: the quantity does not exist for one point (intrinsic dimension,
          a spectral decay exponent): a :class:`DataError` saying so;
        * ``None``: the estimator's own computation gives the right answer (measures of the
          uncentred matrix, such as RankMe's singular values, where a constant non-zero
          layer has rank 1), or the input is refused anyway (both sides discrete ...).

        The default is ``"zero"`` for pair estimators in nats (mutual information) and None
        otherwise. See the degenerate-input table in docs/estimators.md.
        """
        return "zero" if self.kind == "pair" and self.unit == NATS else None

    def cap_name(self, quantity: str) -> str:
        """How the cap of ``quantity`` is called in messages ("log n", "H(Y)", "log batch" ...)."""
        if self.kind == "pair":
            return "H(Y)" if quantity == "I(T;Y)" else "log n"
        return "its maximum"

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        """The estimate on ``(x, y[p])`` for every permutation ``p`` (int64 tensors of length n).

        ``x`` and ``y`` are the converted tensors. The default re-estimates N times; estimators
        override it to share work between the permutations and the estimate (what does not
        depend on the pairing of the rows, e.g. the entropy of each side, is computed once).
        Used by :func:`ibscope.estimators.nulls.with_null`.
        """
        return [float(self.estimate(x, y[p.to(y.device)]).value) for p in permutations]

    def estimate_and_null(self, x: torch.Tensor, y: torch.Tensor,
                          permutations: list[torch.Tensor]) -> tuple[Estimate, list[float]]:
        """The estimate of ``(x, y)`` and :meth:`null_values` for ``permutations``, in one call.

        The default calls both; estimators override it when the estimate and the null share
        work (binning bins once for both). Called by :func:`ibscope.estimators.nulls.with_null`
        with converted, non-constant tensors; warnings of the null part are silenced there.
        """
        e = self.estimate(x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return e, self.null_values(x, y, permutations)

    def _constant_cap(self, *tensors: torch.Tensor) -> float | None:
        """The cap of the estimate when an input is constant (see :meth:`on_constant`).

        Pair estimators: the plug-in entropy of the discrete side (log n for sample ids, H(Y)
        for labels; the smaller of the two when both are discrete), None when both are
        continuous. Single measures: None.
        """
        if self.kind != "pair" or len(tensors) != 2:
            return None
        from ibscope.estimators._mi import codes, entropy_codes

        hs = [entropy_codes(codes(t)) for t in tensors if is_discrete(t)]
        return min(hs) if hs else None

    # helpers for subclasses -------------------------------------------------------------
    def _make(self, value: float, *, n: int, dims: tuple[int, ...], **kw: Any) -> Estimate:
        if math.isnan(float(value)):  # never hand back a silent NaN
            raise DataError(f"{self.name}: the computation gave NaN on {int(n)} finite samples of dims "
                            f"{tuple(int(d) for d in dims)}; no value can be reported.",
                            hint="This points at degenerate data (e.g. constant or duplicated rows) or a numerical "
                                 "limit of this estimator; try another estimator or check the data.")
        # information estimates only: the cap of a rank (the layer's width) is a fact about the
        # layer, not a limit of the estimator (see ibscope.trust.is_saturated)
        unit = kw.get("unit", self.unit)
        kw.setdefault("saturated", is_saturated(value, kw.get("cap")) if unit in (NATS, BITS) else None)
        return Estimate(
            value=float(value), unit=kw.pop("unit", self.unit), quantity=kw.pop("quantity", self.quantity),
            estimator=self.name, params=self.params(), n_samples=int(n), dims=tuple(int(d) for d in dims), **kw,
        )

    def _require(self, cond: bool, param: str, expected: str, got: Any) -> None:
        """UsageError naming ``param``, what it must be and what it got, unless ``cond``: for
        rules between fields in :meth:`validate` (one field's rule is declared on the field)."""
        if not cond:
            raise UsageError(message(self.name or type(self).__name__, param, expected, got))


@dataclass(frozen=True)
class PairEstimator(Estimator):
    """An estimator of a quantity of two variables (mutual information I(X;Y)):
    ``estimate(x, y)``, rows paired by index."""

    kind: ClassVar[str] = "pair"

    @abc.abstractmethod
    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        """The estimate for the paired samples ``x`` ``(n, d_x)`` and ``y`` ``(n, d_y)``."""


@dataclass(frozen=True)
class SingleEstimator(Estimator):
    """A measure of one representation (a rank, a dimension, an entropy): ``estimate(x)``."""

    kind: ClassVar[str] = "single"

    @abc.abstractmethod
    def estimate(self, x: ArrayLike) -> Estimate:
        """The measure of the samples ``x`` ``(n, d)``."""


@dataclass(frozen=True)
class JacobianEstimator(Estimator):
    """A measure of per-sample Jacobian spectra: ``estimate(singular_values)``."""

    kind: ClassVar[str] = "jacobian"

    @abc.abstractmethod
    def estimate(self, singular_values: ArrayLike) -> Estimate:
        """The measure of ``singular_values`` ``(n_samples, r)`` (as stored by ``ibscope capture
        --jacobian-samples``)."""


@runtime_checkable
class SidedEstimator(Protocol):
    """A pair estimator that prepares each side apart (the binning family), so that a side the
    same in many estimates (the labels, the sample ids) is prepared once: ``side(v, name)`` gives
    the prepared side, ``estimate_sides(a, b, ...)`` the same Estimate as ``estimate(x, y)``
    (with its permutation null when ``null_permutations`` > 0)."""

    def side(self, v: Any, name: str = "x") -> Any:
        """``v`` as argument ``name``, prepared (converted and binned)."""
        ...

    def estimate_sides(self, a: Any, b: Any, null_permutations: int = 0, null_seed: int = 0,
                       perms: list[Any] | None = None) -> Estimate:
        """The estimate of the prepared sides ``a`` (x) and ``b`` (y)."""
        ...


_TYPED_BASES.update({PairEstimator: "pair", SingleEstimator: "single", JacobianEstimator: "jacobian"})

# Bases for the mixins that estimator modules share between their classes (_KDEMixin ...): to the
# type checker a mixin is an estimator of its kind (so self.name, self._make type-check); at run
# time a plain object, so that each class's MRO stays mixin -> typed base -> Estimator.
if TYPE_CHECKING:
    PairMixinBase = PairEstimator
    SingleMixinBase = SingleEstimator
else:
    PairMixinBase = SingleMixinBase = object


def kind_of(cls: type[Estimator] | Estimator) -> Kind:
    """"pair", "single" or "jacobian": from the typed base, or (older plug-ins that subclass
    :class:`Estimator` directly) from the ``kind`` class attribute. UsageError for anything else."""
    c = cls if isinstance(cls, type) else type(cls)
    for base, kind in _TYPED_BASES.items():
        if issubclass(c, base):
            return kind
    k = getattr(c, "kind", None)
    for kind in KINDS:
        if k == kind:
            return kind
    raise UsageError(f"Estimator {getattr(c, 'name', '') or c.__qualname__} has kind {k!r}; expected one of "
                     f"{', '.join(KINDS)}.", hint="Subclass PairEstimator, SingleEstimator or JacobianEstimator.")


#: Float inputs whose largest magnitude is above 2**SAFE_EXPONENT (about 3e150) leave float64's
#: safe range: squared distances and sums of squares of n x d such values overflow to inf.
#: Estimators whose value depends on the scale refuse them. See :meth:`Estimator.scale_invariant`.
SAFE_EXPONENT = 500
#: Scale-invariant estimators get inputs with magnitudes in [2**-RESCALE_EXPONENT,
#: 2**RESCALE_EXPONENT] (about 1e-15 to 1e15): outside it they are rescaled by a power of two
#: (exact), so that even float32 kernels inside an estimator (k-NN candidate search, GEMMs)
#: neither overflow nor underflow. Inputs already inside are left bit for bit as they are.
RESCALE_EXPONENT = 50

_NON_NUMERIC = {"U": "strings", "S": "byte strings", "O": "Python objects", "M": "dates", "m": "time deltas",
                "V": "structured records", "c": "complex numbers"}


def _scale_pow2(t: torch.Tensor, e: torch.Tensor | float) -> torch.Tensor:
    """``t * 2**-e`` exactly (``e`` a float tensor broadcast over columns, or a number), in two
    halves so that no factor overflows."""
    import torch

    e = torch.as_tensor(e, dtype=t.dtype, device=t.device)
    a = torch.floor(e / 2)
    return t * torch.exp2(-a) * torch.exp2(-(e - a))


def _fit_range(t: torch.Tensor, est: Estimator, name: str) -> torch.Tensor:
    """Rescale (by powers of two) or refuse values of extreme magnitude; see RESCALE_EXPONENT, SAFE_EXPONENT."""
    import torch

    amax = t.abs().amax(dim=0)
    big, small = 2.0 ** RESCALE_EXPONENT, 2.0 ** -RESCALE_EXPONENT
    m = float(amax.max())
    nonzero = amax[amax > 0]
    lo = float(nonzero.min()) if nonzero.numel() else 0.0
    if m <= big and (lo == 0.0 or lo >= small):
        return t
    mode = est.scale_invariant(name)
    if mode == "column":
        out = (amax > big) | ((amax > 0) & (amax < small))
        e = torch.where(out, torch.floor(torch.log2(torch.where(out, amax, torch.ones_like(amax)))), torch.zeros_like(amax))
        return _scale_pow2(t, e)
    if mode in ("global", True):
        if m > big or m < small:
            return _scale_pow2(t, math.floor(math.log2(m)))
        return t
    big = 2.0 ** SAFE_EXPONENT
    if m > big:
        raise DataError(
            f"{est.name}: '{name}' has values up to {m:.3g} in magnitude, which overflow float64 in this estimator's "
            f"squared distances and sums (safe up to about {big:.1e}). Its value depends on the scale of '{name}' "
            "(it uses an absolute noise variance, kernel width, bin width or tolerance), so it cannot rescale them.",
            hint=f"Divide '{name}' by a constant first (and scale that parameter to match), or use an estimator "
                 "whose value does not depend on the scale.")
    return t


def as_tensor(a: ArrayLike, *, name: str = "x", estimator: str | Estimator = "", allow_discrete: bool = True,
              allow_bool: bool = True) -> torch.Tensor:
    """Convert numpy/torch/list input to a 2-D torch tensor ``(n, d)`` and validate it.

    The one place where every built-in estimator's input is checked. 1-D input becomes
    ``(n, 1)``. Integer and bool inputs stay integer (discrete) unless ``allow_discrete`` is
    False (then float64); float16/bfloat16 become float32. Raises :class:`DataError` naming
    ``name``, the dtype or the numbers involved for: strings, objects, dates, complex numbers
    (and bool when ``allow_bool`` is False), no samples or no features, NaN/inf. When
    ``estimator`` is the :class:`Estimator` itself, float values beyond float64's safe range
    are rescaled or refused according to its :meth:`Estimator.scale_invariant`.
    """
    import numpy as np
    import torch

    est = estimator if isinstance(estimator, Estimator) else None
    ename = est.name if est is not None else estimator
    who = f"{ename}: " if ename else ""
    expected = "a numeric array (float, integer or bool)" if allow_bool else "a numeric array (float or integer)"

    def non_numeric(dtype: Any, kind: str) -> DataError:
        what = _NON_NUMERIC.get(kind, "a non-numeric type")
        hint = (f"Encode categories as integer codes first, e.g. codes = np.unique({name}, return_inverse=True)[1]."
                if kind in "USO" else "Convert to float or integer values first.")
        if kind == "c":
            hint = f"Pass the real part, the magnitude, or both as separate columns (np.c_[{name}.real, {name}.imag])."
        return DataError(f"{who}'{name}' must be {expected}. Got dtype {dtype} ({what}).", hint=hint)

    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.is_complex():
            raise non_numeric(t.dtype, "c")
        if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
            t = t.to(torch.int64)
    else:
        try:
            arr = np.asarray(a)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise DataError(f"{who}'{name}' cannot be read as an array of shape (n_samples, n_features): {exc}") from None
        kind = arr.dtype.kind
        if kind not in "biuf":
            raise non_numeric(arr.dtype, kind)
        if kind == "u" and arr.dtype.itemsize > 1:  # torch has few ops for uint16/32/64
            if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
                raise DataError(f"{who}'{name}' holds unsigned integers above {np.iinfo(np.int64).max}, which do not "
                                f"fit int64. Got dtype {arr.dtype}.")
            arr = arr.astype(np.int64)
        elif kind == "f" and arr.dtype.itemsize > 8:  # long double: torch has no such dtype
            arr = arr.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.bool:
        if not allow_bool:
            raise DataError(f"{who}'{name}' must be {expected}. Got dtype bool, which has no meaning here.",
                            hint="Pass the numeric values themselves.")
        t = t.to(torch.int64)
    if t.dtype in (torch.float16, torch.bfloat16):  # exact in float32, which every kernel supports
        t = t.to(torch.float32)
    if t.ndim == 1:
        t = t.reshape(-1, 1)
    if t.ndim != 2:
        raise DataError(
            f"{who}'{name}' must have shape (n_samples, n_features) or (n_samples,). Got shape {tuple(t.shape)}.",
            hint="Flatten or pool higher-dimensional activations first (capture does this with --reduce).",
        )
    if t.shape[0] == 0:
        raise DataError(f"{who}'{name}' has no samples (shape {tuple(t.shape)}).")
    if t.shape[1] == 0:
        raise DataError(f"{who}'{name}' has no features (shape {tuple(t.shape)}).")
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            nb = int(bad.sum())
            raise DataError(f"{who}'{name}' contains {nb} non-finite value(s) (NaN or inf) out of {t.numel()}.")
        if est is not None:
            t = _fit_range(t, est, name)
    elif not allow_discrete:
        t = t.to(torch.float64)
    return t


def is_discrete(t: torch.Tensor) -> bool:
    """True for integer tensors (labels, ids): the library's marker of a discrete variable."""
    return not t.is_floating_point()


def check_pair(x: torch.Tensor, y: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{estimator}: x and y must have the same number of samples. Got {x.shape[0]} and {y.shape[0]}.")
    if x.device != y.device:
        y = y.to(x.device)
    return x, y
