"""When float labels with only integer values are class labels.

Labels saved as floats (``y = (x > 0).astype(np.float32)``) are very common; they are the same
classes as integer labels. A continuous target that happens to be rounded (``np.round(100 * t)``)
is not: it has nearly as many distinct values as samples. The rule: integer-valued floats are
classes when there are at most ``max(2, n / MIN_PER_CLASS)`` distinct values (on average at least
``MIN_PER_CLASS`` samples per class); otherwise they stay continuous.
"""

from __future__ import annotations

#: integer-valued float labels are classes when they average at least this many samples per value
MIN_PER_CLASS = 5


def integral_values_are_classes(n_distinct: int, n: int) -> bool:
    """True when ``n_distinct`` integer values among ``n`` samples are read as class labels."""
    return n_distinct <= max(2, n / MIN_PER_CLASS)
