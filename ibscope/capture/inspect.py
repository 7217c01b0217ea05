"""``ibscope layers`` as a library call: what a model and a probe look like to ``capture``."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ibscope.errors import UsageError


def inspect_layers(model: str, probe: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                   model_args: Mapping[str, Any] | None = None, layers: Sequence[str] | None = None,
                   reduce: Any = None, batch_size: int = 4, device: str = "cpu", trust_checkpoint: bool = False,
                   safe_globals: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one probe batch through the model and describe it.

    ``model``: a factory spec ('pkg.module:factory', 'file.py:factory', 'hf:DIR' or 'hf' with
    ``checkpoint``); ``checkpoint``: loaded (strictly) first; ``layers``/``reduce``: selectors and
    reductions as for capture, to show what they would select. Returns ``{"inputs": [...]`` (the
    probe's arrays and how they are passed), ``"modules": [{name, type, calls, output, params}]``
    in execution order, ``"selected": {layer: plan} | None``, ``"batch": n}``.
    """
    import torch

    from ibscope._device import resolve_device
    from ibscope.capture import plan_layers
    from ibscope.capture.hf import is_hf_spec
    from ibscope.capture.loading import load_checkpoint_into, resolve_factory
    from ibscope.capture.probe import check_forward_accepts, load_probe
    from ibscope.capture.selectors import trace_modules

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1. Got {batch_size}.")
    build = resolve_factory(model, dict(model_args or {}))
    net = build(checkpoint) if is_hf_spec(model) else build()  # type: ignore[call-arg]  # an hf factory takes the folder
    if checkpoint is not None:
        load_checkpoint_into(net, checkpoint, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals)
    dev = resolve_device(device)
    net.to(dev).eval()
    pr = load_probe(str(probe), max_samples=batch_size)
    check_forward_accepts(net, pr)
    x = pr.batch(0, pr.n, dev)
    traces = trace_modules(net, x)
    plan = None
    if layers:
        with torch.no_grad():
            _, _, plan, _ = plan_layers(net, x, list(layers), reduce)
    rows = [{"name": t.name or "(model)", "type": t.type, "calls": t.calls, "output": t.outputs[0] if t.outputs else "",
             "params": t.n_params} for t in traces.values()]
    return {"inputs": pr.describe_inputs(), "modules": rows, "selected": plan, "batch": x.n}
