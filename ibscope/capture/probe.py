"""Probe data: the fixed set of samples every checkpoint is run on.

Sources: ``.npz`` (arrays), ``.h5``/``.hdf5`` (datasets), ``.pt`` (a dict of tensors or a
tuple ``(x, y)``, read with ``weights_only=True``), ``"pkg.module:factory"`` /
``"file.py:factory"`` returning a torch ``Dataset`` (items ``(x, y)``, ``x``, or dicts of
arrays) or a tuple ``(x, y)``, or a tuple ``(x, y)``.

Arrays: ``y`` holds the labels and ``ids`` the sample ids; every other array is a model input.
``x`` is passed as the first positional argument (``model(x)``); any other array is passed by
keyword under its own name, so a file with ``input_ids``, ``attention_mask`` and ``y`` runs
``model(input_ids=..., attention_mask=...)``, batch by batch. An ``attention_mask`` array
(1 = real token, 0 = padding) is also the padding mask of the sequence reductions (``mean``
over real tokens, ``last`` real token, ``first``).

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

RESERVED = ("y", "ids")  # labels and sample ids: never passed to the model
POSITIONAL = "x"  # passed as the first positional argument; every other input array by keyword
MASK_KEY = "attention_mask"  # 1 = real token, 0 = padding (Hugging Face convention)
# the input that Jacobians are taken with respect to and that is copied into the store, when
# there is no 'x': the first of these present, else the first input array
PRIMARY_KEYS = (POSITIONAL, "input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds")


@dataclass
class ModelInput:
    """One batch of model inputs: ``x`` (positional) and/or keyword arrays, all with the batch in dim 0.

    ``call(model)`` runs ``model(x, **kwargs)``; ``mask`` is the batch's padding mask (bool,
    True = real token) taken from ``attention_mask``, or None.
    """

    tensors: dict  # name -> tensor, in the probe's order
    primary: str

    @classmethod
    def of(cls, x) -> ModelInput:
        """Wrap a plain tensor (passed positionally) or return a ModelInput as is."""
        if isinstance(x, ModelInput):
            return x
        return cls({POSITIONAL: x}, POSITIONAL)

    @property
    def n(self) -> int:
        return int(self.tensors[self.primary].shape[0])

    @property
    def x(self):
        """The primary input (``x``, else ``input_ids``/``pixel_values``/..., else the first array)."""
        return self.tensors[self.primary]

    @property
    def keyword(self) -> list[str]:
        return [k for k in self.tensors if k != POSITIONAL]

    @property
    def mask(self):
        m = self.tensors.get(MASK_KEY)
        return None if m is None else m != 0

    def call(self, model):
        args = (self.tensors[POSITIONAL],) if POSITIONAL in self.tensors else ()
        return model(*args, **{k: v for k, v in self.tensors.items() if k != POSITIONAL})

    def rows(self, start: int, stop: int) -> ModelInput:
        return ModelInput({k: v[start:stop] for k, v in self.tensors.items()}, self.primary)

    def to(self, device, non_blocking: bool = False) -> ModelInput:
        return ModelInput({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}, self.primary)

    def replace(self, name: str, value) -> ModelInput:
        t = dict(self.tensors)
        t[name] = value
        return ModelInput(t, self.primary)

    def describe(self) -> str:
        from ibscope.capture.selectors import describe

        return ", ".join(f"{k}={describe(v)}" if k != POSITIONAL or len(self.tensors) > 1 else describe(v)
                         for k, v in self.tensors.items())


@dataclass
class Probe:
    inputs: dict  # name -> torch.Tensor (n, ...): 'x' positional, the others by keyword
    y: np.ndarray | None
    ids: np.ndarray  # int64 (n,)
    source: str
    primary: str = POSITIONAL

    @property
    def x(self):
        """The primary input: ``x``, else ``input_ids``, ``pixel_values``, ..., else the first array."""
        return self.inputs[self.primary]

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def keyword(self) -> list[str]:
        """Names of the arrays passed by keyword."""
        return [k for k in self.inputs if k != POSITIONAL]

    @property
    def mask(self):
        m = self.inputs.get(MASK_KEY)
        return None if m is None else m != 0

    def batch(self, start: int = 0, stop: int | None = None, device=None) -> ModelInput:
        """Rows ``start:stop`` as a :class:`ModelInput` (moved to ``device`` if given)."""
        b = ModelInput({k: v[start:stop] for k, v in self.inputs.items()}, self.primary)
        return b if device is None else b.to(device, non_blocking=True)

    def describe_inputs(self) -> list[dict]:
        """One entry per input array: name, per-sample shape, dtype, how it is passed and its role."""
        out = []
        for k, v in self.inputs.items():
            role = []
            if k == self.primary:
                role.append("primary input (Jacobians, stored inputs)")
            if k == MASK_KEY:
                role.append("padding mask of sequence reductions")
            out.append({"name": k, "shape": [int(s) for s in v.shape[1:]], "dtype": str(v.dtype).replace("torch.", ""),
                        "passed": "positional" if k == POSITIONAL else f"keyword {k}=", "role": "; ".join(role)})
        return out


def _to_numpy(a: Any, what: str) -> np.ndarray:
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"Probe {what} could not be turned into an array: {exc}") from None


def _from_mapping(m: Any, source: str) -> tuple[dict, Any, Any]:
    keys = [str(k) for k in m.keys()]
    inputs = {k: m[k] for k in keys if k not in RESERVED}
    if not inputs:
        raise DataError(f"Probe file '{source}' holds no input array. Found: {', '.join(keys) or 'nothing'}.",
                        hint="Save inputs as 'x' (passed as model(x)) or under the names of forward()'s arguments "
                             "(input_ids, attention_mask, ... passed by keyword), labels as 'y': "
                             "np.savez(path, x=x, y=y).")
    return inputs, m.get("y"), m.get("ids")


def _from_dataset(ds: Any, source: str, limit: list[int] | None) -> tuple[dict, Any, Any]:
    import torch

    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"The probe dataset from '{source}' has no len(); ibscope needs a map-style Dataset.") from None
    idx = range(n) if limit is None else limit
    cols: dict[str, list] = {}
    ys = []
    for i in idx:
        item = ds[i]
        if isinstance(item, (tuple, list)):
            if len(item) < 1:
                raise DataError(f"Probe dataset item {i} is empty.")
            parts, y = {POSITIONAL: item[0]}, (item[1] if len(item) > 1 else None)
        elif isinstance(item, dict) or (hasattr(item, "keys") and hasattr(item, "__getitem__")):
            parts = {str(k): item[k] for k in item.keys() if str(k) not in RESERVED}
            y = item["y"] if "y" in item.keys() else None
            if not parts:
                raise DataError(f"Probe dataset item {i} holds no input (keys: {', '.join(map(str, item.keys()))}).")
        else:
            parts, y = {POSITIONAL: item}, None
        if cols and set(parts) != set(cols):
            raise DataError(f"Probe dataset item {i} has inputs {', '.join(parts)}; earlier items had "
                            f"{', '.join(cols)}.")
        for k, v in parts.items():
            cols.setdefault(k, []).append(torch.as_tensor(v))
        ys.append(y)
    if not cols:
        raise DataError(f"The probe dataset from '{source}' is empty.")
    inputs = {}
    for k, vals in cols.items():
        try:
            inputs[k] = torch.stack(vals)
        except RuntimeError as exc:
            raise DataError(f"Probe samples from '{source}' have inputs '{k}' of different shapes, which cannot be "
                            f"stacked: {exc}", hint="Pad sequences to one length and pass an attention_mask.") from None
    y = None if any(v is None for v in ys) else np.stack([_to_numpy(v, "labels") for v in ys])
    return inputs, y, np.asarray(list(idx), dtype=np.int64)


def _read_source(probe: Any, max_samples: int | None, sample_seed: int | None):
    import torch

    if isinstance(probe, tuple) and len(probe) == 2:
        if isinstance(probe[0], dict):
            return dict(probe[0]), probe[1], None, "<arrays>", False
        return {POSITIONAL: probe[0]}, probe[1], None, "<arrays>", False
    if isinstance(probe, dict):
        inputs, y, ids = _from_mapping(probe, "<arrays>")
        return inputs, y, ids, "<arrays>", False
    if not isinstance(probe, (str, os.PathLike)):
        raise UsageError(f"--probe expects a file (.npz, .h5, .pt), 'pkg.module:factory', (x, y) arrays or a dict of "
                         f"arrays. Got {type(probe).__name__}.")
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
                    inputs, y, ids = _from_mapping({k: z[k] for k in z.files}, s)
            except (ValueError, OSError) as exc:
                raise DataError(f"Probe file '{s}' is not a readable .npz: {exc}") from None
            return inputs, y, ids, src, False
        if suffix in (".h5", ".hdf5"):
            import h5py

            try:
                with h5py.File(p, "r") as f:
                    inputs, y, ids = _from_mapping({k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}, s)
            except OSError as exc:
                raise DataError(f"Probe file '{s}' is not readable HDF5: {exc}") from None
            return inputs, y, ids, src, False
        if suffix in (".pt", ".pth"):
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"Probe file '{s}' could not be read with torch.load(weights_only=True): "
                                f"{str(exc).splitlines()[0][:300]}",
                                hint="Save plain tensors: torch.save({'x': x, 'y': y}, path).") from None
            if isinstance(obj, dict):
                inputs, y, ids = _from_mapping(obj, s)
                return inputs, y, ids, src, False
            if isinstance(obj, (tuple, list)) and len(obj) == 2:
                return {POSITIONAL: obj[0]}, obj[1], None, src, False
            if isinstance(obj, torch.Tensor):
                return {POSITIONAL: obj}, None, None, src, False
            raise DataError(f"Probe file '{s}' holds a {type(obj).__name__}; expected a dict with 'x' (and 'y') or (x, y).")
        raise UsageError(f"Probe file '{s}' has an unsupported extension '{suffix}'. Use .npz, .h5 or .pt, or a factory.")
    if ":" in s:
        from ibscope.capture.factory import model_spec_id, resolve_object

        fn = resolve_object(s, "--probe")
        try:
            obj = fn() if isinstance(fn, type) or inspect.isroutine(fn) else fn
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"The probe factory {s!r} raised {type(exc).__name__}: {exc}") from None
        src = model_spec_id(s)
        if isinstance(obj, (tuple, list)) and len(obj) == 2 and hasattr(obj[0], "shape"):
            return {POSITIONAL: obj[0]}, obj[1], None, src, False
        if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
            n = len(obj)
            limit = _subset(n, max_samples, sample_seed)
            inputs, y, ids = _from_dataset(obj, s, None if limit is None else list(limit))
            return inputs, y, ids, src, True
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
    from ibscope._labels import MIN_PER_CLASS, integral_values_are_classes

    vals = np.unique(y)
    if not integral_values_are_classes(int(vals.size), int(y.shape[0])):
        return y.astype(np.float32)  # a rounded continuous target (fewer than MIN_PER_CLASS samples per value)
    shown = ", ".join(f"{v:g}" for v in vals[:5]) + (", ..." if vals.size > 5 else "")
    warnings.warn(f"The probe labels are floats ({y.dtype}) with only integer values ({vals.size} distinct: {shown}); "
                  "they are stored as int64 class labels, so that every estimator treats them as discrete classes "
                  f"(integer-valued floats with more than n/{MIN_PER_CLASS} distinct values stay continuous). "
                  "Save them as integers to silence this.", RuntimeWarning, stacklevel=3)
    return y.astype(np.int64)


def _check_mask(mask, n: int, inputs: dict) -> None:
    """``attention_mask``: (n, T) of 0/1 (or bool), at least one real token per row, T = the sequence length."""
    import torch

    if mask.ndim != 2:
        raise DataError(f"Probe array '{MASK_KEY}' must be (samples, positions); got shape {tuple(mask.shape)}.",
                        hint="1 marks a real token, 0 padding, as a Hugging Face tokenizer returns it.")
    vals = torch.unique(mask)
    if not bool(((vals == 0) | (vals == 1)).all()):
        shown = ", ".join(str(v) for v in vals[:6].tolist())
        raise DataError(f"Probe array '{MASK_KEY}' must hold 0 (padding) and 1 (real token) only; it holds {shown}.",
                        hint="A float mask of additive -inf/0 values or True-means-padding masks are not attention "
                             "masks: convert them, e.g. attention_mask = (pad_mask == 0).astype(int).")
    for k, v in inputs.items():
        if k != MASK_KEY and v.ndim >= 2 and v.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) \
                and v.shape[1] != mask.shape[1]:
            raise DataError(f"Probe arrays '{k}' {tuple(v.shape)} and '{MASK_KEY}' {tuple(mask.shape)} differ in length: "
                            "the mask needs one entry per token.")
    empty = torch.nonzero((mask != 0).sum(1) == 0).reshape(-1)
    if len(empty):
        rows = ", ".join(str(int(i)) for i in empty[:8]) + (" ..." if len(empty) > 8 else "")
        raise DataError(f"Probe rows {rows} have no real token ({MASK_KEY} is all 0): a sequence reduction has "
                        "nothing to average or pick there.", hint="Drop these rows from the probe set.")


def load_probe(probe: Any, *, max_samples: int | None = None, sample_seed: int | None = None) -> Probe:
    """Load the probe set; see the module docstring for sources, arrays and sample selection."""
    import torch

    raw, y, ids, source, already_subset = _read_source(probe, max_samples, sample_seed)
    inputs: dict = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            arr = _to_numpy(v, f"input '{k}'")
            if arr.dtype.kind not in "biuf":
                raise DataError(f"Probe input '{k}' must hold numbers; got dtype {arr.dtype}.")
            v = torch.as_tensor(arr)
        if v.ndim < 1 or v.shape[0] == 0:
            raise DataError(f"The probe input '{k}' is empty (shape {tuple(v.shape)}).")
        inputs[k] = v
    n = int(next(iter(inputs.values())).shape[0])
    bad = {k: int(v.shape[0]) for k, v in inputs.items() if int(v.shape[0]) != n}
    if bad:
        raise DataError("Probe input arrays have different numbers of samples: "
                        + ", ".join(f"'{k}' {int(v.shape[0])}" for k, v in inputs.items()) + ".",
                        hint="Every input array needs one row per sample (the batch in dim 0).")
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
            inputs = {k: v[t] for k, v in inputs.items()}
            y = None if y is None else y[sel]
            ids = ids[sel]
    for k, v in list(inputs.items()):
        if v.dtype in (torch.float64, torch.float16, torch.bfloat16):
            v = v.float()
        if v.is_floating_point() and not _all_finite(v):
            raise DataError(f"The probe input '{k}' contains NaN or inf ({int((~torch.isfinite(v)).sum())} values).")
        inputs[k] = v.contiguous()
    if MASK_KEY in inputs:
        _check_mask(inputs[MASK_KEY], len(ids), inputs)
    primary = next((k for k in PRIMARY_KEYS if k in inputs), next(iter(inputs)))
    return Probe(inputs=inputs, y=y, ids=np.ascontiguousarray(ids, dtype=np.int64), source=source, primary=primary)


def check_forward_accepts(model, probe: Probe | ModelInput) -> None:
    """Refuse, before any work, probe arrays that ``model.forward`` cannot take.

    ``x`` needs a positional parameter; every other array a parameter of its name (or
    ``**kwargs``). Models whose signature cannot be read are not checked.
    """
    import inspect as _inspect

    names = list(probe.inputs if isinstance(probe, Probe) else probe.tensors)
    fwd = getattr(model, "forward", None)
    if fwd is None:
        return
    try:
        sig = _inspect.signature(fwd)
    except (TypeError, ValueError):
        return
    params = list(sig.parameters.values())
    kinds = _inspect.Parameter
    var_kw = any(p.kind == kinds.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == kinds.VAR_POSITIONAL for p in params)
    by_name = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    shown = f"{type(model).__name__}.forward{sig}"
    src = "the probe"
    problems = []
    if POSITIONAL in names and not positional and not var_pos:
        problems.append("'x' is passed as the first positional argument, but forward() takes none")
    taken = positional[0].name if (POSITIONAL in names and positional) else None
    for k in names:
        if k == POSITIONAL:
            continue
        if k == taken:
            problems.append(f"'x' already fills forward()'s first argument '{k}', and '{k}' is passed by keyword too")
        elif k not in by_name and not var_kw:
            problems.append(f"'{k}' is passed as {k}=..., but forward() has no parameter '{k}'")
    if problems:
        raise DataError(f"The arrays of {src} ({', '.join(names)}) do not fit {shown}: " + "; ".join(problems) + ".",
                        hint="Name each input array after the forward() argument it feeds ('x' goes in first, "
                             "positionally; input_ids, attention_mask, ... by keyword), or leave out arrays the model "
                             "does not take. A model that reads several inputs from one tensor can also take them "
                             "by name: def forward(self, input_ids, attention_mask=None).")
