"""`ibscope ood` writes its outputs as one set: a run killed between them leaves nothing that
looks complete, readers refuse a half set (exit 4), a re-run works, and `-o FILE` is a usage
error. The killed runs are real processes (SIGKILL); the other commands run in-process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ibscope.errors import DataError
from ibscope.ood import read_scores, run_ood
from ibscope.ood.runner import JSON_NAME, SCORES_NAME
from ibscope.report import write_report
from ibscope.results import make_row, write_results
from ibscope.store import StoreWriter


def _store(path: Path, x: np.ndarray) -> str:
    w = StoreWriter(path, config={"run": "r", "split": path.name}, sample_ids=np.arange(len(x)), labels=None,
                    layers={"feat": {"raw_shape": [x.shape[1]], "dims": x.shape[1], "reduction": "none"}})
    with w.checkpoint(epoch=1, step=None, path="ck.pt", sha256="a" * 64) as sh:
        sh.append("feat", x.astype(np.float32))
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("oodset")
    rng = np.random.default_rng(0)
    d = 6
    s = {"fit": _store(root / "fit", rng.standard_normal((300, d))),
         "test": _store(root / "test", rng.standard_normal((150, d))),
         "near": _store(root / "near", rng.standard_normal((150, d)) + 1.0),
         "far": _store(root / "far", rng.standard_normal((150, d)) * 3.0)}
    results = write_results(root / "results.csv", [make_row(checkpoint=0, epoch=1, layer="feat", layer_index=0,
                                                             estimator="effective-rank", quantity="effective_rank",
                                                             value=5.0, unit="dimensions", n_samples=300)])
    s["results"] = str(results)
    return s


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "IBSCOPE_DEBUG")}


def _ood_cmd(s, out, *extra):
    return [sys.executable, "-m", "ibscope.cli.main", "ood", "--fit", s["fit"], "--test", s["test"],
            "--ood", f"near={s['near']}", "--ood", f"far={s['far']}", "--layer", "feat", "--bootstrap", "20",
            "-q", "-o", str(out), *extra]


class Ran:
    """What a command left: its exit code and stderr (named as subprocess.run's)."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def _run(args):
    """A command that is not killed, in this process (typer's CliRunner: its exit code and
    stderr as a user gets them; the same environment as the killed runs). An exception that
    escaped the command's error handling fails the test, as a traceback would."""
    from typer.testing import CliRunner

    from ibscope.cli.main import app

    assert args[:3] == [sys.executable, "-m", "ibscope.cli.main"], args
    res = CliRunner().invoke(app, [str(a) for a in args[3:]], env={"FORCE_COLOR": None, "IBSCOPE_DEBUG": None})
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.exception, res.output)
    return Ran(res.exit_code, res.stderr)


def _kill_when(cmd, ready, timeout=180.0):
    """Start ``cmd`` and SIGKILL it as soon as ``ready()`` holds; return True if it was killed there."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _report(s, ood, html):
    return _run([sys.executable, "-m", "ibscope.cli.main", "report", s["results"], "--ood", str(ood), "-o", str(html)])


@pytest.mark.slow
def test_killed_between_outputs_leaves_no_half_set_and_rerun_works(stores, tmp_path):
    s = stores
    out = tmp_path / "ood_out"
    scores, marker = out / SCORES_NAME, out / JSON_NAME
    # 1) killed after ood_scores.h5 got its final name, while the figures are drawn
    killed = _kill_when(_ood_cmd(s, out), lambda: scores.exists() and not marker.exists())
    assert killed, "the run finished before the kill point was seen"
    assert scores.exists() and not marker.exists()          # the half set the issue saw ...
    r = _report(s, out, tmp_path / "r.html")                 # ... is refused by every reader
    assert r.returncode == 4, r.stderr
    assert "does not hold a complete `ibscope ood` output" in r.stderr and "did not finish" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r.html").exists()
    assert _report(s, marker, tmp_path / "r.html").returncode == 4
    with pytest.raises(DataError, match="did not finish"):
        read_scores(scores)

    # 2) a re-run completes the set; the readers accept it and its record matches the files
    r = _run(_ood_cmd(s, out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(marker.read_text())
    files = doc["output_set"]["files"]
    assert set(files) == {SCORES_NAME, "report.md", "report.html", *doc["figures"]} and len(doc["figures"]) >= 3
    for rel, meta in files.items():
        assert meta["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    sc = read_scores(scores)
    assert sc["checkpoint_0"]["sample_ids"]["test"].tolist() == list(range(150))
    assert sc["checkpoint_0"]["mahalanobis|none"]["near"].shape == (150,)
    assert _report(s, out, tmp_path / "r.html").returncode == 0 and (tmp_path / "r.html").exists()
    assert not list(out.rglob("*.tmp*"))

    # 3) killed while re-writing over a complete set: the old marker is gone before the new scores land
    old_inode = scores.stat().st_ino
    killed = _kill_when(_ood_cmd(s, out, "-d", "knn", "--k", "7"),
                        lambda: scores.exists() and scores.stat().st_ino != old_inode and not marker.exists())
    assert killed
    assert not marker.exists()
    assert _report(s, out, tmp_path / "r2.html").returncode == 4 and not (tmp_path / "r2.html").exists()
    assert _run(_ood_cmd(s, out, "-d", "knn", "--k", "7")).returncode == 0
    assert set(read_scores(out)["checkpoint_0"]) == {"sample_ids", "knn|none|k=7"}


def test_mixed_or_changed_set_is_refused(stores, tmp_path):
    s = stores
    out = tmp_path / "o"
    kw = dict(reductions=["none"], n_bootstrap=0, figures=False, progress=False, out_dir=out)
    run_ood(s["fit"], s["test"], {"near": s["near"]}, "feat", detectors=["mahalanobis"], **kw)
    first = (out / JSON_NAME).read_text()
    run_ood(s["fit"], s["test"], {"near": s["near"]}, "feat", detectors=["knn"], ks=[5], **kw)
    read_scores(out / SCORES_NAME)  # complete
    (out / JSON_NAME).write_text(first)  # metrics of run 1 next to the scores of run 2
    with pytest.raises(DataError, match="mixes the outputs of two runs"):
        read_scores(out / SCORES_NAME)
    with pytest.raises(DataError, match=r"'ood_scores.h5' is not the file"):
        write_report(s["results"], tmp_path / "r.html", ood=out)
    assert not (tmp_path / "r.html").exists()
    run_ood(s["fit"], s["test"], {"near": s["near"]}, "feat", detectors=["knn"], ks=[5], **kw)
    (out / "report.md").unlink()
    with pytest.raises(DataError, match="lists 'report.md', which is missing"):
        write_report(s["results"], tmp_path / "r.html", ood=out / JSON_NAME)


@pytest.mark.slow
def test_out_that_is_a_file_is_a_usage_error(stores, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x\n")
    for out, needle in [(afile, "is a file"), (afile / "sub", "lies inside")]:
        r = _run(_ood_cmd(stores, out))
        assert r.returncode == 2, r.stderr
        msg = " ".join(r.stderr.split())
        assert f"--out '{out}' {needle}" in msg and "writes a folder" in msg and "Unexpected" not in msg
    assert afile.read_text() == "x\n"


def test_disk_full_while_writing_scores_is_a_clean_error_and_no_half_set(stores, tmp_path, monkeypatch):
    """ENOSPC while ood_scores.h5 is written (fault injection on the HDF5 writes, os.pwrite):
    IOFailure naming the scores file, no *.tmp left, no ood_metrics.json (the set is absent), and
    the same call succeeds once there is space."""
    import errno

    from ibscope.errors import IOFailure

    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "ood"
    kw = dict(detectors=["mahalanobis"], reductions=["none"], out_dir=out, progress=False, n_bootstrap=10)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(IOFailure) as ei:
        run_ood(stores["fit"], stores["test"], {"near": stores["near"]}, "feat", **kw)
    monkeypatch.setattr(os, "pwrite", real)
    assert ei.value.message.startswith(f"No space left on device (ENOSPC) while writing the OOD scores '{out / SCORES_NAME}'.")
    assert not list(out.rglob("*.tmp")) and not (out / JSON_NAME).exists() and not (out / SCORES_NAME).exists()
    run_ood(stores["fit"], stores["test"], {"near": stores["near"]}, "feat", **kw)
    assert set(read_scores(out)) and (out / JSON_NAME).exists()
