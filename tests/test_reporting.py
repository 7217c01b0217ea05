"""The library's output boundary (ibscope.reporting): tables and progress through any reporter."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from ibscope.capture import capture
from ibscope.cli.main import app
from ibscope.errors import UsageError
from ibscope.reporting import LoggingReporter, NullReporter, Table, TextReporter, show_table


def test_table_text_is_aligned_and_reaches_reporters_without_a_table_method():
    t = Table("Layers", ["layer", "dims"], [["fc1", "10"], ["a_long_name", "7"]])
    assert t.text().splitlines() == ["Layers", "layer        dims", "fc1          10", "a_long_name  7"]

    class InfoOnly:
        silent = False

        def __init__(self):
            self.got = []

        def info(self, msg):
            self.got.append(msg)

        def warning(self, msg):
            self.got.append(msg)

        def task(self, label, total=None):  # pragma: no cover - not used here
            raise AssertionError

    r = InfoOnly()
    show_table(r, t)
    assert r.got == [t.text()]
    show_table(NullReporter(), t)  # silent: nothing, no error
    show_table(None, t)


def test_logging_and_text_reporters_say_what_a_task_did(caplog):
    with caplog.at_level(logging.INFO, logger="ibscope"):
        rep = LoggingReporter()
        with rep.task("batches", 3) as t:
            t.advance(note="epoch 0")
            t.advance(2)
        rep.table(Table("T", ["a"], [["1"]]))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "batches: started (3 steps)"
    assert msgs[1].startswith("batches: 3/3 done in ") and msgs[1].endswith(" s (last: epoch 0)")
    assert msgs[2] == "T\na\n1"
    buf = io.StringIO()
    rep2 = TextReporter(buf)
    rep2.info("hello")
    rep2.warning("careful")
    with rep2.task("figures") as t:
        t.update(completed=2, total=5, note="b.png")
    lines = buf.getvalue().splitlines()
    assert lines[:2] == ["hello", "Warning: careful"]
    assert lines[2].startswith("figures: 2/5 done in ") and lines[2].endswith("(last: b.png)")


def _toy(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    for e in (0, 3):
        torch.save({"epoch": e, "state_dict": net.state_dict()}, tmp_path / f"e{e}.pt")
    np.savez(tmp_path / "p.npz", x=np.random.default_rng(0).normal(size=(20, 4)).astype("float32"),
             y=np.arange(20) % 2)
    (tmp_path / "toy.py").write_text("import torch.nn as nn\n\ndef net():\n    return nn.Sequential(nn.Linear(4, 6), "
                                     "nn.Tanh(), nn.Linear(6, 2))\n")
    return [f"{tmp_path / 'toy.py'}:net", str(tmp_path / "e*.pt"), str(tmp_path / "p.npz")]


def test_capture_tables_go_to_the_reporter_and_a_dry_run_shows_them_anyway(tmp_path, caplog, capsys):
    model, ckpts, probe = _toy(tmp_path)
    with caplog.at_level(logging.INFO, logger="ibscope"):
        capture(model, ckpts, probe, ["0"], tmp_path / "acts", reporter=LoggingReporter())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Checkpoints, in capture order\n#  checkpoint" in text and "e3.pt  3" in text
    assert "checkpoints: 2/2 done in" in text and "batches: 1/1 done in" in text
    capsys.readouterr()
    capture(model, ckpts, probe, ["0"], tmp_path / "acts2")  # no reporter: silent
    assert capsys.readouterr().err == "" and (tmp_path / "acts2").is_dir()
    assert capture(model, ckpts, probe, ["0"], None, dry_run=True) is None  # no reporter: plain text on stderr
    err = capsys.readouterr().err
    assert "Checkpoints, in capture order" in err and "Layers to capture (dry run: nothing written)" in err
    assert "0      0       none       6          6" in err


def test_dry_run_into_an_existing_store_is_refused_like_the_real_run(tmp_path):
    model, ckpts, probe = _toy(tmp_path)
    capture(model, ckpts, probe, ["0"], tmp_path / "acts")
    base = ["capture", "-m", model, "-c", ckpts, "-p", probe, "-l", "0", "-o", str(tmp_path / "acts"), "--dry-run"]
    res = CliRunner().invoke(app, base)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "already exists: the capture would be refused (dry run: nothing written)" in text
    assert "Layers to capture" in res.stdout  # the plan is the dry run's result: on stdout, still shown
    res = CliRunner().invoke(app, [*base, "--resume"])
    assert res.exit_code == 0, res.output
    with pytest.raises(UsageError, match="already exists: the capture would be refused"):
        capture(model, ckpts, probe, ["0"], tmp_path / "acts", dry_run=True, reporter=NullReporter())


def test_info_names_checkpoint_files_of_the_same_name_with_their_folder(tmp_path):
    model, _, probe = _toy(tmp_path)
    net = torch.nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    for e in (0, 1):
        (tmp_path / f"run_e{e}").mkdir()
        torch.save({"epoch": e, "state_dict": net.state_dict()}, tmp_path / f"run_e{e}" / "model.pt")
    capture(model, [str(tmp_path / "run_e0" / "model.pt"), str(tmp_path / "run_e1" / "model.pt")], probe, ["0"],
            tmp_path / "acts")
    res = CliRunner().invoke(app, ["info", str(tmp_path / "acts")])
    assert res.exit_code == 0 and "run_e0/model.pt" in res.output and "run_e1/model.pt" in res.output, res.output
