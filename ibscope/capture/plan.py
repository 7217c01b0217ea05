"""Planning a capture before any work: which module outputs to hook (:func:`plan_layers`),
how each is reduced to one vector per sample (checked against its layout), the store config
entries of keyword inputs and sketched Jacobians, and how much memory the Jacobians need
(:func:`plan_jacobian_work`). The dry run's tables are drawn here too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ibscope.capture.jacobian import frozen_parameters, plan_jacobians
from ibscope.errors import UsageError
from ibscope.reporting import Table


def reduce_for(name: str, module: str, reduce: Any) -> str:
    """The reduction asked for a layer: exact name/path, then glob patterns, then the default."""
    from ibscope.capture.selectors import glob_match

    if reduce is None:
        return "auto"
    if isinstance(reduce, str):
        return reduce
    if not isinstance(reduce, dict):
        raise UsageError(f"reduce must be a string or a mapping {{layer: op}}. Got {type(reduce).__name__}.")
    for key in (name, module):
        if key in reduce:
            return str(reduce[key])
    for pat, op in reduce.items():
        if pat not in ("*", "default") and (glob_match(pat, name) or glob_match(pat, module)):
            return str(op)
    return str(reduce.get("*", reduce.get("default", "auto")))


def check_reduce_keys(reduce: Any, targets) -> None:
    from ibscope.capture.selectors import glob_match

    if not isinstance(reduce, dict):
        return
    names = [t.name for t in targets] + [t.module for t in targets]
    for pat in reduce:
        if pat in ("*", "default"):
            continue
        if not any(pat == n or glob_match(pat, n) for n in names):
            from ibscope.errors import unknown_name

            raise unknown_name("layer in --reduce", pat, [t.name for t in targets])


def plan_layers(model, x, layers, reduce=None):
    """Dry-run ``model`` on batch ``x`` (a tensor, or a :class:`~ibscope.capture.probe.ModelInput`
    for keyword inputs): (targets, reducers, per-layer metadata, traces).

    Every reduction is checked against its layer's layout (channels-first map, sequence, features
    last); all layers whose reduction does not fit are named in one UsageError. With an
    ``attention_mask`` in ``x``, last/first/mean reduce over real tokens.
    """
    from ibscope.capture.hooks import (
        CaptureEngine,
        Problem,
        Reducer,
        check_reduction,
        layout_of,
        raw_shape_of,
        reduction_error,
    )
    from ibscope.capture.probe import ModelInput
    from ibscope.capture.selectors import resolve_layers, trace_modules

    inp = ModelInput.of(x)
    traces = trace_modules(model, inp)
    targets = resolve_layers(layers, traces)
    check_reduce_keys(reduce, targets)
    raw = {t.name: (lambda v, mask=None, length=None: v) for t in targets}
    with CaptureEngine(model, targets, raw) as eng:
        raw_out = eng.run(inp)
    mask = inp.mask
    length = None if mask is None else int(mask.shape[1])
    reducers: dict[str, Reducer] = {}
    meta: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for t in targets:
        r = raw_out[t.name]
        shape = raw_shape_of(r, length)
        layout, why = layout_of(t, shape, traces)
        asked = reduce_for(t.name, t.module, reduce)
        op, problem = check_reduction(asked, shape, layout)
        if problem is None and op in ("last", "first", "mean") and len(shape) == 2 and mask is not None \
                and not getattr(r, "is_nested", False) and shape[0] != length:
            problem, why = "mask-length", str(length)
        if problem:
            problems.append(Problem(problem, t, shape, layout, asked, why))
            continue
        if op is None:  # pragma: no cover - check_reduction gives an op or a problem
            raise ValueError(f"No reduction for layer '{t.name}'.")
        reducer = Reducer(op, t.name)
        reducer.masked = op in ("last", "first", "mean") and len(shape) == 2 and (mask is not None or
                                                                                  getattr(r, "is_nested", False))
        reducers[t.name] = reducer
    if problems:
        raise reduction_error(problems, targets)
    with CaptureEngine(model, targets, reducers) as eng:
        red = eng.run(inp)
    for i, t in enumerate(targets):
        r = raw_out[t.name]
        meta[t.name] = {
            "module": t.module, "type": traces[t.module].type, "call": t.call, "select": list(t.select),
            "io": t.io, "spec": t.spec, "reduction": reducers[t.name].spec,
            "raw_shape": list(raw_shape_of(r, length)), "dims": int(red[t.name].shape[1]),
            "raw_dtype": str(r.dtype).replace("torch.", ""), "order": i,
        }
        if reducers[t.name].masked:  # reduced over real tokens only (attention_mask or nested tensors)
            meta[t.name]["masked"] = True
        if getattr(r, "is_nested", False):
            meta[t.name]["nested"] = True
    return targets, reducers, meta, traces


def check_jacobian_input(pr, jacobian_samples: int) -> None:
    if jacobian_samples and not pr.x.is_floating_point():
        raise UsageError(f"--jacobian-samples needs a floating-point probe input; '{pr.primary}' is "
                         f"{str(pr.x.dtype).replace('torch.', '')}.",
                         hint="Jacobians with respect to integer inputs (e.g. token ids) are not defined; capture "
                              "without --jacobian-samples.")


def plan_jacobian_work(net, targets, reducers, meta, pr, m, dev, method, budget, chunk=None):
    """Size the Jacobian computation to the budget before any work (UsageError if it cannot fit);
    ``chunk``: at most that many samples per ``vmap`` (None: as many as the budget holds)."""
    from ibscope.capture.hooks import CaptureEngine

    with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
        return plan_jacobians(eng.run, pr.batch(0, 1, dev), {t.name: meta[t.name]["dims"] for t in targets},
                              min(int(m), pr.n), method=method, budget=budget, device=dev,
                              max_samples_per_pass=None if chunk is None else int(chunk))


def probe_and_jacobian_config(pr, jplan) -> dict:
    """Store config entries for keyword probe inputs and a non-exact Jacobian method (absent
    otherwise, so that stores of plain captures keep their identity)."""
    extra: dict = {}
    if pr.keyword:  # keyword inputs: their names, shapes and content take part in the store's identity
        from ibscope.store import sha256_bytes

        extra["input_key"] = pr.primary
        extra["probe_inputs"] = [dict(e, sha256=sha256_bytes(np.ascontiguousarray(pr.inputs[e["name"]].numpy()).tobytes()))
                                 for e in pr.describe_inputs()]
    if jplan is not None and jplan.method != "exact":
        extra["jacobian_method"] = f"{jplan.method}:{jplan.sketch_k}"
    return extra


def layers_table(meta: dict, title: str) -> Table:
    """The planned layers (``plan_layers``' metadata) as a table: layer, module, reduction, raw
    shape, stored dims."""
    return Table(title, ["layer", "module", "reduction", "raw shape", "stored dims"],
                 [[name, m["module"] or "(model)", m["reduction"] + (" (real tokens)" if m.get("masked") else ""),
                   "x".join(map(str, m["raw_shape"])), str(m["dims"])] for name, m in meta.items()])
