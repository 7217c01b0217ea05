"""`ibscope estimate` and `ibscope capture` on a real Dask cluster on 127.0.0.1.

A `dask scheduler` and two `dask worker` processes (worker B declares ``--resources GPU=1``)
are started by the module fixture on free ports (the scheduler picks its port and writes it
to a scheduler file) and stopped at the end. The tests check that the cluster gives the same
results as a local run, that GPU-capable cells go to the GPU worker, that killing a worker
mid-estimate still yields complete identical results, and that a worker that cannot see the
store stops the run with a message naming the worker and the path.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capture_support import load_models, mlp_data, save_probe, synthetic_store as _store, train_checkpoints, write_models

distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed (pip install ibscope[dask])")

from ibscope.cli.main import app  # noqa: E402
from ibscope.estimate import run_estimate  # noqa: E402
from ibscope.store import open_store  # noqa: E402

START_TIMEOUT = 90.0


def _spawn(args, cwd, log):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _worker(sched_file, cwd, log, name, *extra):
    return _spawn(["worker", "--scheduler-file", str(sched_file), "--nthreads", "1", "--no-nanny", "--no-dashboard",
                   "--host", "127.0.0.1", "--name", name, "--death-timeout", "60", *extra], cwd, log)


def _wait_workers(client, n, procs):
    t0 = time.time()
    while len(client.scheduler_info()["workers"]) < n:
        for p in procs:
            assert p.poll() is None, f"a dask process exited with {p.returncode}"
        assert time.time() - t0 < START_TIMEOUT, "dask workers did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, scheduler file, {name: address}, dir) of a running 2-worker cluster."""
    d = tmp_path_factory.mktemp("dask")
    (d / "workers").mkdir()
    sched_file = d / "scheduler.json"
    log = open(d / "dask.log", "w")
    procs = [_spawn(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                     str(sched_file)], d, log)]
    try:
        t0 = time.time()
        while not sched_file.exists():
            assert procs[0].poll() is None, (d / "dask.log").read_text()
            assert time.time() - t0 < START_TIMEOUT, "dask scheduler did not start"
            time.sleep(0.1)
        procs.append(_worker(sched_file, d / "workers", log, "A"))
        procs.append(_worker(sched_file, d / "workers", log, "B", "--resources", "GPU=1"))
        from distributed import Client

        with Client(scheduler_file=str(sched_file), timeout=START_TIMEOUT) as c:
            _wait_workers(c, 2, procs)
            names = {w["name"]: a for a, w in c.scheduler_info()["workers"].items()}
            addr = c.scheduler.address
        yield {"address": addr, "file": sched_file, "workers": names, "dir": d, "log": log}
    finally:
        for p in procs[1:]:  # the workers hold nothing worth a graceful close
            _stop(p, signal.SIGKILL)
        _stop(procs[0])
        log.close()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_rows(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert x == y


def _provenance(csv_path: Path) -> dict:
    return json.loads(csv_path.with_name(csv_path.stem + ".provenance.json").read_text())


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def test_estimate_scheduler_same_as_local_and_gpu_cells_on_gpu_worker(cluster, tmp_path):
    st = _store(tmp_path / "acts", n_ck=4)
    est = ["-e", "binning", "-e", "kde", "--null-permutations", "1", "-q"]
    local = invoke("estimate", st, "-o", tmp_path / "local.csv", *est)
    assert local.exit_code == 0, local.output
    res = invoke("estimate", st, "-o", tmp_path / "dask.csv", "--scheduler", cluster["address"], *est)
    assert res.exit_code == 0, res.output
    _same_rows(tmp_path / "local.csv", tmp_path / "dask.csv")
    eng = _provenance(tmp_path / "dask.csv")["engine"]
    assert eng["engine"] == "dask" and eng["scheduler"] == cluster["address"] and eng["source"] == "--scheduler"
    assert eng["workers"] == 2 and eng["gpu_workers"] == 1
    # 4 checkpoints x 3 layers; each cell split into its kde piece (GPU-capable) and its binning piece,
    # the pieces of one checkpoint sent as one task per kind: 4 x 2 tasks
    assert eng["tasks"] == 8 and sum(eng["tasks_by_worker"].values()) == 8
    gpu = eng["gpu_tasks_by_worker"]
    assert sum(gpu.values()) == 4 and all(cluster["workers"]["B"] in w for w in gpu), gpu
    assert _provenance(tmp_path / "local.csv")["engine"]["engine"] == "in-process"

    # --scheduler-file, and an unchanged result is kept (nothing recomputed, nothing submitted)
    again = invoke("estimate", st, "-o", tmp_path / "dask.csv", "--scheduler-file", cluster["file"], *est)
    assert again.exit_code == 0, again.output
    assert _provenance(tmp_path / "dask.csv")["cells_computed"] == 0
    _same_rows(tmp_path / "local.csv", tmp_path / "dask.csv")


def test_capture_scheduler_same_as_local_and_resume(cluster, tmp_path):
    mods = load_models(tmp_path)
    x, y = mlp_data(n=48)
    torch.manual_seed(0)
    train_checkpoints(mods.MLP(), x, y, tmp_path / "ck", epochs=(0, 1, 2, 3), steps=3)
    save_probe(tmp_path / "probe.npz", x.numpy(), y.numpy())
    args = ["capture", "-m", f"{write_models(tmp_path)}:MLP", "-c", str(tmp_path / "ck" / "*.pt"), "-p",
            tmp_path / "probe.npz", "-l", "type:Linear", "-l", "act", "-q", "--device", "cpu"]
    local = invoke(*args, "-o", tmp_path / "local")
    assert local.exit_code == 0, local.output
    # a partial store (the first two checkpoints) resumed on the cluster
    first = sorted((tmp_path / "ck").glob("*.pt"))[:2]
    part = invoke(*[a if a != str(tmp_path / "ck" / "*.pt") else str(first[0]) for a in args], "-c", first[1],
                  "-o", tmp_path / "dask")
    assert part.exit_code == 0, part.output
    res = invoke(*args, "-o", tmp_path / "dask", "--resume", "--scheduler", cluster["address"])
    assert res.exit_code == 0, res.output
    a, b = open_store(tmp_path / "local"), open_store(tmp_path / "dask")
    assert a.config_hash == b.config_hash and a.probe_hash == b.probe_hash and a.content_hash() == b.content_hash()
    assert len(b.checkpoints) == 4
    for ca, cb in zip(a.checkpoints, b.checkpoints):
        assert (ca.epoch, ca.sha256, ca.metrics) == (cb.epoch, cb.sha256, cb.metrics)
        for layer in a.layers:
            np.testing.assert_array_equal(a.activations(ca, layer), b.activations(cb, layer))
    workers = []
    for c in b.checkpoints:
        with h5py.File(c.shard, "r") as f:
            workers.append(f.attrs.get("worker"))
    assert workers[:2] == [None, None]  # captured here
    # capture tasks are GPU work: they went to the worker that declares a GPU (and ran on its CPU: no CUDA here)
    assert all(cluster["workers"]["B"] in w for w in workers[2:]), workers
    # estimates of both stores agree too
    r1 = run_estimate(tmp_path / "local", tmp_path / "r1.csv", ["binning"], progress=False, null_permutations=0)
    r2 = run_estimate(tmp_path / "dask", tmp_path / "r2.csv", ["binning"], progress=False, null_permutations=0,
                      scheduler=cluster["address"])
    assert [r["value"] for r in r1.rows] == [r["value"] for r in r2.rows]


def test_worker_that_cannot_see_the_store(cluster, tmp_path, monkeypatch):
    _store(tmp_path / "acts", n_ck=2)
    # /proc/self/cwd is this process's working folder here and each worker's own on the worker:
    # the path names the store for this process only, as a store on a disk the workers do not mount
    monkeypatch.chdir(tmp_path)
    blind = Path("/proc/self/cwd/acts")
    assert (blind / "manifest.h5").exists()
    res = invoke("estimate", blind, "-o", tmp_path / "r.csv", "-e", "binning", "--scheduler", cluster["address"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "Dask worker tcp://127.0.0.1:" in out and "cannot see the activation store '/proc/self/cwd/acts'" in out
    assert "same path" in out
    assert not (tmp_path / "r.csv").exists()  # nothing half-written


def test_killing_a_worker_mid_estimate_gives_complete_identical_results(cluster, tmp_path):
    from distributed import Client

    st = _store(tmp_path / "acts", n_ck=8, n=300)
    kw = dict(progress=False, null_permutations=2)
    local = run_estimate(st, tmp_path / "local.csv", ["kde", "binning"], **kw)
    with Client(scheduler_file=str(cluster["file"]), timeout=30) as c:
        victim = _worker(cluster["file"], cluster["dir"] / "workers", cluster["log"], "C")
        try:
            _wait_workers(c, 3, [victim])
            addr = next(a for a, w in c.scheduler_info()["workers"].items() if w["name"] == "C")
            got: dict = {}

            def run():
                try:
                    got["res"] = run_estimate(st, tmp_path / "dask.csv", ["kde", "binning"],
                                              scheduler=cluster["address"], **kw)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    got["exc"] = exc

            th = threading.Thread(target=run)
            th.start()
            t0 = time.time()
            while not c.processing(workers=[addr]).get(addr):
                assert th.is_alive() and time.time() - t0 < 60, "worker C never got a task"
                time.sleep(0.01)
            victim.kill()  # SIGKILL: the worker process dies with the tasks it holds
            victim.wait(10)
            th.join(120)
            assert not th.is_alive()
        finally:
            _stop(victim, signal.SIGKILL)
    assert "exc" not in got, got.get("exc")
    _same_rows(tmp_path / "local.csv", tmp_path / "dask.csv")
    eng = got["res"].provenance["engine"]
    assert eng["tasks"] == 8 * 2 and eng["workers"] == 3 and eng["workers_at_end"] == 2
    assert got["res"].provenance["complete"] is True


@pytest.mark.slow
def test_sweep_on_the_cluster(cluster, tmp_path):
    from test_sweep import tiny_config

    from ibscope.results import read_results

    cfg = tiny_config(tmp_path, "tanh", train={"epochs": 6, "checkpoints": 1})
    res = invoke("sweep", cfg, "--seeds", "0-1", "-o", tmp_path / "sw", "--until", "estimate", "--scheduler",
                 cluster["address"], "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert doc["engine"]["engine"] == "dask" and doc["engine"]["tasks"] == 2
    assert [r["status"] for r in doc["runs"]] == ["ok", "ok"]
    # runs are GPU work (training, capture): they went to the worker that declares a GPU
    assert all(cluster["workers"]["B"] in r["worker"] for r in doc["runs"]), doc["runs"]
    for r in doc["runs"]:
        assert read_results(r["results"]).unique("run") == [r["name"]]
    html = (tmp_path / "sw" / "tanh_report.html").read_text()
    assert "tanh: 2 seeds, median and 25-75 % band" in html
