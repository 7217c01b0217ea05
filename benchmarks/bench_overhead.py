"""Per-cell overhead of the information-plane binning workload: ibscope beside a numpy loop.

The workload is the demo's: the 12-10-7-5-4-3-2 tanh network on the 12-bit task (4,096 inputs),
13 checkpoints x 5 hidden layers = 65 cells; each cell is I(X;T) (X = the sample identity) and
I(T;Y) with Shwartz-Ziv & Tishby's binning as their code computes it (IDNNs: edges
linspace(-1, 1, 30) in float32, bins[digitize(v, bins) - 1]). The store is built here (the
network trained at one thread between log-spaced checkpoints; no download, no capture run).

Three ways, same data, same process (and one CLI subprocess per repeat):

  (a) numpy   -- a plain numpy loop over the 65 cells: IDNNs' digitize, unique rows through a void
                 view (np.unique), plug-in H(T), H(T|Y) and I(X;T) = H(X) + H(T) - H(X,T) (nats);
  (b) API     -- one ``ibscope.mutual_information(x, t, "binning", ...)`` call per quantity and
                 cell, arrays read from the store by ``open_store`` (once), as in a notebook;
  (c) CLI     -- ``ibscope estimate STORE -e binning ... --null-permutations 0`` (and with the
                 default null of 10 permutations) in a subprocess: the whole process minus a
                 process that only starts and imports what an estimate run imports, and the
                 provenance's ``wall_time_s`` / ``cpu_time_s`` (the cells alone).

On a shared, loaded machine wall times stretch with the load; CPU seconds (user + system of the
process) are the steadier figure, and both are printed.

Each figure is a median of --repeats; ratios are ibscope / numpy (<= 2 is the goal for the API)
and ms per cell. Values are compared: the largest |ibscope - numpy| over all 130 numbers.

  python benchmarks/bench_overhead.py              # builds the store in a temporary folder
  python benchmarks/bench_overhead.py --store DIR  # an existing store (e.g. ibscope-demo/tanh/stores/all)
"""

from __future__ import annotations

import argparse
import math
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EDGES = np.linspace(-1, 1, 30).astype(np.float32)
PARAMS = {"n_bins": 29, "range_min": -1.0, "range_max": 1.0, "outside": "idnns"}
LAYERS = ["hidden1", "hidden2", "hidden3", "hidden4", "hidden5"]


def make_store(path, *, n_checkpoints: int = 13, epochs: int = 1000, seed: int = 0) -> Path:
    """A demo-like store at ``path``: the tanh 12-10-7-5-4-3-2 network trained with full-batch
    Adam, its five hidden layers (and output) at ``n_checkpoints`` log-spaced epochs, inputs
    and labels stored. Deterministic for a seed."""
    import torch

    from ibscope.demo.models import ib_net
    from ibscope.demo.tasks import twelve_bit_task
    from ibscope.store import StoreWriter

    x, y = twelve_bit_task()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = ib_net("tanh")
        opt = torch.optim.Adam(model.parameters(), lr=0.005)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        stops = sorted({0, *np.unique(np.geomspace(1, epochs, n_checkpoints - 1).astype(int)).tolist()})
        while len(stops) < n_checkpoints:  # log spacing repeats small epochs: fill up at the end
            stops.append(stops[-1] + 1)
        names = [*model.hidden_names, "output"]
        with torch.no_grad():
            probe = [getattr(model, n) for n in names]
        w = StoreWriter(path, config={"run": "tanh", "split": "all", "model": "bench_overhead"},
                        sample_ids=np.arange(len(x), dtype=np.int64), labels=y.astype(np.int64),
                        layers={n: {"dims": int(getattr(model, n)[0].out_features)} for n in names},
                        inputs=x, input_shape=(x.shape[1],))
        epoch = 0
        for stop in stops:
            for _ in range(stop - epoch):
                opt.zero_grad()
                loss = torch.nn.functional.nll_loss(torch.log(model(xt).clamp_min(1e-12)), yt)
                loss.backward()
                opt.step()
            epoch = stop
            sha = f"{seed:08x}{stop:056x}"
            with torch.no_grad(), w.checkpoint(epoch=stop, step=None, path=f"epoch{stop}.pt", sha256=sha) as sw:
                h = xt
                for n, seq in zip(names, probe):
                    h = seq(h)
                    sw.append(n, h.numpy())
    finally:
        torch.set_num_threads(threads)
    return Path(path)


def _h_counts(c: np.ndarray) -> float:
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def numpy_cell(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(I(X;T), I(T;Y)) in nats, X = the sample identity, IDNNs' binning: digitize, unique rows
    through a void view, plug-in entropies from the counts."""
    sym = EDGES[np.digitize(t.reshape(-1), EDGES) - 1].reshape(t.shape)
    rows = np.ascontiguousarray(sym).view(np.dtype((np.void, sym.dtype.itemsize * sym.shape[1]))).reshape(-1)
    _, inv, cnt = np.unique(rows, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    n = len(t)
    h_t = _h_counts(cnt)
    # X = n distinct ids: H(X) = log n and every (x, t) pair is distinct, H(X, T) = log n
    i_xt = math.log(n) + h_t - math.log(n)
    _, ycodes = np.unique(y, return_inverse=True)
    k = int(inv.max()) + 1
    h_ty = _h_counts(np.bincount(ycodes.reshape(-1) * k + inv))
    h_y = _h_counts(np.bincount(ycodes.reshape(-1)))
    return i_xt, h_t + h_y - h_ty


def run_numpy(acts, y):
    return [numpy_cell(t, y) for t in acts]


def run_api(acts, y):
    import ibscope

    ids = np.arange(len(y), dtype=np.int64)
    out = []
    for t in acts:
        out.append((ibscope.mutual_information(ids, t, "binning", **PARAMS).value,
                    ibscope.mutual_information(t, y, "binning", **PARAMS).value))
    return out


def _child_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _proc(args, env) -> tuple[float, float]:
    """(wall, CPU) seconds of one child process."""
    c0, t0 = _child_cpu(), time.perf_counter()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, _child_cpu() - c0


def _timed(fn, clock):
    t0 = clock()
    out = fn()
    return clock() - t0, out


def _cli(store: Path, out: Path, nulls: int, env: dict) -> tuple[float, float, float]:
    """(wall, CPU seconds of one `ibscope estimate` process, the cells' wall_time_s and cpu_time_s from its
    provenance)."""
    args = [sys.executable, "-m", "ibscope.cli.main", "estimate", str(store), "-o", str(out), "-e", "binning", "--force",
            "-q", "--device", "cpu", "--null-permutations", str(nulls), *[a for n in LAYERS for a in ("-l", n)],
            *[a for k, v in PARAMS.items() for a in ("--param", f"binning.{k}={v}")]]
    wall, cpu = _proc(args, env)
    prov = json.loads(out.with_name(out.stem + ".provenance.json").read_text())
    return wall, cpu, float(prov["wall_time_s"]), float(prov.get("cpu_time_s", "nan"))  # nan: an ibscope without cpu_time_s


def _startup(env: dict) -> tuple[float, float]:
    """`ibscope --version`: Python start-up and the CLI's own imports."""
    return _proc([sys.executable, "-m", "ibscope.cli.main", "--version"], env)


def _imports(env: dict) -> tuple[float, float]:
    """Start-up plus the imports of an estimate run (torch, numpy, h5py, the runner, every registered estimator)."""
    # what a run of `ibscope estimate -e binning` imports (compared with sys.modules after one)
    return _proc([sys.executable, "-c", "import ibscope.cli.main, ibscope.cli.estimate, torch, numpy, h5py, rich.console, "
                  "pydantic, typer._adapters, filelock, zoneinfo, decimal, ibscope.estimate, ibscope.store, ibscope._device, ibscope._order; "
                  "from ibscope.estimators import registry; registry._load()"], env)


def thread_crossover(repeats: int) -> None:
    """Binning (IDNNs' setting) at 1 thread and at torch's default, n x d from 10^4 to ~10^7 elements."""
    import torch

    from ibscope.estimators import binning, registry

    est = registry.create("binning", **PARAMS)

    def cold():
        binning._SIDES.clear()  # no prepared side kept from the previous repeat
        return est.estimate(t, y)

    default = torch.get_num_threads()
    rng = np.random.default_rng(0)
    print(f"\nthreads: binning I(T;Y) (estimator called directly, nothing kept between repeats), 1 thread vs "
          f"{default} (wall medians of {repeats})")
    print(f"{'n x d':>12} {'1 thread ms':>12} {f'{default} threads ms':>14} {'ratio':>7}")
    for n, d in ((1000, 10), (4096, 10), (16384, 10), (65536, 10), (262144, 10), (1048576, 10)):
        t = np.tanh(rng.standard_normal((n, d))).astype(np.float32)
        y = rng.integers(0, 2, n)
        times = {1: [], default: []}
        for _ in range(repeats):
            for k in times:
                torch.set_num_threads(k)
                times[k].append(_timed(cold, time.perf_counter)[0])
        torch.set_num_threads(default)
        a, b = statistics.median(times[1]), statistics.median(times[default])
        print(f"{n * (d + 1):>12,} {a * 1e3:>12.2f} {b * 1e3:>14.2f} {b / a:>7.2f}")


def main(argv=None) -> int:
    import warnings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="an existing store (default: build the demo-like one in a temporary folder)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cli-repeats", type=int, default=3)
    ap.add_argument("--threads", action="store_true", help="also measure 1 thread vs the default per problem size")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # saturation warnings of every cell: the numbers are the point here

    from ibscope.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else make_store(Path(tmp) / "store")
        st = open_store(store)
        acts = [np.asarray(st.activations(c, n)) for c in st.checkpoints for n in LAYERS]
        y = np.asarray(st.labels)
        getattr(st, "close", lambda: None)()  # the shard kept open between reads
        cells = len(acts)
        import torch

        print(f"store {store}: {cells} cells ({cells // len(LAYERS)} checkpoints x {len(LAYERS)} layers), "
              f"n = {len(y)}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; binning {PARAMS}")
        run_numpy(acts[:2], y), run_api(acts[:2], y)  # warm-up (imports, caches)
        wall = {"numpy": [], "api": []}
        cpu = {"numpy": [], "api": []}
        ref = got = None
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            for name, fn in (("numpy", run_numpy), ("api", run_api)):
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn(acts, y)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                ref, got = (out, got) if name == "numpy" else (ref, out)
        diff = max(abs(a - b) for p, q in zip(ref, got) for a, b in zip(p, q))
        med = {k: statistics.median(v) for k, v in wall.items()}
        medc = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"\n{'':24} {'wall s':>8} {'CPU s':>8} {'ms/cell':>8} {'ratio (wall)':>13} {'ratio (CPU)':>12}")
        for k, label in (("numpy", "(a) numpy loop"), ("api", "(b) ibscope API per cell")):
            print(f"{label:24} {med[k]:8.3f} {medc[k]:8.3f} {1e3 * med[k] / cells:8.2f} "
                  f"{med[k] / med['numpy']:13.2f} {medc[k] / medc['numpy']:12.2f}")
        print(f"largest |API - numpy| over {2 * cells} values: {diff:.1e} nats")

        env = dict(os.environ)
        out = Path(tmp) / "r.csv"
        _startup(env)
        m = {k: [] for k in ("start", "imports", "null0", "null10")}
        for _ in range(args.cli_repeats):
            m["start"].append(_startup(env))
            m["imports"].append(_imports(env))
            m["null0"].append(_cli(store, out, 0, env))
            m["null10"].append(_cli(store, out, 10, env))
        med = {k: [statistics.median(x[i] for x in v) for i in range(len(v[0]))] for k, v in m.items()}
        print(f"\n(c) ibscope estimate (CLI), medians of {args.cli_repeats} processes:{'':14}wall s    CPU s")
        print(f"  `ibscope --version` (start-up){'':28}{med['start'][0]:7.3f}  {med['start'][1]:7.3f}")
        print(f"  start-up + imports (torch, h5py, runner, estimators)     {med['imports'][0]:7.3f}  "
              f"{med['imports'][1]:7.3f}")
        for k, label in (("null0", "--null-permutations 0"), ("null10", "default null (10 permutations)")):
            w, c, cells_wall, cells_cpu = med[k]
            print(f"  estimate, {label:31}{'':17}{w:7.3f}  {c:7.3f}")
            print(f"      per cell, the process minus start-up and imports: {1e3 * (w - med['imports'][0]) / cells:6.2f} ms "
                  f"wall, {1e3 * (c - med['imports'][1]) / cells:6.2f} ms CPU")
            print(f"      per cell, the cells alone (provenance wall_time_s, cpu_time_s): {1e3 * cells_wall / cells:6.2f} ms "
                  f"wall, {1e3 * cells_cpu / cells:6.2f} ms CPU")
    if args.threads:
        thread_crossover(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
