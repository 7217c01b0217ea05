"""`ibscope check` through the CLI: exit codes, messages, files written, no tracebacks."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from ibscope.cli.main import app
from ibscope.results import make_row, read_results, write_results

EPOCHS = [0, 10, 20, 30, 40, 50]


def rows(shift=0.0, layers=("fc1", "fc2")):
    out = []
    for li, layer in enumerate(layers):
        for ci, e in enumerate(EPOCHS):
            v = (2.0 - 0.5 * li) + (e / 25 if e <= 20 else 0.8 - (e - 20) / 50)  # peak at 20, -0.6 to 50
            out.append(make_row(checkpoint=ci, epoch=e, layer=layer, layer_index=li, estimator="binning",
                                quantity="I(X;T)", value=v + shift, unit="nats"))
            out.append(make_row(checkpoint=ci, epoch=e, layer=layer, layer_index=li, estimator="binning",
                                quantity="I(T;Y)", value=0.1 + e / 100, unit="nats"))
    return out


@pytest.fixture
def tables(tmp_path):
    base = write_results(tmp_path / "base.csv", rows(), {"made_by": "test"})
    same = write_results(tmp_path / "same.csv", rows())
    worse = write_results(tmp_path / "worse.csv", rows(shift=-1.0))
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: last layer compresses\n"
        "    type: compression\n    layer: last\n    from: peak\n    min_decrease: 0.5\n"
        "  - type: at_least\n    quantity: I(T;Y)\n    layer: last\n    min: 0.55\n"
    )
    return tmp_path, base, same, worse, rules


def invoke(*args):
    return CliRunner().invoke(app, ["check", *map(str, args)])


def test_passes_exit_0_and_writes_reports(tables):
    d, base, same, worse, rules = tables
    r = invoke(same, "--baseline", base, "--rules", rules, "--junit", d / "j.xml", "--json", d / "s.json")
    assert r.exit_code == 0, r.output
    assert "all checks hold" in r.output and "6 checks" in r.output  # 4 curves + 2 rules
    root = ET.parse(d / "j.xml").getroot()
    assert root.get("tests") == "6" and root.get("failures") == "0"
    s = json.loads((d / "s.json").read_text())
    assert s["ok"] is True and s["counts"]["passed"] == 6


def test_regression_exit_3_with_table_and_junit(tables):
    d, base, same, worse, rules = tables
    r = invoke(worse, "--baseline", base, "--junit", d / "j.xml")
    assert r.exit_code == 3, r.output
    assert "FAIL" in r.output and "fc1 binning I(X;T)" in r.output and "Traceback" not in r.output
    assert "2 of 4 checks failed" in r.output
    root = ET.parse(d / "j.xml").getroot()
    assert root.get("tests") == "4" and root.get("failures") == "2" and len(root.findall(".//failure")) == 2
    # a looser tolerance lets the same change pass: |diff| 1.0 <= 0.02 + 0.7*1.5 (smallest baseline
    # value 1.5); rtol 0.6 still fails there (0.92 < 1.0)
    assert invoke(worse, "--baseline", base, "--rtol", "0.7").exit_code == 0
    assert invoke(worse, "--baseline", base, "--rtol", "0.6").exit_code == 3
    # per-quantity tolerance flag
    r = invoke(worse, "--baseline", base, "--tol", "I(X;T):atol=1.1")
    assert r.exit_code == 0, r.output


def test_rule_failure_exit_3_reports_numbers(tables):
    d, base, same, worse, rules = tables
    rules.write_text("rules:\n  - {type: at_least, quantity: 'I(T;Y)', layer: last, min: 0.7}\n")
    r = CliRunner().invoke(app, ["check", str(same), "--rules", str(rules), "--json", "-", "-q"])
    assert r.exit_code == 3
    data = json.loads(r.stdout)
    (case,) = data["cases"]
    assert case["details"]["value"] == pytest.approx(0.6) and case["details"]["bound"] == 0.7
    assert case["status"] == "fail" and "(>= 0.7 required)" in case["message"]


def test_units_from_bits_table(tables):
    d, base, *_ = tables
    res = read_results(base)
    bits = write_results(d / "bits.csv", res.to_unit("bits").rows)
    assert read_results(bits).rows[0]["unit"] == "bits"
    r = invoke(bits, "--baseline", base, "--rtol", "0", "--atol", "0")
    assert r.exit_code == 0, r.output


def test_update_baseline_writes_atomically_with_provenance(tables):
    d, base, same, worse, rules = tables
    out = d / "ci" / "baseline.csv"
    r = invoke(worse, "--baseline", out, "--update-baseline")
    assert r.exit_code == 0, r.output and "baseline written" in r.output
    prov = json.loads((d / "ci" / "baseline.provenance.json").read_text())
    assert prov["baseline"]["from"][0]["path"] == str(worse) and prov["baseline"]["n_rows"] == 24
    assert sorted(p.name for p in (d / "ci").iterdir()) == ["baseline.csv", "baseline.provenance.json"]
    assert invoke(worse, "--baseline", out, "--rtol", "0", "--atol", "0").exit_code == 0
    assert invoke(same, "--baseline", out).exit_code == 3


def test_missing_curve_exit_3_unless_warned(tables):
    d, base, *_ = tables
    one = write_results(d / "one.csv", rows(layers=("fc1",)))
    r = invoke(one, "--baseline", base)
    assert r.exit_code == 3 and "curve missing" in r.output
    r = invoke(one, "--baseline", base, "--missing", "warn")
    assert r.exit_code == 0 and "WARN" in r.output


@pytest.mark.parametrize("args, code, text", [
    (["{d}/nope.csv", "--baseline", "{base}"], 4, "does not exist"),
    (["{same}", "--baseline", "{d}/nope.csv"], 4, "--update-baseline"),
    (["{d}/junk.csv", "--baseline", "{base}"], 4, "not an ibscope results table"),
    (["{d}/badval.csv", "--baseline", "{base}"], 4, "must be a number"),
    (["{d}", "--baseline", "{base}"], 4, "is a directory"),
    (["{d}/binary.csv", "--baseline", "{base}"], 4, "is not an ibscope results table: it is not UTF-8 text"),
    (["{same}"], 2, "Nothing to check"),
    (["{same}", "--update-baseline"], 2, "needs --baseline"),
    (["{same}", "--baseline", "{base}", "--missing", "explode"], 2, "missing must be one of fail, warn, ignore"),
    (["{same}", "--baseline", "{base}", "--unit", "bytes"], 2, "unit must be one of nats, bits"),
    (["{same}", "--baseline", "{base}", "--tol", "nonsense"], 2, "expected SELECTOR:key=value"),
    (["{same}", "--baseline", "{base}", "--rtol", "-1"], 2, "rtol must be a finite number >= 0"),
    (["{same}", "--rules", "{d}/typo.yaml"], 2, "Did you mean 'peak_epoch'"),
    (["{same}", "--rules", "{d}/missing.yaml"], 2, "Rules file not found"),
    (["{same}", "--baseline", "{base}", "--align", "epoch"], 4, "expected one"),
])
def test_error_paths(tables, args, code, text):
    d, base, same, worse, rules = tables
    (d / "junk.csv").write_text("a,b\n1,2\n")
    (d / "binary.csv").write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe\x00\x01" * 10)
    (d / "badval.csv").write_text("layer,estimator,quantity,value,unit\nfc1,x,q,abc,nats\n")
    (d / "typo.yaml").write_text("rules:\n  - {type: peak_epoc, epoch: 3, within: 1}\n")
    dup = read_results(same).rows
    dup[1]["epoch"] = dup[0]["epoch"]
    dup[1]["quantity"] = dup[0]["quantity"]
    write_results(same, dup)
    r = invoke(*[a.format(d=d, base=base, same=same) for a in args])
    assert r.exit_code == code, r.output
    assert text in r.output.replace("\n", " ")
    assert "Traceback" not in r.output


def test_help_and_subprocess_exit_code(tables):
    d, base, same, worse, rules = tables
    r = CliRunner().invoke(app, ["check", "--help"])
    assert r.exit_code == 0 and "--update-baseline" in r.output and "--sigma" in r.output
    p = subprocess.run([sys.executable, "-m", "ibscope.cli.main", "check", str(worse), "--baseline", str(base), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and p.stdout == "" and "checks failed" in p.stderr


def test_quiet_and_show_passing(tables):
    d, base, same, worse, rules = tables
    r = invoke(worse, "--baseline", base, "-q")
    assert r.exit_code == 3 and "FAIL" not in r.output and "2 of 4 checks failed" in r.output
    r = invoke(same, "--baseline", base, "--show-passing")
    assert r.exit_code == 0 and r.output.count(" ok ") == 4 and "fc2 binning I(T;Y)" in r.output
    r = invoke(same, "--baseline", base)
    assert r.exit_code == 0 and " ok " not in r.output


def test_unusable_input_still_writes_a_junit_error(tables):
    d, base, same, worse, rules = tables
    r = invoke(d / "nope.csv", "--baseline", base, "--junit", d / "j.xml")
    assert r.exit_code == 4
    root = ET.parse(d / "j.xml").getroot()
    assert root.get("errors") == "1" and root.get("failures") == "0"
    (err,) = root.findall(".//testcase/error")
    assert "does not exist" in err.get("message") and err.get("type") == "exit code 4"
