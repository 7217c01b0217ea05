"""Registry of estimators: built-ins and third-party plug-ins, loaded the same way.

Built-in modules register their classes with :func:`register`. Third-party packages expose
an estimator class (a subclass of :class:`~ibscope.estimators.base.Estimator`) under the
entry-point group ``ibscope.estimators``::

    [project.entry-points."ibscope.estimators"]
    my-mi = "my_pkg.estimators:MyMI"

A plug-in that fails to import is reported as a warning (``ibscope estimators`` shows it);
it never stops the built-ins from working.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import warnings
from typing import Any

from ibscope.errors import PluginError, UsageError, did_you_mean, unknown_name

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

_REGISTRY: dict[str, type] = {}
_SOURCES: dict[str, str] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator for built-in estimators: ``@register`` above the dataclass."""
    _add(cls, source="ibscope")
    return cls


def _add(cls: type, source: str) -> None:
    from ibscope.estimators.base import Estimator

    if not (isinstance(cls, type) and issubclass(cls, Estimator) and dataclasses.is_dataclass(cls)):
        raise PluginError(f"Estimator from {source} must be a dataclass subclass of ibscope Estimator. Got {cls!r}.")
    if not cls.name:
        raise PluginError(f"Estimator class {cls.__qualname__} from {source} has no 'name'.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise PluginError(f"Two estimators are named '{cls.name}': {_SOURCES[cls.name]} and {source}.")
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


def available() -> dict[str, type]:
    """Name -> class of every registered estimator."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def plugin_errors() -> dict[str, str]:
    _load()
    return dict(_PLUGIN_ERRORS)


def source(name: str) -> str:
    _load()
    return _SOURCES.get(name, "?")


def get(name: str) -> type:
    """The estimator class registered as ``name`` (UsageError with did-you-mean otherwise)."""
    _load()
    if name not in _REGISTRY:
        if name in _PLUGIN_ERRORS:
            raise PluginError(f"Estimator '{name}' is a plug-in that failed to load: {_PLUGIN_ERRORS[name]}")
        raise unknown_name("estimator", name, _REGISTRY)
    return _REGISTRY[name]


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict:
    """{name: field} of an estimator class (classes do not change their fields)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def coerce_param(cls: type, key: str, value: Any) -> Any:
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
            f"The '{key}' parameter of {cls.name} must be of type {typ.__name__}. Got {value!r} instead."
        ) from None
    return value


def create(name: str, **params: Any):
    """Instantiate estimator ``name`` with ``params`` (strings are converted to field types)."""
    cls = get(name)
    kwargs = {k: coerce_param(cls, k, v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"Cannot create estimator '{name}' with {kwargs}: {exc}") from None


def describe(cls: type) -> dict[str, Any]:
    """Name, kind, quantity, unit, parameters with defaults, reference, first doc line."""
    params = {}
    for f in dataclasses.fields(cls):
        d = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        params[f.name] = d
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": cls.name, "kind": cls.kind, "quantity": cls.quantity, "unit": cls.unit,
        "params": params, "reference": cls.reference, "summary": doc[0] if doc else "",
        "source": _SOURCES.get(cls.name, "?"),
    }
