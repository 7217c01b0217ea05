"""`ibscope run` on the toy run of docs/capture.md, as a user runs it (real subprocesses): stages
re-run when their model file or outputs change, config names cannot write outside the output
folder, one run at a time per folder, and the run-config keys of the other parts of issue 11."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ibscope._locks import LockTimeout, lock_path_for
from ibscope._version import __version__
from ibscope.cli.main import app
from ibscope.pipeline import run_demo, run_pipeline
from ibscope.results import read_results
from ibscope.store import open_store

# the model of docs/capture.md ("Try it")
TOY_NET = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, hidden=10):
            super().__init__()
            self.fc1 = nn.Linear(12, hidden)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(hidden, 2)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))
''')

# runcfg/sane.yaml of the shared cases, with the figures cut down to one kind
SANE = {"model": {"factory": "mynet.py:Net"}, "data": {"probes": {"p": "probe.npz"}, "probe": "p"},
        "checkpoints": "runs/*.pt", "capture": {"layers": ["type:Linear", "act"]},
        "estimate": {"estimators": ["binning", "effective-rank"]}, "plot": {"kinds": ["info-plane"]},
        "report": {"enabled": False}}


@pytest.fixture(scope="module")
def toy_src(tmp_path_factory):
    """mynet.py, probe.npz and runs/epoch_00{0,1,2}.pt, trained as in docs/capture.md."""
    import torch

    d = tmp_path_factory.mktemp("toy")
    (d / "mynet.py").write_text(TOY_NET)
    ns: dict = {}
    exec(TOY_NET, ns)
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    y = (x[:, 0] > 0).long()
    (d / "runs").mkdir()
    net = ns["Net"](hidden=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for epoch in range(3):
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        acc = float((net(x).argmax(1) == y).float().mean())
        torch.save({"epoch": epoch, "state_dict": net.state_dict(), "accuracy": acc, "loss": loss.item()},
                   d / "runs" / f"epoch_{epoch:03d}.pt")
    np.savez(d / "probe.npz", x=x.numpy(), y=y.numpy())
    return d


@pytest.fixture
def toy(toy_src, tmp_path):
    d = tmp_path / "toy"
    shutil.copytree(toy_src, d)
    (d / "sane.yaml").write_text(yaml.safe_dump(SANE))
    return d


def ibscope(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # one stage line per line
    return subprocess.run([sys.executable, "-m", "ibscope.cli.main", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def stage_lines(output: str) -> dict[str, tuple[str, str]]:
    """{stage: ("ran" | "skipped", reason)} from the progress lines of `ibscope run`."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^> (\w+)(?: \([^)]*\))? \((.*)\)$", line.strip())
        if m:
            out[m.group(1)] = ("ran", m.group(2))
        m = re.match(r"^- (\w+)(?: \([^)]*\))?: skipped \((.*)\)$", line.strip())
        if m:
            out[m.group(1)] = ("skipped", m.group(2))
    return out


def finished(out: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["finished"] for p in (out / ".ibscope" / "stages").glob("*.json")}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------------- sound stamps
@pytest.mark.slow
def test_factory_file_edit_reruns_capture_and_everything_after(toy):
    r = ibscope("run", "sane.yaml", "-o", "so", cwd=toy)
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stderr) == {s: ("ran", "never ran here") for s in ("capture", "estimate", "plot")}
    acts = open_store(toy / "so" / "stores" / "p").activations(0, "act")
    assert acts.min() < 0  # tanh
    stamps = finished(toy / "so")

    r = ibscope("run", "sane.yaml", "-o", "so", cwd=toy)  # nothing edited: nothing runs
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stderr) == {s: ("skipped", "up to date") for s in ("capture", "estimate", "plot")}
    assert finished(toy / "so") == stamps

    (toy / "mynet.py").write_text(TOY_NET.replace("nn.Tanh()", "nn.ReLU()"))
    r = ibscope("run", "sane.yaml", "-o", "so", cwd=toy)
    assert r.returncode == 0, r.stderr
    assert stage_lines(r.stderr) == {"capture": ("ran", "input mynet.py changed"),
                                     "estimate": ("ran", "an earlier stage ran again"),
                                     "plot": ("ran", "an earlier stage ran again")}
    assert open_store(toy / "so" / "stores" / "p").activations(0, "act").min() == 0.0  # captured with ReLU


@pytest.mark.slow
def test_truncated_results_rerun_estimate_and_plot_then_succeeds(toy):
    r = ibscope("run", "sane.yaml", "-o", "so", cwd=toy)
    assert r.returncode == 0, r.stderr
    results = toy / "so" / "results.csv"
    rows = read_results(results).rows
    data = results.read_bytes()
    results.write_bytes(data[: len(data) // 2])  # stamp_truncate.sh

    r = ibscope("run", "sane.yaml", "-o", "so", cwd=toy)
    assert r.returncode == 0, r.stderr
    st = stage_lines(r.stderr)
    assert st["capture"] == ("skipped", "up to date")
    assert st["estimate"] == ("ran", f"output results.csv changed since it was written "
                                     f"({len(data)} -> {len(data) // 2} bytes)")
    assert st["plot"] == ("ran", "an earlier stage ran again")
    again = read_results(results).rows
    assert len(again) == len(rows) and [r["value"] for r in again] == pytest.approx([r["value"] for r in rows],
                                                                                   nan_ok=True)
    assert (toy / "so" / "figures" / "info-plane_binning.png").stat().st_size > 5000

    # a stamp written by another ibscope version: that stage (and those after it) run again
    p = toy / "so" / ".ibscope" / "stages" / "estimate.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "ibscope_version": "0.0.1"}, indent=2))
    res = run_pipeline(toy / "sane.yaml", out=toy / "so", progress=False, quiet=True)
    assert res.ran() == ["estimate", "plot"] and res.skipped() == ["capture"]
    assert res.stages[1].reason == f"ibscope version changed 0.0.1 -> {__version__}"
    assert json.loads(p.read_text())["ibscope_version"] == __version__


def test_module_factory_source_is_part_of_the_fingerprint(toy, monkeypatch):
    pkg = toy / "ibscope_test_toypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(TOY_NET)
    monkeypatch.syspath_prepend(str(toy))
    for m in ("ibscope_test_toypkg", "ibscope_test_toypkg.nets"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    over = {"model": {"factory": "ibscope_test_toypkg.nets:Net"}, "estimate": {"estimators": ["effective-rank"]},
            "plot": {"enabled": False}}
    assert run_pipeline(toy / "sane.yaml", out=toy / "m", overrides=over, progress=False, quiet=True).ran() == [
        "capture", "estimate"]
    stamp = json.loads((toy / "m" / ".ibscope" / "stages" / "capture.json").read_text())
    assert str(pkg / "nets.py") in stamp["inputs"]
    (pkg / "nets.py").write_text(TOY_NET + "\n# a comment is a change of the source\n")
    res = run_pipeline(toy / "sane.yaml", out=toy / "m", overrides=over, progress=False, quiet=True)
    assert res.ran() == ["capture", "estimate"]
    assert res.stages[0].reason == f"input {os.path.join('ibscope_test_toypkg', 'nets.py')} changed (" \
                                   f"{len(TOY_NET)} -> {len(TOY_NET) + 39} bytes)"


# ---------------------------------------------------------------------------- confined paths
TRAVERSALS = {  # the shared cases trav_name.yaml, trav_probe.yaml, trav_subset.yaml
    "name": ({"name": "../../NAME_ESCAPE", "checkpoints": "runs/epoch_000.pt"}, "'name' '../../NAME_ESCAPE'"),
    "probe": ({"data": {"probes": {"../../../x": "probe.npz"}, "probe": "../../../x"}, "checkpoints": "runs/epoch_000.pt"},
              "a 'data.probes' key '../../../x'"),
    "subset": ({"data": {"probes": {"p": "probe.npz"}, "probe": "p",
                         "subsets": {"../../../x": {"probe": "p", "n": 10, "seed": 0}}}},
               "a 'data.subsets' key '../../../x'"),
}


@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_traversal_names_are_usage_errors_with_nothing_written(toy, tmp_path, case):
    over, message = TRAVERSALS[case]
    cfg = {**SANE, **over, "capture": {"layers": ["fc1"]}, "estimate": {"estimators": ["binning"]},
           "plot": {"enabled": False}}
    deep = toy / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for f in ("mynet.py", "probe.npz", "runs"):
        (deep / f).symlink_to(toy / f)
    (deep / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    before = tree(tmp_path)
    for out in (["-o", "o"], []):  # with -o, and into the default ./ibscope-runs/<name>
        r = ibscope("run", "cfg.yaml", *out, cwd=deep)
        assert r.returncode == 2, r.stderr
        text = " ".join(r.stderr.split())
        assert f"{message} is not a safe name: it becomes part of a file path" in text
        assert "Traceback" not in r.stderr
        assert not (deep / "o").exists() and not (deep / "ibscope-runs").exists()
        assert tree(tmp_path) == before  # nothing written anywhere


def test_output_path_through_a_symlink_outside_is_refused(toy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (toy / "so").mkdir()
    (toy / "so" / "stores").symlink_to(elsewhere)  # OUT/stores would lead outside OUT
    r = CliRunner().invoke(app, ["run", str(toy / "sane.yaml"), "-o", str(toy / "so"), "-q"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert (f"The activation store '{elsewhere / 'p'}' lies outside the output folder '{toy / 'so'}' (through a "
            f"symbolic link: '{toy / 'so' / 'stores' / 'p'}')." in text)
    assert "remove the link or choose another output folder" in text
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in (toy / "so").iterdir()) == ["stores"]


def test_figure_names_from_results_stay_in_the_figure_folder(tmp_path):
    from test_plot import table

    from ibscope.plot import plot_results
    from ibscope.results import write_results

    long = "a/" * 60
    write_results(tmp_path / "r.csv", table(splits=("../../evil", long), metrics=False, extra=False))
    out = tmp_path / "deep" / "figs"
    paths = plot_results(tmp_path / "r.csv", out, kinds=["estimators"])
    names = sorted(p.name for p in paths)
    assert len(names) == 2 and "estimators_evil.png" in names
    other = next(n for n in names if n != "estimators_evil.png")
    assert re.fullmatch(r"estimators_(a_){35}a_[0-9a-f]{8}\.png", other), other  # cut short, with a hash
    assert all(p.parent == out for p in paths)
    assert tree(tmp_path) == {"r.csv", "r.provenance.json", "deep", "deep/figs", *(f"deep/figs/{n}" for n in names)}


# ---------------------------------------------------------------------------- one run per folder
SLOW_NET = TOY_NET + textwrap.dedent('''

    class SlowNet(Net):
        """Waits in forward until the test says so: the run holds its folder's lock meanwhile."""

        def forward(self, x):
            import os, pathlib, time
            t0 = time.time()
            while not pathlib.Path(os.environ["TOY_RELEASE"]).exists() and time.time() - t0 < 120:
                time.sleep(0.05)
            return super().forward(x)
''')


@pytest.mark.slow
def test_second_run_on_one_folder_is_refused_naming_the_lock(toy):
    (toy / "slow.py").write_text(SLOW_NET)
    cfg = {**SANE, "model": {"factory": "slow.py:SlowNet"}, "capture": {"layers": ["fc1"]},
           "estimate": {"estimators": ["effective-rank"]}, "plot": {"enabled": False}}
    (toy / "slow.yaml").write_text(yaml.safe_dump(cfg))
    release = toy / "release"
    env = {**os.environ, "COLUMNS": "400", "TOY_RELEASE": str(release)}
    first = subprocess.Popen([sys.executable, "-m", "ibscope.cli.main", "run", "slow.yaml", "-o", "so", "-q"], cwd=toy,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = toy / ".so.lock.holder.json"
        t0 = time.time()
        while not holder.exists():  # the first run holds the folder's lock
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.05)
        second = ibscope("run", "sane.yaml", "-o", "so", "--lock-timeout", "0", "-q", cwd=toy)
        assert first.poll() is None
    finally:
        release.write_text("go")
        out, err = first.communicate(timeout=300)
    text = " ".join(second.stderr.split())
    assert second.returncode == 1, second.stderr
    assert f"The run folder '{toy / 'so'}' is being written by process {first.pid}" in text
    assert f"its lock '{toy / '.so.lock'}'" in text and "--lock-timeout" in text
    assert first.returncode == 0, err
    # the refused run changed nothing: the stamps are the first run's, for its config
    stamp = json.loads((toy / "so" / ".ibscope" / "stages" / "estimate.json").read_text())
    assert stamp["config"]["estimate"]["estimators"] == ["effective-rank"]
    assert sorted(finished(toy / "so")) == ["capture", "estimate"]


def test_demo_holds_its_folder_lock(tmp_path):
    target = tmp_path / "demo"
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import time, pathlib
        from ibscope._locks import writer_lock
        with writer_lock({str(target)!r}, what="demo folder"):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        t0 = time.time()
        while not ready.exists():
            assert time.time() - t0 < 60
            time.sleep(0.05)
        with pytest.raises(LockTimeout) as ei:
            run_demo(target, progress=False, quiet=True, lock_timeout=0)
        assert f"process {holder.pid}" in str(ei.value) and str(lock_path_for(target)) in str(ei.value)
        r = CliRunner().invoke(app, ["demo", "-o", str(target), "--lock-timeout", "0", "-q"])
        assert r.exit_code == 1 and f"The demo folder '{target}' is being written by process {holder.pid}" in " ".join(
            r.output.split())
        assert not target.exists()  # refused before any run wrote its folder
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- keys of the other parts
def test_strict_skip_bad_shards_and_safe_globals_reach_the_stages(toy, monkeypatch):
    import ibscope.capture
    import ibscope.estimate
    import ibscope.ood

    np.savez(toy / "probe2.npz", x=np.load(toy / "probe.npz")["x"] * 3, y=np.load(toy / "probe.npz")["y"])
    cfg = {**SANE, "data": {"probes": {"p": "probe.npz", "q": "probe2.npz"}, "probe": "p"},
           "capture": {"layers": ["act"], "safe_globals": ["numpy.dtype"]}, "estimate": {"estimators": ["binning"]},
           "plot": {"enabled": False},
           "ood": {"fit": "p", "test": "p", "ood": ["q"], "layer": "act", "detectors": ["mahalanobis"],
                   "options": {"n_bootstrap": 10}}}
    (toy / "k.yaml").write_text(yaml.safe_dump(cfg))
    seen: dict[str, list[dict]] = {"capture": [], "run_estimate": [], "run_ood": []}
    keys = ("strict", "skip_bad_shards", "safe_globals")

    def recorder(mod, name):
        real = getattr(mod, name)

        def fake(*args, **kwargs):
            seen[name].append({k: kwargs.pop(k) for k in keys if k in kwargs})
            return real(*args, **kwargs)  # the real stage, with its default for the recorded keywords

        monkeypatch.setattr(mod, name, fake)

    recorder(ibscope.capture, "capture")
    recorder(ibscope.estimate, "run_estimate")
    recorder(ibscope.ood, "run_ood")
    r = CliRunner().invoke(app, ["run", str(toy / "k.yaml"), "-o", str(toy / "k"), "-q", "--strict", "--skip-bad-shards",
                                 "--safe-globals", "collections.OrderedDict", "--safe-globals", "numpy.dtype"])
    assert r.exit_code == 0, r.output
    assert seen["capture"] == [{"safe_globals": ["numpy.dtype", "collections.OrderedDict"]}] * 2  # one store per probe set: p, q
    assert seen["run_estimate"] == [{"skip_bad_shards": True}]  # strict is checked by the run itself, at its end
    assert seen["run_ood"] == [{"skip_bad_shards": True}]
    stamp = json.loads((toy / "k" / ".ibscope" / "stages" / "estimate.json").read_text())
    assert "strict" not in stamp["config"]["estimate"] and stamp["config"]["skip_bad_shards"] is True
    # without the flags the keywords carry their defaults, and the changed settings re-run the stages
    cfg["capture"].pop("safe_globals")
    (toy / "k.yaml").write_text(yaml.safe_dump(cfg))
    for v in seen.values():
        v.clear()
    res = run_pipeline(toy / "k.yaml", out=toy / "k", progress=False, quiet=True)
    assert res.ran() == ["capture", "estimate", "ood"]
    assert seen == {"capture": [{"safe_globals": []}] * 2, "run_estimate": [{"skip_bad_shards": False}],
                    "run_ood": [{"skip_bad_shards": False}]}


@pytest.mark.slow
def test_strict_run_writes_every_stage_then_exits_4_and_toggling_it_reruns_nothing(toy):
    """A ReLU layer dead at one checkpoint: twonn cannot define an intrinsic dimension there (a
    noted row). `ibscope run --strict` still writes the figures and the report, then exits 4 naming
    the note; a re-run with --strict exits 4 again without re-running anything; without it, 0."""
    import torch

    (toy / "mynet.py").write_text(TOY_NET.replace("nn.Tanh()", "nn.ReLU()"))
    ns: dict = {}
    exec(TOY_NET.replace("nn.Tanh()", "nn.ReLU()"), ns)
    for p in (toy / "runs").glob("*.pt"):
        p.unlink()
    torch.manual_seed(1)
    net = ns["Net"](hidden=10)
    for epoch in range(3):
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        if epoch == 1:
            sd["fc1.bias"] = torch.full((10,), -100.0)  # every ReLU unit dead at epoch 1
        torch.save({"epoch": epoch, "state_dict": sd}, toy / "runs" / f"epoch_{epoch:03d}.pt")
    cfg = {**SANE, "capture": {"layers": ["act"]}, "estimate": {"estimators": ["twonn"]},
           "plot": {"kinds": ["curves"]}, "report": {"enabled": True}}
    (toy / "dead.yaml").write_text(yaml.safe_dump(cfg))
    r = ibscope("run", "dead.yaml", "-o", "dr", "--strict", cwd=toy)
    assert r.returncode == 4, r.stderr
    assert "have no value (estimate.strict / --strict)" in r.stderr and "checkpoint 1 (epoch 1)" in r.stderr
    assert "Every stage has written its outputs." in r.stderr
    out = toy / "dr"
    assert (out / "report.html").exists() and list((out / "figures").glob("*.png"))
    assert (out / "report.html").stat().st_mtime >= (out / "results.csv").stat().st_mtime
    rows = read_results(out / "results.csv").rows
    dead = [x for x in rows if x["layer"] == "act" and x["epoch"] == 1]
    assert len(dead) == 1 and dead[0]["value"] is None and dead[0]["note"]
    assert all(x["value"] is not None for x in rows if x["layer"] == "act" and x["epoch"] != 1)
    r = ibscope("run", "dead.yaml", "-o", "dr", "--strict", cwd=toy)
    assert r.returncode == 4 and "> " not in r.stderr.replace("skipped", ""), r.stderr  # nothing re-ran
    r = ibscope("run", "dead.yaml", "-o", "dr", cwd=toy)
    assert r.returncode == 0 and "> " not in r.stderr, r.stderr
