"""What a model offers for capture (``ibscope layers``): the probe's inputs and the model's
modules in execution order, with output shapes and calls per forward pass, and what layer
selectors would capture.

The CLI prints :func:`inspect_layers`'s result as tables or JSON; notebooks can use it as is.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def inspect_layers(model: str | Callable, probe, *, checkpoint: str | os.PathLike | None = None,
                   model_args: dict | None = None, layers: list[str] | None = None, reduce: Any = None,
                   batch_size: int = 4, device: str = "cpu", trust_checkpoint: bool = False,
                   safe_globals: list | None = None) -> dict:
    """Run one probe batch (``batch_size`` samples) through the model built from ``model`` (a
    factory spec or callable, as for :func:`ibscope.capture.capture`; ``"hf"`` needs
    ``checkpoint``), after loading ``checkpoint`` strictly if given.

    Returns ``{"inputs": [...], "modules": [...], "selected": {...} | None, "batch": n}``:
    ``inputs`` as :meth:`~ibscope.capture.probe.Probe.describe_inputs` gives them; ``modules``
    one entry per module (``name``, ``type``, ``calls``, first ``output`` shape, ``params``);
    ``selected``, when ``layers`` are given, the per-layer plan of
    :func:`~ibscope.capture.plan_layers` (module, reduction, raw shape, stored dims).
    """
    import torch

    from ibscope.capture import plan_layers, resolve_device
    from ibscope.capture.checkpoints import load_checkpoint_into
    from ibscope.capture.factory import resolve_factory
    from ibscope.capture.hf import is_hf_spec
    from ibscope.capture.probe import check_forward_accepts, load_probe
    from ibscope.capture.selectors import trace_modules
    from ibscope.errors import UsageError

    if int(batch_size) < 1:
        raise UsageError(f"--batch-size must be >= 1. Got {batch_size}.")
    build = resolve_factory(model, model_args)
    net = build(checkpoint) if is_hf_spec(model) else build()
    if checkpoint is not None:
        load_checkpoint_into(net, checkpoint, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals)
    dev = resolve_device(device)
    net.to(dev).eval()
    pr = load_probe(probe, max_samples=int(batch_size))
    check_forward_accepts(net, pr)
    x = pr.batch(0, pr.n, dev)
    traces = trace_modules(net, x)
    plan = None
    if layers:
        with torch.no_grad():
            _, _, plan, _ = plan_layers(net, x, list(layers), reduce)
    rows = [{"name": t.name or "(model)", "type": t.type, "calls": t.calls, "output": t.outputs[0] if t.outputs else "",
             "params": t.n_params} for t in traces.values()]
    return {"inputs": pr.describe_inputs(), "modules": rows, "selected": plan, "batch": int(x.n)}
