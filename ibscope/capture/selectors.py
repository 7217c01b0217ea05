"""Layer selectors: which module outputs (or inputs) to capture, and under which names.

Grammar of one selector (the ``--layers`` option, repeatable)::

    spec   := target ["@" call] [element]... [":in" | ":out"] ["=" alias]
    target := module.path            exact ``named_modules()`` path: ``features.3``, ``layer1.0.conv2``
            | glob                   ``*`` = one path segment, ``**`` = any depth: ``encoder.*``, ``**.fc``
            | "re:" regex            full match on the dotted path: ``re:blocks\\.\\d+\\.attn``
            | "type:" Class[,Class]  class name: ``type:Linear``, ``type:Conv2d,Linear``
            | "output"               the model's own output
    call   := int | "all" | "last"   which call, for a module called more than once per forward
    element:= "[" int "]" | "[" key "]" | "['" key "']"   pick from a tuple/list/dict output
              (not parsed after a ``re:`` target, whose brackets belong to the regex)

Store names: the module path (``output`` for the model output), then ``@i`` when the module
runs more than once per forward, then the element selectors, then ``:in`` for inputs; or the
alias. An exact path naming a module that runs more than once per forward is an error unless it
says which call (``relu@0``, ``relu@all``); globs, regexes and types take every call. Layers are
ordered by when they run in the forward pass (a one-batch dry run).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from ibscope.errors import DataError, UsageError, did_you_mean

OUTPUT = "output"
_ELEM_RE = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class LayerSpec:
    raw: str
    kind: str  # "path" | "glob" | "re" | "type" | "output"
    pattern: str
    call: int | str | None = None  # int, "all", "last" or None
    select: tuple = ()
    io: str = "out"
    alias: str | None = None


def _parse_elem(tok: str, raw: str):
    tok = tok.strip()
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
        return tok[1:-1]
    if re.fullmatch(r"[A-Za-z_][\w\-]*", tok):
        return tok
    raise UsageError(f"Layer selector {raw!r}: cannot read element [{tok}].",
                     hint="Use [0] for a tuple position or ['key'] for a dict key.")


def parse_spec(raw: str) -> LayerSpec:
    """Parse one selector string (see the module docstring)."""
    if not isinstance(raw, str) or not raw.strip():
        raise UsageError(f"Layer selectors must be non-empty strings. Got {raw!r}.")
    s = raw.strip()
    alias = None
    m = re.search(r"=([A-Za-z_][\w.\-@]*)$", s)
    if m:
        alias, s = m.group(1), s[: m.start()]
    elif re.match(r"^[^=\[\]'\"]+=[^=]*$", s) and not s.startswith(("re:", "type:")):
        bad = s.split("=", 1)[1]
        raise UsageError(f"Layer selector {raw!r}: the alias {bad!r} is not a valid layer name; expected a name of "
                         "letters, digits, '_', '.', '-' or '@' that starts with a letter or '_'.",
                         hint=f"e.g. '{s.split('=', 1)[0]}=fc1_out'.")
    io = "out"
    if s.endswith(":in") or s.endswith(":out"):
        s, io = s.rsplit(":", 1)
    select: list = []
    while not s.startswith("re:"):  # a regex keeps its brackets: no element selectors there
        m = re.search(r"\[([^\[\]]*)\]$", s)
        if not m:
            break
        select.insert(0, _parse_elem(m.group(1), raw))
        s = s[: m.start()]
    call: int | str | None = None
    m = re.search(r"@(\d+|all|last)$", s)
    if m:
        c = m.group(1)
        call = int(c) if c.isdigit() else c
        s = s[: m.start()]
    if not s:
        raise UsageError(f"Layer selector {raw!r} names no module.", hint="Run `ibscope layers` to list module names.")
    if s.startswith("re:"):
        pat = s[3:]
        try:
            re.compile(pat)
        except re.error as exc:
            raise UsageError(f"Layer selector {raw!r}: invalid regular expression: {exc}.") from None
        kind = "re"
    elif s.startswith("type:"):
        pat = s[5:]
        if not pat or not all(re.fullmatch(r"[A-Za-z_]\w*", t.strip()) for t in pat.split(",")):
            raise UsageError(f"Layer selector {raw!r}: 'type:' expects class names, e.g. type:Linear,Conv2d.")
        kind = "type"
    elif s in (OUTPUT, "logits"):
        pat, kind = "", "output"
    elif any(c in s for c in "*?"):
        pat, kind = s, "glob"
    else:
        pat, kind = s, "path"
    return LayerSpec(raw=raw, kind=kind, pattern=pat, call=call, select=tuple(select), io=io, alias=alias)


def glob_to_regex(pattern: str) -> str:
    """``*`` = one dotted segment (or part of it), ``**`` = any number of segments, ``?`` = one char."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:[^.]+\.)*")
            i += 3
        elif pattern.startswith(".**", i) and i + 3 == len(pattern):
            out.append(r"(?:\.[^.]+)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def glob_match(pattern: str, name: str) -> bool:
    return re.fullmatch(glob_to_regex(pattern), name) is not None


# --------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------
def describe(obj: Any, depth: int = 0) -> str:
    """Short structural description of a module output: ``Tensor[32, 10] float32``, ``tuple(...)``.

    Never raises: nested tensors (``NestedTensor[4 x (3..12), 32] float32``), ModelOutput-like
    mappings and dataclasses are described, anything else by its type name.
    """
    import dataclasses

    import torch

    try:
        if isinstance(obj, torch.Tensor):
            dt = str(obj.dtype).replace("torch.", "")
            if getattr(obj, "is_nested", False):
                parts = obj.unbind()
                lens = sorted(int(p.shape[0]) for p in parts) if parts and parts[0].ndim else []
                rest = ", ".join(map(str, parts[0].shape[1:])) if parts else ""
                span = f"{lens[0]}..{lens[-1]}" if lens and lens[0] != lens[-1] else (str(lens[0]) if lens else "?")
                return f"NestedTensor[{len(parts)} x ({span}){', ' + rest if rest else ''}] {dt}"
            return f"Tensor[{', '.join(map(str, obj.shape))}] {dt}"
        if depth > 2:
            return "..."
        if isinstance(obj, (tuple, list)):
            return f"{type(obj).__name__}(" + ", ".join(describe(o, depth + 1) for o in obj) + ")"
        if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__")):
            return f"{type(obj).__name__}(" + ", ".join(f"{k}: {describe(obj[k], depth + 1)}" for k in obj.keys()) + ")"
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return f"{type(obj).__name__}(" + ", ".join(f"{f.name}: {describe(getattr(obj, f.name), depth + 1)}"
                                                        for f in dataclasses.fields(obj)) + ")"
    except Exception:  # noqa: BLE001 - a description must never break a forward pass
        pass
    return type(obj).__name__


def _first_shape(obj: Any) -> tuple | None:
    """Shape of the first tensor in a module output (None for a ragged dim of a nested tensor)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if getattr(obj, "is_nested", False):
            try:
                parts = obj.unbind()
                return (len(parts), None) + tuple(int(s) for s in parts[0].shape[1:]) if parts else None
            except Exception:  # noqa: BLE001
                return None
        return tuple(int(s) for s in obj.shape)
    if isinstance(obj, (tuple, list)) and obj:
        return _first_shape(obj[0])
    return None


@dataclass
class ModuleTrace:
    """What a dry run saw of one module."""

    name: str  # "" = the model itself
    type: str
    calls: int = 0
    call_order: list[int] = field(default_factory=list)  # global position of each call
    outputs: list[str] = field(default_factory=list)  # description per call
    inputs: list[str] = field(default_factory=list)
    n_params: int = 0
    shapes: list = field(default_factory=list)  # shape of the first tensor of each call's output (None if none)

    @property
    def first(self) -> int:
        return self.call_order[0] if self.call_order else 1 << 30


def trace_modules(model, x) -> dict[str, ModuleTrace]:
    """Run one forward pass on batch ``x`` (a tensor or a :class:`~ibscope.capture.probe.ModelInput`)
    and record every module's calls and outputs.

    Returns traces keyed by module path ("" = the model), in order of first call (modules that
    never run come last).
    """
    import torch

    traces = {name: ModuleTrace(name, type(mod).__name__, n_params=sum(p.numel() for p in mod.parameters()))
              for name, mod in model.named_modules()}
    counter = [0]
    handles = []

    def make(name):
        def hook(_mod, args, output):
            t = traces[name]
            t.calls += 1
            t.call_order.append(counter[0])
            counter[0] += 1
            t.shapes.append(_first_shape(output))
            if len(t.outputs) < 4:
                t.outputs.append(describe(output))
                t.inputs.append(describe(args[0] if len(args) == 1 else tuple(args)))
        return hook

    try:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_hook(make(name)))
        with torch.no_grad():
            _forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return dict(sorted(traces.items(), key=lambda kv: kv[1].first))


def _forward(model, x):
    """``model(x)`` for a tensor, ``model(x, **kwargs)`` for a ModelInput; a failure of the model
    itself becomes a DataError that shows the inputs and names the likely cause."""
    from ibscope.capture.probe import ModelInput
    from ibscope.errors import IbscopeError

    inp = ModelInput.of(x)
    try:
        with warnings.catch_warnings():
            # torch's note on nn.TransformerEncoder's nested-tensor fast path (handled by the hooks)
            warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
            return inp.call(model)
    except Exception as exc:  # the user's model failed on the probe batch
        if isinstance(exc, IbscopeError):
            raise
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        if "nested" in text.lower() or "Nested" in type(exc).__name__:
            hint = ("The model runs on nested tensors here (nn.TransformerEncoder with a padding mask in eval mode "
                    "packs each sequence to its real tokens). ibscope captures such outputs with the reductions "
                    "mean, first and last; if the error is inside your own code, build the encoder with "
                    "enable_nested_tensor=False.")
        elif isinstance(exc, TypeError) and ("argument" in text or "positional" in text):
            hint = ("The probe's arrays are passed as model(x, name=array, ...): 'x' positionally, every other array "
                    "(except y and ids) by keyword. Name them after forward()'s arguments.")
        else:
            hint = "Check that --probe holds inputs of the shape and dtype the model expects."
        raise DataError(f"The model's forward pass failed on the probe batch (input {inp.describe()}): "
                        f"{type(exc).__name__}: {text}", hint=hint) from None


# --------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One thing to capture: a call of a module's output (or input), optionally an element."""

    name: str  # store name
    module: str  # module path ("" = the model)
    call: int | None  # None: the module runs once per forward
    select: tuple
    io: str
    spec: str
    order: float = 0  # position in the forward pass (an input sorts half a step before its output)


def _elem_name(select: tuple) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f"['{s}']" for s in select)


def resolve_layers(specs: list[str] | str, traces: dict[str, ModuleTrace]) -> list[Target]:
    """Expand selectors against a dry run's traces into capture targets, in execution order."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise UsageError("No layers selected.", hint="Pass --layers (e.g. --layers 'type:Linear'); "
                                                     "`ibscope layers --model M --probe P` lists the modules.")
    names = [n for n in traces if n]
    targets: dict[str, Target] = {}
    for raw in specs:
        spec = parse_spec(raw)
        if spec.kind == "output":
            matched = [""]
        elif spec.kind == "path":
            if spec.pattern not in traces:
                raise UsageError(f"Unknown layer '{spec.pattern}'.{did_you_mean(spec.pattern, names)}",
                                 hint="`ibscope layers --model M --probe P` lists module names; globs (encoder.*), "
                                      "re:REGEX and type:Class also select.")
            matched = [spec.pattern]
        elif spec.kind == "glob":
            matched = [n for n in names if glob_match(spec.pattern, n)]
        elif spec.kind == "re":
            rx = re.compile(spec.pattern)
            matched = [n for n in names if rx.fullmatch(n)]
        else:
            want = {t.strip() for t in spec.pattern.split(",")}
            matched = [n for n in names if traces[n].type in want]
            if not matched:
                types = sorted({traces[n].type for n in names})
                raise UsageError(f"Layer selector {raw!r} matched no module.{did_you_mean(next(iter(want)), types)}",
                                 hint=f"Module types in this model: {', '.join(types)}.")
        if not matched:
            close = did_you_mean(spec.pattern, names)
            raise UsageError(f"Layer selector {raw!r} matched no module.{close}",
                             hint="`ibscope layers --model M --probe P` lists module names.")
        if spec.kind in ("glob", "re", "type"):
            matched = [n for n in matched if traces[n].calls > 0]  # patterns skip modules that never run
            if not matched:
                raise UsageError(f"Layer selector {raw!r} only matches modules that never run in forward().")
        produced = []
        for mod in matched:
            tr = traces[mod]
            if tr.calls == 0:
                raise UsageError(f"Module '{mod}' is never called in the forward pass, so it has no output to capture.")
            calls: list[int | None]
            if spec.call is None:
                if tr.calls > 1 and spec.kind in ("path", "output"):
                    raise UsageError(
                        f"Module '{mod or OUTPUT}' is called {tr.calls} times per forward pass (the same module is reused).",
                        hint=f"Say which call to capture: '{mod}@0' ... '{mod}@{tr.calls - 1}', '{mod}@last', "
                             f"or '{mod}@all' for each under its own name.")
                calls = list(range(tr.calls)) if tr.calls > 1 else [None]
            elif spec.call == "all":
                calls = list(range(tr.calls)) if tr.calls > 1 else [None]
            elif spec.call == "last":
                calls = [tr.calls - 1] if tr.calls > 1 else [None]
            elif isinstance(spec.call, int):
                if spec.call >= tr.calls:
                    raise UsageError(f"Layer selector {raw!r}: module '{mod}' runs {tr.calls} time(s) per forward, "
                                     f"so call {spec.call} does not exist (calls are numbered from 0).")
                calls = [spec.call] if tr.calls > 1 else [None]
            else:  # pragma: no cover - the parser admits only these
                raise UsageError(f"Layer selector {raw!r}: unknown call {spec.call!r}.")
            for c in calls:
                base = mod or OUTPUT
                name = base + (f"@{c}" if c is not None else "") + _elem_name(spec.select) + (":in" if spec.io == "in" else "")
                order = tr.call_order[c or 0] + (0 if spec.io == "out" else -0.5)
                produced.append(Target(name, mod, c, spec.select, spec.io, raw, order))
        if spec.alias:
            if len(produced) != 1:
                raise UsageError(f"Layer selector {raw!r} matches {len(produced)} captures; an alias (=name) needs exactly one.")
            produced = [Target(spec.alias, *(getattr(produced[0], f) for f in ("module", "call", "select", "io", "spec", "order")))]
        for t in produced:
            if "/" in t.name:
                raise UsageError(f"Layer name {t.name!r} contains '/', which the store cannot hold. Give an alias: '{raw}=NAME'.")
            if t.name in targets and targets[t.name] != t:
                prev = targets[t.name]
                if (prev.module, prev.call, prev.select, prev.io) != (t.module, t.call, t.select, t.io):
                    raise UsageError(f"Two selectors produce the layer name '{t.name}' for different captures.",
                                     hint="Give one of them an alias: 'SELECTOR=other_name'.")
                continue
            targets[t.name] = t
    return sorted(targets.values(), key=lambda t: t.order)
