"""Crash safety: a capture killed with SIGKILL mid-run leaves a store that opens and holds only
complete checkpoints; --resume finishes it with values identical to an uninterrupted capture."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capture_support import load_models, mlp_data, save_probe, train_checkpoints, write_models
from ibscope.capture import capture
from ibscope.cli.main import app
from ibscope.store import open_store

N_CKPT = 6


@pytest.mark.slow
def test_kill_9_then_resume_matches_fresh_capture(tmp_path):
    mods = load_models(tmp_path)
    x, y = mlp_data(n=64)
    torch.manual_seed(0)
    train_checkpoints(mods.MLP(), x, y, tmp_path / "ck", epochs=range(N_CKPT), steps=2)
    save_probe(tmp_path / "probe.npz", x.numpy(), y.numpy())
    # SlowMLP sleeps 40 ms per forward: 8 batches -> ~0.3 s per checkpoint, time enough to kill mid-run
    args = ["capture", "-m", f"{write_models(tmp_path)}:SlowMLP", "-c", str(tmp_path / "ck" / "*.pt"),
            "-p", str(tmp_path / "probe.npz"), "-l", "type:Linear", "-l", "act", "-b", "8", "-q"]
    out = tmp_path / "acts"
    proc = subprocess.Popen([sys.executable, "-m", "ibscope.cli.main", *args, "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = out / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shards.exists() and any(shards.glob("*.h5")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()

    st = open_store(out)  # opens fine after the crash
    done = len(st.checkpoints)
    assert 1 <= done < N_CKPT
    for c in st.checkpoints:
        with h5py.File(c.shard, "r") as f:
            assert bool(f.attrs["complete"]) and f["acts/fc1"].shape == (64, 10)
    stamps = {c.shard.name: c.shard.stat().st_mtime_ns for c in st.checkpoints}

    res = CliRunner().invoke(app, [*args, "-o", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert not list(shards.glob("*.tmp"))  # leftovers of the killed shard are gone
    resumed = open_store(out)
    assert [c.epoch for c in resumed.checkpoints] == list(range(N_CKPT))
    assert {c.shard.name: c.shard.stat().st_mtime_ns for c in resumed.checkpoints[:done]} == stamps

    fresh = open_store(capture(f"{write_models(tmp_path)}:SlowMLP", str(tmp_path / "ck" / "*.pt"), str(tmp_path / "probe.npz"),
                               ["type:Linear", "act"], tmp_path / "fresh", batch_size=8, progress=False))
    assert resumed.layers == fresh.layers == ["fc1", "act", "fc2"]
    assert resumed.config_hash == fresh.config_hash and resumed.probe_hash == fresh.probe_hash
    for a, b in zip(resumed.checkpoints, fresh.checkpoints):
        assert a.sha256 == b.sha256
        for layer in fresh.layers:
            np.testing.assert_array_equal(resumed.activations(a, layer), fresh.activations(b, layer))


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_complete_checkpoints(tmp_path):
    mods = load_models(tmp_path)
    x, y = mlp_data(n=64)
    train_checkpoints(mods.MLP(), x, y, tmp_path / "ck", epochs=range(4), steps=1)
    save_probe(tmp_path / "probe.npz", x.numpy(), y.numpy())
    out = tmp_path / "acts"
    proc = subprocess.Popen([sys.executable, "-m", "ibscope.cli.main", "capture", "-m", f"{write_models(tmp_path)}:SlowMLP",
                             "-c", str(tmp_path / "ck"), "-p", str(tmp_path / "probe.npz"), "-l", "fc1", "-b", "8", "-q",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "checkpoints").exists() and any((out / "checkpoints").glob("*.h5")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "--resume" in err and "Traceback" not in err
    st = open_store(out)
    assert 1 <= len(st.checkpoints) < 4
    assert not list((out / "checkpoints").glob("*.tmp"))  # the interrupted shard was removed, not left half-written
