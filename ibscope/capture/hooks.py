"""The hook engine: forward hooks that copy, select, reduce and hand back per-layer batches.

Always copy: a hook sees the very tensor the module returned, and a later in-place op
(``ReLU(inplace=True)``, ``out += identity``) may rewrite it after the hook has run. Every
captured tensor is therefore either a fresh result of a reduction (mean, max, projection) or
an explicit ``clone()`` of the module output, taken inside the hook, before anything else runs.

Reductions turn one module output into ``(batch, features)``:

==========  ===================================================================
``auto``    (default) 2-D outputs as they are; conv maps ``(N, C, ...)`` -> ``gap``;
            sequences ``(N, L, D)`` need an explicit choice
``none``    2-D outputs only (1-D outputs become one feature)
``flatten`` ``(N, ...)`` -> ``(N, prod(...))``
``gap``     conv maps: global average pool over all dims after the channel dim (alias ``avg``)
``gmp``     conv maps: global max pool over the same dims (alias ``max``)
``rp:K``    flatten, then project to K dims with a Gaussian matrix drawn from a fixed seed
            (the same matrix at every checkpoint; ``rp:K:SEED`` sets the seed)
``last``    sequences ``(N, L, D)``: the last position; with an attention mask, the last real token
``first``   sequences: the first position (alias ``cls``); with a mask, the first real token
``mean``    sequences: mean over positions; with a mask, over the real tokens only. Also
            ``(N, ..., D)`` outputs with features last: mean over all positions
==========  ===================================================================

Layouts: a 3-D or larger output is either a channels-first map ``(N, C, ...)`` (made by a
convolution, batch norm or pooling) or has its features last ``(N, L, D)`` (made by a Linear,
LayerNorm, attention, an RNN or an embedding). The layout of a captured output is read from the
last module of a known kind that ran before it returned (checked against the shapes), falling
back to ``(N, C, H, W)`` maps for 4-D and sequences for 3-D outputs. ``gap``/``gmp`` are refused
on sequences (they would average each position over its features) and ``mean``/``first``/
``last`` on channels-first maps.

Nested tensors (``nn.TransformerEncoder`` with a padding mask in eval mode packs each sequence
to its real tokens) are reduced per sequence by ``mean``, ``first`` and ``last``, which then
equal the masked reductions; other reductions pad them back to the probe's sequence length.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ibscope.capture.selectors import Target, describe
from ibscope.errors import DataError, UsageError

REDUCTIONS = ("auto", "none", "flatten", "gap", "avg", "gmp", "max", "rp:K", "last", "first", "cls", "mean")
_ALIASES = {"avg": "gap", "max": "gmp", "cls": "first"}
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


# module kinds whose outputs have a known layout
_MAP_TYPES = re.compile(r"^(Lazy)?Conv(Transpose)?[123]d$|^(Sync)?BatchNorm([123]d)?$|^(Lazy)?InstanceNorm[123]d$|"
                        r"^GroupNorm$|^(Adaptive)?(Max|Avg)Pool[123]d$|^LPPool[123]d$|^LocalResponseNorm$|"
                        r"^Dropout[123]d$|^Pixel(Un)?Shuffle$|^Upsample")
_FEATURES_LAST_TYPES = re.compile(r"Linear$|^Bilinear$|^Embedding(Bag)?$|LayerNorm$|RMSNorm$|^MultiheadAttention$|"
                                  r"^(RNN|LSTM|GRU)$|^Transformer(Encoder|Decoder)?(Layer)?$|^Conv1D$")


def module_kind(type_name: str) -> str | None:
    """'map' (channels-first: conv, batch norm, pooling), 'features' (features last: Linear,
    LayerNorm, attention, RNNs, embeddings; Hugging Face's GPT-2 ``Conv1D`` is a Linear), or None."""
    if _FEATURES_LAST_TYPES.search(type_name):
        return "features"
    if _MAP_TYPES.search(type_name):
        return "map"
    return None


def layout_of(target, raw_shape: tuple, traces: dict) -> tuple[str, str]:
    """(layout, why) of a captured tensor: 'vector' (N, D), 'map' (N, C, ...), 'sequence'
    (N, L, D) or 'features' (N, ..., D) for 4-D and larger with features last.

    The layout is that of the last module of a known kind (:func:`module_kind`) that ran before
    the captured module returned (the module itself included), provided its output shape agrees
    (same channel dim for maps, same last dim for features-last); otherwise 4-D and larger
    outputs are taken as maps and 3-D ones as sequences.
    """
    nd = len(raw_shape) + 1
    if nd <= 2:
        return "vector", ""
    full = (None,) + tuple(raw_shape)
    fallback = ("map" if nd >= 4 else "sequence"), "by its number of dims"

    def named(kind: str | None) -> str:
        return "map" if kind == "map" else ("sequence" if nd == 3 else "features")

    def agrees(kind: str | None, shape) -> bool:
        if shape is None:
            return True
        if kind == "map":
            return len(shape) == nd and shape[1] == full[1]
        return shape[-1] is not None and shape[-1] == full[-1]

    tr = traces.get(target.module) if traces else None
    if tr is None:
        return fallback
    own = module_kind(tr.type)
    if target.io == "in":  # the input of a conv is a map, of a Linear/LayerNorm/attention features-last
        return (named(own), f"it is the input of {tr.type} '{target.module}'") if own else fallback
    if not tr.call_order:
        return fallback
    pos = tr.call_order[target.call or 0]
    best = None  # (position, name, call index)
    for name, t in traces.items():
        if module_kind(t.type) is None:
            continue
        for i, cp in enumerate(t.call_order):
            if cp <= pos and (best is None or cp > best[0]):
                best = (cp, name, i)
    if best is None:
        return fallback
    t = traces[best[1]]
    kind = module_kind(t.type)
    shape = t.shapes[best[2]] if best[2] < len(t.shapes) else None
    if best[1] == target.module and target.select:
        shape = None  # an element of a tuple output: the first tensor's shape says nothing about it
    if not agrees(kind, shape):
        return fallback
    where = "it is the output of" if best[1] == target.module else "the last module before it is"
    return named(kind), f"{where} {t.type} '{best[1] or 'model'}'"


_SEQUENCE_OPS = ("last", "first", "mean")


def check_reduction(op: str, raw_shape: tuple, layout: str) -> tuple[str | None, str | None]:
    """(concrete reduction, None) or (None, problem) for a layer's requested ``op``.

    Problems: 'choose' (auto on a sequence or features-last output), 'gap-on-sequence',
    'sequence-op-on-map', 'none-on-nd', 'pool-on-vector', 'sequence-op-shape'.
    """
    nd = len(raw_shape) + 1  # with the batch dim
    base, _, _ = parse_reduction(op)
    if base == "auto":
        if nd <= 2:
            return "none", None
        if layout == "map":
            return "gap", None
        return None, "choose"
    if base == "none" and nd > 2:
        return None, "none-on-nd"
    if base in ("gap", "gmp"):
        if nd < 3:
            return None, "pool-on-vector"
        if layout in ("sequence", "features"):
            return None, "gap-on-sequence"
    if base in _SEQUENCE_OPS:
        if layout == "map" and nd >= 3:
            return None, "sequence-op-on-map"
        if not (nd == 3 or (base == "mean" and layout == "features")):
            return None, "sequence-op-shape"
    return (str(op).strip().lower() if base == "rp" else base), None


@dataclass
class Problem:
    """A requested reduction that does not fit a layer's output (collected, then raised together)."""

    kind: str
    target: Any
    shape: tuple
    layout: str
    op: str
    why: str = ""


def _shape(shape: tuple) -> str:
    return "(batch, " + ", ".join("L" if s is None else str(s) for s in shape) + ")"


def _reduce_keys(problems: list, all_targets: list | None) -> list[str]:
    """What to write left of '=' in a --reduce hint: a plain glob the user gave when every layer it
    matched is in ``problems``, else each layer name."""
    from ibscope.capture.selectors import parse_spec

    names = [p.target.name for p in problems]
    keys: list[str] = []
    covered: set[str] = set()
    by_spec: dict[str, list[str]] = {}
    for t in (all_targets or [p.target for p in problems]):
        by_spec.setdefault(t.spec, []).append(t.name)
    for p in problems:
        spec = p.target.spec
        if spec in keys or p.target.name in covered:
            continue
        try:
            ps = parse_spec(spec)
        except Exception:  # noqa: BLE001
            ps = None
        matched = by_spec.get(spec, [])
        if ps is not None and ps.kind == "glob" and ps.call is None and not ps.select and ps.io == "out" \
                and not ps.alias and len(matched) > 1 and all(n in names for n in matched):
            keys.append(ps.pattern)
            covered.update(matched)
        else:
            keys.append(p.target.name)
            covered.add(p.target.name)
    return keys


def _listing(problems: list) -> str:
    """'blocks.0, blocks.1 (from 'blocks.*')' with every layer named."""
    from ibscope.capture.selectors import parse_spec

    by_spec: dict[str, list] = {}
    for p in problems:
        by_spec.setdefault(p.target.spec, []).append(p.target.name)
    parts = []
    for spec, names in by_spec.items():
        try:
            exact = parse_spec(spec).kind in ("path", "output") and len(names) == 1
        except Exception:  # noqa: BLE001
            exact = True
        parts.append(", ".join(f"'{n}'" for n in names) + ("" if exact else f" (from '{spec}')"))
    return "; ".join(parts)


def reduction_error(problems: list, all_targets: list | None = None) -> UsageError:
    """One UsageError for every layer whose reduction does not fit, grouped by problem, naming
    every layer (all matches of a glob) and giving a --reduce hint for each group."""
    groups: dict[str, list] = {}
    for p in problems:
        groups.setdefault(p.kind, []).append(p)
    msgs, hints = [], []
    for kind, ps in groups.items():
        many = len(ps) > 1
        layers = ("Layers " if many else "Layer ") + _listing(ps)
        shapes = sorted({_shape(p.shape) for p in ps})
        shape = " / ".join(shapes)
        keys = _reduce_keys(ps, all_targets)
        why = ps[0].why

        def opt(op: str) -> str:  # called within this iteration only
            return " ".join(f"--reduce '{k}={op}'" for k in keys)  # noqa: B023

        if kind == "choose" and ps[0].layout == "sequence":
            msgs.append(f"{layers} output{'' if many else 's'} sequences {shape} (positions x features"
                        f"{'; ' + why if why and not many else ''}): say how to reduce "
                        f"{'each' if many else 'it'} to one vector per sample.")
            hints.append(f"{opt('mean')} (average over positions; over real tokens when the probe has an "
                         f"attention_mask), {opt('first')} (the first position, e.g. a CLS token) or {opt('last')} "
                         "(the last real token: causal language models); flatten or rp:K keep every position.")
        elif kind == "choose":
            msgs.append(f"{layers} output{'' if many else 's'} {shape} with the features last"
                        f"{' (' + why + ')' if why and not many else ''}: say how to reduce "
                        f"{'each' if many else 'it'} to one vector per sample.")
            hints.append(f"{opt('mean')} (average over all positions, keeping the features), or flatten / rp:K.")
        elif kind == "gap-on-sequence":
            op = ps[0].op
            d = ps[0].shape[-1]
            msgs.append(f"{layers} output{'' if many else 's'} {shape} with the features last "
                        f"({'positions x features' if len(ps[0].shape) == 2 else 'features in the last dim'}"
                        f"{'; ' + why if why and not many else ''}), but '{op}' pools the dims after dim 1 of a (batch, channels, ...) "
                        f"map: it would {'average' if parse_reduction(op)[0] == 'gap' else 'take the max of'} each "
                        f"position over its {d} features and store one value per position.")
            hints.append(f"{opt('mean')} averages over positions and keeps the {d} features (over real tokens with an "
                         f"attention_mask); {opt('first')} / {opt('last')} pick one position.")
        elif kind == "sequence-op-on-map":
            op = ps[0].op
            c = ps[0].shape[0]
            msgs.append(f"{layers} output{'' if many else 's'} a channels-first map {shape}"
                        f"{' (' + why + ')' if why and not many else ''}, but '{op}' treats dim 1 as positions: it would "
                        f"{'average over' if op == 'mean' else 'pick one of'} the {c} channels.")
            hints.append(f"{opt('gap')} averages over the dims after the channels and keeps the {c} channels "
                         f"(gmp: their max); flatten or rp:K keep every value.")
        elif kind == "none-on-nd":
            msgs.append(f"{layers} output{'' if many else 's'} {shape}; 'none' keeps 2-D outputs only.")
            hints.append(f"{opt('flatten')} keeps every value; {'gap, gmp' if ps[0].layout == 'map' else 'mean, first, last'}"
                         " or rp:K make it smaller.")
        elif kind == "pool-on-vector":
            msgs.append(f"{layers} output{'' if many else 's'} {shape}: '{ps[0].op}' needs maps with dims after the "
                        "channel dim.")
            hints.append(f"{opt('none')} for 2-D outputs.")
        elif kind == "mask-length":
            msgs.append(f"{layers} output{'' if many else 's'} {shape}, but the probe's attention_mask has "
                        f"{ps[0].why} positions: '{ps[0].op}' cannot tell real tokens from padding there.")
            hints.append(f"Capture a module with one position per token, or {opt('flatten')} / rp:K.")
        else:  # sequence-op-shape
            msgs.append(f"{layers}: '{ps[0].op}' expects (batch, positions, features), got {shape}.")
            hints.append(f"{opt('flatten')} or rp:K for any shape; mean also averages (batch, ..., features).")
    return UsageError("\n".join(msgs), hint=" ".join(hints))


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

        k, seed = self.k, self.seed
        if k is None or seed is None:
            raise ValueError(f"Reduction {self.spec!r} is not a random projection (it has no K).")
        key = (d_in, str(device), dtype)
        if key not in self._proj:
            g = torch.Generator(device="cpu")
            g.manual_seed((seed * 1_000_003 + zlib.crc32(self.layer.encode())) % (2**63))
            r = torch.randn(d_in, k, generator=g, dtype=torch.float32) / math.sqrt(k)
            self._proj[key] = r.to(device=device, dtype=dtype)
        return self._proj[key]

    masked = False  # set by plan_layers: reduce over the real tokens of the batch's attention mask

    def __call__(self, t, mask=None, length: int | None = None):
        """Reduce ``t`` (batch first). ``mask``: the batch's padding mask (bool (N, T), True = real
        token), used by last/first/mean when :attr:`masked`; ``length``: T, to pad nested tensors."""
        import torch

        op = self.op
        if getattr(t, "is_nested", False):
            if op in _SEQUENCE_OPS:
                parts = t.unbind()  # each sequence holds only its real tokens
                if op == "mean":
                    return torch.stack([p.mean(0) for p in parts])
                return torch.stack([p[0] if op == "first" else p[-1] for p in parts])
            if length is None:
                raise DataError(
                    f"Layer '{self.layer}' returned a nested tensor (sequences of different lengths: "
                    "nn.TransformerEncoder packs a padded batch to its real tokens in eval mode), and "
                    f"'{self.spec}' needs one fixed length, which the probe does not give (no attention_mask).",
                    hint=f"--reduce '{self.layer}=mean' (or first, last) reduces each sequence over its real tokens; "
                         "or pass the padding as an 'attention_mask' array in the probe file, so that ibscope can pad "
                         "them back to its length.")
            n = t.size(0)
            d = t.unbind()[0].shape[1:]
            t = torch.nested.to_padded_tensor(t, 0.0, (n, int(length), *d))
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
        if op in _SEQUENCE_OPS and t.ndim > 3:  # (N, ..., D) with the features last: mean over all positions
            return t.mean(dim=tuple(range(1, t.ndim - 1)))
        if op in _SEQUENCE_OPS and self.masked and mask is not None:
            if mask.shape[1] != t.shape[1]:
                raise DataError(f"Layer '{self.layer}' returned {t.shape[1]} positions in this batch, but the "
                                f"attention_mask has {mask.shape[1]}.")
            if op == "mean":
                real = mask.unsqueeze(-1)
                return t.masked_fill(~real, 0).sum(1) / mask.sum(1, keepdim=True).to(t.dtype)
            if op == "first":
                idx = mask.to(torch.int8).argmax(1)  # first real token
            else:
                idx = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)  # last real token
            return t.gather(1, idx.reshape(-1, 1, 1).expand(-1, 1, t.shape[-1])).squeeze(1)
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


def raw_shape_of(t, length: int | None = None) -> tuple:
    """Per-sample shape of a captured tensor; a nested tensor's ragged dim becomes ``length`` (the
    probe's sequence length) or its longest sequence."""
    if getattr(t, "is_nested", False):
        parts = t.unbind()
        longest = max(int(p.shape[0]) for p in parts) if parts else 0
        return (int(length) if length is not None else longest,) + tuple(int(s) for s in parts[0].shape[1:])
    return tuple(int(s) for s in t.shape[1:])


def select_element(obj: Any, select: tuple, name: str):
    """Pick ``obj[s0][s1]...``; a clear error when the structure does not fit."""
    import torch

    cur = obj
    for s in select:
        try:
            cur = cur[s]
        except (KeyError, IndexError, TypeError) as exc:
            # ModelOutput-like objects and dataclasses: fields by name (a None field is not a key)
            if isinstance(s, str) and not isinstance(cur, torch.Tensor) and hasattr(cur, s):
                cur = getattr(cur, s)
                if cur is None:
                    raise UsageError(f"Layer '{name}': field '{s}' is None in this output.",
                                     hint="The model did not compute it (e.g. hidden states or attentions that "
                                          "must be switched on in its config).") from None
                continue
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

    def __init__(self, model, targets: list[Target], reducers: Mapping[str, Callable[..., Any]], *,
                 grad: bool = False):
        self.model = model
        self.targets = targets
        self.reducers = reducers
        self.grad = grad
        self._handles: list = []
        self._out: dict[str, Any] = {}
        self._calls: dict[tuple, int] = {}
        self._batch = 0
        self._mask = None
        self._length: int | None = None
        modules = dict(model.named_modules())
        groups: dict[tuple, _Group] = {}
        for t in targets:
            if t.module not in modules:
                raise UsageError(f"Module '{t.module}' does not exist in this model.")
            groups.setdefault((t.module, t.io), _Group(modules[t.module], t.io, [])).targets.append(t)
        self.groups = groups

    def __enter__(self) -> CaptureEngine:
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
        if src.dim() == 0 or src.size(0) != self._batch:
            raise DataError(f"Layer '{t.name}' returned {describe(tensor)}, but the batch has {self._batch} samples; "
                            "ibscope needs the batch in dim 0.")
        r = self.reducers[t.name](src, self._mask, self._length)
        if self.grad or _shares_storage(r, tensor):
            r = r.clone()  # always copy: later in-place ops must not rewrite what we keep
        return r

    def run(self, x) -> dict[str, Any]:
        """Forward ``x`` (a tensor, passed as ``model(x)``, or a
        :class:`~ibscope.capture.probe.ModelInput`) through the model; return the captured
        ``(batch, d)`` tensors by layer name."""
        import torch

        from ibscope.capture.probe import ModelInput
        from ibscope.capture.selectors import _forward

        inp = ModelInput.of(x)
        self._out = {}
        self._calls = {}
        self._batch = inp.n
        self._mask = inp.mask
        self._length = None if self._mask is None else int(self._mask.shape[1])
        if self.grad:
            _forward(self.model, inp)
        else:
            with torch.no_grad():
                _forward(self.model, inp)
        missing = [t.name for t in self.targets if t.name not in self._out]
        if missing:
            raise DataError(f"These layers did not run in this forward pass: {', '.join(missing)}.",
                            hint="The model's control flow differs between batches; select layers that always run.")
        out, self._out = self._out, {}
        return out
