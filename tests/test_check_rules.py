"""ibscope.check as a package: rule classes, pydantic settings, error messages, point arithmetic."""

import math
import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from ibscope.check import (
    RULE_TYPES, AnyRule, AtLeast, Compression, PeakEpoch, Rule, Tolerance, load_rules, parse_rule,
    parse_tol_flag, parse_tolerance_entry, point_verdict, run_check,
)
from ibscope.check.curves import Point
from ibscope.errors import UsageError
from ibscope.results import Results, make_row

ROOT = Path(__file__).parents[1]


def _rows(values, quantity="I(T;Y)", unit="nats"):
    return Results([make_row(epoch=e, layer="fc1", layer_index=0, estimator="binning", quantity=quantity,
                             value=v, unit=unit) for e, v in values])


def test_every_rule_type_is_a_class_and_documented():
    text = (ROOT / "docs" / "check.md").read_text()
    assert len(RULE_TYPES) == 6
    for name, cls in RULE_TYPES.items():
        assert issubclass(cls, Rule) and cls.model_fields["type"].default == name
        assert f"`{name}`" in text, f"rule type {name} is not in docs/check.md"
        assert cls.doc  # the hint shown when a required key is missing


def test_rule_classes_own_label_and_defaults():
    r = parse_rule({"type": "compression", "from": 50, "min_decrease": 0.1, "layer": "last"}, 2)
    assert isinstance(r, Compression) and r.index == 2
    assert r.quantity == "I(X;T)" and r.to == "end" and r.from_ == 50.0
    assert r.label == "I(X;T) of last decreases by >= 0.1 nats from 50.0 to end"
    assert r.spec == {"type": "compression", "from": 50.0, "min_decrease": 0.1, "layer": "last", "quantity": "I(X;T)"}
    a = parse_rule({"type": "at_least", "quantity": "I(T;Y)", "min": "0.5", "unit": "bits", "name": "floor"}, 0)
    assert isinstance(a, AtLeast) and a.min == 0.5 and a.label == "floor"
    p = parse_rule({"type": "peak_epoch", "epoch": 10, "within": 2}, 0)
    assert isinstance(p, PeakEpoch) and p.mode == "max" and p.describe() == "max of I(X;T) of each layer within +-2.0 of 10.0"


def test_rules_evaluate_with_unit_conversion():
    # I(T;Y) rises 0.2 -> 0.9 nats; a 1-bit floor (0.693 nats) holds at the end, a 1.5-bit one does not
    res = _rows([(0, 0.2), (5, 0.5), (10, 0.9)])
    ok = run_check(res, rules=[{"type": "at_least", "quantity": "I(T;Y)", "min": 1, "unit": "bits"}])
    (c,) = ok.cases
    assert c.status == "pass" and c.details["bound"] == pytest.approx(math.log(2))
    bad = run_check(res, rules=[{"type": "at_least", "quantity": "I(T;Y)", "min": 1.5, "unit": "bits"}])
    assert not bad.ok and bad.cases[0].details["bound"] == pytest.approx(1.5 * math.log(2))
    inc = run_check(res, rules=[{"type": "increases", "quantity": "I(T;Y)", "from": 5, "min_increase": 0.5}])
    assert not inc.ok and inc.cases[0].details["increase"] == pytest.approx(0.4)


@pytest.mark.parametrize("spec, pattern", [
    ({"type": "at_least", "quantity": "q", "min": True}, r"rule 1 \(at_least\): 'min' must be a number"),
    ({"type": "at_least", "quantity": "q", "min": "x"}, r"'min' must be a finite number\. Got 'x'"),
    ({"type": "compression", "from": 1, "to": "peak", "min_decrease": 0}, r"'to' cannot be 'peak'"),
    ({"type": "compression", "from": "middle", "min_decrease": 0}, r"'from' must be 'start', 'end', 'peak' or a number"),
    ({"type": "peak_epoch", "epoch": 1, "within": 1, "mode": "maxx"},
     r"'mode' must be one of max, min\. Got 'maxx'\. Did you mean 'max'"),
    ({"type": "at_most", "quantity": "q", "max": 1, "unit": "bit"}, r"Did you mean 'bits'"),
    ({"type": "at_most", "quantity": "q", "max": 1, "layr": 0}, r"unknown key 'layr'\. Did you mean 'layer'"),
    ({"type": "at_most", "max": 1}, r"rule 1 \(at_most\) needs 'quantity'"),
    ({"type": "at_most", "quantity": "q", "max": 1, "layer": 1.5}, r"'layer'.*name, a glob"),
])
def test_rule_errors_name_the_key(spec, pattern):
    with pytest.raises(UsageError, match=pattern):
        parse_rule(spec, 0)


def test_settings_and_tolerance_errors_name_the_location(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("tolerances:\n  - {match: {quantty: 'I(X;T)'}, rtol: 0.2}\n")
    cfg = load_rules(p)
    with pytest.raises(UsageError, match=r"tolerances\[0\]: match: unknown key 'quantty'\. Did you mean 'quantity'"):
        run_check(_rows([(0, 1.0)]), baseline=_rows([(0, 1.0)]), rules=cfg)
    with pytest.raises(UsageError, match=r"r\.yaml: 'seeds' must be true or false\. Got 'yes'"):
        p.write_text("seeds: 'yes'\n")
        load_rules(p)
    with pytest.raises(UsageError, match=r"r\.yaml: 'rules' must be a list"):
        p.write_text("rules: {type: at_least}\n")
        load_rules(p)
    with pytest.raises(UsageError, match=r"'fail_on' must be one of both, decrease, increase.*Did you mean one of: 'decrease'"):
        parse_tolerance_entry({"fail_on": "decreas"}, "t")
    with pytest.raises(UsageError, match=r"sigma must be a finite number >= 0\. Got -1"):
        run_check(_rows([(0, 1.0)]), baseline=_rows([(0, 1.0)]), sigma=-1)
    # a bad value in the file is named with the file (the file is checked when read, even if --rtol is given)
    p.write_text("rtol: -2\n")
    with pytest.raises(UsageError, match=r"r\.yaml: 'rtol' must be a finite number >= 0\. Got -2"):
        run_check(_rows([(0, 1.0)]), baseline=_rows([(0, 1.0)]), rules=p, rtol=0.1)
    p.write_text("rtol: 0.5\n")
    rep = run_check(_rows([(0, 1.0)]), baseline=_rows([(0, 1.0)]), rules=p, rtol=0.1)
    assert rep.settings["rtol"] == 0.1  # the argument wins over the file
    o = parse_tol_flag("layer=fc*:rtol=0.3,fail_on=increase")
    assert o.match == {"layer": "fc*"} and Tolerance().updated(o.spec, o.where) == Tolerance(0.3, 0.02, None, "increase")


def test_point_verdict_arithmetic():
    b, c = Point(2.0, 0.1, "nats"), Point(2.3, 0.2, "nats")
    v = point_verdict(10, b, c, Tolerance(rtol=0.1, atol=0.02))
    assert v.tol == pytest.approx(0.22) and v.bad and v.ratio == pytest.approx(0.3 / 0.22) and v.sigma_sd is None
    v = point_verdict(10, b, c, Tolerance(rtol=0.1, atol=0.02, sigma=2))  # s = sqrt(0.01 + 0.04)
    assert v.sigma_sd == pytest.approx(math.sqrt(0.05)) and v.tol == pytest.approx(2 * math.sqrt(0.05)) and not v.bad
    assert not point_verdict(10, b, c, Tolerance(rtol=0, atol=0, fail_on="decrease")).bad
    assert point_verdict(10, c, b, Tolerance(rtol=0, atol=0, fail_on="decrease")).bad
    pooled = Point(2.0, None, "nats", n_runs=4, spread=0.4)
    v = point_verdict(0, pooled, Point(2.5, None, "nats"), Tolerance(rtol=0, atol=0, sigma=1))
    assert v.sigma_sd == pytest.approx(0.4 * math.sqrt(1 + 1 / 4)) and v.bad
    nan = point_verdict(0, Point(math.nan, None, "nats"), Point(math.nan, None, "nats"), Tolerance())
    assert not nan.bad and nan.ratio == 0.0


def test_rules_json_schema_is_a_tagged_union():
    schema = TypeAdapter(list[AnyRule]).json_schema()
    disc = schema["items"]["discriminator"]
    assert set(disc["mapping"]) == set(RULE_TYPES)
    comp = schema["$defs"]["Compression"]
    assert set(comp["required"]) == {"from", "min_decrease"} and comp["additionalProperties"] is False
    assert comp["properties"]["min_decrease"]["minimum"] == 0


def test_docs_rule_tables_list_each_rules_keys():
    """The key column of docs/check.md's rule table names every rule-specific key of the class."""
    text = (ROOT / "docs" / "check.md").read_text()
    common = set(Rule.model_fields)
    for name, cls in RULE_TYPES.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{name}`"))
        keys = {f.alias or k for k, f in cls.model_fields.items() if k not in common}
        for k in keys:
            assert re.search(rf"`{k}`", line), f"{name}: key {k} missing from the docs table"
