"""`ibscope estimate` results you can rely on: rows keyed on the content they were computed
from (never stale after a re-capture), one failing cell never costs the others (a note
instead of a value, --strict), one writer at a time (the results file's lock), and misuse
answered with exit 2 or 4. The user-facing cases run the `ibscope` command line (in-process,
typer's CliRunner: exit code and stderr as a user gets them), on tiny models captured in the
test; concurrent writers are real processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ibscope
from capture_support import tiny_tanh_run
from ibscope._locks import lock_path_for, writer_lock
from ibscope.capture import capture
from ibscope.errors import DataError
from ibscope.estimate import (DEFAULT_NULL_PERMUTATIONS, cell_key, code_version, null_setting, run_estimate,
                              summary_lines)
from ibscope.results import COLUMNS, KNOWN_UNITS, make_row, read_results, write_results
from ibscope.store import StoreWriter, file_sha256, open_store

IBSCOPE = [sys.executable, "-m", "ibscope.cli.main"]


class Ran:
    """What a command left: its exit code and stderr (named as subprocess.run's)."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def ib(*args, cwd=None):
    """``ibscope ARGS`` in this process (CliRunner; in ``cwd`` when given). Only documented exits
    count: an exception that escaped the command's error handling fails the test, as a traceback
    would have in a subprocess."""
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    with contextlib.chdir(cwd or os.getcwd()):
        res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.exception, res.output)
    return Ran(res.exit_code, res.stderr)


def ib_process(*args, timeout=300):
    """``ibscope ARGS`` in a process of its own (for the cases about processes: a lock held by another)."""
    return subprocess.run([*IBSCOPE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def flat(text: str) -> str:
    return " ".join(text.split())


def capture_cli(d: Path, probe: Path, out: Path, *extra):
    r = ib("capture", "-m", f"{d / 'tiny.py'}:make", "-c", d / "ck" / "*.pt", "-p", probe, "-l", "type:Tanh",
           "-o", out, "-q", *extra)
    assert r.returncode == 0, r.stderr
    return out


def retrain(d: Path, factor: float):
    """Same epoch numbers, new weights: every checkpoint's weights scaled, its metrics changed."""
    for e in range(3):
        p = d / "ck" / f"e{e}.pt"
        obj = torch.load(p, weights_only=True)
        obj["state_dict"] = {k: v * factor for k, v in obj["state_dict"].items()}
        obj["accuracy"] = 0.25 + 0.1 * e
        torch.save(obj, p)


def expected_keys(rows, store):
    """The key every row of ``store`` must carry: recomputed here from the store's hashes."""
    st = open_store(store)
    by_epoch = {c.epoch: c for c in st.checkpoints}
    out = []
    for r in rows:
        out.append(cell_key(config_hash=st.config_hash, probe_hash=st.probe_hash,
                            checkpoint_sha256=by_epoch[r["epoch"]].sha256, layer=r["layer"], estimator=r["estimator"],
                            quantity=r["quantity"], params=r["params"], code=code_version(r["estimator"]),
                            null=null_setting(r["estimator"], r["quantity"], r["params"], DEFAULT_NULL_PERMUTATIONS, 0)))
    return out


# ------------------------------------------------------------------------------------------ stale rows
@pytest.mark.slow
def test_refresh_after_overwrite_and_new_probe_equals_a_fresh_estimate(tmp_path):
    d = tiny_tanh_run(tmp_path, 96, "tiny_stale_model")
    acts = capture(f"{d / 'tiny.py'}:make", str(d / "ck" / "*.pt"), d / "probe.npz", ["type:Tanh"], d / "acts",
                   progress=False)
    res_csv, fresh_csv = d / "results.csv", d / "fresh.csv"
    before = run_estimate(acts, res_csv, ["binning", "effective-rank", "gaussian"], progress=False)
    st0 = open_store(acts)

    # 1. the run is retrained (same epochs, new weights) and re-captured over the old store
    retrain(d, 0.3)
    capture_cli(d, d / "probe.npz", acts, "--overwrite")
    r = ib("estimate", acts, "-o", res_csv, "-e", "binning", "-e", "effective-rank")
    assert r.returncode == 0, r.stderr
    # 3 checkpoints x 2 layers, all recomputed; the gaussian rows (not selected now) are dropped, said so
    assert "Wrote 24 rows (6 cell(s) computed, 0 row(s) kept)" in flat(r.stderr), r.stderr
    assert "Dropped 12 row(s) of estimator(s) gaussian" in flat(r.stderr) and "-e gaussian" in r.stderr
    run_estimate(acts, fresh_csv, ["binning", "effective-rank"], progress=False)
    refreshed, fresh = read_results(res_csv), read_results(fresh_csv)
    assert refreshed.rows == fresh.rows  # every column of every row, values exactly equal
    old = {(x["epoch"], x["layer"], x["estimator"], x["quantity"]): x["value"] for x in before.rows}
    changed = [x for x in refreshed.rows if x["value"] != old[(x["epoch"], x["layer"], x["estimator"], x["quantity"])]]
    assert len(changed) > len(refreshed) // 2  # the retrained run really gives other numbers
    assert refreshed.filter(quantity="accuracy", epoch=2).rows[0]["value"] == pytest.approx(0.45)
    st = open_store(acts)
    assert [x["key"] for x in refreshed.rows] == expected_keys(refreshed.rows, acts)
    (entry,) = refreshed.provenance["stores"]
    assert entry["content_hash"] == st.content_hash() != st0.content_hash()
    assert (entry["config_hash"], entry["probe_hash"]) == (st.config_hash, st.probe_hash)
    assert [c["sha256"] for c in entry["checkpoints"]] == [file_sha256(d / "ck" / f"e{e}.pt") for e in range(3)]
    assert entry == fresh.provenance["stores"][0]
    assert refreshed.provenance["rows_dropped_stale"] == 12 and refreshed.provenance["rows_recomputed_stale"] == 24

    # 2. the same checkpoints, re-captured from another probe file (64 samples instead of 96)
    g = np.random.default_rng(5)
    x = g.standard_normal((64, 4)).astype(np.float32)
    np.savez(d / "p64.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    capture(f"{d / 'tiny.py'}:make", str(d / "ck" / "*.pt"), d / "p64.npz", ["type:Tanh"], acts, overwrite=True,
            progress=False)
    r = ib("estimate", acts, "-o", res_csv, "-e", "binning", "-e", "effective-rank", "-q")
    assert r.returncode == 0, r.stderr
    fresh_csv.unlink()
    run_estimate(acts, fresh_csv, ["binning", "effective-rank"], progress=False)
    refreshed, fresh = read_results(res_csv), read_results(fresh_csv)
    assert refreshed.rows == fresh.rows
    assert {x["n_samples"] for x in refreshed.rows if x["estimator"] != "metrics"} == {64}
    st2 = open_store(acts)
    assert refreshed.provenance["stores"][0]["probe_hash"] == st2.probe_hash != st.probe_hash
    assert refreshed.provenance["stores"][0] == fresh.provenance["stores"][0]
    # 3. nothing changed: everything kept, nothing computed, the table byte for byte the same
    text = res_csv.read_text()
    r = ib("estimate", acts, "-o", res_csv, "-e", "binning", "-e", "effective-rank")
    assert r.returncode == 0 and "0 cell(s) computed, 24 row(s) kept" in flat(r.stderr), r.stderr
    assert res_csv.read_text() == text


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A tiny trained run captured twice: run 'a' (3 checkpoints) and run 'b'."""
    d = tiny_tanh_run(tmp_path_factory.mktemp("two"), 80, "tiny_two_model")
    for run in ("a", "b"):
        capture(f"{d / 'tiny.py'}:make", str(d / "ck" / "*.pt"), d / "probe.npz", ["type:Tanh"], d / f"acts_{run}",
                run=run, progress=False)
    return d


def test_missing_checkpoints_dropped_other_stores_kept(two_runs, tmp_path):
    d = two_runs
    a = tmp_path / "acts_a"
    shutil.copytree(d / "acts_a", a)
    out = tmp_path / "r.csv"
    both = run_estimate([a, d / "acts_b"], out, ["binning"], progress=False)
    b_rows = both.filter(run="b").rows
    b_entry = [e for e in both.provenance["stores"] if e["run"] == "b"][0]
    # store a re-captured from its first two checkpoints only
    shutil.rmtree(a)
    ck = tmp_path / "ck2"
    ck.mkdir()
    for e in (0, 1):
        shutil.copy(d / "ck" / f"e{e}.pt", ck / f"e{e}.pt")
    capture(f"{d / 'tiny.py'}:make", str(ck / "*.pt"), d / "probe.npz", ["type:Tanh"], a, run="a", progress=False)
    res = run_estimate([a], out, ["binning"], progress=False)
    assert res.provenance["cells_computed"] == 0  # epochs 0, 1: same checkpoint bytes, same keys: kept
    assert sorted({r["epoch"] for r in res.filter(run="a").rows}) == [0, 1]
    assert res.provenance["rows_dropped_missing_checkpoint"] == 2 * 2 + 2  # epoch 2: 2 layers x 2 + 2 metrics
    assert res.filter(run="b").rows == b_rows  # the store not named in this run: rows kept as they were
    stores = {e["run"]: e for e in res.provenance["stores"]}
    assert stores["b"] == b_entry and stores["a"]["n_checkpoints"] == 2
    assert [c["sha256"] for c in stores["a"]["checkpoints"]] == [file_sha256(ck / f"e{e}.pt") for e in (0, 1)]
    lines = summary_lines(res)
    assert any("Dropped 6 row(s) of checkpoint(s) no longer in the store: a/probe checkpoint 2 (epoch 2)" in x
               for x in lines), lines
    assert read_results(out).rows == res.rows


def test_key_covers_code_version_and_parameters(two_runs, tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    first = run_estimate(two_runs / "acts_a", out, ["binning", "effective-rank"], progress=False)
    assert first.provenance["cells_computed"] == 6
    assert run_estimate(two_runs / "acts_a", out, ["binning", "effective-rank"],
                        progress=False).provenance["cells_computed"] == 0
    # another ibscope version: the same store and settings are recomputed (rows keyed on the code)
    # (ibscope.estimate is a package: code versions are read in .cells, the provenance in .runner)
    monkeypatch.setattr("ibscope.estimate.cells.__version__", "99.0")
    monkeypatch.setattr("ibscope.estimate.runner.__version__", "99.0")
    again = run_estimate(two_runs / "acts_a", out, ["binning"], progress=False)
    assert again.provenance["cells_computed"] == 6 and again.provenance["rows_dropped_stale"] == 6
    assert again.filter(estimator="effective-rank").rows == []  # stale and not selected: dropped
    assert [r["value"] for r in again.rows] == [r["value"] for r in first.rows if r["estimator"] != "effective-rank"]
    assert all(r["key"] != f["key"] for r, f in zip(again.filter(estimator="binning").rows,
                                                      first.filter(estimator="binning").rows))
    # a hand-edited key does not match: that row is recomputed, the others are kept
    rows = read_results(out).rows
    rows[3]["key"] = "0" * 16
    rows[3]["value"] = 123.0
    write_results(out, rows, read_results(out).provenance)
    fixed = run_estimate(two_runs / "acts_a", out, ["binning"], progress=False)
    assert fixed.provenance["cells_computed"] == 1 and fixed.rows == again.rows


# ------------------------------------------------------------------------------------------ one cell, one failure
@pytest.fixture(scope="module")
def dead_store(tmp_path_factory):
    """ReLU layer dead at epoch 2 of 3 (bias -100: every unit outputs 0 for every sample)."""
    d = tmp_path_factory.mktemp("dead")
    src = "import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"
    (d / "relu.py").write_text(src)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    (d / "ck").mkdir()
    for ep in (1, 2, 3):
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        if ep == 2:
            sd["0.bias"] = torch.full((6,), -100.0)
        torch.save({"epoch": ep, "state_dict": sd}, d / "ck" / f"e{ep}.pt")
    x = torch.randn(150, 4, generator=torch.Generator().manual_seed(1))
    np.savez(d / "p.npz", x=x.numpy(), y=(x[:, 0] > 0).long().numpy())
    return capture(f"{d / 'relu.py'}:make", str(d / "ck" / "*.pt"), d / "p.npz", ["1"], d / "acts", progress=False)


@pytest.mark.slow
def test_dead_layer_cells_zero_or_noted_healthy_cells_written(dead_store, tmp_path):
    out = tmp_path / "r.csv"
    r = ib("estimate", dead_store, "-o", out, "-e", "ksg", "-e", "twonn", "-e", "binning", "-q")
    assert r.returncode == 0, r.stderr
    res = read_results(out)
    assert COLUMNS[-1] == "note"
    dead = [x for x in res.rows if x["epoch"] == 2]
    healthy = [x for x in res.rows if x["epoch"] != 2]
    assert len(healthy) == 2 * (2 + 2 + 1) and all(x["value"] is not None and x["note"] == "" for x in healthy)
    # the degenerate-input rule: a constant layer has I(X;T) = I(T;Y) = 0 exactly, said in the note ...
    for est in ("ksg", "binning"):
        for q in ("I(X;T)", "I(T;Y)"):
            (x,) = [x for x in dead if (x["estimator"], x["quantity"]) == (est, q)]
            assert x["value"] == 0.0, x
            assert x["note"].startswith(f"{est} {q} at layer '1', checkpoint 1 (epoch 2): T is constant (all 150 "
                                        "rows identical): the value is 0 exactly"), x["note"]
    # ... and its intrinsic dimension is undefined: the one noted cell
    noted = {(x["estimator"], x["quantity"]): x for x in dead if x["value"] is None}
    assert set(noted) == {("twonn", "intrinsic_dimension")}
    x = noted[("twonn", "intrinsic_dimension")]
    assert x["note"].startswith("twonn intrinsic_dimension not estimated at layer '1', checkpoint 1 (epoch 2): T is "
                                "constant (all 150 rows identical), and the intrinsic dimension of a single point is "
                                "undefined."), x["note"]
    assert "'y'" not in x["note"] and "'x'" not in x["note"]
    assert x["n_samples"] == 150 and x["unit"] in KNOWN_UNITS and x["key"]
    st = open_store(dead_store)
    ok = res.filter(estimator="ksg", quantity="I(T;Y)", epoch=3).rows[0]
    assert ok["value"] == pytest.approx(ibscope.mutual_information(st.activations(2, "1"), st.labels).value, abs=1e-12)
    err = flat(r.stderr)
    assert "1 cell(s) could not be estimated" in err and "Pass --strict" in err
    assert "twonn intrinsic_dimension not estimated at layer '1', checkpoint 1 (epoch 2): T is constant" in err
    assert "4 row(s) have a value and a warning in their note" in err
    # --strict: the same table is written, then exit 4
    strict = tmp_path / "strict.csv"
    r = ib("estimate", dead_store, "-o", strict, "-e", "ksg", "-e", "twonn", "-e", "binning", "-q", "--strict")
    assert r.returncode == 4, r.stderr
    assert "--strict: 1 cell(s) could not be estimated" in flat(r.stderr)
    assert read_results(strict).rows == res.rows
    # the default estimators (binning + ksg) no longer lose the run either
    r = ib("estimate", dead_store, "-o", tmp_path / "default.csv", "-q")
    assert r.returncode == 0 and len(read_results(tmp_path / "default.csv")) == 3 * 4, r.stderr


@pytest.mark.slow
def test_noted_cells_same_with_jobs_and_api_strict(dead_store, tmp_path):
    one = run_estimate(dead_store, tmp_path / "one.csv", ["ksg", "mle-id"], progress=False)
    two = run_estimate(dead_store, tmp_path / "two.csv", ["ksg", "mle-id"], jobs=2, progress=False)
    assert one.rows == two.rows  # values, nulls, notes and keys
    assert one.provenance["noted_cells"] == 1 and sum(r["value"] is None for r in one.rows) == 1
    with pytest.raises(DataError, match=r"1 cell\(s\) could not be estimated \(strict\)") as ei:
        run_estimate(dead_store, tmp_path / "s.csv", ["ksg", "mle-id"], progress=False, strict=True)
    assert ei.value.exit_code == 4 and read_results(tmp_path / "s.csv").rows == one.rows
    # a noted cell is tried again by the next run that selects its estimator (its cause may have been
    # repaired); the healthy cells are kept; a run that does not select it keeps the note as it is
    again = run_estimate(dead_store, tmp_path / "one.csv", ["ksg", "mle-id"], progress=False)
    assert again.provenance["cells_computed"] == 1 and again.provenance["noted_cells_computed_now"] == 1
    assert again.rows == one.rows and again.provenance["noted_cells"] == 1
    assert summary_lines(again)[0].startswith("1 cell(s) could not be estimated;")
    # (the dead cell's ksg rows have a value, 0 by the degenerate-input rule: not noted, not retried)
    only_ksg = run_estimate(dead_store, tmp_path / "one.csv", ["ksg"], progress=False)
    assert only_ksg.provenance["noted_cells"] == 1 and only_ksg.provenance["noted_cells_computed_now"] == 0
    assert "1 cell(s) could not be estimated (0 of them in this run" in summary_lines(only_ksg)[0]


def test_checkpoint_without_jacobians_is_one_noted_cell(tmp_path):
    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path / "s", config={"run": "r"}, sample_ids=np.arange(40), labels=np.arange(40) % 2,
                    layers={"a": {}, "b": {}}, inputs=rng.standard_normal((40, 3)))
    sv = np.sort(np.abs(rng.standard_normal((5, 3))), axis=1)[:, ::-1].copy()
    for e, jac in ((1, True), (2, False)):
        with w.checkpoint(epoch=e, step=None, path=f"c{e}.pt", sha256=str(e) * 64) as s:
            s.append("a", rng.standard_normal((40, 4)))
            s.append("b", rng.standard_normal((40, 2)))
            if jac:
                s.set_jacobian("a", sv, np.arange(5))
    res = run_estimate(tmp_path / "s", tmp_path / "r.csv", ["local-rank", "effective-rank"], progress=False)
    lr = res.filter(estimator="local-rank").rows
    assert [(x["epoch"], x["layer"]) for x in lr] == [(1, "a"), (2, "a")]  # layer b never had Jacobians: no rows
    assert lr[0]["value"] == ibscope.measure(sv, method="local-rank").value and lr[0]["note"] == ""
    assert lr[1]["value"] is None
    assert lr[1]["note"].startswith("local-rank local_rank not estimated at layer 'a', checkpoint 1 (epoch 2): ")
    assert "holds no Jacobian spectra for layer 'a' at checkpoint 1 (epoch 2)" in lr[1]["note"]
    er = res.filter(estimator="effective-rank").rows
    assert len(er) == 4 and all(x["value"] is not None for x in er)  # every other estimator's rows are there


# ------------------------------------------------------------------------------------------ locks
@pytest.mark.slow
def test_two_concurrent_estimates_lose_no_rows(two_runs, tmp_path):
    out = tmp_path / "conc.csv"
    acts = two_runs / "acts_a"
    # hold the lock while both start: they queue behind it and then race for it when it is released
    with writer_lock(out, what="results file"):
        procs = [subprocess.Popen([*IBSCOPE, "estimate", str(acts), "-o", str(out), "-e", est, "-q",
                                   "--lock-timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for est in ("binning", "effective-rank")]
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs) and not out.exists()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    res = read_results(out)
    assert len(res.filter(estimator="binning")) == 3 * 2 * 2 and len(res.filter(estimator="effective-rank")) == 3 * 2
    assert len(res.filter(estimator="metrics")) == 3 * 2 and len(res) == 24
    # the second merged into the first's table: its rows (and the 6 metrics rows) kept
    assert res.provenance["rows_kept_from_existing"] in (6 + 6, 12 + 6)
    # a held lock and --lock-timeout 0: a refusal naming the lock file and the holder; the table untouched
    text = out.read_text()
    with writer_lock(out, what="results file"):
        r = ib_process("estimate", acts, "-o", out, "-e", "gaussian", "-q", "--lock-timeout", "0")
    assert r.returncode == 1, r.stderr
    err = flat(r.stderr)
    assert str(lock_path_for(out)) in err and f"process {os.getpid()}" in err and "--lock-timeout" in err
    assert out.read_text() == text


# ------------------------------------------------------------------------------------------ misuse
@pytest.mark.slow
def test_misuse_is_usage_or_data_error(two_runs, tmp_path):
    acts = two_runs / "acts_a"
    good = tmp_path / "results.csv"
    run_estimate(acts, good, ["binning"], progress=False)
    r = ib("estimate", acts, "-o", ".", "-e", "binning", "-q", cwd=tmp_path)
    assert r.returncode == 2 and "The results file '.' is a directory" in flat(r.stderr), r.stderr
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 10)
    r = ib("plot", garbage)
    assert r.returncode == 4, r.stderr
    assert f"'{garbage}' is not an ibscope results table: it is not UTF-8 text" in flat(r.stderr)
    r = ib("estimate", acts, "-o", garbage, "-e", "binning", "-q")
    assert r.returncode == 4 and "is not an ibscope results table" in r.stderr
    assert garbage.read_bytes() == bytes(range(256)) * 10
    lines = good.read_text().splitlines()
    head = lines[0].split(",")
    bad = [lines[0]] + [",".join("furlongs" if i == head.index("unit") else v for i, v in enumerate(line.split(",")))
                        if j == 2 else line for j, line in enumerate(lines[1:], start=1)]
    furl = tmp_path / "furlongs.csv"
    furl.write_text("\n".join(bad) + "\n")
    r = ib("plot", furl, "-o", tmp_path / "pf")
    assert r.returncode == 4, r.stderr
    assert (f"{furl}:3: unknown unit 'furlongs'. Expected one of: bits, dimensions, exponent, loss, nats, ratio, value."
            in flat(r.stderr))
    assert not (tmp_path / "pf").exists()


@pytest.mark.slow
def test_outputs_under_a_file_are_usage_errors(two_runs, tmp_path):
    """-o below an existing file (or a file where a folder is needed): exit 2 naming both, before
    any work, and nothing written; for estimate, plot, report and capture alike."""
    acts = two_runs / "acts_a"
    good = tmp_path / "results.csv"
    run_estimate(acts, good, ["binning"], progress=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, needle in [
        (("estimate", acts, "-o", afile / "r.csv", "-e", "binning", "-q"), f"'{afile}' is a file, not a folder"),
        (("plot", good, "-o", afile), f"The figure folder '{afile}' is a file; expected a folder"),
        (("plot", good, "-o", afile / "sub"), f"'{afile}' is a file, not a folder"),
        (("report", good, "-o", afile / "r.html"), f"'{afile}' is a file, not a folder"),
        (("capture", "-m", "m.py:make", "-c", "*.pt", "-p", "p.npz", "-l", "0", "-o", afile / "sub", "-q"),
         f"'{afile}' is a file, not a folder"),
    ]:
        r = ib(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in flat(r.stderr), (args, r.stderr)
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "afile", "results.csv", "results.provenance.json"]


def test_plot_and_report_on_a_full_disk_name_the_file(two_runs, tmp_path, monkeypatch):
    import errno

    from ibscope.errors import IOFailure
    from ibscope.plot import plot_results
    from ibscope.report import write_report

    good = tmp_path / "results.csv"
    run_estimate(two_runs / "acts_a", good, ["binning"], progress=False)
    real = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(IOFailure) as ei:
        plot_results(good, tmp_path / "figs", kinds=["info-plane"])
    assert ei.value.message.startswith("No space left on device (ENOSPC) while writing the figure "
                                       f"'{tmp_path / 'figs'}")
    with pytest.raises(IOFailure) as ei:
        write_report(good, tmp_path / "r.html")
    assert ei.value.message == f"No space left on device (ENOSPC) while writing the report '{tmp_path / 'r.html'}'."
    monkeypatch.setattr(os, "replace", real)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_read_results_rules(tmp_path):
    row = dict(checkpoint=0, epoch=1, layer="fc", layer_index=0, estimator="binning", quantity="I(X;T)", unit="nats",
               n_samples=8, params={"n_bins": 3})
    p = write_results(tmp_path / "r.csv", [make_row(value=0.5, **row),
                                           make_row(value=None, note="why not", **{**row, "epoch": 2, "checkpoint": 1})])
    back = read_results(p).rows
    assert [(x["value"], x["note"], x["key"]) for x in back] == [(0.5, "", ""), (None, "why not", "")]
    text = p.read_text().replace(",why not", ",")
    p.write_text(text)
    with pytest.raises(DataError, match=r"r.csv:3: empty 'value' and no 'note' saying why"):
        read_results(p)
    # a plug-in's unit is accepted where the provenance declares it, and nowhere else
    q = write_results(tmp_path / "q.csv", [make_row(value=2.0, **{**row, "unit": "furlongs"})],
                      {"plugin_units": {"furlongs": ["my-mi"]}})
    assert read_results(q).rows[0]["unit"] == "furlongs"
    (tmp_path / "q.provenance.json").unlink()
    with pytest.raises(DataError, match=r"q.csv:2: unknown unit 'furlongs'"):
        read_results(q)
    # a table written before the key and note columns existed still reads
    old = tmp_path / "old.csv"
    old.write_text("run,split,checkpoint,epoch,step,layer,layer_index,estimator,quantity,value,unit,stderr,cap,"
                   "n_samples,dims,params\nrun,probe,0,1,,fc,0,binning,I(X;T),0.25,nats,,,8,3,{}\n")
    (x,) = read_results(old).rows
    assert (x["value"], x["key"], x["note"]) == (0.25, "", "")
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"layer,estimator,quantity,value,unit\nfc,b,q,1\x00,nats\n")
    with pytest.raises(DataError, match="is not an ibscope results table: it contains NUL bytes"):
        read_results(nul)
    with pytest.raises(DataError, match="is a directory; expected a results CSV file"):
        read_results(tmp_path)
    empty = write_results(tmp_path / "empty.csv", [])
    assert read_results(empty, allow_empty=True).rows == []
    with pytest.raises(DataError, match="holds no rows"):
        read_results(empty)


def test_check_treats_noted_rows_as_missing_points(tmp_path):
    from ibscope.check import run_check

    rows = [make_row(checkpoint=i, epoch=i, layer="fc", layer_index=0, estimator="ksg", quantity="I(T;Y)",
                     value=0.1 * i, unit="nats") for i in range(3)]
    base = write_results(tmp_path / "base.csv", rows)
    rows[1] = {**rows[1], "value": None, "note": "ksg I(T;Y) not estimated at layer 'fc', checkpoint 1 (epoch 1): x"}
    cur = write_results(tmp_path / "cur.csv", rows)
    rep = run_check(cur, baseline=base)
    (case,) = rep.cases
    assert case.status == "fail" and case.details["missing_points"] == [1]
    assert any("1 current row(s) have no value" in n and "checkpoint 1 (epoch 1)" in n for n in rep.notes)
    assert run_check(cur, baseline=base, missing="ignore").ok


def test_skip_bad_shards_is_passed_to_open_store(two_runs, tmp_path, monkeypatch):
    """open_store(path, skip_bad_shards=True) is asked for only with the flag; what the store
    skipped goes to the provenance."""
    import ibscope.store as store_mod
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    real = store_mod.open_store
    calls = []

    def fake(path, **kw):
        calls.append(kw)
        st = real(path)
        if kw.get("skip_bad_shards"):
            st.skipped = [{"file": "checkpoints/e000009_s0000000000_abc.h5", "reason": "truncated"}]
        return st

    monkeypatch.setattr(store_mod, "open_store", fake)
    run_estimate(two_runs / "acts_a", tmp_path / "plain.csv", ["binning"], progress=False)
    assert calls and all(kw == {} for kw in calls)
    calls.clear()
    res = CliRunner().invoke(app, ["estimate", str(two_runs / "acts_a"), "-o", str(tmp_path / "r.csv"), "-e",
                                   "binning", "--skip-bad-shards", "-q"])
    assert res.exit_code == 0, res.output
    assert calls and all(kw == {"skip_bad_shards": True} for kw in calls)
    # the store names each skipped shard once, when it is opened (tests/test_store_integrity.py); the
    # CLI does not repeat it at the end
    assert "e000009_s0000000000_abc.h5" not in res.output
    prov = read_results(tmp_path / "r.csv").provenance
    assert prov["stores"][0]["skipped_shards"] == [{"file": "checkpoints/e000009_s0000000000_abc.h5",
                                                    "reason": "truncated"}]
    assert prov["config"]["skip_bad_shards"] is True


def test_plugin_estimator_notes_units_and_crashes(two_runs, tmp_path, monkeypatch):
    """A plug-in's data error is a note like any other (its 'x' called T); its own unit is
    declared in the provenance so the table reads back; any other exception stays exit 5."""
    from dataclasses import dataclass
    from typing import ClassVar

    from ibscope.errors import PluginError
    from ibscope.estimators import registry
    from ibscope.estimators.base import Estimator, as_tensor

    @dataclass(frozen=True)
    class Flaky(Estimator):
        mode: str = "ok"
        name: ClassVar[str] = "test-flaky"
        kind: ClassVar[str] = "single"
        quantity: ClassVar[str] = "flakiness"
        unit: ClassVar[str] = "furlongs"

        def estimate(self, x):
            t = as_tensor(x, name="x", estimator=self.name)
            if self.mode == "crash":
                raise RuntimeError("boom")
            if self.mode == "data":
                raise DataError(f"{self.name}: 'x' is too dull to measure.")
            return self._make(float(t.abs().mean()), n=t.shape[0], dims=(t.shape[1],))

    registry.available()
    monkeypatch.setitem(registry._REGISTRY, "test-flaky", Flaky)
    monkeypatch.setitem(registry._SOURCES, "test-flaky", "plug-in tests:Flaky")
    acts = two_runs / "acts_a"
    res = run_estimate(acts, tmp_path / "ok.csv", ["test-flaky"], progress=False)
    st = open_store(acts)
    got = res.filter(estimator="test-flaky", epoch=1, layer=st.layers[0]).rows[0]
    assert got["unit"] == "furlongs" and got["value"] == pytest.approx(float(np.abs(st.activations(1, st.layers[0])).mean()))
    assert res.provenance["plugin_units"] == {"furlongs": ["test-flaky"]}
    assert "plug-in tests:Flaky" in res.provenance["estimators"]["test-flaky"]["code_version"]
    assert read_results(tmp_path / "ok.csv").rows == res.rows
    noted = run_estimate(acts, tmp_path / "data.csv", ["test-flaky"], {"test-flaky": {"mode": "data"}},
                         progress=False).filter(estimator="test-flaky").rows
    assert len(noted) == 6 and all(r["value"] is None for r in noted)
    assert noted[0]["note"] == (f"test-flaky flakiness not estimated at layer '{noted[0]['layer']}', checkpoint 0 "
                                f"(epoch 0): T is too dull to measure.")
    with pytest.raises(PluginError, match="plug-in estimator 'test-flaky' failed on flakiness: RuntimeError: boom") as ei:
        run_estimate(acts, tmp_path / "crash.csv", ["test-flaky"], {"test-flaky": {"mode": "crash"}}, progress=False)
    assert ei.value.exit_code == 5 and not (tmp_path / "crash.csv").exists()


# ------------------------------------------------------------------------------------------ kept rows, other stores
def test_kept_rows_take_the_store_current_checkpoint_index(tmp_path):
    """A checkpoint captured in between (capture --resume) shifts the indices of later ones: kept
    rows must take the store's current index, so the table equals a fresh estimate."""
    d = tiny_tanh_run(tmp_path, 64, "tiny_index_model")
    mk = f"{d / 'tiny.py'}:make"
    acts = capture(mk, [str(d / "ck" / "e0.pt"), str(d / "ck" / "e2.pt")], d / "probe.npz", ["type:Tanh"],
                   d / "acts", progress=False)
    run_estimate(acts, d / "r.csv", ["binning"], progress=False, null_permutations=0)
    capture(mk, str(d / "ck" / "*.pt"), d / "probe.npz", ["type:Tanh"], d / "acts", progress=False, resume=True)
    again = run_estimate(acts, d / "r.csv", ["binning"], progress=False, null_permutations=0)
    fresh = run_estimate(acts, d / "fresh.csv", ["binning"], progress=False, null_permutations=0)

    def ident(rows):
        return sorted((r["checkpoint"], r["epoch"], r["layer"], r["layer_index"], r["quantity"], r["value"])
                      for r in rows)

    assert ident(again.rows) == ident(fresh.rows)
    assert sorted({(r["checkpoint"], r["epoch"]) for r in again.rows}) == [(0, 0), (1, 1), (2, 2)]


def test_another_store_with_the_same_run_and_split_is_named(tmp_path):
    d = tiny_tanh_run(tmp_path, 64, "tiny_other_store_model")
    mk = f"{d / 'tiny.py'}:make"
    a = capture(mk, str(d / "ck" / "*.pt"), d / "probe.npz", ["type:Tanh"], d / "a", progress=False, run="r")
    b = capture(mk, str(d / "ck" / "e1.pt"), d / "probe.npz", ["1"], d / "b", progress=False, run="r")
    run_estimate(a, d / "mix.csv", ["binning"], progress=False, null_permutations=0)
    with pytest.warns(RuntimeWarning, match=r"came from the store '.*a'; this run's store '.*b' has the same run "
                                            r"and split, so its rows replace them"):
        run_estimate(b, d / "mix.csv", ["binning"], progress=False, null_permutations=0)
    # the same store again (or moved with its folder): no such warning
    shutil.move(str(b), str(d / "b2"))
    with warnings_recorded() as said:
        run_estimate(d / "b2", d / "mix.csv", ["binning"], progress=False, null_permutations=0)
    assert not [w for w in said if "came from the store" in str(w.message)]


def test_unreadable_results_file_is_named_with_the_way_out(tmp_path):
    d = tiny_tanh_run(tmp_path, 64, "tiny_unreadable_model")
    acts = capture(f"{d / 'tiny.py'}:make", str(d / "ck" / "*.pt"), d / "probe.npz", ["type:Tanh"], d / "acts",
                   progress=False)
    run_estimate(acts, d / "r.csv", ["binning"], progress=False, null_permutations=0)
    text = (d / "r.csv").read_text()
    (d / "r.csv").write_text(text[: len(text) // 2])
    r = ib("estimate", acts, "-o", d / "r.csv", "-e", "binning", "--force", "-q")
    assert r.returncode == 4
    msg = flat(r.stderr)
    assert "cannot be read, so this run cannot merge into it" in msg and "Move it aside" in msg
    assert (d / "r.csv").read_text() == text[: len(text) // 2]  # left as it was


class warnings_recorded:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        got = self._cm.__enter__()
        warnings.simplefilter("always")
        return got

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
