"""CLI presentation, applied centrally (ibscope/cli/_help.py, cli/_common.py): help of every
command without ``<bool>`` and with prose re-flowed to the terminal width, closed sets listed,
clean usage lines, and tables that are not cut at 80 columns when the output is not a terminal."""

import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ibscope.cli._help import reflow
from ibscope.cli.main import app

WIDTH = 100
COMMANDS = sorted(typer.main.get_command(app).commands)


def _help(*args, width=WIDTH):
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(width)})  # not TERMINAL_WIDTH: typer freezes it
    assert r.exit_code == 0, r.output
    return r.output


def _description(text: str) -> list[list[str]]:
    """The prose between the usage line and the first panel, as paragraphs of stripped lines."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("Usage:")) + 1
    end = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("╭")), len(lines))
    paras, cur = [], []
    for ln in lines[start:end]:
        if ln.strip():
            cur.append(ln.rstrip())
        elif cur:
            paras.append(cur)
            cur = []
    return paras + ([cur] if cur else [])


def test_there_are_commands():
    assert {"run", "capture", "estimate", "plot", "report", "check", "validate", "ood"} <= set(COMMANDS)


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in COMMANDS])
def test_help_has_no_bool_metavar_and_wraps_at_the_width(cmd):
    text = _help(*cmd)
    assert "<bool>" not in text and "<list[" not in text and "{" not in text.split("\n", 3)[1]
    assert "......" not in text  # a repeatable argument is NAME..., once
    assert max(len(ln) for ln in text.splitlines()) <= WIDTH
    # greedy wrapping: a line of a paragraph ends only where the next word would not have fit
    for para in _description(text):
        for line, nxt in zip(para, para[1:]):
            nxt_word = nxt.split()[0]
            assert len(line) + 1 + len(nxt_word) > WIDTH - 2, (
                f"`ibscope {' '.join(cmd)} --help`: line broken early (hard-wrapped source?):\n{line}\n{nxt}")


@pytest.mark.parametrize("cmd", [[c] for c in COMMANDS])
def test_help_at_80_columns_cuts_nothing(cmd):
    """On a standard 80-column terminal no option name or word is cut off with an ellipsis."""
    text = _help(*cmd, width=80)
    assert "…" not in text, "\n".join(ln for ln in text.splitlines() if "…" in ln)


def test_default_flags_spelt_out_still_work_and_exclude_their_opposites(tmp_path):
    from capture_support import save_probe, write_models

    save_probe(tmp_path / "p.npz", np.random.default_rng(0).normal(size=(8, 4)).astype("float32"))
    model = f"{write_models(tmp_path)}:MLP"
    base = ["capture", "-m", model, "-c", str(tmp_path / "none*.pt"), "-p", str(tmp_path / "p.npz"), "-l", "fc1"]
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a"), "--store-inputs", "--no-store-inputs"])
    assert r.exit_code == 2 and "--store-inputs and --no-store-inputs exclude each other." in r.output
    r = CliRunner().invoke(app, ["ood", "--fit", "a", "--test", "b", "--ood", "c", "--layer", "l",
                                 "--class-conditional", "--single-gaussian", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--class-conditional and --single-gaussian exclude each other." in r.output


def test_usage_line_and_argument_names():
    assert re.search(r"Usage: ibscope estimate \[OPTIONS\] STORE\.\.\.\s*$", _help("estimate"), re.M)
    assert re.search(r"Usage: ibscope run \[OPTIONS\] \[CONFIG\]\s*$", _help("run"), re.M)
    text = _help("check")
    assert "RESULTS..." in text and "RESULTS......" not in text


def test_flags_show_no_type_and_lists_show_their_element():
    text = _help("estimate")
    force = next(ln for ln in text.splitlines() if ln.startswith("│ --force "))
    assert re.match(r"│ --force\s+Recompute", force), force
    layer = next(ln for ln in text.splitlines() if ln.startswith("│ --layer "))
    assert "<str>" in layer


def test_closed_sets_are_listed_and_checked():
    text = " ".join(_help("check", width=200).replace("│", " ").split())
    assert "[one of: fail, warn, ignore]" in text and "[one of: auto, epoch, step, checkpoint]" in text
    for cmd, listed in (("capture", "[one of: none, lzf, gzip]"), ("capture", "[one of: auto, step, epoch, name]"),
                        ("checkpoints", "[one of: auto, step, epoch, name]"), ("estimators", "[one of: pair, single, jacobian]"),
                        ("run", "[one of: data, train, capture, estimate, plot, ood, report, check]"),
                        ("estimate", "[one of: identity, inputs]")):
        assert listed in " ".join(_help(cmd, width=200).replace("│", " ").split()), (cmd, listed)
    assert "--missing <choice>" in text
    def flat(out):  # the error box wraps at the terminal width
        return " ".join(out.replace("│", " ").split())

    r = CliRunner().invoke(app, ["check", "x.csv", "--baseline", "b.csv", "--unit", "bit"])
    assert r.exit_code == 2 and "--unit must be one of nats, bits. Got 'bit'. Did you mean 'bits'?" in flat(r.output)
    r = CliRunner().invoke(app, ["plot", "x.csv", "--null", "subtrct"])
    assert r.exit_code == 2 and "Got 'subtrct'. Did you mean 'subtract'?" in flat(r.output)


def test_reflow_keeps_paragraphs_examples_and_lists():
    src = "Title line\n\n    First para\n    goes on here.\n\n    Examples:\n\n      ibscope a\n      ibscope b\n\n    - one\n    - two"
    assert reflow(src) == "Title line\n\nFirst para goes on here.\n\nExamples:\n\n  ibscope a\n  ibscope b\n\n- one\n- two"
    assert reflow("\b\nkeep\nthis") == "\b\nkeep\nthis"


def test_table_off_a_terminal_is_not_cut_at_80_columns(tmp_path, monkeypatch):
    """`ibscope check` prints a rich table on stderr; in a CI log (not a TTY, no COLUMNS) it used to be cut at 80."""
    from ibscope.results import make_row, write_results

    monkeypatch.delenv("COLUMNS", raising=False)
    layer = "blocks.11.attention_out"
    rows = [make_row(epoch=e, layer=layer, layer_index=0, estimator="binning", quantity="I(T;Y)", value=v, unit="nats")
            for e, v in ((0, 0.1), (10, 0.2))]
    base = write_results(tmp_path / "b.csv", rows)
    cur = write_results(tmp_path / "c.csv", [dict(r, value=r["value"] + 1.0) for r in rows])
    r = CliRunner().invoke(app, ["check", str(cur), "--baseline", str(base)])
    assert r.exit_code == 3
    lines = r.output.splitlines()
    assert any(f"{layer} binning I(T;Y)" in ln for ln in lines), r.output  # the case name is not folded
    assert max(len(ln) for ln in lines) > 80
    narrow = CliRunner().invoke(app, ["check", str(cur), "--baseline", str(base)], env={"COLUMNS": "80"})
    assert not any(f"{layer} binning I(T;Y)" in ln for ln in narrow.output.splitlines())  # at 80 it folds
    from ibscope.cli._common import OFF_TERMINAL_WIDTH, console

    assert console().width >= OFF_TERMINAL_WIDTH
    monkeypatch.setenv("COLUMNS", "90")
    assert console().width == 90  # COLUMNS still decides
