"""The hook engine: forward hooks that copy, select, reduce and hand back per-layer batches.

Always copy: a hook sees the very tensor the module returned, and a later in-place op
(``ReLU(inplace=True)``, ``out += identity``) may rewrite it after the hook has run. Every
captured tensor is therefore either a fresh result of a reduction (mean, max, projection) or
an explicit ``clone()`` of the module output, taken inside the hook, before anything else runs.

Reductions turn one module output into ``(batch, features)``:

==========  ===================================================================
``auto``    (default) 2-D outputs as they are; conv maps ``(N, C, ...)`` -> ``gap``;
            3-D outputs of other modules (sequences) need an explicit choice
``none``    2-D outputs only (1-D outputs become one feature)
``flatten`` ``(N, ...)`` -> ``(N, prod(...))``
``gap``     global average pool over all dims after the channel dim (alias ``avg``)
``gmp``     global max pool over the same dims (alias ``max``)
``rp:K``    flatten, then project to K dims with a Gaussian matrix drawn from a fixed seed
            (the same matrix at every checkpoint; ``rp:K:SEED`` sets the seed)
``last``    sequences ``(N, T, D)``: the last position
``first``   sequences: the first position (alias ``cls``)
``mean``    sequences: mean over positions
==========  ===================================================================
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

from ibscope.errors import DataError, UsageError
from ibscope.capture.selectors import Target, describe

REDUCTIONS = ("auto", "none", "flatten", "gap", "avg", "gmp", "max", "rp:K", "last", "first", "cls", "mean")
_ALIASES = {"avg": "gap", "max": "gmp", "cls": "first"}
_CHANNEL_TYPES_1D = ("Conv1d", "ConvTranspose1d", "BatchNorm1d", "InstanceNorm1d", "MaxPool1d", "AvgPool1d",
                     "AdaptiveAvgPool1d", "AdaptiveMaxPool1d", "LazyConv1d")
DEFAULT_RP_SEED = 0


def parse_reduction(op: str) -> tuple[str, int | None, int | None]:
    """('rp', K, seed) | (name, None, None); UsageError for unknown ops."""
    op = str(op).strip().lower()
    op = _ALIASES.get(op, op)
    if op.startswith("rp:") or op.startswith("rp"):
        parts = op.split(":")
        try:
            k = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else DEFAULT_RP_SEED
        except (IndexError, ValueError):
            raise UsageError(f"Random projection is written 'rp:K' or 'rp:K:SEED' (K = output dims). Got {op!r}.") from None
        if k < 1:
            raise UsageError(f"Random projection dims must be >= 1. Got {k}.")
        if len(parts) > 3:
            raise UsageError(f"Random projection is written 'rp:K' or 'rp:K:SEED'. Got {op!r}.")
        return "rp", k, seed
    if op not in ("auto", "none", "flatten", "gap", "gmp", "last", "first", "mean"):
        from ibscope.errors import unknown_name

        raise unknown_name("reduction", op, [r for r in REDUCTIONS if r != "rp:K"] + ["rp:K"])
    return op, None, None


def resolve_auto(op: str, raw_shape: tuple[int, ...], module_type: str, layer: str) -> str:
    """Turn 'auto' into a concrete reduction for a per-sample shape; validate explicit ones."""
    nd = len(raw_shape) + 1  # with the batch dim
    base, _, _ = parse_reduction(op)
    if base == "auto":
        if nd <= 2:
            return "none"
        if nd >= 4 or module_type in _CHANNEL_TYPES_1D:
            return "gap"
        raise UsageError(
            f"Layer '{layer}' ({module_type}) outputs a sequence of shape (batch, {', '.join(map(str, raw_shape))}); "
            "say how to reduce it to one vector per sample.",
            hint=f"--reduce '{layer}=last' (or first, mean, flatten, gap, rp:K).")
    if base == "none" and nd > 2:
        raise UsageError(f"Layer '{layer}' outputs (batch, {', '.join(map(str, raw_shape))}); 'none' keeps 2-D outputs only.",
                         hint=f"--reduce '{layer}=flatten' keeps every value; gap, gmp or rp:K make it smaller.")
    if base in ("gap", "gmp") and nd < 3:
        raise UsageError(f"Layer '{layer}' outputs (batch, {', '.join(map(str, raw_shape))}): "
                         f"'{base}' needs maps with dims after the channel dim.", hint="Use 'none' for 2-D outputs.")
    if base in ("last", "first", "mean") and nd != 3:
        raise UsageError(f"Layer '{layer}': '{base}' expects (batch, positions, features), got (batch, "
                         f"{', '.join(map(str, raw_shape))}).")
    return str(op).strip().lower() if base == "rp" else base


class Reducer:
    """A concrete reduction for one layer (see the module docstring)."""

    def __init__(self, op: str, layer: str):
        self.op, self.k, self.seed = parse_reduction(op)
        self.spec = op
        self.layer = layer
        self._proj: dict[tuple, Any] = {}

    def projection(self, d_in: int, device, dtype):
        """The (d_in, K) Gaussian matrix; a function of (seed, layer name, d_in) only."""
        import torch

        key = (d_in, str(device), dtype)
        if key not in self._proj:
            g = torch.Generator(device="cpu")
            g.manual_seed((self.seed * 1_000_003 + zlib.crc32(self.layer.encode())) % (2**63))
            r = torch.randn(d_in, self.k, generator=g, dtype=torch.float32) / math.sqrt(self.k)
            self._proj[key] = r.to(device=device, dtype=dtype)
        return self._proj[key]

    def __call__(self, t):
        import torch

        op = self.op
        if t.ndim == 1:
            t = t.reshape(-1, 1)
        if op == "none":
            return t
        if op == "flatten":
            return t.reshape(t.shape[0], -1)
        if op == "gap":
            return t.mean(dim=tuple(range(2, t.ndim)))
        if op == "gmp":
            return t.amax(dim=tuple(range(2, t.ndim)))
        if op == "last":
            return t[:, -1]
        if op == "first":
            return t[:, 0]
        if op == "mean":
            return t.mean(dim=1)
        if op == "rp":
            f = t.reshape(t.shape[0], -1)
            if not f.is_floating_point():
                f = f.float()
            dt = f.dtype if f.dtype in (torch.float32, torch.float64) else torch.float32
            return f.to(dt) @ self.projection(f.shape[1], f.device, dt)
        raise UsageError(f"Reduction {op!r} cannot be applied directly; resolve 'auto' first.")  # pragma: no cover


def select_element(obj: Any, select: tuple, name: str):
    """Pick ``obj[s0][s1]...``; a clear error when the structure does not fit."""
    import torch

    cur = obj
    for s in select:
        try:
            cur = cur[s]
        except (KeyError, IndexError, TypeError) as exc:
            raise UsageError(f"Layer '{name}': cannot select [{s!r}] from {describe(cur)}: {exc}.") from None
    if not isinstance(cur, torch.Tensor):
        hint = "Select a tensor element, e.g. '[0]'" if isinstance(cur, (tuple, list)) else \
            ("Select a key, e.g. \"['last_hidden_state']\"" if hasattr(cur, "keys") else None)
        raise UsageError(f"Layer '{name}' produced {describe(cur)}, not a tensor.",
                         hint=(hint + f" after the module path: '{name}[0]'.") if hint else None)
    return cur


def _shares_storage(a, b) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses / functorch wrappers
        return True


@dataclass
class _Group:
    module: Any
    io: str
    targets: list


class CaptureEngine:
    """Installs hooks for ``targets`` on ``model``; ``run(x)`` returns {layer: (batch, d) tensor}.

    ``grad=True`` keeps the autograd graph (for Jacobians); otherwise outputs are detached.
    Hooks are removed on ``close()`` / leaving the ``with`` block.
    """

    def __init__(self, model, targets: list[Target], reducers: dict[str, Reducer], *, grad: bool = False):
        self.model = model
        self.targets = targets
        self.reducers = reducers
        self.grad = grad
        self._handles: list = []
        self._out: dict[str, Any] = {}
        self._calls: dict[tuple, int] = {}
        self._batch = 0
        modules = dict(model.named_modules())
        groups: dict[tuple, _Group] = {}
        for t in targets:
            if t.module not in modules:
                raise UsageError(f"Module '{t.module}' does not exist in this model.")
            groups.setdefault((t.module, t.io), _Group(modules[t.module], t.io, [])).targets.append(t)
        self.groups = groups

    def __enter__(self) -> "CaptureEngine":
        for key, g in self.groups.items():
            if g.io == "out":
                h = g.module.register_forward_hook(self._make_hook(key, g, output=True))
            else:
                h = g.module.register_forward_pre_hook(self._make_hook(key, g, output=False))
            self._handles.append(h)
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_hook(self, key, g: _Group, output: bool):
        def hook(_mod, args, out=None):
            idx = self._calls.get(key, 0)
            self._calls[key] = idx + 1
            value = out if output else args
            for t in g.targets:
                if t.call is None:
                    if idx > 0:
                        raise UsageError(
                            f"Module '{t.module or 'output'}' ran more than once in this forward pass, "
                            "but the dry run saw it once (data-dependent control flow?).",
                            hint=f"Select calls explicitly: '{t.module}@0', '{t.module}@all'.")
                elif t.call != idx:
                    continue
                sel = t.select if (output or t.select) else (0,)
                tensor = select_element(value, sel, t.name)
                self._out[t.name] = self._capture(t, tensor)
            return None

        return hook

    def _capture(self, t: Target, tensor):
        src = tensor if self.grad else tensor.detach()
        if src.ndim == 0 or src.shape[0] != self._batch:
            raise DataError(f"Layer '{t.name}' returned {describe(tensor)}, but the batch has {self._batch} samples; "
                            "ibscope needs the batch in dim 0.")
        r = self.reducers[t.name](src)
        if self.grad or _shares_storage(r, tensor):
            r = r.clone()  # always copy: later in-place ops must not rewrite what we keep
        return r

    def run(self, x) -> dict[str, Any]:
        """Forward ``x`` through the model; return the captured (batch, d) tensors by layer name."""
        import torch

        from ibscope.capture.selectors import _forward

        self._out = {}
        self._calls = {}
        self._batch = int(x.shape[0])
        if self.grad:
            _forward(self.model, x)
        else:
            with torch.no_grad():
                _forward(self.model, x)
        missing = [t.name for t in self.targets if t.name not in self._out]
        if missing:
            raise DataError(f"These layers did not run in this forward pass: {', '.join(missing)}.",
                            hint="The model's control flow differs between batches; select layers that always run.")
        out, self._out = self._out, {}
        return out
