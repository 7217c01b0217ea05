"""The executor layer without a cluster: choosing the engine, thread limits per local worker,
GPU routing decisions, credentials kept out of the provenance, and the errors of --scheduler."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from ibscope import executor as ex
from ibscope.errors import ClusterError, UsageError


def test_resolve_engine_choices_and_usage_errors(tmp_path):
    assert ex.resolve_engine(1, env={}) == ex.EngineSpec("local", 1, source="default")
    assert ex.resolve_engine(3, env={}).jobs == 3
    spec = ex.resolve_engine(1, "tcp://10.0.0.5:8786", env={})
    assert (spec.kind, spec.scheduler, spec.source, spec.remote) == ("dask", "tcp://10.0.0.5:8786", "--scheduler", True)
    # the DASK_SCHEDULER_ADDRESS convention, unless --jobs N or --scheduler local is asked for
    env = {ex.ENV_SCHEDULER: "tcp://h:1"}
    assert ex.resolve_engine(1, env=env).source == ex.ENV_SCHEDULER
    assert ex.resolve_engine(2, env=env).kind == "local"
    assert ex.resolve_engine(1, "local", env=env).kind == "local"
    f = tmp_path / "sched.json"
    f.write_text('{"address": "tcp://127.0.0.1:1"}')
    assert ex.resolve_engine(1, scheduler_file=f, env={}).scheduler_file == str(f)
    cases = [
        (dict(jobs=0), "--jobs must be an integer >= 1. Got 0."),
        (dict(jobs=2, scheduler="tcp://h:1"), "--jobs 2 and a Dask scheduler exclude each other"),
        (dict(scheduler="tcp://h:1", scheduler_file=f), "--scheduler and --scheduler-file exclude each other"),
        (dict(scheduler_file=tmp_path / "none.json"), "--scheduler-file '"),
        (dict(scheduler="nohost"), "--scheduler expects an address such as tcp://HOST:PORT"),
    ]
    for kw, msg in cases:
        with pytest.raises(UsageError) as e:
            ex.resolve_engine(**{"jobs": 1, **kw}, env={})
        assert msg in e.value.message


def test_threads_per_worker_never_oversubscribe():
    for cores in (1, 2, 3, 8, 64):
        for jobs in (1, 2, 3, 8, 100):
            t = ex.threads_per_worker(jobs, cores)
            assert t >= 1 and (jobs * t <= cores or t == 1)
    assert ex.threads_per_worker(2, 2) == 1 and ex.threads_per_worker(1, 8) == 8 and ex.threads_per_worker(3, 8) == 2


def test_worker_threads_env_override(monkeypatch):
    monkeypatch.setenv(ex.ENV_THREADS, "1")
    assert ex.threads_per_worker(1, 8) == 1 and ex.LocalPool(2).threads == 1
    monkeypatch.setenv(ex.ENV_THREADS, "3")
    assert ex.threads_per_worker(2, 2) == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(ex.ENV_THREADS, bad)
        with pytest.raises(UsageError, match=f"IBSCOPE_WORKER_THREADS must be a positive integer. Got '{bad}'"):
            ex.threads_per_worker(2, 2)


def _threads(payload, device):
    import torch

    from threadpoolctl import threadpool_info

    blas = sorted({p["num_threads"] for p in threadpool_info()})
    return {"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "blas": blas,
            "pid": os.getpid(), "device": device, "x": payload}


def test_local_pool_limits_each_worker_to_its_share_of_the_cores():
    pieces = [ex.Piece(_threads, i, label=f"p{i}") for i in range(4)]
    with ex.LocalPool(2, threads=1) as pool:
        outs = ex.run_pieces(pool, pieces)
        desc = pool.describe()
    assert [o.value["x"] for o in outs] == [0, 1, 2, 3]
    for o in outs:
        assert o.value["torch"] == 1 and o.value["omp"] == "1" and o.value["blas"] in ([], [1]), o.value
    assert len({o.value["pid"] for o in outs}) <= 2 and all(o.value["pid"] != os.getpid() for o in outs)
    assert desc == {"engine": "process-pool", "workers": 2, "threads_per_worker": 1, "cores": ex.available_cores(),
                    "tasks": 4}
    # the default share is cores // jobs
    assert ex.LocalPool(2).threads == max(1, ex.available_cores() // 2)


def _fails(payload, device):
    from ibscope.store import BadShard

    if payload == 1:
        raise BadShard("corrupt", "'x.h5' is truncated")
    return payload


def test_errors_of_pieces_come_back_with_message_and_hint():
    # BadShard has its own constructor: it would not survive pickling as it is
    with ex.LocalPool(2, threads=1) as pool, pytest.raises(Exception) as e:
        ex.run_pieces(pool, [ex.Piece(_fails, i) for i in range(3)])
    assert "'x.h5' is truncated" in str(e.value) and e.value.exit_code == 4


def test_gpu_routing_decisions():
    assert ex.gpu_capable("kde") and ex.gpu_capable("ksg") and ex.gpu_capable("infonce")
    assert not ex.gpu_capable("binning") and not ex.gpu_capable("effective-rank")
    assert not ex.gpu_capable("no-such-estimator")
    assert ex.task_device("auto", True, cuda_available=True) == "cuda"
    assert ex.task_device("auto", True, cuda_available=False) == "cpu"
    assert ex.task_device("auto", False, cuda_available=True) == "cpu"
    assert ex.task_device("cuda:1", False, cuda_available=True) == "cuda:1"
    assert ex.task_device("cpu", True, cuda_available=True) == "cpu"
    assert ex.remote_device("CUDA:0") == "cuda:0" and ex.remote_device(None) == "auto"
    with pytest.raises(UsageError, match="--device expects auto, cpu or cuda:N"):
        ex.remote_device("tpu")


def test_cells_split_by_gpu_capability_on_a_cluster_with_gpu_workers():
    """A cell of kde (GPU-capable) and binning becomes a GPU piece and a CPU piece when the
    cluster has GPU workers; one piece otherwise."""
    from ibscope.estimate import _pieces

    class Fake:
        name, in_process = "dask", False

        def __init__(self, gpus):
            self.gpus = gpus

        def gpu_workers(self):
            return self.gpus

    class Plan:
        run, split, path, content_hash, meta = "r", "probe", "acts", "h", {"inputs": None}

    class Ck:
        index = 0

    specs = [("binning", {}, "identity"), ("kde", {}, "identity")]
    want = {("binning", "I(X;T)"), ("kde", "I(X;T)"), ("kde", "I(T;Y)")}
    cells = [(Plan, Ck, "fc1", want), (Plan, Ck, "fc2", want)]
    two = _pieces(Fake(["tcp://gpu:1"]), cells, specs)
    # per checkpoint, one task of its layers' GPU pieces and one of their CPU pieces
    assert [(p.gpu, [(c["layer"], [s[0] for s in c["specs"]], sorted(c["want"])) for c in p.payload["cells"]])
            for p in two] == [
        (True, [("fc1", ["kde"], [("kde", "I(T;Y)"), ("kde", "I(X;T)")]),
                ("fc2", ["kde"], [("kde", "I(T;Y)"), ("kde", "I(X;T)")])]),
        (False, [("fc1", ["binning"], [("binning", "I(X;T)")]), ("fc2", ["binning"], [("binning", "I(X;T)")])])]
    one = _pieces(Fake([]), cells[:1], specs)
    assert len(one) == 1 and one[0].gpu and one[0].payload["want"] == want and one[0].payload["layer"] == "fc1"
    cell = two[0].payload["cells"][0]
    assert cell["path"] == os.path.abspath("acts") and cell["content_hash"] == "h" and "st" not in cell


def test_redact_address_drops_credentials():
    assert ex.redact_address("tls://alice:s3cret@10.1.2.3:8786") == "tls://10.1.2.3:8786"
    assert ex.redact_address("tcp://10.1.2.3:8786?token=abc#x") == "tcp://10.1.2.3:8786"
    assert ex.redact_address("bob:pw@host:1") == "host:1"
    assert ex.redact_address("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"


def test_scheduler_without_dask_says_how_to_install(tmp_path, monkeypatch):
    from ibscope.cli.main import app
    from capture_support import synthetic_store as _store

    st = _store(tmp_path / "acts", n_ck=1, n=40)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    res = CliRunner().invoke(app, ["estimate", str(st), "-o", str(tmp_path / "r.csv"), "-e", "binning",
                                   "--scheduler", "tcp://127.0.0.1:9"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "A Dask scheduler was given (--scheduler), but dask.distributed is not installed" in out
    assert 'pip install "ibscope[dask]"' in out
    assert not (tmp_path / "r.csv").exists()


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    import socket

    from ibscope.cli.main import app
    from capture_support import synthetic_store as _store

    st = _store(tmp_path / "acts", n_ck=1, n=40)
    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ex, "CONNECT_TIMEOUT", 1.0)
    res = CliRunner().invoke(app, ["estimate", str(st), "-o", str(tmp_path / "r.csv"), "-e", "binning",
                                   "--scheduler", f"tcp://user:pw@127.0.0.1:{port}"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert f"Could not reach the Dask scheduler at 'tcp://127.0.0.1:{port}' (--scheduler) (waiting up to 1 s)" in out
    assert "pw" not in out and "Start it with `dask scheduler`" in out
    assert not (tmp_path / "r.csv").exists()
    assert ClusterError.exit_code == 1
