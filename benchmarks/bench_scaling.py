"""Scaling of `ibscope estimate` over workers: local processes and a Dask cluster, in one run.

Workload (issue 16 / 17): a synthetic store of --checkpoints x --layers tanh layers of
--width units over --n probe samples, estimated with KDE (I(X;T) and I(T;Y) per cell; no
permutation null, so that the time is the cells' own work), --force each time. Engines,
same store, same process:

  * local-1  -- ``--jobs 1``: every cell in this process (torch's default threads);
  * local-1/1t -- the same with torch limited to 1 thread (what each --jobs 2 worker gets on
                2 cores): tells the parallel speed-up from the end of thread oversubscription;
  * local-2  -- ``--jobs 2``: two spawned worker processes, cores // 2 threads each (the pool's
                start-up, incl. importing torch in each worker, is part of the time; a --jobs 2
                run of the small job, nearly all start-up, is printed too);
  * dask-1   -- a real `dask scheduler` + 1 `dask worker --nthreads 1` on 127.0.0.1 (started
                once, warm: the first, untimed run imports torch on the worker);
  * dask-1/1t -- 1 worker limited to 1 thread (IBSCOPE_WORKER_THREADS=1);
  * dask-2   -- the same with 2 workers (each limited to its share of the cores: 1 thread).
                dask-1/1t / dask-2 is the parallel speed-up alone: warm workers, same threads.

Each time is a median of --repeats. Ratios: local-1 / local-2 (the --jobs 2 speed-up),
dask-1 / dask-2, and the Dask overhead on a small job (--small: 4 checkpoints x 2 layers,
binning, 200 samples) as dask-1 time / local-1 time. Results of every engine are checked to be
identical to local-1.

  python benchmarks/bench_scaling.py                       # 40 x 6 cells, n = 1000
  python benchmarks/bench_scaling.py --n 2000 --repeats 5
  python benchmarks/bench_scaling.py --skip-dask           # local engines only

The machine's load matters: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, n_ck: int, n_layers: int, n: int, width: int, seed: int = 0) -> Path:
    from ibscope.store import StoreWriter

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    layers = {f"l{i}": {"dims": width} for i in range(n_layers)}
    w = StoreWriter(path, config={"run": "bench", "split": "probe", "model": "synthetic"}, sample_ids=np.arange(n),
                    labels=y, layers=layers, inputs=x, compression="none")
    for e in range(n_ck):
        with w.checkpoint(epoch=e, step=None, path=f"ck{e}.pt", sha256=f"{e:064x}") as sh:
            h = x
            for name in layers:
                m = rng.normal(size=(h.shape[1], width)).astype(np.float32) * (0.5 + e / n_ck)
                h = np.tanh(h @ m).astype(np.float32)
                sh.append(name, h)
    return path


def values(path: Path) -> list:
    with open(path, newline="") as f:
        return [(r["checkpoint"], r["layer"], r["estimator"], r["quantity"], r["value"]) for r in csv.DictReader(f)]


class Cluster:
    """A `dask scheduler` and ``k`` `dask worker --nthreads 1` processes on 127.0.0.1."""

    def __init__(self, k: int, d: Path, threads: int | None = None):
        self.d = d
        self.file = d / f"scheduler-{k}-{threads}.json"
        self.log = open(d / f"dask-{k}-{threads}.log", "w")
        env = dict(os.environ)
        env.pop("DASK_SCHEDULER_ADDRESS", None)
        if threads:
            env["IBSCOPE_WORKER_THREADS"] = str(threads)
        self.procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--no-dashboard", "--scheduler-file", str(self.file)], stdout=self.log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=d)]
        t0 = time.time()
        while not self.file.exists():
            if time.time() - t0 > 120:
                raise RuntimeError("dask scheduler did not start; see " + str(d))
            time.sleep(0.1)
        for i in range(k):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(self.file), "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"], stdout=self.log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=d))
        from distributed import Client

        with Client(scheduler_file=str(self.file), timeout=120) as c:
            c.wait_for_workers(k, timeout=120)
            self.address = c.scheduler.address

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=40)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--estimator", default="kde")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-dask", action="store_true")
    args = ap.parse_args()

    from ibscope.estimate import run_estimate
    from ibscope.executor import available_cores

    print(f"cores available: {available_cores()}; load average at start: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="ibscope-bench-scaling-"))
    big = make_store(tmp / "big", args.checkpoints, args.layers, args.n, args.width)
    small = make_store(tmp / "small", 4, 2, 200, args.width, seed=1)
    cells = args.checkpoints * args.layers
    print(f"workload: {args.checkpoints} checkpoints x {args.layers} layers = {cells} cells, n = {args.n}, "
          f"width {args.width}, estimator {args.estimator}; medians of {args.repeats}")

    def run(store, out, est, **kw):
        run_estimate(store, out, [est], force=True, progress=False, null_permutations=0, **kw)

    def timed(store, est, tag, **kw):
        out = tmp / f"{tag}.csv"
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            run(store, out, est, **kw)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), values(out), times

    res = {}
    run(small, tmp / "warm-small.csv", args.estimator, jobs=1)  # numba's JIT and first imports, untimed
    t0 = time.perf_counter()
    run(small, tmp / "warm-pool.csv", "binning", jobs=2)
    pool_start = time.perf_counter() - t0  # nearly all of it: spawning 2 workers that import torch
    res["local-1"] = timed(big, args.estimator, "local-1", jobs=1)
    import torch

    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two --jobs 2 workers gets on 2 cores
    try:
        res["local-1/1t"] = timed(big, args.estimator, "local-1-1t", jobs=1)
    finally:
        torch.set_num_threads(default_threads)
    res["local-2"] = timed(big, args.estimator, "local-2", jobs=2)
    small_local = timed(small, "binning", "small-local", jobs=1)
    small_dask = None
    if not args.skip_dask:
        for k, threads in ((1, None), (1, 1), (2, None)):
            cl = Cluster(k, tmp, threads)
            tag = f"dask-{k}" + ("/1t" if threads else "")
            try:
                run(small, tmp / "warm-small.csv", "binning", scheduler=cl.address)  # imports on the workers, untimed
                run(big, tmp / "warm-big.csv", args.estimator, scheduler=cl.address)
                res[tag] = timed(big, args.estimator, tag.replace("/", "-"), scheduler=cl.address)
                if threads:
                    continue
                if k == 1:
                    small_dask = timed(small, "binning", "small-dask", scheduler=cl.address)
            finally:
                cl.close()

    ref = res["local-1"][1]
    print(f"\n{'engine':<9} {'median s':>9} {'per cell ms':>12}  runs (s)           identical to local-1")
    for k, (t, vals, times) in res.items():
        print(f"{k:<9} {t:9.2f} {1000 * t / cells:12.1f}  {', '.join(f'{x:.2f}' for x in times):<18} {vals == ref}")
    print("\nratios (higher = faster with more workers):")
    print(f"  --jobs 2 speed-up   local-1 / local-2 = {res['local-1'][0] / res['local-2'][0]:.2f}x")
    print(f"  --jobs 2 vs one 1-thread process    local-1/1t / local-2 = {res['local-1/1t'][0] / res['local-2'][0]:.2f}x")
    print(f"  (a --jobs 2 run on an 8-cell binning job took {pool_start:.2f} s: nearly all of it the pool's start-up, "
          f"two spawned workers importing torch)")
    if "dask-2" in res:
        print(f"  Dask 2 workers      dask-1 / dask-2   = {res['dask-1'][0] / res['dask-2'][0]:.2f}x")
        print(f"  Dask 2 workers vs 1 worker of 1 thread (warm, same threads per worker): dask-1/1t / dask-2 = "
              f"{res['dask-1/1t'][0] / res['dask-2'][0]:.2f}x")
        print(f"  Dask-1 vs local-1   local-1 / dask-1  = {res['local-1'][0] / res['dask-1'][0]:.2f}x")
    if small_dask is not None:
        print(f"small job (4 x 2 cells, binning, n = 200): local {small_local[0]:.3f} s, Dask 1 worker "
              f"{small_dask[0]:.3f} s: Dask overhead = {small_dask[0] / small_local[0]:.2f}x local "
              f"(+{(small_dask[0] - small_local[0]) * 1000 / 8:.1f} ms per cell); identical: "
              f"{small_dask[1] == small_local[1]}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
