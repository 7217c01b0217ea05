"""Per-sample Jacobian spectra in bounded memory: singular values of d f(x_i) / d x_i.

Stored by ``ibscope capture --jacobian-samples N`` so that local-rank estimators can run later
without the model. The Jacobian of one sample and one layer is ``(d_out, d_in)`` (input
flattened); only its singular values, in descending order, are kept.

Two methods (``--jacobian-method``):

``exact`` (default)
    The Jacobian is built row by row with reverse mode (``torch.func.vjp``), ``K`` rows per
    pass (``vmap`` over ``K`` one-hot cotangents), one layer at a time, so at most one layer's
    ``(d_out, d_in)`` matrix and the ``K`` backward passes live at once; then
    ``torch.linalg.svdvals``. Same values as building the whole Jacobian at once (float32
    tolerance). When whole Jacobians fit the budget, as many samples as the budget holds go into
    each ``vmap(jacrev)``, and the layers whose whole Jacobians of all the samples fit together
    share one (one forward and one batched backward for all of them, as
    :func:`jacobian_singular_values` does): a small model needs one ``vmap`` call per checkpoint,
    not one per layer and few samples.
``sketch:K``
    A randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) that never forms the
    Jacobian: ``Y = J Omega`` with ``K + 10`` Gaussian directions (forward mode,
    ``torch.func.jvp``), one power iteration (``J^T``, ``J`` again), then the singular values of
    ``Q^T J`` (reverse mode). It stores the top ``K`` singular values. They are lower bounds of
    the exact ones (Rayleigh-Ritz); for a layer whose Jacobian has rank <= K they equal the exact
    values to float tolerance, so a local rank below K is exact and a local rank >= K reads as K.
    Cost: ``4 (K + 10)`` passes per sample and layer instead of ``d_out``; memory
    ``O((d_in + d_out) K)`` instead of ``d_out x d_in``.

Memory (``--jacobian-memory``): before any work, one forward pass of one sample measures the
bytes its operations allocate (``A``); one vjp/jvp pass is counted as ``2 A``, the graph kept for
reverse mode as ``A``, and the Jacobian plus its SVD workspace as ``2 x 4 d_out d_in`` bytes
(exact). Rows per pass, and samples per ``vmap``, are chosen so that the estimate stays within
the budget (a group of layers sharing a ``vmap`` counts the graph once and every layer's rows,
Jacobians and SVD workspace); a layer that cannot fit even one row is an error before any work,
naming what it would need.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ibscope.errors import DataError, UsageError

DEFAULT_MEMORY = "auto"
AUTO_MEMORY_CAP = 1 << 30  # "auto": 1 GiB, or half the available memory if that is less
ROW_FACTOR = 2.0  # bytes of one vjp/jvp pass, in units of one forward's allocations
OVERSAMPLE = 10  # sketch: extra random directions
POWER_ITERS = 1  # sketch: power iterations
MAX_SAMPLES_PER_PASS = None  # samples per vmap: as many as the budget holds (an int caps them)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_memory(value: Any, device: Any = None) -> int:
    """A memory budget in bytes: an int, ``'512M'``, ``'1.5G'``, ``'2GiB'`` (powers of 1024) or
    ``'auto'`` (1 GiB, or half the memory available on ``device`` if that is less)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return auto_memory(device)
    if isinstance(value, bool):
        raise UsageError(f"--jacobian-memory expects a size such as 512M, 2G or auto. Got {value!r}.")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise UsageError(f"--jacobian-memory expects a size such as 512M, 1.5G, 2GiB or auto. Got {value!r}.")
        n = int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))
    if n < 1 << 20:
        raise UsageError(f"--jacobian-memory must be at least 1M. Got {value!r} ({n} bytes).")
    return n


def auto_memory(device: Any = None) -> int:
    """The default budget: 1 GiB, or half of what is available (CUDA: free device memory;
    CPU: MemAvailable from /proc/meminfo) if that is less."""
    avail = None
    try:
        import torch

        if device is not None and torch.device(device).type == "cuda":
            free, _total = torch.cuda.mem_get_info(torch.device(device))
            avail = int(free)
        else:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
    except (OSError, ValueError, RuntimeError, AssertionError):
        avail = None
    return AUTO_MEMORY_CAP if avail is None else max(1 << 26, min(AUTO_MEMORY_CAP, avail // 2))


def parse_method(value: Any) -> tuple[str, int | None]:
    """``'exact'`` -> ('exact', None); ``'sketch:K'`` -> ('sketch', K)."""
    s = str(value or "exact").strip().lower()
    if s == "exact":
        return "exact", None
    m = re.fullmatch(r"sketch:(\d+)", s)
    if m and int(m.group(1)) >= 1:
        return "sketch", int(m.group(1))
    raise UsageError(f"--jacobian-method must be 'exact' or 'sketch:K' (K >= 1, the number of singular values kept). "
                     f"Got {value!r}.")


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


@contextlib.contextmanager
def frozen_parameters(model):
    """Parameters with ``requires_grad=False`` for the duration: Jacobians are taken with respect
    to the input only, and autograd then neither keeps nor computes anything for the weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def forward_bytes(fn: Callable, *args) -> int:
    """Bytes allocated by the operations of one call ``fn(*args)`` (each storage counted once)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode  # torch >= 2.4, as pyproject asks

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0
            self.seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and not getattr(t, "is_nested", False):
                    try:
                        st = t.untyped_storage()
                        key = (st.data_ptr(), t.device)
                        if key not in self.seen:
                            self.seen.add(key)
                            self.bytes += st.nbytes()
                    except (RuntimeError, NotImplementedError):
                        self.bytes += t.numel() * t.element_size()
            return out

    try:
        c = _Count()
        with c:
            fn(*args)
        return int(c.bytes)
    except Exception:  # noqa: BLE001 - fall back to module outputs below
        pass
    # fallback: the outputs of every module, counted twice (functional ops are not seen)
    total = [0]
    model = getattr(fn, "__self__", None)
    model = getattr(model, "model", None)
    handles = []
    if model is not None:
        def hook(_m, _a, out):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    total[0] += 2 * t.numel() * t.element_size()
        handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        fn(*args)
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


@dataclass
class LayerPlan:
    name: str
    d_out: int
    method: str  # "exact" | "sketch"
    rank: int  # singular values stored per sample
    rows_per_pass: int  # exact: Jacobian rows per vmap'd vjp; sketch: directions per pass
    samples_per_pass: int
    passes: int  # vjp/jvp passes per sample
    est_bytes: int  # of this layer's vmap (its group's, when it shares one)
    group: int = -1  # layers with the same group >= 0 share one vmap(jacrev) (whole Jacobians, exact)


@dataclass
class JacobianPlan:
    """What :func:`jacobian_spectra` will do, sized to a memory budget (see the module docstring)."""

    m: int
    d_in: int
    primary: str
    budget: int
    act_bytes: int
    method: str
    sketch_k: int | None
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def est_peak(self) -> int:
        return max((lp.est_bytes for lp in self.layers), default=0)

    @property
    def total_passes(self) -> int:
        return self.m * sum(lp.passes for lp in self.layers)

    def units(self) -> list[list[LayerPlan]]:
        """The layers in the order they are computed: one list per ``vmap`` unit (a group of
        whole-Jacobian layers sharing ``vmap(jacrev)``, or one layer alone)."""
        out: list[list[LayerPlan]] = []
        by_group: dict[int, list[LayerPlan]] = {}
        for lp in self.layers:
            if lp.group < 0:
                out.append([lp])
            elif lp.group in by_group:
                by_group[lp.group].append(lp)
            else:
                by_group[lp.group] = [lp]
                out.append(by_group[lp.group])
        return out

    @property
    def per_vmap(self) -> int:
        """The most backward/forward passes batched in one ``vmap``."""
        per = 0
        for unit in self.units():
            lp = unit[0]
            rows = sum(u.d_out for u in unit) if lp.rows_per_pass >= lp.d_out and lp.method == "exact" \
                else lp.rows_per_pass
            per = max(per, rows * lp.samples_per_pass)
        return per

    def summary(self) -> str:
        kind = "exact" if self.method == "exact" else f"sketch:{self.sketch_k}"
        rows = ", ".join(f"{lp.name} {lp.d_out}" + ("" if lp.method == self.method else f" ({lp.method})")
                         for lp in self.layers)
        per = self.per_vmap
        return (f"Jacobians ({kind}): {self.m} sample(s) of '{self.primary}' ({self.d_in} inputs) x layers "
                f"[{rows}]: {self.total_passes} vjp/jvp passes, up to {per} per vmap; estimated peak "
                f"{fmt_bytes(self.est_peak)} of the {fmt_bytes(self.budget)} budget (--jacobian-memory).")


def _mib_up(n: float) -> str:
    """A --jacobian-memory value 10 % above ``n`` bytes, in whole MiB."""
    return f"{math.ceil(n * 1.1 / (1 << 20))}M"


def _whole_bytes(d: int, d_in: int, a: int) -> int:
    """Bytes one sample adds to a ``vmap(jacrev)`` for a layer of ``d`` dims besides the graph
    (``a``): its ``d`` backward passes, its Jacobian and its SVD workspace."""
    j = 4 * d * d_in
    return j + (j + 8 * min(d, d_in) ** 2) + d * int(ROW_FACTOR * a)


def _samples(per_sample: int, budget: int, m: int, max_samples: int | None) -> int:
    return max(1, min(m, budget // per_sample, m if max_samples is None else max_samples))


def _exact_layer(name: str, d: int, d_in: int, a: int, budget: int, m: int, max_samples: int | None) -> LayerPlan:
    j = 4 * d * d_in
    svd = j + 8 * min(d, d_in) ** 2
    row = int(ROW_FACTOR * a)
    per_sample_full = a + _whole_bytes(d, d_in, a)
    if per_sample_full <= budget:
        s = _samples(per_sample_full, budget, m, max_samples)
        return LayerPlan(name, d, "exact", min(d, d_in), d, s, d, s * per_sample_full)
    fixed = a + j + svd
    k = (budget - fixed) // row if budget > fixed else 0
    if k < 1:
        return LayerPlan(name, d, "exact", min(d, d_in), 0, 1, d, fixed + row)
    return LayerPlan(name, d, "exact", min(d, d_in), int(k), 1, d, fixed + int(k) * row)


def _group_whole(layers: list[LayerPlan], d_in: int, a: int, budget: int, m: int, max_samples: int | None) -> None:
    """Put exact whole-Jacobian layers, in order, into groups that share one ``vmap(jacrev)``
    holding all the samples (``m``, or ``max_samples`` if fewer) within the budget; a layer that
    cannot join one is a group of its own, as many samples per vmap as the budget holds.

    A group costs, per sample, the graph once (``a``) plus every layer's rows, Jacobian and SVD
    workspace: never more than its layers one by one, and one forward pass and one ``vmap`` call
    instead of one per layer, which is most of the time of a small model. Layers share only a
    vmap that holds every sample: the rows of a lower layer then also run backward through the
    upper layers (with zero cotangents), which on a large model costs more than the forward passes
    saved (ResNet-18: about 6 %)."""
    want = m if max_samples is None else min(m, max_samples)
    groups: list[list[LayerPlan]] = []
    cost = 0
    for lp in layers:
        if lp.method != "exact" or lp.rows_per_pass < lp.d_out:
            continue
        c = _whole_bytes(lp.d_out, d_in, a)
        if groups and (a + cost + c) * want <= budget:
            groups[-1].append(lp)
            cost += c
        else:
            groups.append([lp])
            cost = c
    for g, members in enumerate(groups):
        per_sample = a + sum(_whole_bytes(lp.d_out, d_in, a) for lp in members)
        s = _samples(per_sample, budget, m, max_samples)
        for lp in members:
            lp.samples_per_pass, lp.est_bytes, lp.group = s, s * per_sample, g


def _sketch_layer(name: str, d: int, d_in: int, a: int, budget: int, k: int) -> LayerPlan | None:
    kp = k + OVERSAMPLE
    if kp >= min(d, d_in):
        return None  # nothing to gain: the exact method is used for this layer
    fixed = a + 4 * kp * (3 * d_in + 3 * d) + 8 * kp * kp
    row = int(ROW_FACTOR * a)
    c = (budget - fixed) // row if budget > fixed else 0
    passes = kp * (2 + 2 * POWER_ITERS)
    if c < 1:
        return LayerPlan(name, d, "sketch", k, 0, 1, passes, fixed + row)
    c = min(int(c), kp)
    return LayerPlan(name, d, "sketch", k, c, 1, passes, fixed + c * row)


def plan_jacobians(run: Callable, sample, layer_dims: dict[str, int], m: int, *, method: str = "exact",
                   budget: int | str | None = None, device: Any = None,
                   max_samples_per_pass: int | None = MAX_SAMPLES_PER_PASS) -> JacobianPlan:
    """Size the Jacobian computation to ``budget`` before any work (see the module docstring).

    ``run`` maps a :class:`~ibscope.capture.probe.ModelInput` to ``{layer: (b, d)}`` with autograd
    (``CaptureEngine(grad=True).run``), ``sample`` is a one-row ModelInput (floating primary
    input), ``layer_dims`` the stored dims per layer. Raises :class:`UsageError` naming the layer,
    what it needs and what to change when the budget cannot hold even one pass.
    ``max_samples_per_pass`` caps the samples in one ``vmap`` (default: as many as the budget holds).
    """
    import torch

    kind, k = parse_method(method)
    cap = parse_memory(budget, device)
    x = sample.x
    if not x.is_floating_point():
        raise UsageError(f"Jacobians need a floating-point input; the probe's '{sample.primary}' is "
                         f"{str(x.dtype).replace('torch.', '')}.",
                         hint="Jacobians with respect to token ids or other integer inputs are not defined.")
    d_in = int(x[0].numel())
    with torch.enable_grad():
        v = x.detach().clone().requires_grad_(True)
        a = forward_bytes(run, sample.replace(sample.primary, v))
    a = max(a, 4 * d_in)
    plan = JacobianPlan(m=int(m), d_in=d_in, primary=sample.primary, budget=cap, act_bytes=a, method=kind, sketch_k=k)
    short = []
    for name, d in layer_dims.items():
        lp = _sketch_layer(name, int(d), d_in, a, cap, k) if kind == "sketch" and k is not None else None
        if lp is None:
            lp = _exact_layer(name, int(d), d_in, a, cap, m, max_samples_per_pass)
        plan.layers.append(lp)
        if lp.rows_per_pass < 1:
            short.append(lp)
    if not short:
        _group_whole(plan.layers, d_in, a, cap, int(m), max_samples_per_pass)
    if short:
        worst = max(short, key=lambda lp: lp.est_bytes)
        need = fmt_bytes(worst.est_bytes)
        parts = [f"raise the budget: --jacobian-memory {_mib_up(worst.est_bytes)}"]
        if kind == "exact":
            ks = 64 if min(worst.d_out, d_in) > 2 * (64 + OVERSAMPLE) else max(1, min(worst.d_out, d_in) // 4)
            sk = _sketch_layer(worst.name, worst.d_out, d_in, a, cap, ks)
            if sk is not None:
                more = "" if sk.rows_per_pass >= 1 else f" --jacobian-memory {_mib_up(sk.est_bytes)}"
                parts.append(f"keep the top {ks} singular values: --jacobian-method sketch:{ks}{more} (about "
                             f"{fmt_bytes(sk.est_bytes)})")
        parts.append("capture that layer with fewer dims (gap, rp:K)")
        what = (f"its {worst.d_out} x {d_in} Jacobian ({fmt_bytes(4 * worst.d_out * d_in)}) with its SVD, and one "
                f"backward pass ({fmt_bytes(ROW_FACTOR * a)})" if worst.method == "exact" else
                f"the sketch's {worst.rank + OVERSAMPLE} directions and one pass ({fmt_bytes(ROW_FACTOR * a)})")
        raise UsageError(
            f"Jacobians of layer '{worst.name}' need at least {need} ({what}), more than the "
            f"{fmt_bytes(cap)} budget (--jacobian-memory)." + (f" {len(short) - 1} other layer(s) too." if len(short) > 1 else ""),
            hint="; or ".join(parts)[0].upper() + "; or ".join(parts)[1:] + ".")
    return plan


def _one_hot(k: int, start: int, d: int, like):
    import torch

    e = torch.zeros(k, d, dtype=like.dtype, device=like.device)
    e[torch.arange(k, device=like.device), start + torch.arange(k, device=like.device)] = 1
    return e


def _layer_fn(run: Callable, names: list[str], template, primary: str):
    """``f(v, kw) -> {name: (d,)}``: the layers ``names`` of one sample whose primary input is
    ``v`` (1, ...)."""

    from ibscope.capture.probe import ModelInput

    order = list(template.tensors)

    def f(v, kw):
        both = {**kw, primary: v}
        out = run(ModelInput({k: both[k] for k in order}, primary))
        return {n: out[n].reshape(-1) for n in names}

    return f


def _one_layer(f: Callable, name: str) -> Callable:
    return lambda v, kw: f(v, kw)[name]


def _exact_whole(f: Callable, xs, kws: dict, unit: list[LayerPlan], d_in: int, tick: Callable) -> dict:
    """Singular values {layer: (S, r)} of the whole Jacobians of the layers ``unit`` at the S
    samples ``xs`` (S, 1, ...): one ``vmap(jacrev)`` for all of them."""
    import torch
    from torch.func import jacrev, vmap

    jac = vmap(lambda xi, kwi: jacrev(lambda v: f(v, kwi))(xi))(xs, kws)
    tick(xs.shape[0] * sum(lp.d_out for lp in unit))
    out = {}
    for lp in unit:
        out[lp.name] = torch.linalg.svdvals(jac.pop(lp.name).reshape(xs.shape[0], lp.d_out, d_in).detach().float())
    return out


def _exact_rows(f: Callable, xs, kws: dict, lp: LayerPlan, d_in: int, tick: Callable):
    """Singular values (S, r) of the layer's Jacobian at the S samples ``xs`` (S, 1, ...), built
    ``lp.rows_per_pass`` rows per vmap'd vjp, one sample at a time (``f`` gives this layer only)."""
    import torch
    from torch.func import vjp, vmap

    d = lp.d_out
    out = []
    for i in range(xs.shape[0]):
        kwi = {k: v[i] for k, v in kws.items()}
        _, vjp_fn = vjp(lambda v: f(v, kwi), xs[i])[:2]  # noqa: B023 - used within this iteration (no aux)
        jm = torch.empty(d, d_in, dtype=torch.float32, device=xs.device)
        for r0 in range(0, d, lp.rows_per_pass):
            k = min(lp.rows_per_pass, d - r0)
            (g,) = vmap(vjp_fn)(_one_hot(k, r0, d, xs))
            jm[r0:r0 + k] = g.reshape(k, d_in).detach()
            del g
            tick(k)
        del vjp_fn
        out.append(torch.linalg.svdvals(jm))
        del jm
    return torch.stack(out)


def _sketch_one(f: Callable, x1, kw1: dict, lp: LayerPlan, d_in: int, seed: int, tick: Callable):
    """Top ``lp.rank`` singular values of one sample's Jacobian by a randomized SVD."""
    import torch
    from torch.func import jvp, vjp, vmap

    kp = lp.rank + OVERSAMPLE
    step = lp.rows_per_pass
    fl = (lambda v: f(v, kw1))  # noqa: E731
    out, vjp_fn = vjp(fl, x1)[:2]  # (no aux)

    def j_times(v):  # (d_in, c) -> (d, c), forward mode
        cols = []
        for c0 in range(0, v.shape[1], step):
            t = v[:, c0:c0 + step].T.to(x1.dtype).reshape(-1, *x1.shape)
            cols.append(vmap(lambda ti: jvp(fl, (x1,), (ti,))[1])(t).detach().T.double())
            tick(t.shape[0])
        return torch.cat(cols, 1)

    def jt_times(u):  # (d, c) -> (d_in, c), reverse mode
        rows = []
        for c0 in range(0, u.shape[1], step):
            cot = u[:, c0:c0 + step].T.to(out.dtype).contiguous()
            (g,) = vmap(vjp_fn)(cot)
            rows.append(g.reshape(cot.shape[0], d_in).detach().double())
            tick(cot.shape[0])
        return torch.cat(rows, 0).T

    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d_in, kp, generator=gen, dtype=torch.float64).to(x1.device)
    try:
        with warnings.catch_warnings():  # torch's first jvp loads decompositions through torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            y = j_times(omega)
    except (NotImplementedError, RuntimeError) as exc:
        raise DataError(f"--jacobian-method sketch needs forward-mode autograd (torch.func.jvp), which this model "
                        f"does not support: {str(exc).splitlines()[0][:200]}",
                        hint="Use --jacobian-method exact (reverse mode only).") from None
    for _ in range(POWER_ITERS):
        q = torch.linalg.qr(y).Q
        z = jt_times(q)
        y = j_times(torch.linalg.qr(z).Q)
    q = torch.linalg.qr(y).Q  # (d, kp): an orthonormal basis of J's dominant range
    b = jt_times(q).T  # (kp, d_in) = Q^T J
    return torch.linalg.svdvals(b)[: lp.rank].float()


def jacobian_spectra(run: Callable, inputs, plan: JacobianPlan, progress: Callable[[int], Any] | None = None,
                     sample_ids=None) -> dict[str, Any]:
    """Per-sample Jacobian singular values for every layer of ``plan`` (descending), as float32
    tensors ``(m, r)``: ``r = min(d_out, d_in)`` (exact) or ``K`` (sketch).

    ``inputs``: a :class:`~ibscope.capture.probe.ModelInput` with ``plan.m`` rows; ``run`` as in
    :func:`plan_jacobians`, on a model whose parameters are frozen (:func:`frozen_parameters`).
    ``progress(n)`` is called after every ``n`` passes; ``sample_ids`` seed the sketch's random
    directions per sample (default: row numbers), so every checkpoint uses the same ones.
    """
    import torch

    tick = progress or (lambda n: None)
    ids = list(range(plan.m)) if sample_ids is None else [int(i) for i in sample_ids]
    prim = plan.primary
    xs_all = inputs.tensors[prim][: plan.m]
    kw_all = {k: v[: plan.m] for k, v in inputs.tensors.items() if k != prim}
    res: dict[str, Any] = {}
    with torch.enable_grad(), warnings.catch_warnings():
        # torch notes ops without a vmap batching rule (e.g. CPU flash attention): slower, not wrong
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for unit in plan.units():
            lp = unit[0]
            whole = lp.method == "exact" and lp.rows_per_pass >= lp.d_out
            f = _layer_fn(run, [u.name for u in unit], inputs, prim)
            parts: dict[str, list] = {u.name: [] for u in unit}
            for s0 in range(0, plan.m, lp.samples_per_pass):
                s1 = min(plan.m, s0 + lp.samples_per_pass)
                xs = xs_all[s0:s1].unsqueeze(1)  # (S, 1, ...): each sample as its own batch of one
                kws = {k: v[s0:s1].unsqueeze(1) for k, v in kw_all.items()}
                if whole:
                    for name, sv in _exact_whole(f, xs, kws, unit, plan.d_in, tick).items():
                        parts[name].append(sv)
                elif lp.method == "exact":
                    parts[lp.name].append(_exact_rows(_one_layer(f, lp.name), xs, kws, lp, plan.d_in, tick))
                else:
                    for i in range(s1 - s0):
                        seed = (zlib.crc32(lp.name.encode()) * 1_000_003 + ids[s0 + i]) % (2 ** 63)
                        kw1 = {k: v[i] for k, v in kws.items()}
                        parts[lp.name].append(_sketch_one(_one_layer(f, lp.name), xs[i], kw1, lp, plan.d_in, seed,
                                                          tick).unsqueeze(0))
            for name, p in parts.items():
                res[name] = torch.cat(p).float()
    return {lp.name: res[lp.name] for lp in plan.layers}


def jacobian_singular_values(fn: Callable, x, chunk: int = 16):
    """Singular values of the Jacobian of ``fn`` at each sample of ``x``, descending: the whole
    Jacobian at once (no memory bound; a reference for small models and tests).

    ``fn`` maps a batch ``(b, *in_shape)`` to ``(b, d_out)`` (or ``(b, ...)``, flattened), or to a
    dict of such tensors, treating samples independently (e.g. a model in eval mode). ``x`` is a
    floating tensor ``(m, *in_shape)``. Returns a tensor ``(m, min(d_out, d_in))`` (a dict of
    them if ``fn`` returns a dict), ``chunk`` samples at a time, so that ``chunk x d_out x d_in``
    Jacobian entries (and ``chunk x d_out`` backward passes) live at once. ``ibscope capture``
    uses :func:`plan_jacobians` / :func:`jacobian_spectra`, which bound memory.
    """
    import torch
    from torch.func import jacrev, vmap

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UsageError(f"Jacobians need floating-point inputs; got {getattr(x, 'dtype', type(x).__name__)}.",
                         hint="Jacobians with respect to token ids or other integer inputs are not defined.")
    if chunk < 1:
        raise UsageError(f"The Jacobian chunk size must be >= 1. Got {chunk}.")
    d_in = x[0].numel()

    def per_sample(xi):
        out = fn(xi.unsqueeze(0))
        if isinstance(out, dict):
            return {k: v.reshape(-1) for k, v in out.items()}
        return out.reshape(-1)

    jac = vmap(jacrev(per_sample))
    parts: dict[Any, list] = {}
    single = None
    for i in range(0, x.shape[0], chunk):
        j = jac(x[i:i + chunk])
        single = not isinstance(j, dict)
        items = {None: j} if single else j
        for k, v in items.items():
            mm = v.reshape(v.shape[0], -1, d_in)
            parts.setdefault(k, []).append(torch.linalg.svdvals(mm.detach().float()))
        del j
    if single is None:
        raise UsageError("No samples given for the Jacobian.")
    res = {k: torch.cat(v) for k, v in parts.items()}
    return res[None] if single else res
