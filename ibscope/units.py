"""Units of information: nats (natural log, what every estimator returns) and bits (log base 2)."""

from __future__ import annotations

import math

from ibscope.errors import UsageError

NATS = "nats"
BITS = "bits"
#: the units information values can be converted between
INFO_UNITS = (NATS, BITS)
LN2 = math.log(2.0)


def conversion_factor(src: str, dst: str) -> float:
    """Multiplicative factor from unit ``src`` to unit ``dst`` (nats <-> bits; 1 for the same unit)."""
    if src == dst:
        return 1.0
    if src == NATS and dst == BITS:
        return 1.0 / LN2
    if src == BITS and dst == NATS:
        return LN2
    raise UsageError(f"Cannot convert from unit '{src}' to '{dst}'. Expected 'nats' or 'bits'.")


def convert(value: float | None, src: str, dst: str) -> float | None:
    """``value`` in ``src`` converted to ``dst``; ``None`` stays ``None``, as do values whose units
    are not both information units (a rank, a dimension)."""
    if value is None or src == dst or src not in INFO_UNITS or dst not in INFO_UNITS:
        return value
    return value * conversion_factor(src, dst)
