"""Registry of estimators: built-ins and third-party plug-ins, loaded the same way.

Built-in modules register their classes with :func:`register`, and names that pin a parameter
(``kde-upper`` is ``kde`` with ``bound="upper"``) with :func:`register_alias`. Third-party
packages expose an estimator class (a subclass of
:class:`~ibscope.estimators.base.PairEstimator`, :class:`~ibscope.estimators.base.SingleEstimator`
or :class:`~ibscope.estimators.base.JacobianEstimator`) under the entry-point group
``ibscope.estimators``::

    [project.entry-points."ibscope.estimators"]
    my-mi = "my_pkg.estimators:MyMI"

A plug-in that fails to import is reported as a warning (``ibscope estimators`` shows it);
it never stops the built-ins from working. A plug-in written against the older contract (a
direct subclass of ``Estimator`` with a ``kind`` class attribute) still loads, with a
DeprecationWarning.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ibscope.errors import PluginError, UsageError, did_you_mean, unknown_name

if TYPE_CHECKING:
    from ibscope.estimators.base import Estimator

E = TypeVar("E", bound="type[Estimator]")

ENTRY_POINT_GROUP = "ibscope.estimators"

#: modules holding the built-in estimators (imported on first registry access)
BUILTIN_MODULES = [
    "ibscope.estimators.binning",
    "ibscope.estimators.kde",
    "ibscope.estimators.ksg",
    "ibscope.estimators.gaussian",
    "ibscope.estimators.gcmi",
    "ibscope.estimators.compressed",
    "ibscope.estimators.neural",
    "ibscope.estimators.renyi",
    "ibscope.estimators.spectral",
    "ibscope.estimators.local_rank",
    "ibscope.estimators.intrinsic",
    "ibscope.estimators.entropy",
]

@dataclass(frozen=True)
class Alias:
    """A registered name for an estimator class with some parameters fixed (``kde-upper``)."""

    name: str
    target: type[Estimator]
    fixed: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


#: every registered name -> the class that computes it (for an alias: its target class)
_REGISTRY: dict[str, type[Estimator]] = {}
_ALIASES: dict[str, Alias] = {}
_SOURCES: dict[str, str] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_loaded = False


def register(cls: E) -> E:
    """Class decorator for built-in estimators: ``@register`` above the dataclass."""
    _add(cls, source="ibscope")
    return cls


def register_alias(name: str, cls: type[Estimator], *, summary: str = "", **fixed: Any) -> Alias:
    """Register ``name`` as ``cls`` with the parameters ``fixed`` pinned (``register_alias("kde-upper",
    KDE, bound="upper")``). :func:`create` builds ``cls(**params, **fixed)`` whose ``name`` is the
    alias; giving a pinned parameter another value is a UsageError. ``summary``: the one-line
    description ``ibscope estimators`` shows (default: the class's)."""
    from ibscope.estimators.params import constraints

    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fixed) - fields)
    if unknown:
        raise PluginError(f"Alias '{name}' pins {unknown}, which are not parameters of {cls.__qualname__}.")
    for key, value in fixed.items():
        c = constraints(cls).get(key)
        if c is not None and not c.accepts(value):
            raise PluginError(f"Alias '{name}' pins {key}={value!r}; {cls.__qualname__} needs {c.describe()}.")
    if name in _REGISTRY and _ALIASES.get(name, None) != Alias(name, cls, dict(fixed), summary):
        raise PluginError(f"Two estimators are named '{name}': {_SOURCES[name]} and an alias of {cls.__qualname__}.")
    alias = Alias(name, cls, dict(fixed), summary)
    _REGISTRY[name] = cls
    _ALIASES[name] = alias
    _SOURCES[name] = "ibscope" if cls.__module__.startswith("ibscope.") else cls.__module__
    return alias


def _add(cls: Any, source: str) -> None:
    from ibscope.estimators.base import _TYPED_BASES, Estimator

    if not (isinstance(cls, type) and issubclass(cls, Estimator) and dataclasses.is_dataclass(cls)):
        raise PluginError(f"Estimator from {source} must be a dataclass subclass of ibscope Estimator. Got {cls!r}.")
    if not cls.name:
        raise PluginError(f"Estimator class {cls.__qualname__} from {source} has no 'name'.")
    if cls.name in _REGISTRY and (_REGISTRY[cls.name] is not cls or cls.name in _ALIASES):
        raise PluginError(f"Two estimators are named '{cls.name}': {_SOURCES[cls.name]} and {source}.")
    if not any(issubclass(cls, b) for b in _TYPED_BASES):
        from ibscope.estimators.base import kind_of

        kind_of(cls)  # a kind the library knows, or a clear error
        warnings.warn(f"ibscope: estimator '{cls.name}' ({source}) subclasses Estimator directly with kind = "
                      f"{cls.kind!r}; subclass PairEstimator, SingleEstimator or JacobianEstimator instead (the "
                      "direct form will stop being accepted in a later release).", DeprecationWarning, stacklevel=3)
    _REGISTRY[cls.name] = cls
    _SOURCES[cls.name] = source


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            _add(cls, source=f"plug-in {ep.value}")
        except Exception as exc:  # a broken plug-in must not break ibscope
            msg = f"{type(exc).__name__}: {exc}"
            _PLUGIN_ERRORS[ep.name] = msg
            warnings.warn(f"ibscope: plug-in estimator '{ep.name}' ({ep.value}) failed to load: {msg}", stacklevel=2)


def available() -> dict[str, type[Estimator]]:
    """Name -> class of every registered estimator (an alias maps to the class it pins)."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def aliases() -> dict[str, Alias]:
    """Alias name -> :class:`Alias` (target class and pinned parameters)."""
    _load()
    return dict(sorted(_ALIASES.items()))


def plugin_errors() -> dict[str, str]:
    """Entry-point name -> the error that stopped the plug-in from loading."""
    _load()
    return dict(_PLUGIN_ERRORS)


def source(name: str) -> str:
    """Where estimator ``name`` comes from: "ibscope" or "plug-in <entry point>"."""
    _load()
    return _SOURCES.get(name, "?")


def get(name: str) -> type[Estimator]:
    """The estimator class registered as ``name`` (for an alias: the class it pins; see
    :func:`create`). UsageError with did-you-mean for an unknown name."""
    _load()
    if name not in _REGISTRY:
        if name in _PLUGIN_ERRORS:
            raise PluginError(f"Estimator '{name}' is a plug-in that failed to load: {_PLUGIN_ERRORS[name]}")
        raise unknown_name("estimator", name, _REGISTRY)
    return _REGISTRY[name]


@functools.cache
def _fields(cls: type[Estimator]) -> dict[str, dataclasses.Field[Any]]:
    """Name -> field of an estimator class (computed once per class)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def coerce_param(cls: type[Estimator], key: str, value: Any) -> Any:
    """Convert a string value (from the CLI) to the type of field ``key`` of ``cls``."""
    fields = _fields(cls)
    if key not in fields:
        raise UsageError(
            f"Estimator '{cls.name}' has no parameter '{key}'.{did_you_mean(key, fields)}",
            hint="Parameters: " + (", ".join(fields) or "(none)"),
        )
    if not isinstance(value, str):
        return value
    default = fields[key].default
    typ = type(default) if default is not dataclasses.MISSING and default is not None else None
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if default is None or typ is None:
            for conv in (int, float):
                try:
                    return conv(value)
                except ValueError:
                    pass
            return None if value.lower() in ("none", "null") else value
        if typ is tuple:
            return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(
            f"The '{key}' parameter of {cls.name} must be of type {typ.__name__ if typ else 'str'}. Got {value!r} instead."
        ) from None
    return value


def create(name: str, /, **params: Any) -> Estimator:
    """Instantiate estimator ``name`` with ``params`` (strings are converted to field types).

    For an alias, the pinned parameters are added (giving one of them another value is a
    UsageError) and the instance's ``name`` is the alias."""
    cls = get(name)
    return build(name, {k: coerce_param(cls, k, v) for k, v in params.items()})


def build(name: str, params: dict[str, Any]) -> Estimator:
    """Instantiate estimator ``name`` with ``params`` as given (no string conversion; see
    :func:`create`), adding an alias's pinned parameters and name."""
    cls = get(name)
    kwargs = dict(params)
    alias = _ALIASES.get(name)
    if alias is not None:
        for key, value in alias.fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise UsageError(
                    f"The '{key}' parameter of {name} must be {value!r} ({name} fixes it). Got {kwargs[key]!r} instead.",
                    hint=f"Use '{alias.target.name}' with {key}={kwargs[key]!r}, or leave {key} out.")
        kwargs.update(alias.fixed)
        from ibscope.estimators.params import check_values, constraints

        check_values(kwargs, constraints(cls), name)  # messages name the alias the user typed
    try:
        est = cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"Cannot create estimator '{name}' with {kwargs}: {exc}") from None
    if alias is not None:
        # the alias's name on the instance: its estimates, messages and rows say what was asked for
        object.__setattr__(est, "name", name)
    return est


def describe(cls: type[Estimator] | str) -> dict[str, Any]:
    """Name, kind, quantity, unit, parameters with defaults, their constraints, reference, first
    doc line and source of a class or a registered name (a name may be an alias)."""
    from ibscope.estimators.base import kind_of
    from ibscope.estimators.params import constraints

    alias = None
    if isinstance(cls, str):
        alias = _ALIASES.get(cls)
        cls = get(cls)
    params: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        params[f.name] = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    name = cls.name
    doc = (cls.__doc__ or "").strip().splitlines()
    summary = doc[0] if doc else ""
    if alias is not None:
        name, summary = alias.name, alias.summary or summary
        params.update(alias.fixed)
    return {
        "name": name, "kind": kind_of(cls), "quantity": cls.quantity, "unit": cls.unit,
        "params": params, "constraints": {k: c.describe() for k, c in constraints(cls).items()},
        "fixed": dict(alias.fixed) if alias is not None else {},
        "reference": cls.reference, "summary": summary, "source": _SOURCES.get(name, "?"),
    }
