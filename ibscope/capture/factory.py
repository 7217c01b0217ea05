"""Model factories: from ``"pkg.module:factory"``, ``"path/file.py:factory"`` or a callable to
a builder of the user's ``nn.Module``.

* ``resolve_factory(spec | callable, model_args)`` returns a zero-argument builder (for ``"hf"`` /
  ``"hf:DIR"`` one that takes the checkpoint folder, see :mod:`ibscope.capture.hf`);
* ``resolve_object(spec)`` imports the module (or the ``.py`` file, with its folder on
  ``sys.path`` while it is imported) and returns the attribute;
* ``model_spec_id`` is the spec as stored in a store's config (file paths made absolute);
* ``unwrap_model`` takes a model out of ``DataParallel`` / DDP / ``torch.compile`` wrappers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ibscope.errors import UsageError, did_you_mean

__all__ = ["resolve_factory", "resolve_object", "model_spec_id", "unwrap_model"]


def _import_file(path: Path):
    """The module of the Python file ``path``, imported once per content: a file edited since it
    was imported (a notebook re-running a pipeline after changing its model) is imported again."""
    import hashlib

    name = "ibscope_user_" + re.sub(r"\W", "_", str(path.resolve()))
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise UsageError(f"Cannot read '{path}': {exc.strerror or exc}.") from None
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__ibscope_sha256__", None) == digest:
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"Cannot import '{path}' as a Python file.")
    mod = importlib.util.module_from_spec(spec)
    mod.__ibscope_sha256__ = digest  # type: ignore[attr-defined]  # the content this module was made from
    sys.modules[name] = mod
    parent = str(path.resolve().parent)
    added = parent not in sys.path
    if added:  # let the user's file import its neighbours
        sys.path.insert(0, parent)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        if cached is not None:
            sys.modules[name] = cached  # the earlier version stays importable (pickled models refer to it)
        else:
            del sys.modules[name]
        raise UsageError(f"Importing '{path}' failed: {type(exc).__name__}: {exc}",
                         hint="Fix the error in that file; it must import without side effects that fail.") from None
    finally:
        if added and parent in sys.path:
            sys.path.remove(parent)
    return mod


def resolve_object(spec: str, what: str = "--model") -> Any:
    """Resolve ``"pkg.module:attr"`` or ``"path/to/file.py:attr"`` to the Python object."""
    if not isinstance(spec, str) or ":" not in spec or spec.endswith(":") or spec.startswith(":"):
        raise UsageError(
            f"{what} expects 'pkg.module:factory' or 'path/to/file.py:factory'. Got {spec!r}.",
            hint="Name the module (or .py file) and the function or class after a colon, e.g. 'mynet.py:build'.",
        )
    mod_part, attr = spec.rsplit(":", 1)
    if mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part:
        path = Path(mod_part)
        if not path.exists():
            raise UsageError(f"{what}: file '{mod_part}' not found.", hint="Check the path (relative to the current directory).")
        mod = _import_file(path)
    else:
        try:
            return pkgutil.resolve_name(f"{mod_part}:{attr}")
        except (ImportError, ValueError) as exc:  # ValueError: not a dotted module name
            raise UsageError(f"{what}: cannot import module '{mod_part}': {exc}.",
                             hint="Install the package, or pass a file path 'path/to/file.py:factory'.") from None
        except AttributeError:  # the module imported: name the missing attribute below, with a did-you-mean
            mod = importlib.import_module(mod_part)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise UsageError(f"{what}: '{mod_part}' has no attribute '{attr}'.{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    return obj


def model_spec_id(model: str | Callable) -> str:
    """A stable description of a model spec for the store config (file paths made absolute)."""
    if callable(model) and not isinstance(model, str):
        return f"{getattr(model, '__module__', '?')}:{getattr(model, '__qualname__', repr(model))}"
    mod_part, _, attr = str(model).rpartition(":")
    if mod_part.endswith(".py") or "/" in mod_part:
        return f"{Path(mod_part).resolve()}:{attr}"
    return str(model)


def unwrap_model(m):
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers,
    so that layer names and state-dict keys are the user's own (hooks also need the eager module)."""
    import torch.nn as nn

    while True:
        if hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            m = m._orig_mod
        elif isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            m = m.module
        else:
            return m


def resolve_factory(model: str | Callable, model_args: dict | None = None,
                    what: str = "--model") -> Callable[..., Any]:
    """A builder of a fresh ``nn.Module`` from a factory spec or callable, called with no
    argument. For ``"hf"`` / ``"hf:DIR"`` (Hugging Face, :mod:`ibscope.capture.hf`) it takes the
    checkpoint whose folder's config.json describes the model (ignored for ``hf:DIR``)."""
    import torch.nn as nn

    from ibscope.capture.hf import is_hf_spec

    if is_hf_spec(model):
        from ibscope.capture import hf

        return hf.factory(model, model_args)
    fn = resolve_object(model, what) if isinstance(model, str) else model
    if not callable(fn):
        raise UsageError(f"{what} must name a callable (function or class). Got {type(fn).__name__} for {model!r}.")
    kwargs = dict(model_args or {})

    def build() -> Any:
        try:
            m = fn(**kwargs)
        except TypeError as exc:
            raise UsageError(f"Calling the model factory {model!r} with {kwargs} failed: {exc}",
                             hint="Check --model-args against the factory's signature.") from None
        if isinstance(m, nn.Module):
            return unwrap_model(m)
        raise UsageError(f"The model factory {model!r} returned {type(m).__name__}, expected a torch.nn.Module.")

    return build
