"""Per-sample Jacobian spectra: singular values of d f(x_i) / d x_i (torch.func, chunked).

Stored by ``ibscope capture --jacobian-samples N`` so that local-rank estimators can run later
without the model. The Jacobian of one sample is ``(d_out, d_in)`` (input flattened); only its
singular values, in descending order, are kept: ``(m, min(d_out, d_in))`` per layer.
"""

from __future__ import annotations

from typing import Any, Callable

from ibscope.errors import UsageError


def jacobian_singular_values(fn: Callable, x, chunk: int = 16):
    """Singular values of the Jacobian of ``fn`` at each sample of ``x``, descending.

    ``fn`` maps a batch ``(b, *in_shape)`` to ``(b, d_out)`` (or ``(b, ...)``, flattened), or to a
    dict of such tensors, treating samples independently (e.g. a model in eval mode). ``x`` is a
    floating tensor ``(m, *in_shape)``. Returns a tensor ``(m, min(d_out, d_in))`` (a dict of
    them if ``fn`` returns a dict), computed on ``x``'s device, ``chunk`` samples at a time so
    that at most ``chunk x d_out x d_in`` Jacobian entries live at once.
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
            m = v.reshape(v.shape[0], -1, d_in)
            parts.setdefault(k, []).append(torch.linalg.svdvals(m.detach().float()))
        del j
    if single is None:
        raise UsageError("No samples given for the Jacobian.")
    res = {k: torch.cat(v) for k, v in parts.items()}
    return res[None] if single else res
