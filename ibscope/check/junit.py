"""JUnit XML for CI test reporters: a check report (one test case per curve and per rule), or a
check that could not run (one test case with an ``<error>``). Built with ``xml.etree``."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from ibscope.check.report import clean, json_default

if TYPE_CHECKING:
    from ibscope.check.report import CheckReport


def _root(suite_name: str, *, tests: int, failures: int, errors: int) -> ET.Element:
    return ET.Element("testsuites", name=suite_name, tests=str(tests), failures=str(failures), errors=str(errors),
                      time="0")


def _suite(root: ET.Element, name: str, *, tests: int, failures: int, errors: int = 0) -> ET.Element:
    return ET.SubElement(root, "testsuite", name=name, tests=str(tests), failures=str(failures),
                         errors=str(errors), skipped="0", time="0")


def _xml(root: ET.Element) -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def report_xml(report: CheckReport, suite_name: str = "ibscope check") -> str:
    """One <testsuite> per group (baseline, rules), one <testcase> per case; a failure carries the
    message and the case's numbers (JSON); passes and warnings carry them as system-out."""
    counts = report.counts()
    root = _root(suite_name, tests=counts["cases"], failures=counts["failed"], errors=0)
    for group in ("baseline", "rules"):
        cases = [c for c in report.cases if c.group == group]
        if not cases:
            continue
        suite = _suite(root, f"{suite_name}: {group}", tests=len(cases), failures=sum(c.failed for c in cases))
        for c in cases:
            tc = ET.SubElement(suite, "testcase", classname=f"ibscope.check.{group}", name=c.name, time="0")
            body = json.dumps(clean(c.details), indent=2, sort_keys=True, default=json_default)
            if c.status == "fail":
                el = ET.SubElement(tc, "failure", message=c.message, type="regression")
                el.text = body
            else:
                out = ET.SubElement(tc, "system-out")
                out.text = (f"WARNING: {c.message}\n" if c.status == "warn" else f"{c.message}\n") + body
    return _xml(root)


def junit_for_error(message: str, exit_code: int, suite_name: str = "ibscope check") -> str:
    """JUnit XML for a check that could not run (unusable input): one test case with an
    <error>, so that a CI test reporter shows why instead of "no report found"."""
    root = _root(suite_name, tests=1, failures=0, errors=1)
    suite = _suite(root, f"{suite_name}: input", tests=1, failures=0, errors=1)
    tc = ET.SubElement(suite, "testcase", classname="ibscope.check.input", name="read results, baseline and rules",
                       time="0")
    ET.SubElement(tc, "error", message=message, type=f"exit code {exit_code}").text = message
    return _xml(root)
