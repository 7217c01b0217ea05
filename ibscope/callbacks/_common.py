"""What the training callbacks share: when to capture, and which metrics to keep."""

from __future__ import annotations

from ibscope.errors import UsageError


def check_every(every_n_epochs, every_n_steps) -> tuple[int | None, int | None]:
    for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UsageError(f"{name} must be a whole number >= 1 or None. Got {v!r}.")
    if every_n_epochs is None and every_n_steps is None:
        raise UsageError("Give every_n_epochs or every_n_steps (or both): when to capture.")
    return every_n_epochs, every_n_steps


def logged_metrics(values: dict) -> dict:
    """Numbers among logged values whose names look like metrics (loss, acc, f1, ...)."""
    from ibscope.capture.series import LOGGED_METRIC_RE, as_float

    out = {}
    for k, v in (values or {}).items():
        if isinstance(k, str) and LOGGED_METRIC_RE.search(k):
            f = as_float(v)
            if f is not None:
                out[k] = f
    return out
