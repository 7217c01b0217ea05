"""ibscope.check: baseline comparison, units, tolerances, sigma, shape rules, reports.

Tables are built by hand so that every check passes or fails by a known margin. The
default tolerance is ``atol + rtol*|baseline|`` = 0.02 + 0.1*|b|; perturbations are chosen
well inside or well outside it (never within rounding distance of the boundary).
"""

import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ibscope.check import (
    CheckReport, RULE_TYPES, load_rules, parse_tol_flag, run_check, write_baseline,
)
from ibscope.errors import DataError, UsageError
from ibscope.results import Results, make_row, read_results, write_results
from ibscope.store import file_sha256

EPOCHS = list(range(0, 101, 10))
LN2 = math.log(2)


def ixt(layer_i, e):
    """Rises to a peak at epoch 50 (3.0 - 0.5*layer), then falls by 0.5 by epoch 100."""
    top = 3.0 - 0.5 * layer_i
    return top - 1.0 + e / 50 if e <= 50 else top - (e - 50) / 100


def ity(layer_i, e):
    return 0.6 * e / 100 + 0.01 * layer_i


def lrank(layer_i, e):
    return 8.0 - layer_i - 0.03 * e


def table(run="run", layers=("fc1", "fc2", "fc3"), unit="nats", stderr=None, shift=0.0, with_rank=True):
    rows = []
    for li, layer in enumerate(layers):
        for ci, e in enumerate(EPOCHS):
            common = dict(run=run, checkpoint=ci, epoch=e, step=e * 10, layer=layer, layer_index=li)
            f = 1 / LN2 if unit == "bits" else 1.0
            se = None if stderr is None else stderr * f
            rows.append(make_row(**common, estimator="binning", quantity="I(X;T)", value=(ixt(li, e) + shift) * f,
                                 unit=unit, stderr=se, params={"bins": 30}))
            rows.append(make_row(**common, estimator="binning", quantity="I(T;Y)", value=(ity(li, e) + shift) * f,
                                 unit=unit, stderr=se, params={"bins": 30}))
            if with_rank:
                rows.append(make_row(**common, estimator="local-rank", quantity="local_rank", value=lrank(li, e),
                                     unit="dimensions"))
    for ci, e in enumerate(EPOCHS):
        rows.append(make_row(run=run, checkpoint=ci, epoch=e, step=e * 10, layer="-", estimator="metrics",
                             quantity="accuracy", value=0.5 + e / 250, unit="ratio"))
    return rows


def res(rows):
    return Results([dict(r) for r in rows])


def setv(rows, value=None, add=None, **match):
    """Change the value of the one row matching ``match``."""
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, hits
    r = hits[0]
    r["value"] = value if value is not None else r["value"] + add
    return r


def case(report, group, **curve):
    hits = [c for c in report.cases if c.group == group
            and all(c.details.get("curve", {}).get(k) == v for k, v in curve.items())]
    assert len(hits) == 1, [c.name for c in hits]
    return hits[0]


# ------------------------------------------------------------------------------------------
# baseline comparison
# ------------------------------------------------------------------------------------------
def test_identical_tables_pass_with_zero_tolerance():
    rep = run_check(res(table()), baseline=res(table()), rtol=0, atol=0)
    assert rep.ok
    # 3 layers x (I(X;T), I(T;Y), local_rank) + accuracy = 10 curves, each one case
    assert len(rep.cases) == 10 and all(c.status == "pass" for c in rep.cases)
    assert rep.settings["align"] == "epoch"


@pytest.mark.parametrize("delta, ok", [(0.20, True), (-0.20, True), (0.25, False), (-0.25, False)])
def test_point_within_and_outside_default_tolerance(delta, ok):
    # baseline I(X;T) of fc1 at epoch 50 is 3.0 -> tol = 0.02 + 0.1*3.0 = 0.32
    cur = table()
    setv(cur, add=delta + 0.1 * np.sign(delta), layer="fc1", epoch=50, quantity="I(X;T)")
    rep = run_check(res(cur), baseline=res(table()))
    c = case(rep, "baseline", layer="fc1", quantity="I(X;T)")
    assert c.details["worst"]["tol"] == pytest.approx(0.32)
    assert c.details["worst"]["epoch"] == 50
    assert rep.ok is ok and (c.status == "pass") is ok
    if not ok:
        (p,) = c.details["failing_points"]
        assert p["diff"] == pytest.approx(delta + 0.1 * np.sign(delta))
        assert p["baseline"] == pytest.approx(3.0)
        assert "epoch 50" in c.message and "1 of 11 points" in c.message


def test_fail_on_direction():
    cur = table()
    setv(cur, add=+1.0, layer="fc2", epoch=100, quantity="I(T;Y)")
    up = run_check(res(cur), baseline=res(table()), tolerances=["I(T;Y):fail_on=decrease"])
    assert up.ok  # an increase of I(T;Y) is no regression when only decreases fail
    cur2 = table()
    setv(cur2, add=-1.0, layer="fc2", epoch=100, quantity="I(T;Y)")
    down = run_check(res(cur2), baseline=res(table()), tolerances=["I(T;Y):fail_on=decrease"])
    assert not down.ok and [c.details["curve"]["layer"] for c in down.failures] == ["fc2"]


def test_units_bits_vs_nats_convert():
    base = res(table(unit="nats"))
    cur_bits = res(table(unit="bits"))
    # the same numbers expressed in bits: must match with zero tolerance (rounding guard 1e-12 relative)
    assert run_check(cur_bits, baseline=base, rtol=0, atol=0).ok
    # shift I(X;T)/I(T;Y) by 0.01 nats (stored in bits): fails atol 0.005 nats, holds at 0.02 nats
    shifted = res(table(unit="bits", shift=0.01))
    assert not run_check(shifted, baseline=base, rtol=0, atol=0.005).ok
    assert run_check(shifted, baseline=base, rtol=0, atol=0.02).ok
    # atol is in the comparison unit: 0.01 nats = 0.01443 bits > 0.012 bits, but < 0.012 nats
    assert run_check(shifted, baseline=base, rtol=0, atol=0.012, unit="nats").ok
    rep = run_check(shifted, baseline=base, rtol=0, atol=0.012, unit="bits")
    assert not rep.ok
    p = rep.failures[0].details["failing_points"][0]
    assert p["diff"] == pytest.approx(0.01 / LN2) and rep.failures[0].details["unit"] == "bits"
    # only information curves fail (6 of them); local_rank and accuracy are not shifted
    assert {c.details["curve"]["quantity"] for c in rep.failures} == {"I(X;T)", "I(T;Y)"}
    assert len(rep.failures) == 6


def test_unit_mismatch_of_other_units_is_a_failure():
    cur = table()
    for r in cur:
        if r["quantity"] == "local_rank" and r["layer"] == "fc1":
            r["unit"] = "ratio"
    rep = run_check(res(cur), baseline=res(table()))
    (f,) = rep.failures
    assert "unit mismatch" in f.message and f.details["current_units"] == ["ratio"]


def test_missing_and_extra_curves_and_points():
    cur = [r for r in table() if r["layer"] != "fc3"]
    rep = run_check(res(cur), baseline=res(table()))
    missing = [c for c in rep.failures if c.details.get("missing_curve")]
    assert len(missing) == 3 and not rep.ok  # I(X;T), I(T;Y), local_rank of fc3
    assert all("curve missing" in c.message for c in missing)
    assert run_check(res(cur), baseline=res(table()), missing="warn").ok
    assert len(run_check(res(cur), baseline=res(table()), missing="ignore").cases) == 7

    # extra curves (a 4th layer) warn by default, fail with extra="fail"
    bigger = table(layers=("fc1", "fc2", "fc3", "fc4"))
    rep = run_check(res(bigger), baseline=res(table()))
    assert rep.ok and len(rep.warnings) == 3
    assert all("extra curve" in c.message for c in rep.warnings)
    assert not run_check(res(bigger), baseline=res(table()), extra="fail").ok

    # a missing point inside a curve
    cur = [r for r in table() if not (r["layer"] == "fc1" and r["epoch"] == 70 and r["quantity"] == "I(X;T)")]
    rep = run_check(res(cur), baseline=res(table()))
    (f,) = rep.failures
    assert f.details["missing_points"] == [70] and "missing" in f.message


def test_tolerance_overrides_from_rules_file_and_flags(tmp_path):
    cur = table()
    setv(cur, add=0.5, layer="fc1", epoch=100, quantity="I(T;Y)")  # base 0.6: tol 0.08
    setv(cur, add=0.5, layer="fc1", epoch=100, quantity="I(X;T)")  # base 2.5: tol 0.27
    base = res(table())
    assert len(run_check(res(cur), baseline=base).failures) == 2
    rules = tmp_path / "r.yaml"
    rules.write_text("tolerances:\n  - match: {quantity: 'I(T;Y)'}\n    atol: 0.6\n")
    rep = run_check(res(cur), baseline=base, rules=rules)
    assert [c.details["curve"]["quantity"] for c in rep.failures] == ["I(X;T)"]
    c = case(rep, "baseline", layer="fc1", quantity="I(T;Y)")
    assert c.details["tolerance"]["atol"] == 0.6 and c.status == "pass"
    # flags apply after the file: an estimator-wide rtol of 0.3 makes I(X;T) hold too (0.02+0.75)
    assert run_check(res(cur), baseline=base, rules=rules, tolerances=["binning:rtol=0.3"]).ok
    # FIELD=PATTERN selectors
    assert run_check(res(cur), baseline=base, tolerances=["layer=fc1:atol=0.6"]).ok
    assert not run_check(res(cur), baseline=base, tolerances=["layer=fc2:atol=0.6"]).ok


def test_sigma_from_stderr():
    # stderr 0.1 in both tables: sd of the difference = sqrt(0.02) = 0.1414; 3 sigma = 0.4243
    base = res(table(stderr=0.1))
    for delta, ok in [(0.40, True), (0.45, False)]:
        cur = table(stderr=0.1)
        setv(cur, add=delta, layer="fc2", epoch=30, quantity="I(X;T)")
        rep = run_check(res(cur), baseline=base, rtol=0, atol=0, sigma=3)
        assert rep.ok is ok
        c = case(rep, "baseline", layer="fc2", quantity="I(X;T)")
        assert c.details["worst"]["tol"] == pytest.approx(3 * math.sqrt(0.02))
        assert c.details["points_without_uncertainty"] == 0
    # without sigma, 0.40 fails the zero tolerance
    cur = table(stderr=0.1)
    setv(cur, add=0.40, layer="fc2", epoch=30, quantity="I(X;T)")
    assert not run_check(res(cur), baseline=base, rtol=0, atol=0).ok
    # rows with no stderr (local_rank, accuracy) are reported as lacking uncertainty
    rep = run_check(res(table(stderr=0.1)), baseline=base, rtol=0, atol=0, sigma=3)
    assert case(rep, "baseline", layer="fc1", quantity="local_rank").details["points_without_uncertainty"] == 11


def test_sigma_from_seeds_in_baseline():
    offs = [-0.1, 0.0, 0.1, 0.2]  # mean 0.05, sample sd sqrt(0.05/3)
    base_rows = []
    for i, o in enumerate(offs):
        base_rows += table(run=f"seed{i}", shift=o, with_rank=False)
    sd = math.sqrt(0.05 / 3)
    s = sd * math.sqrt(1 / 1 + 1 / 4)  # one current run against the mean of four seeds
    tol = 3 * s  # = 0.4330
    for delta, ok in [(0.40, True), (0.47, False)]:
        cur = table(run="mine", shift=0.05, with_rank=False)
        setv(cur, add=delta, layer="fc3", epoch=80, quantity="I(T;Y)")
        rep = run_check(res(cur), baseline=res(base_rows), rtol=0, atol=0, sigma=3)
        assert rep.settings["seeds_pooled"] is True
        assert any("pooled as seeds" in n for n in rep.notes)
        assert rep.ok is ok, rep.summary()
        c = case(rep, "baseline", layer="fc3", quantity="I(T;Y)")
        w = c.details["worst"]
        assert w["epoch"] == 80 and w["tol"] == pytest.approx(tol) and w["sigma_sd"] == pytest.approx(s)
    # accuracy is identical across seeds: sd 0, so any change fails at zero rtol/atol
    assert case(rep, "baseline", quantity="accuracy").status == "pass"
    # without pooling, the run names do not match: every baseline curve is missing
    rep = run_check(res(table(run="mine", with_rank=False)), baseline=res(base_rows), sigma=3, seeds=False)
    assert not rep.ok and all(c.details.get("missing_curve") or c.details.get("extra_curve") for c in rep.cases)


def test_axis_falls_back_to_step_when_epochs_repeat():
    rows = table()
    for r in rows:
        r["epoch"] = r["checkpoint"] // 2  # two checkpoints per epoch
    rep = run_check(res(rows), baseline=res(rows))
    assert rep.ok and rep.settings["align"] == "step"
    with pytest.raises(DataError, match="expected one"):
        run_check(res(rows), baseline=res(rows), align="epoch")
    for r in rows:
        r["epoch"] = None
        r["step"] = None
    assert run_check(res(rows), baseline=res(rows)).settings["align"] == "checkpoint"
    with pytest.raises(DataError, match="have no 'epoch'"):
        run_check(res(rows), baseline=res(rows), align="epoch")


def test_non_finite_values_fail_and_json_stays_strict(tmp_path):
    cur = table()
    setv(cur, value=float("nan"), layer="fc1", epoch=20, quantity="I(X;T)")
    rep = run_check(res(cur), baseline=res(table()), atol=100)
    (f,) = rep.failures
    assert f.details["failing_points"][0]["epoch"] == 20
    out = rep.write_json(tmp_path / "s.json")
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["ok"] is False and data["counts"]["failed"] == 1


def test_params_difference_is_reported():
    cur = table()
    for r in cur:
        if r["estimator"] == "binning":
            r["params"] = {"bins": 10}
    rep = run_check(res(cur), baseline=res(table()))
    c = case(rep, "baseline", layer="fc1", quantity="I(X;T)")
    assert c.details["params_differ"] == {"baseline": {"bins": 30}, "current": {"bins": 10}}
    assert "parameters differ" in c.message and c.status == "warn" and rep.ok
    for r in cur:
        r["n_samples"] = 1024
    base = table()
    for r in base:
        r["n_samples"] = 4096
    c = case(run_check(res(cur), baseline=res(base)), "baseline", layer="fc2", quantity="local_rank")
    assert c.details["n_samples_differ"] == {"baseline": [4096], "current": [1024]}
    assert "sample counts differ" in c.message and c.status == "warn"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(-5, 5), min_size=11, max_size=11), st.lists(st.floats(-1, 1), min_size=11, max_size=11),
       st.floats(0, 0.5), st.floats(0, 0.2))
def test_pointwise_verdicts_match_numpy_isclose(base_vals, deltas, rtol, atol):
    """Reference: numpy.isclose uses the same |a-b| <= atol + rtol*|b| rule."""
    b, c = np.array(base_vals), np.array(base_vals) + np.array(deltas)
    margin = np.abs(np.abs(c - b) - (atol + rtol * np.abs(b)))
    if margin.min() < 1e-9:  # rounding-distance cases are not what this property is about
        return
    rows_b = [make_row(checkpoint=i, epoch=e, layer="l", layer_index=0, estimator="e", quantity="q",
                       value=float(v), unit="nats") for i, (e, v) in enumerate(zip(EPOCHS, b))]
    rows_c = [dict(r, value=float(v)) for r, v in zip(rows_b, c)]
    rep = run_check(res(rows_c), baseline=res(rows_b), rtol=rtol, atol=atol)
    (cs,) = rep.cases
    got = sorted(p["epoch"] for p in cs.details["failing_points"])
    want = [e for e, close in zip(EPOCHS, np.isclose(c, b, rtol=rtol, atol=atol)) if not close]
    assert got == want


def test_duplicate_rows_are_unusable_input():
    rows = table() + table()[:1]
    with pytest.raises(DataError, match="expected one"):
        run_check(res(rows), baseline=res(table()), align="epoch")


# ------------------------------------------------------------------------------------------
# shape rules
# ------------------------------------------------------------------------------------------
def rule_case(rule, rows=None, **kw):
    rep = run_check(res(rows or table()), rules=[rule], **kw)
    assert len(rep.cases) == 1, [c.name for c in rep.cases]
    return rep.cases[0]


@pytest.mark.parametrize("need, ok", [(0.4, True), (0.6, False)])
def test_compression_rule(need, ok):
    # fc3 (last layer): I(X;T) = 2.0 at epoch 50, 1.5 at epoch 100 -> decrease 0.5 nats
    c = rule_case({"type": "compression", "layer": "last", "estimator": "binning", "from": 50, "min_decrease": need})
    assert (c.status == "pass") is ok
    d = c.details
    assert d["curve"]["layer"] == "fc3"
    assert (d["epoch_from"], d["epoch_to"]) == (50, 100)
    assert d["value_from"] == pytest.approx(2.0) and d["value_to"] == pytest.approx(1.5)
    assert d["decrease"] == pytest.approx(0.5) and d["required_decrease"] == need
    assert "2 -> 1.5 nats" in c.message


@pytest.mark.parametrize("need_bits, ok", [(0.70, True), (0.75, False)])
def test_compression_rule_in_bits_on_bits_table(need_bits, ok):
    # 0.5 nats = 0.7213 bits; the table itself is in bits and is converted to nats first
    c = rule_case({"type": "compression", "layer": "fc3", "from": "peak", "min_decrease": need_bits, "unit": "bits"},
                  rows=table(unit="bits"))
    assert (c.status == "pass") is ok
    assert c.details["required_decrease"] == pytest.approx(need_bits * LN2)
    assert c.details["epoch_from"] == 50  # 'peak' = the curve's maximum


def test_decreases_and_increases_rules():
    # local rank of fc2: 7 - 0.03 e -> 6.4 at 20, 4.0 at 100
    c = rule_case({"type": "decreases", "quantity": "local_rank", "layer": "fc2", "from": 20})
    assert c.status == "pass" and c.details["decrease"] == pytest.approx(2.4)
    c = rule_case({"type": "decreases", "quantity": "local_rank", "layer": "fc2", "from": 20, "min_decrease": 2.5})
    assert c.status == "fail"
    c = rule_case({"type": "increases", "quantity": "local_rank", "layer": "fc2", "from": 20})
    assert c.status == "fail" and c.details["increase"] == pytest.approx(-2.4)
    flat = [r for r in table() if not (r["quantity"] == "local_rank" and r["layer"] == "fc2" and r["epoch"] == 100)]
    flat.append(make_row(checkpoint=10, epoch=100, layer="fc2", layer_index=1, estimator="local-rank",
                         quantity="local_rank", value=6.4, unit="dimensions"))
    c = rule_case({"type": "decreases", "quantity": "local_rank", "layer": "fc2", "from": 20}, rows=flat)
    assert c.status == "fail"  # "below" is strict: equal is not below


@pytest.mark.parametrize("bound, ok", [(0.60, True), (0.65, False)])
def test_at_least_rule_last_layer(bound, ok):
    # final I(T;Y) of the last layer (fc3) = 0.6 + 0.02 = 0.62
    c = rule_case({"type": "at_least", "quantity": "I(T;Y)", "layer": "last", "min": bound})
    assert (c.status == "pass") is ok
    assert c.details["value"] == pytest.approx(0.62) and c.details["epoch"] == 100
    assert c.details["curve"]["layer"] == "fc3"


def test_at_most_rule_and_nearest_epoch():
    # accuracy at epoch 33 -> nearest checkpoint is epoch 30: 0.5 + 30/250 = 0.62
    c = rule_case({"type": "at_most", "quantity": "accuracy", "at": 33, "max": 0.63})
    assert c.status == "pass" and c.details["epoch"] == 30 and c.details["value"] == pytest.approx(0.62)
    assert "nearest" in c.details["note"]
    c = rule_case({"type": "at_most", "quantity": "accuracy", "at": 33, "max": 0.61})
    assert c.status == "fail"
    c = rule_case({"type": "at_most", "quantity": "accuracy", "at": 500, "max": 1})
    assert c.status == "fail" and "outside the curve's range [0, 100]" in c.message


@pytest.mark.parametrize("expected, within, ok", [(45, 10, True), (60, 10, True), (30, 10, False), (75, 20, False)])
def test_peak_epoch_rule(expected, within, ok):
    c = rule_case({"type": "peak_epoch", "layer": "first", "epoch": expected, "within": within, "estimator": "binning"})
    assert (c.status == "pass") is ok
    assert c.details["max_at"] == 50 and c.details["value"] == pytest.approx(3.0)
    assert c.details["offset"] == 50 - expected


def test_rule_matching_several_curves_and_none():
    rep = run_check(res(table(run="a") + table(run="b")), rules=[{"type": "at_least", "quantity": "I(T;Y)", "min": 0.5}])
    assert len(rep.cases) == 6 and rep.ok  # 2 runs x 3 layers
    rep = run_check(res(table()), rules=[{"type": "at_least", "quantity": "I(T;Y)", "layer": "fc9", "min": 0}])
    (c,) = rep.cases
    assert c.status == "fail" and "no curve matches" in c.message


def test_rules_file_validation(tmp_path):
    with pytest.raises(UsageError, match="^rules: rule 1: Unknown rule type 'compresion'.*Did you mean 'compression'"):
        run_check(res(table()), rules=[{"type": "compresion", "from": 1, "min_decrease": 1}])
    # from a file: the file, the rule's number and type name where it is (as for its other keys)
    import yaml

    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump({"rules": [{"type": "at_least", "quantity": "I(T;Y)", "mn": 0.1}]}))
    with pytest.raises(UsageError, match=rf"^{re.escape(str(f))}: rule 1 \(at_least\): unknown key 'mn'"):
        run_check(res(table()), rules=str(f))
    with pytest.raises(UsageError, match="unknown key 'min_decrese'.*min_decrease"):
        run_check(res(table()), rules=[{"type": "compression", "from": 1, "min_decrese": 1}])
    with pytest.raises(UsageError, match="needs 'min_decrease'"):
        run_check(res(table()), rules=[{"type": "compression", "from": 1}])
    with pytest.raises(UsageError, match="'within' must be a finite number"):
        run_check(res(table()), rules=[{"type": "peak_epoch", "epoch": 1, "within": -2}])
    with pytest.raises(UsageError, match="Nothing to check"):
        run_check(res(table()))
    p = tmp_path / "bad.yaml"
    p.write_text("rules: [type: compression\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_rules(p)
    p.write_text("rule:\n  - type: compression\n")
    with pytest.raises(UsageError, match="unknown key 'rule'.*'rules'"):
        load_rules(p)
    with pytest.raises(UsageError, match="Rules file not found"):
        load_rules(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="expected SELECTOR:key=value"):
        parse_tol_flag("rtol=0.1")
    with pytest.raises(UsageError, match="unknown key 'rtl'"):
        parse_tol_flag("I(X;T):rtl=0.1")
    assert set(RULE_TYPES) == {"compression", "decreases", "increases", "at_least", "at_most", "peak_epoch"}


def test_rules_file_settings_are_overridden_by_arguments(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rtol: 0\natol: 0\nrules:\n  - {type: at_least, quantity: 'I(T;Y)', layer: last, min: 0.5}\n")
    cur = table()
    setv(cur, add=0.1, layer="fc1", epoch=10, quantity="I(X;T)")
    assert not run_check(res(cur), baseline=res(table()), rules=p).ok       # file: zero tolerance
    assert run_check(res(cur), baseline=res(table()), rules=p, atol=0.2).ok  # argument wins


# ------------------------------------------------------------------------------------------
# baseline writing, JSON, JUnit
# ------------------------------------------------------------------------------------------
def test_write_baseline_with_provenance(tmp_path):
    src = write_results(tmp_path / "results.csv", table(), {"estimate": {"estimators": ["binning"]}})
    out = write_baseline(src, tmp_path / "ci" / "baseline.csv")
    back = read_results(out)
    assert len(back) == len(table())
    prov = back.provenance["baseline"]
    assert prov["from"][0]["sha256"] == file_sha256(src) and prov["n_rows"] == len(table())
    assert back.provenance["estimate"] == {"estimators": ["binning"]}
    assert not list((tmp_path / "ci").glob("*.tmp"))
    # update_baseline through run_check: rules still run, baseline not compared
    rep = run_check(src, baseline=tmp_path / "b2.csv", update_baseline=True,
                    rules=[{"type": "at_least", "quantity": "I(T;Y)", "layer": "last", "min": 0.9}])
    assert (tmp_path / "b2.csv").exists() and [c.group for c in rep.cases] == ["rules"] and not rep.ok
    assert run_check(src, baseline=tmp_path / "b2.csv", rtol=0, atol=0).ok


def test_junit_xml_counts_cases_and_failures(tmp_path):
    cur = [r for r in table() if r["layer"] != "fc3"]  # 3 missing curves
    setv(cur, add=1.0, layer="fc1", epoch=40, quantity="I(T;Y)")  # 1 failing curve
    rep = run_check(res(cur), baseline=res(table()), rules=[
        {"type": "compression", "layer": "fc1", "estimator": "binning", "from": 50, "min_decrease": 0.4},   # pass
        {"type": "peak_epoch", "layer": "fc2", "estimator": "binning", "epoch": 10, "within": 5},           # fail
    ])
    path = rep.write_junit(tmp_path / "junit.xml")
    root = ET.parse(path).getroot()
    tcs = root.findall(".//testcase")
    assert root.tag == "testsuites" and int(root.get("tests")) == len(tcs) == 12  # 10 curves + 2 rules
    fails = root.findall(".//testcase/failure")
    assert int(root.get("failures")) == len(fails) == 5
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert suites["ibscope check: baseline"].get("failures") == "4"
    assert suites["ibscope check: rules"].get("failures") == "1"
    failed_rule = [t for t in suites["ibscope check: rules"] if t.find("failure") is not None][0]
    assert "max 2.5 nats at epoch 50; expected 10" in failed_rule.find("failure").get("message")
    assert json.loads(failed_rule.find("failure").text)["offset"] == 40
    # JSON summary agrees
    data = json.loads(rep.write_json(tmp_path / "s.json").read_text())
    assert data["counts"] == {"cases": 12, "passed": 7, "failed": 5, "warnings": 0}
    assert data["format"] == "ibscope-check" and len(data["cases"]) == 12


def test_report_table_lists_failures_only():
    from rich.console import Console

    cur = table()
    setv(cur, add=1.0, layer="fc2", epoch=40, quantity="I(T;Y)")
    rep = run_check(res(cur), baseline=res(table()))
    con = Console(width=200, record=True)
    con.print(rep.table())
    text = con.export_text()
    assert "fc2 binning I(T;Y)" in text and "fc1 binning I(T;Y)" not in text
    assert isinstance(rep, CheckReport) and "1 of 10 checks failed" in rep.summary()


def test_docs_yaml_examples_are_valid():
    """Every YAML block of docs/check.md is a valid rules file (rules and tolerances parse)."""
    import re
    from pathlib import Path

    import yaml

    from ibscope.check import parse_rule, parse_tolerance_entry

    text = (Path(__file__).parents[1] / "docs" / "check.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    n_rules = 0
    for b in blocks:
        cfg = load_rules(yaml.safe_load(b))
        n_rules += len([parse_rule(r, i) for i, r in enumerate(cfg.get("rules") or [])])
        [parse_tolerance_entry(t, "docs") for t in cfg.get("tolerances") or []]
    assert n_rules == 4


def test_pooled_seeds_reject_duplicates_within_one_run():
    base = table(run="s0", with_rank=False) + table(run="s1", shift=0.1, with_rank=False)
    dup = base + [dict(table(run="s1", with_rank=False)[0])]  # a second row for s1 at epoch 0
    with pytest.raises(DataError, match="in one run; expected one"):
        run_check(res(table(with_rank=False)), baseline=res(dup), sigma=3, align="epoch")
    rep = run_check(res(table(with_rank=False)), baseline=res(base), sigma=3)
    assert rep.settings["seeds_pooled"] and rep.ok


@pytest.mark.parametrize("sel, layers", [(-1, ["fc3"]), (0, ["fc1"]), ("1", ["fc2"]), ("fc[12]", ["fc1", "fc2"]),
                                         ("last", ["fc3"]), ("first", ["fc1"]), (7, [])])
def test_rule_layer_selectors(sel, layers):
    rows = table()
    # layer_index decides first/last, not the order of the rows
    rows.sort(key=lambda r: r["layer"], reverse=True)
    rep = run_check(res(rows), rules=[{"type": "at_least", "quantity": "I(T;Y)", "layer": sel, "min": 0}])
    got = [c.details["curve"]["layer"] for c in rep.cases if "curve" in c.details]
    assert got == layers
    assert rep.ok is bool(layers)
