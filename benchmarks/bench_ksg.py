"""KSG-1 speed, memory and agreement: ibscope beside every peer, in one run.

ibscope runs ``ksg_terms(search="auto")`` (max-norm, k = 3, float64): a scipy cKDTree at small
joint dimension, its numba brute-force kernel otherwise (ibscope.estimators._knn.resolve_search).
Peers, on the same data in the same process (max-norm in every block):

  * cKDTree  -- NPEET's algorithm: joint k-NN query with p=inf, marginal counts with
                query_ball_point at radius nextafter(eps, 0);
  * sklearn  -- scikit-learn's ``_compute_mi_cc`` generalised to d dims: NearestNeighbors
                (chebyshev) for eps, KDTree(chebyshev).query_radius(count_only=True) for counts;
  * numpy    -- chunked numpy brute force (per-coordinate max-abs accumulation, np.partition);
  * bmi      -- ``bmi.estimators.KSGEnsembleFirstEstimator(neighborhoods=(k,), metric chebyshev)``
                (JAX brute force), run in a subprocess with ``--bmi-python`` (a venv holding
                benchmark-mi: it pins numpy < 2 and an old JAX, so it cannot share ibscope's venv).

The per-point terms of ibscope, cKDTree, sklearn and numpy are compared exactly. Peers that
would take minutes run on a subset of query points against all n reference points: their
tree build is timed apart and the query time is scaled by n / queries (the cost per query point
is the same for every point); the table says so (``q=``). bmi always runs on all n points
(n <= --bmi-max-n). Every time is a median of --repeats runs; ratios are peer / ibscope
(> 1: ibscope faster). Then: the growth exponent p of ibscope's time ~ n^p per d; the brute-force
kernel's throughput in pair-dims/s on one thread beside torch's float64 matmul on one thread
(the SIMD reference); and the peak memory that one KSG call adds, per implementation, at
--memory-n (each in a fresh subprocess).

  python benchmarks/bench_ksg.py                             # n in {2k, 10k, 50k}, d in {1, 5, 20, 100}
  python benchmarks/bench_ksg.py --bmi-python /tmp/bmivenv/bin/python
  python benchmarks/bench_ksg.py --n 10000 --dims 1,20 --repeats 5
  python benchmarks/bench_ksg.py --device cuda --n 100000 --dims 20   # ibscope on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma


def make_data(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = 0.6 * x + 0.8 * rng.standard_normal((n, d))  # I = -d/2 log(1 - 0.36) nats
    return x, y


def timed(fn, repeats):
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---- peers: each returns (build seconds, query seconds, psi(nx+1)+psi(ny+1) for the first q points)
def ckdtree_terms(x, y, k, q):
    t0 = time.perf_counter()
    xy = np.hstack([x, y])
    txy, tx, ty = cKDTree(xy), cKDTree(x), cKDTree(y)
    t1 = time.perf_counter()
    dist, _ = txy.query(xy[:q], k + 1, p=np.inf)
    eps = np.nextafter(dist[:, k], 0)
    nx = tx.query_ball_point(x[:q], eps, p=np.inf, return_length=True) - 1
    ny = ty.query_ball_point(y[:q], eps, p=np.inf, return_length=True) - 1
    out = digamma(nx + 1) + digamma(ny + 1)
    return t1 - t0, time.perf_counter() - t1, out


def sklearn_terms(x, y, k, q):
    from sklearn.neighbors import KDTree, NearestNeighbors

    t0 = time.perf_counter()
    xy = np.hstack([x, y])
    nn = NearestNeighbors(metric="chebyshev", n_neighbors=k).fit(xy)
    kx, ky = KDTree(x, metric="chebyshev"), KDTree(y, metric="chebyshev")
    t1 = time.perf_counter()
    # sklearn's _compute_mi_cc calls kneighbors() without X (the point itself excluded); for a
    # subset of queries the point itself is among the answers (distance 0): k + 1 neighbours
    radius = nn.kneighbors(xy[:q], n_neighbors=k + 1)[0][:, -1]
    radius = np.nextafter(radius, 0)
    nx = kx.query_radius(x[:q], radius, count_only=True) - 1
    ny = ky.query_radius(y[:q], radius, count_only=True) - 1
    out = digamma(nx + 1) + digamma(ny + 1)
    return t1 - t0, time.perf_counter() - t1, out


def _cheb(q, r):
    out = np.abs(q[:, None, 0] - r[None, :, 0])
    tmp = np.empty_like(out)
    for j in range(1, q.shape[1]):
        np.subtract(q[:, None, j], r[None, :, j], out=tmp)
        np.abs(tmp, out=tmp)
        np.maximum(out, tmp, out=out)
    return out


def numpy_terms(x, y, k, q, chunk=256):
    t1 = time.perf_counter()
    out = np.empty(q)
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        dx, dy = _cheb(x[s:e], x), _cheb(y[s:e], y)
        dz = np.maximum(dx, dy)
        dz[np.arange(e - s), np.arange(s, e)] = np.inf
        eps = np.partition(dz, k - 1, axis=1)[:, k - 1:k]
        nx = (dx < eps).sum(1) - 1
        ny = (dy < eps).sum(1) - 1
        out[s:e] = digamma(nx + 1) + digamma(ny + 1)
    return 0.0, time.perf_counter() - t1, out


def ibscope_terms(x, y, k, device, search="auto"):
    import torch

    from ibscope.estimators.ksg import ksg_search, ksg_terms

    tx = torch.from_numpy(x).to(device)
    ty = torch.from_numpy(y).to(device)
    terms = ksg_terms(tx, ty, k, search=search)
    if tx.is_cuda:
        torch.cuda.synchronize()
    return digamma(k) + digamma(len(x)) - terms.cpu().numpy(), ksg_search(tx, ty, "max", search)


BMI_SNIPPET = r"""
import json, sys, time, statistics
import numpy as np
from bmi.estimators import KSGEnsembleFirstEstimator
n, d, k, reps = map(int, sys.argv[1:5])
rng = np.random.default_rng(0)
x = rng.standard_normal((n, d)); y = 0.6 * x + 0.8 * rng.standard_normal((n, d))
est = KSGEnsembleFirstEstimator(neighborhoods=(k,), standardize=False, metric_x="chebyshev", metric_y="chebyshev")
est.estimate(x[:200], y[:200])  # JIT warm-up
ts = []
for _ in range(reps):
    t0 = time.perf_counter(); v = est.estimate(x, y); ts.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(ts), "value": float(v)}))
"""


MEMORY_SNIPPET = r"""
import json, resource, sys, time
import numpy as np
impl, n, d, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 3
rng = np.random.default_rng(0)
x = rng.standard_normal((n, d)); y = 0.6 * x + 0.8 * rng.standard_normal((n, d))
if impl == "ibscope":
    import torch
    from ibscope.estimators.ksg import ksg_terms
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    ksg_terms(tx[:300], ty[:300], k)  # imports and kernel compilation (cached) before the baseline
    run = lambda: ksg_terms(tx, ty, k)
elif impl == "ckdtree":
    from scipy.spatial import cKDTree
    def run():
        xy = np.hstack([x, y])
        dist, _ = cKDTree(xy).query(xy, k + 1, p=np.inf)
        eps = np.nextafter(dist[:, k], 0)
        return (cKDTree(x).query_ball_point(x, eps, p=np.inf, return_length=True),
                cKDTree(y).query_ball_point(y, eps, p=np.inf, return_length=True))
else:
    from sklearn.neighbors import KDTree, NearestNeighbors
    def run():
        xy = np.hstack([x, y])
        r = np.nextafter(NearestNeighbors(metric="chebyshev", n_neighbors=k).fit(xy).kneighbors()[0][:, -1], 0)
        return (KDTree(x, metric="chebyshev").query_radius(x, r, count_only=True),
                KDTree(y, metric="chebyshev").query_radius(y, r, count_only=True))
def status(key):  # kB from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
# ru_maxrss is a high-water mark since process start: the import of torch peaks above what a
# small call adds, which then reads as 0. Reset the peak (Linux: clear_refs 5) just before the
# call and take the new peak minus the resident size before it.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    t0 = time.perf_counter(); run(); dt = time.perf_counter() - t0
    peak = status("VmHWM")
except OSError:  # no /proc (not Linux): the lifetime high-water mark, a lower bound
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter(); run(); dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "added_mb": (peak - base) / 1024}))
"""


def kernel_throughput(threads: int = 1):
    """(max-norm kernel pair-dims/s, torch float64 matmul flop/s), both on ``threads`` threads."""
    import torch

    from ibscope.estimators import _cpu

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, d = 8000, 100
        x, y = make_data(n, d)
        _cpu.ksg_counts(x[:200], y[:200], 3)
        t, _ = timed(lambda: _cpu.ksg_counts(x, y, 3), 3)
        a = torch.randn(2048, 2048, dtype=torch.float64)
        torch.mm(a, a)
        tm, _ = timed(lambda: torch.mm(a, a), 5)
    finally:
        torch.set_num_threads(old)
    return n * n * 2 * d / t, 2 * 2048 ** 3 / tm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2000,10000,50000", help="comma-separated sample sizes")
    ap.add_argument("--dims", default="1,5,20,100", help="comma-separated d (= d_x = d_y)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="runs per implementation (median)")
    ap.add_argument("--peer-work", type=float, default=2e9,
                    help="peers answer all n queries when q x n x 2d <= this, else a subset (scaled)")
    ap.add_argument("--min-queries", type=int, default=200)
    ap.add_argument("--peers", default="ckdtree,sklearn,numpy", help="peers to run (bmi: see --bmi-python)")
    ap.add_argument("--bmi-python", default=None, help="python of a venv with benchmark-mi installed")
    ap.add_argument("--bmi-max-n", type=int, default=10000, help="bmi runs on all n points: only up to this n")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (ibscope only)")
    ap.add_argument("--threads", type=int, default=0, help="torch/numba threads (0: torch default)")
    ap.add_argument("--memory-n", type=int, default=50_000, help="n of the peak-memory runs (0 to skip)")
    ap.add_argument("--memory-dims", default="1,20")
    ap.add_argument("--no-kernel", action="store_true", help="skip the one-thread kernel throughput")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 2
    ns = [int(v) for v in args.n.split(",")]
    dims = [int(v) for v in args.dims.split(",")]
    peers = [p for p in args.peers.split(",") if p]
    k = args.k
    fns = {"ckdtree": ckdtree_terms, "sklearn": sklearn_terms, "numpy": numpy_terms}
    print(f"KSG-1 max-norm, k={k}, ibscope on {dev} (float64, torch threads {torch.get_num_threads()}), "
          f"medians of {args.repeats}; CPU cores {os.cpu_count()}, load average at start "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if dev.startswith("cuda"):
        print("GPU:", torch.cuda.get_device_name(torch.device(dev)))
    names = ["ckdtree", "sklearn", "numpy"] + (["bmi"] if args.bmi_python else [])
    names = [p for p in names if p in peers or p == "bmi"]
    print(f"{'n':>6} {'d':>4} {'ibscope s':>10} {'search':>6} " + " ".join(f"{p + ' s':>10} {'/ib':>6}" for p in names)
          + f" {'max|dterm|':>10} {'I':>7} {'truth':>7}", flush=True)
    rows = []
    for n in ns:
        for d in dims:
            x, y = make_data(n, d)
            ibscope_terms(x[:300], y[:300], k, dev)  # warm-up (kernels, CUDA context)
            t_ib, (terms_ib, how) = timed(lambda: ibscope_terms(x, y, k, dev), args.repeats)
            row = dict(n=n, d=d, ibscope_s=t_ib, search=how, peers={})
            diff = 0.0
            q = int(min(n, max(args.min_queries, args.peer_work / (n * 2 * d))))
            for p in names:
                if p == "bmi":
                    if n > args.bmi_max_n:
                        row["peers"][p] = None
                        continue
                    res = subprocess.run([args.bmi_python, "-c", BMI_SNIPPET, str(n), str(d), str(k), str(args.repeats)],
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        print(res.stderr[-2000:], file=sys.stderr)
                        row["peers"][p] = None
                        continue
                    row["peers"][p] = dict(seconds=json.loads(res.stdout.strip().splitlines()[-1])["seconds"], q=n)
                    continue
                runs = [fns[p](x, y, k, q) for _ in range(args.repeats)]
                build = statistics.median(r[0] for r in runs)
                query = statistics.median(r[1] for r in runs)
                row["peers"][p] = dict(seconds=build + query * n / q, q=q)
                diff = max(diff, float(np.abs(runs[-1][2] - terms_ib[:q]).max()))
            value = digamma(k) + digamma(n) - float(terms_ib.mean())
            row.update(max_term_diff=diff, value=value, truth=-d / 2 * math.log(1 - 0.36))
            rows.append(row)

            def cell(p):
                r = row["peers"].get(p)
                if r is None:
                    return f"{'-':>10} {'-':>6}"
                tag = "" if r["q"] == n else "*"
                return f"{r['seconds']:>9.2f}{tag or ' '} {r['seconds'] / t_ib:>6.2f}"

            print(f"{n:>6} {d:>4} {t_ib:>10.3f} {how:>6} " + " ".join(cell(p) for p in names)
                  + f" {diff:>10.1e} {value:>7.3f} {row['truth']:>7.3f}", flush=True)
    print("* subset of query points, build + query x n/q. Ratios: peer / ibscope (> 1: ibscope faster).")
    # growth exponent p (time ~ n^p) per d, least squares over the n's
    if len(ns) > 1:
        print("growth exponent p of ibscope's time ~ n^p:", ", ".join(
            f"d={d}: {np.polyfit(np.log(ns), np.log([r['ibscope_s'] for r in rows if r['d'] == d]), 1)[0]:.2f}"
            for d in dims))
    kern = None
    if not args.no_kernel and not dev.startswith("cuda"):
        pd, fl = kernel_throughput(1)
        kern = dict(pair_dims_per_s=pd, matmul_flops=fl)
        print(f"max-norm brute-force kernel, one thread, n=8000, d_x=d_y=100: {pd / 1e9:.2f} G pair-dims/s "
              f"(3 ops each: subtract, abs, max); torch float64 matmul on one thread: {fl / 1e9:.1f} GFLOP/s "
              f"= {fl / 2e9:.1f} G multiply-adds/s; kernel / matmul FMA rate: {pd / (fl / 2):.2f}")
    mem = {}
    if args.memory_n:
        for d in [int(v) for v in args.memory_dims.split(",")]:
            for impl in ["ibscope", "ckdtree", "sklearn"]:
                if impl != "ibscope" and d > 5:
                    continue  # the trees take many minutes at high d
                res = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, impl, str(args.memory_n), str(d)],
                                     capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    continue
                m = json.loads(res.stdout.strip().splitlines()[-1])
                mem[f"{impl} d={d}"] = m
                print(f"memory n={args.memory_n}, d={d}: {impl} adds {m['added_mb']:.0f} MiB peak RSS "
                      f"({m['seconds']:.1f} s)", flush=True)
        print(f"(an n x n float64 matrix would be {args.memory_n ** 2 * 8 / 2 ** 30:.1f} GiB)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "kernel": kern, "memory": mem}, f, indent=2)
    bad = [r for r in rows if r["max_term_diff"] > 1e-9]
    if bad:
        print("DISAGREEMENT between implementations at", [(r["n"], r["d"]) for r in bad], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
