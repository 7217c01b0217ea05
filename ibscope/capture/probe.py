"""Probe data: the fixed set of samples every checkpoint is run on.

Sources: ``.npz`` (arrays ``x`` and optionally ``y`` and ``ids``), ``.h5``/``.hdf5`` (datasets
``x``, optional ``y``/``ids``), ``.pt`` (a dict with ``x``/``y``/``ids`` or a tuple ``(x, y)``,
read with ``weights_only=True``), ``"pkg.module:factory"`` / ``"file.py:factory"`` returning a
torch ``Dataset`` (items ``(x, y)`` or ``x``) or a tuple ``(x, y)``, or a tuple ``(x, y)``.

Row order is the source's order. ``max_samples=N`` keeps the first N samples, or with
``sample_seed`` a seeded random subset of N (kept in source order). Sample ids are the indices
in the source (or its ``ids`` array), so every checkpoint and every later stage refers to the
same samples.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ibscope.errors import DataError, UsageError


@dataclass
class Probe:
    x: Any  # torch.Tensor (n, ...) in the dtype the model consumes
    y: np.ndarray | None
    ids: np.ndarray  # int64 (n,)
    source: str

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])


def _to_numpy(a: Any, what: str) -> np.ndarray:
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"Probe {what} could not be turned into an array: {exc}") from None


def _from_mapping(m: Any, source: str) -> tuple[Any, Any, Any]:
    keys = list(m.keys())
    if "x" not in keys:
        raise DataError(f"Probe file '{source}' has no 'x' array. Found: {', '.join(map(str, keys)) or 'nothing'}.",
                        hint="Save inputs as 'x' and labels as 'y', e.g. np.savez(path, x=x, y=y).")
    return m["x"], m.get("y"), m.get("ids")


def _from_dataset(ds: Any, source: str, limit: list[int] | None) -> tuple[Any, Any, Any]:
    import torch

    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"The probe dataset from '{source}' has no len(); ibscope needs a map-style Dataset.") from None
    idx = range(n) if limit is None else limit
    xs, ys = [], []
    for i in idx:
        item = ds[i]
        if isinstance(item, (tuple, list)):
            if len(item) < 1:
                raise DataError(f"Probe dataset item {i} is empty.")
            xs.append(torch.as_tensor(item[0]))
            ys.append(item[1] if len(item) > 1 else None)
        elif isinstance(item, dict) and "x" in item:
            xs.append(torch.as_tensor(item["x"]))
            ys.append(item.get("y"))
        else:
            xs.append(torch.as_tensor(item))
            ys.append(None)
    if not xs:
        raise DataError(f"The probe dataset from '{source}' is empty.")
    try:
        x = torch.stack(xs)
    except RuntimeError as exc:
        raise DataError(f"Probe samples from '{source}' have different shapes and cannot be stacked: {exc}") from None
    y = None if any(v is None for v in ys) else np.stack([_to_numpy(v, "labels") for v in ys])
    return x, y, np.asarray(list(idx), dtype=np.int64)


def _read_source(probe: Any, max_samples: int | None, sample_seed: int | None):
    import torch

    if isinstance(probe, tuple) and len(probe) == 2:
        return probe[0], probe[1], None, "<arrays>", False
    if not isinstance(probe, (str, os.PathLike)):
        raise UsageError(f"--probe expects a file (.npz, .h5, .pt), 'pkg.module:factory' or (x, y) arrays. Got {type(probe).__name__}.")
    s = str(probe)
    p = Path(s)
    suffix = p.suffix.lower()
    if suffix in (".npz", ".h5", ".hdf5", ".pt", ".pth") or p.exists():
        if not p.is_file():
            raise UsageError(f"Probe file '{s}' not found.")
        src = str(p.resolve())
        if suffix == ".npz":
            try:
                with np.load(p, allow_pickle=False) as z:
                    x, y, ids = _from_mapping({k: z[k] for k in z.files}, s)
            except (ValueError, OSError) as exc:
                raise DataError(f"Probe file '{s}' is not a readable .npz: {exc}") from None
            return x, y, ids, src, False
        if suffix in (".h5", ".hdf5"):
            import h5py

            try:
                with h5py.File(p, "r") as f:
                    x, y, ids = _from_mapping({k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}, s)
            except OSError as exc:
                raise DataError(f"Probe file '{s}' is not readable HDF5: {exc}") from None
            return x, y, ids, src, False
        if suffix in (".pt", ".pth"):
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"Probe file '{s}' could not be read with torch.load(weights_only=True): "
                                f"{str(exc).splitlines()[0][:300]}",
                                hint="Save plain tensors: torch.save({'x': x, 'y': y}, path).") from None
            if isinstance(obj, dict):
                x, y, ids = _from_mapping(obj, s)
                return x, y, ids, src, False
            if isinstance(obj, (tuple, list)) and len(obj) == 2:
                return obj[0], obj[1], None, src, False
            if isinstance(obj, torch.Tensor):
                return obj, None, None, src, False
            raise DataError(f"Probe file '{s}' holds a {type(obj).__name__}; expected a dict with 'x' (and 'y') or (x, y).")
        raise UsageError(f"Probe file '{s}' has an unsupported extension '{suffix}'. Use .npz, .h5 or .pt, or a factory.")
    if ":" in s:
        from ibscope.capture.loading import model_spec_id, resolve_object

        fn = resolve_object(s, "--probe")
        try:
            obj = fn() if isinstance(fn, type) or inspect.isroutine(fn) else fn
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"The probe factory {s!r} raised {type(exc).__name__}: {exc}") from None
        src = model_spec_id(s)
        if isinstance(obj, (tuple, list)) and len(obj) == 2 and hasattr(obj[0], "shape"):
            return obj[0], obj[1], None, src, False
        if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
            n = len(obj)
            limit = _subset(n, max_samples, sample_seed)
            x, y, ids = _from_dataset(obj, s, None if limit is None else list(limit))
            return x, y, ids, src, True
        raise DataError(f"The probe factory {s!r} returned {type(obj).__name__}; expected a torch Dataset or (x, y).")
    raise UsageError(f"Probe '{s}' not found: expected a file (.npz, .h5, .pt) or 'pkg.module:factory'.")


def _subset(n: int, max_samples: int | None, sample_seed: int | None) -> np.ndarray | None:
    if max_samples is None or max_samples >= n:
        return None
    if max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1. Got {max_samples}.")
    if sample_seed is None:
        return np.arange(max_samples)
    rng = np.random.default_rng(int(sample_seed))
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def _all_finite(x) -> bool:
    """One buffered pass, no copy: a float64 sum of float32 values is finite iff all values are."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(np.add.reduce(x.detach().cpu().numpy().reshape(-1), dtype=np.float64)))


def _float_labels(y: np.ndarray) -> np.ndarray:
    """Float labels holding only integer values (``(x > 0).astype(np.float32)``, very common) are
    class labels: stored as int64, with a warning, so that every estimator treats them as the
    discrete classes they are. Other float labels stay float32 (a continuous target)."""
    import warnings

    with np.errstate(invalid="ignore"):
        integral = (y.size > 0 and bool(np.isfinite(y).all()) and bool((y == np.round(y)).all())
                    and float(np.abs(y).max()) < 2.0 ** 62)
    if not integral:
        return y.astype(np.float32)
    vals = np.unique(y)
    shown = ", ".join(f"{v:g}" for v in vals[:5]) + (", ..." if vals.size > 5 else "")
    warnings.warn(f"The probe labels are floats ({y.dtype}) with only integer values ({vals.size} distinct: {shown}); "
                  "they are stored as int64 class labels, so that every estimator treats them as discrete classes. "
                  "Save them as integers to silence this.", RuntimeWarning, stacklevel=3)
    return y.astype(np.int64)


def load_probe(probe: Any, *, max_samples: int | None = None, sample_seed: int | None = None) -> Probe:
    """Load the probe set; see the module docstring for sources and sample selection."""
    import torch

    x, y, ids, source, already_subset = _read_source(probe, max_samples, sample_seed)
    x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataError(f"The probe inputs are empty (shape {tuple(x.shape)}).")
    n = int(x.shape[0])
    if y is not None:
        y = _to_numpy(y, "labels")
        if y.shape[0] != n:
            raise DataError(f"Probe inputs have {n} samples but labels have {y.shape[0]}.",
                            hint="x and y must have the same first dimension.")
        if y.dtype.kind in "biu":
            y = y.astype(np.int64)
        elif y.dtype.kind == "f":
            y = _float_labels(y)
        else:
            raise DataError(f"Probe labels must be numbers. Got dtype {y.dtype}.")
    if ids is None:
        ids = np.arange(n, dtype=np.int64)
    else:
        ids = _to_numpy(ids, "ids").astype(np.int64).reshape(-1)
        if ids.shape[0] != n:
            raise DataError(f"Probe 'ids' has {ids.shape[0]} entries for {n} samples.")
        if len(np.unique(ids)) != n:
            raise DataError("Probe 'ids' contains duplicates; each sample needs its own id.")
    if not already_subset:
        sel = _subset(n, max_samples, sample_seed)
        if sel is not None:
            t = torch.as_tensor(sel)
            x = x[t]
            y = None if y is None else y[sel]
            ids = ids[sel]
    if x.dtype == torch.float64 or x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.float()
    if x.is_floating_point() and not _all_finite(x):
        raise DataError(f"The probe inputs contain NaN or inf ({int((~torch.isfinite(x)).sum())} values).")
    return Probe(x=x.contiguous(), y=y, ids=np.ascontiguousarray(ids, dtype=np.int64), source=source)
