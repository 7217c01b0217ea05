"""What a check found: one :class:`CaseResult` per baseline curve or rule x curve, gathered in a
:class:`CheckReport` that renders as a rich table, strict JSON and JUnit XML (:mod:`ibscope.check.junit`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ibscope._version import __version__

CHECK_FORMAT = "ibscope-check"
CHECK_VERSION = 1

@dataclass
class CaseResult:
    """One test case: a baseline curve or one rule applied to one curve."""

    name: str
    group: str                    # "baseline" | "rules"
    status: str                   # "pass" | "fail" | "warn"
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "status": self.status,
                "message": self.message, "details": self.details}


@dataclass
class CheckReport:
    """What ``run_check`` found. ``ok`` is True when no case failed."""

    cases: list[CaseResult]
    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.cases)

    @property
    def failures(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "fail"]

    @property
    def warnings(self) -> list[CaseResult]:
        return [c for c in self.cases if c.status == "warn"]

    def counts(self) -> dict[str, int]:
        return {"cases": len(self.cases), "passed": sum(c.status == "pass" for c in self.cases),
                "failed": len(self.failures), "warnings": len(self.warnings)}

    def summary(self) -> str:
        n = self.counts()
        if not self.cases:
            return "nothing was compared (0 checks)"
        head = "all checks hold" if self.ok else f"{n['failed']} of {n['cases']} checks failed"
        return f"{head} ({n['cases']} checks, {n['passed']} passed, {n['failed']} failed, {n['warnings']} warnings)"

    def to_dict(self) -> dict[str, Any]:
        return {"format": CHECK_FORMAT, "format_version": CHECK_VERSION, "ibscope_version": __version__,
                "ok": self.ok, "counts": self.counts(), "settings": self.settings, "sources": self.sources,
                "notes": self.notes, "cases": clean([c.to_dict() for c in self.cases])}

    def to_junit_xml(self, suite_name: str = "ibscope check") -> str:
        """JUnit XML: one <testsuite> per group, one <testcase> per case; failures carry the numbers."""
        from ibscope.check.junit import report_xml

        return report_xml(self, suite_name)

    def write_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True, default=json_default) + "\n")

    def write_junit(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_junit_xml())

    def __rich__(self):
        return self.table()

    def table(self, show_passing: bool = False):
        """A rich table of failures and warnings (all cases with ``show_passing``)."""
        from rich.markup import escape
        from rich.table import Table

        t = Table(title="ibscope check", title_justify="left", show_lines=False)
        t.add_column("status")
        t.add_column("check", overflow="fold")
        t.add_column("result", overflow="fold")
        style = {"fail": "[bold red]FAIL[/]", "warn": "[yellow]WARN[/]", "pass": "[green]ok[/]"}
        for c in self.cases:
            if c.status == "pass" and not show_passing:
                continue
            t.add_row(style[c.status], escape(c.name), escape(c.message))
        return t


def json_default(o: Any):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def clean(o: Any) -> Any:
    """Non-finite floats become strings so that the JSON is strict (no NaN/Infinity)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, Mapping):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    return o


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all, creating the parent folder."""
    from ibscope._atomic import write_text_atomic

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(p, text)
