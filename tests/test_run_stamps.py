"""Stage stamps: a stage's fingerprint is its config, its inputs' contents, the ibscope version and
its outputs' contents as it wrote them. Each test changes one thing and checks the stage re-runs
with a reason naming it (or, for changes that leave the contents alone, that it does not)."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

import ibscope.pipeline.runner as pipeline_runner
from ibscope._version import __version__
from ibscope.errors import UsageError
from ibscope.pipeline import STAMP_FORMAT, Stage, StageRunner, factory_source


class Setup:
    """Input file(s) -> stage 'a' (writes a.out and the folder d/) -> stage 'b' (reads a.out)."""

    def __init__(self, root: Path):
        self.root = root
        self.src = root / "input.txt"
        self.src.write_text("hello")
        self.extra: list[Path] = []
        self.calls: list[str] = []
        self.said: list[str] = []

    # the runner's reporter (ibscope.reporting.Reporter): messages recorded, no progress tasks used
    def info(self, msg: str) -> None:
        self.said.append(msg)

    warning = info

    def task(self, label, total=None):
        raise AssertionError("the stage runner opens no progress task")

    def run(self, force: bool = False) -> list[tuple[str, str, str]]:
        r = StageRunner(self.root, force=force, reporter=self)

        def run_a():
            self.calls.append("a")
            (self.root / "a.out").write_text(self.src.read_text().upper())
            d = self.root / "d"
            d.mkdir(exist_ok=True)
            (d / "x.bin").write_bytes(b"\0" * 100)
            (d / "sub").mkdir(exist_ok=True)
            (d / "sub" / "y.bin").write_bytes(b"y" * 10)
            return [self.root / "a.out", d]

        def run_b():
            self.calls.append("b")
            (self.root / "b.out").write_text((self.root / "a.out").read_text() + "!")
            return [self.root / "b.out"]

        r(Stage("a", {"k": 1}, [self.src, *self.extra], [], run_a))
        r(Stage("b", {"k": 1}, [self.root / "a.out"], ["a"], run_b))
        return [(s.name, s.status, s.reason) for s in r.status]

    def stamp(self, name: str) -> dict:
        return json.loads((self.root / ".ibscope" / "stages" / f"{name}.json").read_text())


@pytest.fixture
def setup(tmp_path):
    s = Setup(tmp_path)
    assert [x[1] for x in s.run()] == ["ran", "ran"]
    assert [x[1:] for x in s.run()] == [("skipped", "up to date"), ("skipped", "up to date")]
    return s


def test_stamp_records_content_hashes_readably(setup):
    text = (setup.root / ".ibscope" / "stages" / "a.json").read_text()
    assert text.startswith("{\n  ")  # indented JSON, one key per line
    st = json.loads(text)
    assert st["format"] == STAMP_FORMAT and st["ibscope_version"] == __version__
    assert st["inputs"][str(setup.src)]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert st["inputs"][str(setup.src)]["size"] == 5
    assert st["outputs"] == ["a.out", "d"]
    assert st["output_hashes"]["a.out"]["sha256"] == hashlib.sha256(b"HELLO").hexdigest()
    d = st["output_hashes"]["d"]
    assert d["folder"] is True and sorted(d["files"]) == ["sub/y.bin", "x.bin"]
    assert d["files"]["x.bin"]["sha256"] == hashlib.sha256(b"\0" * 100).hexdigest()


def test_changed_input_reruns_and_downstream(setup):
    setup.src.write_text("HELLO")  # same size, new bytes
    assert setup.run() == [("a", "ran", "input input.txt changed"), ("b", "ran", "an earlier stage ran again")]
    assert (setup.root / "b.out").read_text() == "HELLO!"


def test_deleted_input_is_detected(setup):
    setup.src.unlink()
    with pytest.raises(FileNotFoundError):  # the stage runs again (and here fails reading it)
        setup.run()
    assert setup.calls == ["a", "b", "a"] and setup.said[-1] == "> a (input input.txt was deleted)"
    assert "- a: skipped (up to date)" in setup.said and "  done in " in setup.said[1][:10]
    assert not (setup.root / ".ibscope" / "stages" / "a.json").exists()  # a failed stage leaves no stamp


def test_input_dropped_from_the_list_is_detected(tmp_path):
    s = Setup(tmp_path)
    s.extra = [tmp_path / "ck1.pt", tmp_path / "ck2.pt"]
    for p in s.extra:
        p.write_bytes(b"w" * 8)
    s.run()
    (tmp_path / "ck2.pt").unlink()
    s.extra = s.extra[:1]  # a glob that no longer matches the deleted file
    assert s.run()[0] == ("a", "ran", "input ck2.pt was deleted")
    (tmp_path / "ck3.pt").write_bytes(b"new")
    s.extra.append(tmp_path / "ck3.pt")
    assert s.run()[0] == ("a", "ran", "input ck3.pt is new")


def test_changed_or_truncated_output_reruns(setup):
    (setup.root / "a.out").write_text("HELLX")
    assert setup.run()[0] == ("a", "ran", "output a.out changed since it was written")
    (setup.root / "b.out").write_text("HEL")
    assert setup.run() == [("a", "skipped", "up to date"),
                           ("b", "ran", "output b.out changed since it was written (6 -> 3 bytes)")]
    assert (setup.root / "b.out").read_text() == "HELLO!"


def test_output_folder_contents_are_checked_but_temporary_files_ignored(setup):
    d = setup.root / "d"
    (d / "x.bin.tmp").write_bytes(b"partial")  # ibscope's temporary files are not outputs
    (d / ".fig.tmp.png").write_bytes(b"partial")
    assert [x[1] for x in setup.run()] == ["skipped", "skipped"]
    (d / "sub" / "y.bin").unlink()
    assert setup.run()[0] == ("a", "ran", "output d changed since it was written (sub/y.bin is missing)")
    (d / "z.bin").write_bytes(b"z")
    assert setup.run()[0] == ("a", "ran", "output d changed since it was written (z.bin is new)")
    (d / "x.bin").write_bytes(b"\0" * 50)
    assert setup.run()[0] == ("a", "ran", "output d changed since it was written (x.bin changed, 100 -> 50 bytes)")
    shutil.rmtree(d)
    assert setup.run()[0] == ("a", "ran", "output d is missing")


def test_version_format_and_unreadable_stamps_rerun(setup):
    p = setup.root / ".ibscope" / "stages" / "b.json"
    st = json.loads(p.read_text())
    p.write_text(json.dumps({**st, "ibscope_version": "0.0.1"}))
    assert setup.run()[1] == ("b", "ran", f"ibscope version changed 0.0.1 -> {__version__}")
    st = json.loads(p.read_text())
    p.write_text(json.dumps({k: v for k, v in st.items() if k not in ("format", "output_hashes")}))
    assert setup.run()[1] == ("b", "ran", f"its stamp has an older format (written by ibscope {__version__})")
    p.write_text("{not json")
    assert setup.run()[1] == ("b", "ran", "its stamp is unreadable")
    assert [x[1] for x in setup.run()] == ["skipped", "skipped"]


def test_unchanged_files_are_not_read_again(setup, monkeypatch):
    opened: list[str] = []

    def spy(file, *a, **kw):
        opened.append(os.path.basename(str(file)))
        return builtins.open(file, *a, **kw)

    monkeypatch.setattr(pipeline_runner, "open", spy, raising=False)  # the hashing code's open()
    assert [x[1] for x in setup.run()] == ["skipped", "skipped"]
    assert opened == []  # same (size, mtime_ns) as in the stamps: no file hashed again
    os.utime(setup.src, ns=(1, 1))  # touched, same bytes: hashed once, still up to date
    assert [x[1] for x in setup.run()] == ["skipped", "skipped"]
    assert opened == ["input.txt"]
    assert setup.stamp("a")["inputs"][str(setup.src)]["mtime_ns"] == 1  # cache refreshed in the stamp
    assert [x[1] for x in setup.run()] == ["skipped", "skipped"]
    assert opened == ["input.txt"]


def test_factory_source_of_a_file_and_of_a_module(tmp_path, monkeypatch):
    import ibscope.demo.models

    assert factory_source(tmp_path, "nets/mynet.py:build") == tmp_path / "nets" / "mynet.py"
    assert factory_source(tmp_path, "ibscope.demo.models:ib_net") == Path(ibscope.demo.models.__file__)
    # a module that find_spec cannot place (no __spec__) is imported and its source file used
    src = tmp_path / "generated.py"
    src.write_text("def build(): pass\n")
    mod = types.ModuleType("ibscope_test_generated")
    mod.__file__ = str(src)
    monkeypatch.setitem(sys.modules, "ibscope_test_generated", mod)
    assert factory_source(tmp_path, "ibscope_test_generated:build") == src
    with pytest.raises(UsageError, match="model.factory: cannot import module 'ibscope_no_such_mod'"):
        factory_source(tmp_path, "ibscope_no_such_mod:build")
