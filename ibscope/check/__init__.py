"""Regression checks of compression curves for CI (``ibscope check``).

Two kinds of checks, each reported as one test case with the numbers it used:

* **Baseline comparison** (:mod:`ibscope.check.baseline`): the current results table and a
  baseline results table are aligned on curves ``(run, split, layer, estimator, quantity)``
  and on the x axis (epoch, step or checkpoint), converted to one unit, and compared point
  by point. A point holds when ``|current - baseline| <= tol`` with

  ``tol = max(atol + rtol * |baseline|, sigma * s)``

  where ``s`` is the standard deviation of the difference: ``sqrt(se_b**2 + se_c**2)``
  from the tables' ``stderr`` columns, or, when the baseline holds several runs (seeds)
  and they are pooled, ``sd_seeds * sqrt(1/m + 1/n)`` (``n`` baseline seeds, ``m`` current
  runs averaged). ``fail_on`` restricts failures to one direction (``decrease``: only a
  drop below the baseline fails). Missing curves or points fail by default; extra ones
  warn (both configurable).

* **Shape rules** (:mod:`ibscope.check.rules`, no baseline needed), e.g. "I(X;T) of the last
  layer decreases by at least 0.1 nats from epoch 100 to the end", "final I(T;Y) >= 0.6",
  "local rank at the end is below its value at epoch 5", "the epoch of maximal I(X;T) is
  within +-10 of 50".

Layout: ``settings`` (the rules file and options as pydantic models), ``curves`` (tables as
curves), ``baseline``, ``rules`` (one class per rule type), ``report`` (JSON, table), ``junit``,
``run`` (:func:`run_check`).

Public API: :func:`run_check` -> :class:`CheckReport` (``.ok``, ``.failures``,
``.to_dict()``, ``.to_junit_xml()``, ``.write_json()``, ``.write_junit()``),
:func:`load_rules`, :func:`write_baseline`, :data:`RULE_TYPES`.

Values are compared in nats unless ``unit="bits"`` (information rows only; other units
such as "dimensions" are compared as they are). ``atol`` is in the comparison unit.
"""

from ibscope.check.baseline import PointVerdict, compare, point_verdict
from ibscope.check.junit import junit_for_error
from ibscope.check.report import CHECK_FORMAT, CHECK_VERSION, CaseResult, CheckReport, atomic_write_text
from ibscope.check.rules import (
    RULE_TYPES,
    AnyRule,
    AtLeast,
    AtMost,
    Compression,
    Decreases,
    Increases,
    PeakEpoch,
    Rule,
    evaluate_rules,
    parse_rule,
)
from ibscope.check.run import run_check, write_baseline
from ibscope.check.settings import (
    AXES,
    CURVE_FIELDS,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    FAIL_ON,
    POLICIES,
    CheckSettings,
    Tolerance,
    ToleranceEntry,
    ToleranceOverride,
    load_rules,
    parse_tol_flag,
    parse_tolerance_entry,
)

__all__ = [
    "AXES", "CHECK_FORMAT", "CHECK_VERSION", "CURVE_FIELDS", "DEFAULT_ATOL", "DEFAULT_RTOL", "FAIL_ON", "POLICIES",
    "RULE_TYPES", "AnyRule", "AtLeast", "AtMost", "CaseResult", "CheckReport", "CheckSettings", "Compression",
    "Decreases", "Increases", "PeakEpoch", "PointVerdict", "Rule", "Tolerance", "ToleranceEntry",
    "ToleranceOverride", "atomic_write_text", "compare", "evaluate_rules", "junit_for_error", "load_rules",
    "parse_rule", "parse_tol_flag", "parse_tolerance_entry", "point_verdict", "run_check", "write_baseline",
]
