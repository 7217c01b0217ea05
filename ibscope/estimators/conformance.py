"""Conformance check for estimator plug-ins: ``check_estimator(MyEstimator)``.

Plug-in authors call it in their own test suite::

    from ibscope.estimators.conformance import check_estimator

    def test_my_estimator_conforms():
        check_estimator(MyMI)            # or an instance: check_estimator(MyMI(k=5))

It checks that the estimator

The synthetic data: kind "pair" with ``x_source="inputs"`` gets two correlated Gaussian
blocks; with ``x_source="identity"`` (plug-in estimators) integer labels and a continuous
block; "single" a low-rank cloud; "jacobian" sorted positive spectra.

1. is a frozen dataclass subclassing :class:`~ibscope.estimators.base.Estimator` (one of its
   typed bases: ``PairEstimator``, ``SingleEstimator``, ``JacobianEstimator``), with a
   non-empty ``name``, a ``kind`` in {"pair", "single", "jacobian"}, a ``quantity``, a ``unit``,
   an ``x_source`` in {"identity", "inputs"} and a ``reference`` string;
2. can be described by the registry (``describe``) and rebuilt from its own ``params()``;
   every parameter constraint declared on its fields (:func:`ibscope.estimators.params.param`)
   refuses the values that break it with a :class:`~ibscope.errors.UsageError` naming the
   parameter, what it must be and what it got (:func:`check_parameters`);
3. returns an :class:`~ibscope.estimators.base.Estimate` whose ``estimator``, ``unit``,
   ``quantity`` (for kind "pair": the class's), ``params`` and ``n_samples`` match, with a
   finite float ``value``;
4. gives the same value for numpy and torch inputs, and the same value when called twice
   (deterministic);
5. rejects NaN input with :class:`~ibscope.errors.DataError`.

It raises :class:`ConformanceError` (a :class:`~ibscope.errors.PluginError`, exit code 5)
listing every failed check, and returns the list of checks that passed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ibscope.errors import DataError, PluginError, UsageError

KINDS = ("pair", "single", "jacobian")


class ConformanceError(PluginError):
    """An estimator does not follow the ibscope estimator contract."""


def check_parameters(est: Any) -> list[str]:
    """Build the estimator with each invalid value of each declared parameter constraint.

    ``est``: a class (its defaults are the base) or an instance (its parameters are; an
    instance made by ``registry.create`` from an alias keeps the alias's pinned values and its
    name). Every invalid value listed by the field's constraint
    (:meth:`~ibscope.estimators.params.Constraint.invalid`) must raise a
    :class:`~ibscope.errors.UsageError` whose message names the parameter (``'k'``), says what it
    must be (the constraint's description) and shows the value it got (its ``repr``).
    Returns one line per value checked ("k=0"); raises :class:`ConformanceError` listing the
    values that were accepted or refused without saying so.
    """
    from ibscope.estimators.params import constraints
    from ibscope.estimators.registry import aliases, build

    cls = est if isinstance(est, type) else type(est)
    base = cls().params() if isinstance(est, type) else est.params()
    name = getattr(est, "name", "") or cls.__qualname__
    alias = name != getattr(cls, "name", name)
    pinned = aliases()[name].fixed if alias and name in aliases() else {}
    checked: list[str] = []
    failures: list[str] = []
    for field, c in constraints(cls).items():
        if field in pinned:  # the alias fixes it: any other value is refused by create (tested apart)
            continue
        for bad in c.invalid():
            values = {**base, field: bad}
            try:
                if alias:
                    build(name, values)
                else:
                    cls(**values)
            except UsageError as exc:
                msg = str(exc)
                missing = [part for part in (f"'{field}'", c.describe(), repr(bad), name) if part not in msg]
                if missing:
                    failures.append(f"{field}={bad!r}: the message lacks {missing}: {msg!r}")
                else:
                    checked.append(f"{field}={bad!r}")
            except Exception as exc:  # noqa: BLE001 - a conformance report, not a crash
                failures.append(f"{field}={bad!r}: raised {type(exc).__name__} instead of UsageError: {exc}")
            else:
                failures.append(f"{field}={bad!r}: accepted; the field declares {c.describe()}")
    if failures:
        raise ConformanceError(f"Estimator '{name}' fails {len(failures)} parameter check(s):\n  - "
                               + "\n  - ".join(failures),
                               hint="Declare each field with param(default, constraint) and check rules between "
                                    "fields in validate() with self._require(...).")
    return checked


def _sample(kind: str, n: int, seed: int, x_source: str = "inputs") -> tuple[np.ndarray[Any, Any], ...]:
    rng = np.random.default_rng(seed)
    if kind == "jacobian":
        s = np.sort(np.abs(rng.standard_normal((n, 4))), axis=1)[:, ::-1].copy()
        return (s,)
    x = rng.standard_normal((n, 3))
    if kind == "single":
        return (x @ rng.standard_normal((3, 5)) + 0.1 * rng.standard_normal((n, 5)),)
    y = x[:, :2] + 0.5 * rng.standard_normal((n, 2))
    if x_source == "identity":  # plug-in estimators: a discrete side (labels) and a continuous one
        labels = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)
        return (labels, y)
    return (x, y)


def check_estimator(est: Any, *, n: int = 300, rtol: float = 1e-6, seed: int = 0) -> list[str]:
    """Check an estimator class (built with default parameters) or instance against the contract.

    ``n`` samples of a small synthetic problem are used (correlated Gaussians for "pair",
    a low-rank cloud for "single", sorted positive spectra for "jacobian"). ``rtol`` is the
    tolerance of the numpy-vs-torch and repeat comparisons. Returns the names of the passed
    checks; raises :class:`ConformanceError` listing the failures.
    """
    import torch

    from ibscope.estimators.base import Estimate, Estimator
    from ibscope.estimators.registry import describe

    failures: list[str] = []
    passed: list[str] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        (passed if ok else failures).append(name if ok else f"{name}: {detail}")
        return ok

    cls = est if isinstance(est, type) else type(est)
    if not issubclass(cls, Estimator):
        check("subclass", False, f"{cls!r} is not a subclass of ibscope.estimators.base.Estimator")
        raise ConformanceError(f"Estimator {cls!r} fails the conformance check:\n  - " + "\n  - ".join(failures))
    check("subclass", True)
    label = getattr(cls, "name", "") or cls.__qualname__
    params = cls.__dict__.get("__dataclass_params__")  # set by the decorator on this very class
    check("frozen dataclass", dataclasses.is_dataclass(cls) and bool(params and params.frozen),
          "decorate the class itself with @dataclass(frozen=True); its fields are the hyper-parameters")
    check("name", isinstance(cls.name, str) and bool(cls.name), "set the class attribute name = '...'")
    check("kind", cls.kind in KINDS, f"kind must be one of {KINDS}, got {cls.kind!r}")
    check("quantity", isinstance(cls.quantity, str) and bool(cls.quantity), "set quantity")
    if cls.kind in ("single", "jacobian"):  # the base's default names mutual information, in nats
        check("quantity of a measure", cls.quantity != "mutual_information",
              "a single-representation or Jacobian measure must set its own quantity (and unit): the base's "
              "default is 'mutual_information' in nats, which would mislabel its rows")
    check("unit", isinstance(cls.unit, str) and bool(cls.unit), "set unit (e.g. 'nats')")
    check("x_source", cls.x_source in ("identity", "inputs"), f"x_source must be 'identity' or 'inputs', got {cls.x_source!r}")
    check("reference", isinstance(cls.reference, str), "reference must be a string")
    try:
        d = describe(cls)
        check("describe", d["name"] == cls.name and isinstance(d["params"], dict), "registry.describe gave " + repr(d))
    except Exception as exc:  # noqa: BLE001 - a conformance report, not a crash
        check("describe", False, f"{type(exc).__name__}: {exc}")

    try:
        inst = est if not isinstance(est, type) else cls()
    except Exception as exc:  # noqa: BLE001
        check("default construction", False, f"{type(exc).__name__}: {exc}")
        raise ConformanceError(f"Estimator '{label}' fails the conformance check:\n  - " + "\n  - ".join(failures)) from None
    try:
        p = inst.params()
        again = cls(**p)
        check("params round trip", again == inst and again.params() == p, f"{cls.__name__}(**params()) != instance")
    except Exception as exc:  # noqa: BLE001
        check("params round trip", False, f"{type(exc).__name__}: {exc}")
        p = {}
    if dataclasses.is_dataclass(inst) and dataclasses.fields(inst):
        f0 = dataclasses.fields(inst)[0].name
        try:
            setattr(inst, f0, getattr(inst, f0))
            check("immutable", False, f"assigning .{f0} succeeded; the dataclass is not frozen")
        except dataclasses.FrozenInstanceError:
            check("immutable", True)
    try:
        check_parameters(inst)
        check("parameter constraints", True)
    except ConformanceError as exc:
        check("parameter constraints", False, exc.message)

    data = _sample(cls.kind if cls.kind in KINDS else "pair", n, seed, cls.x_source)
    out = None
    try:
        out = inst.estimate(*data)
    except Exception as exc:  # noqa: BLE001
        check("estimate runs", False, f"{type(exc).__name__}: {exc}")
    if out is not None:
        check("returns Estimate", isinstance(out, Estimate), f"got {type(out).__name__}")
        if isinstance(out, Estimate):
            check("value is a finite float", isinstance(out.value, float) and math.isfinite(out.value), repr(out.value))
            check("estimator name", out.estimator == inst.name, f"Estimate.estimator={out.estimator!r}, name={inst.name!r}")
            check("unit", out.unit == cls.unit, f"Estimate.unit={out.unit!r}, class unit={cls.unit!r}")
            if cls.kind == "pair":
                check("quantity", out.quantity == cls.quantity, f"Estimate.quantity={out.quantity!r}, class={cls.quantity!r}")
            else:
                check("quantity", isinstance(out.quantity, str) and bool(out.quantity), "empty quantity")
            check("params", out.params == p, f"Estimate.params={out.params!r}, params()={p!r}")
            check("n_samples", out.n_samples == n, f"Estimate.n_samples={out.n_samples}, given {n}")
            try:
                tout = inst.estimate(*(torch.from_numpy(np.ascontiguousarray(a)) for a in data))
                check("numpy and torch agree", math.isclose(tout.value, out.value, rel_tol=rtol, abs_tol=rtol),
                      f"numpy {out.value!r} vs torch {tout.value!r}")
            except Exception as exc:  # noqa: BLE001
                check("numpy and torch agree", False, f"torch input failed: {type(exc).__name__}: {exc}")
            try:
                repeat = inst.estimate(*data)
                check("deterministic", math.isclose(repeat.value, out.value, rel_tol=rtol, abs_tol=rtol),
                      f"first call {out.value!r}, second {repeat.value!r}")
            except Exception as exc:  # noqa: BLE001
                check("deterministic", False, f"{type(exc).__name__}: {exc}")
    bad = [a.copy() for a in data]
    j = next(i for i, a in enumerate(bad) if a.dtype.kind == "f")
    bad[j][0, 0] = np.nan
    try:
        inst.estimate(*bad)
        check("rejects NaN", False, "a NaN in the input gave a value instead of a DataError")
    except DataError:
        check("rejects NaN", True)
    except Exception as exc:  # noqa: BLE001
        check("rejects NaN", False, f"raised {type(exc).__name__} instead of ibscope.errors.DataError: {exc}")
    if failures:
        raise ConformanceError(
            f"Estimator '{label}' fails {len(failures)} conformance check(s):\n  - " + "\n  - ".join(failures),
            hint="See docs/estimators.md, 'Writing a plug-in'.",
        )
    return passed
