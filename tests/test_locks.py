"""The writer lock: one writer at a time, a named holder in the refusal, released on exit or kill."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ibscope._locks import LockTimeout, check_timeout, lock_path_for, writer_lock
from ibscope.errors import EXIT_ERROR, UsageError, io_error


def _hold(target, seconds, ready):
    code = textwrap.dedent(f"""
        import time, pathlib
        from ibscope._locks import writer_lock
        with writer_lock({str(target)!r}, what="results file"):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep({seconds})
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def _wait_for(path, limit=30.0):
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < limit, "the holder process never took the lock"
        time.sleep(0.05)


def test_second_writer_refused_with_lock_file_and_holder(tmp_path):
    target = tmp_path / "results.csv"
    ready = tmp_path / "ready"
    p = _hold(target, 30, ready)
    try:
        _wait_for(ready)
        t0 = time.time()
        with pytest.raises(LockTimeout) as ei:
            with writer_lock(target, what="results file", timeout=0.3):
                pass
        assert 0.25 <= time.time() - t0 < 10
        msg = str(ei.value)
        assert str(lock_path_for(target)) in msg
        assert f"process {p.pid}" in msg
        assert ei.value.exit_code == EXIT_ERROR
    finally:
        p.kill()
        p.wait()
    # killed holder: the OS released the lock, the next writer gets it at once
    with writer_lock(target, what="results file", timeout=0):
        pass


def test_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    target = tmp_path / "store"
    ready = tmp_path / "ready"
    p = _hold(target, 1.0, ready)
    try:
        _wait_for(ready)
        t0 = time.time()
        with writer_lock(target, what="activation store", timeout=30):
            waited = time.time() - t0
        assert 0.2 < waited < 30
    finally:
        p.wait()


def test_reentrant_in_one_process(tmp_path):
    with writer_lock(tmp_path / "run", what="run folder", timeout=0):
        with writer_lock(tmp_path / "run", what="run folder", timeout=0):
            pass
        # still held by this process after the inner block ends
        code = f"from ibscope._locks import writer_lock\nwith writer_lock({str(tmp_path / 'run')!r}, what='run folder', timeout=0): pass"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "LockTimeout" in r.stderr


def test_check_timeout():
    assert check_timeout(None) == -1.0
    assert check_timeout(-5) == -1.0
    assert check_timeout("2.5") == 2.5
    with pytest.raises(UsageError):
        check_timeout("soon")


def test_io_error_names_path_and_errno():
    e = io_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "/x/checkpoints/y.h5")
    assert str(e).startswith("No space left on device (ENOSPC) while writing '/x/checkpoints/y.h5'.")
    assert "--resume" in e.hint
    # h5py reports errno inside its message
    h5 = OSError("Can't write data (file write failed: time = x, filename = 'a.h5', errno = 28, "
                 "error message = 'No space left on device')")
    assert str(io_error(h5, "a.h5")).startswith("No space left on device (ENOSPC) while writing 'a.h5'.")
    ro = io_error(OSError(errno.EROFS, "Read-only file system", "/ro/f"))
    assert "(EROFS)" in ro.message and "'/ro/f'" in ro.message and "read-only" in ro.hint


def test_enospc_hint_names_capture_resume_only_for_a_store():
    e = io_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "/d/acts/checkpoints/ckpt_000003.h5.tmp")
    # the same command again is refused (the store exists): the hint says to add --resume, nothing else
    assert "add --resume to the same `ibscope capture` command" in e.hint and "re-run the same command" not in e.hint
    for other in ("/d/results.csv", "/d/ood/ood_scores.h5", "/d/fig.png"):
        e = io_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), other)
        assert "capture" not in e.hint and "Free some space" in e.hint
