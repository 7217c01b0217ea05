"""KSG-1 speed and agreement: ibscope (torch, chunked) vs a KD-tree KSG vs chunked numpy brute force.

Peers, measured in the same run on the same data (max-norm in every block, k = 3):
  * kdtree: the NPEET / scikit-learn algorithm with scipy's cKDTree (joint k-NN query with
    p=inf, marginal counts with query_ball_point at radius nextafter(eps, 0));
  * numpy:  chunked brute force in numpy (per-coordinate max-abs accumulation, np.partition).
All three compute the same per-point terms psi(n_x + 1) + psi(n_y + 1); agreement is checked
on them exactly (max |difference| of the per-point terms on the common query points).

The peers are slow at large d (the KD-tree needs ~100 s at d = 50, n = 10,000 on 2 cores), so by
default they run on the first --peer-queries query points against all n reference points and
their time is scaled by n / peer_queries (the cost per query point is the same for every
point); pass --full to run them on all n queries. Then a subprocess computes KSG at
--memory-n samples and reports its peak memory next to the size an n x n float64 matrix
would need.

Examples:
  python benchmarks/bench_ksg.py                      # n = 10,000, d in {1, 5, 20, 50}, CPU (~3 min)
  python benchmarks/bench_ksg.py --device cuda        # ibscope on the GPU (peers stay on the CPU)
  python benchmarks/bench_ksg.py --full --repeats 3   # peers on every query point
"""

from __future__ import annotations

import argparse
import json
import math
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


def kdtree_terms(x, y, k, q):
    """NPEET/sklearn KSG-1 terms psi(nx+1)+psi(ny+1) for the first q points."""
    xy = np.hstack([x, y])
    dist, _ = cKDTree(xy).query(xy[:q], k + 1, p=np.inf)
    eps = np.nextafter(dist[:, k], 0)
    nx = cKDTree(x).query_ball_point(x[:q], eps, p=np.inf, return_length=True) - 1
    ny = cKDTree(y).query_ball_point(y[:q], eps, p=np.inf, return_length=True) - 1
    return digamma(nx + 1) + digamma(ny + 1)


def _cheb(q, r):
    out = np.abs(q[:, None, 0] - r[None, :, 0])
    tmp = np.empty_like(out)
    for j in range(1, q.shape[1]):
        np.subtract(q[:, None, j], r[None, :, j], out=tmp)
        np.abs(tmp, out=tmp)
        np.maximum(out, tmp, out=out)
    return out


def numpy_terms(x, y, k, q, chunk=256):
    """Chunked numpy brute-force KSG-1 terms for the first q points (memory O(chunk x n))."""
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
    return out


def ibscope_terms(x, y, k, device, precision):
    import torch

    from ibscope.estimators.ksg import ksg_terms

    dt = torch.float64 if precision == "float64" else torch.float32
    tx = torch.from_numpy(x).to(device=device, dtype=dt)
    ty = torch.from_numpy(y).to(device=device, dtype=dt)
    base = digamma(k) + digamma(len(x))
    terms = ksg_terms(tx, ty, k)
    if tx.is_cuda:
        torch.cuda.synchronize()
    return base - terms.cpu().numpy()  # back to psi(nx+1)+psi(ny+1)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


MEMORY_SNIPPET = r"""
import json, resource, sys, time
import numpy as np, torch
from ibscope.estimators.ksg import KSG
n, d, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((n, d))).to(device)
y = (0.6 * x + 0.8 * torch.from_numpy(rng.standard_normal((n, d))).to(device))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
e = KSG(standardize=False, jitter=0.0).estimate(x, y)
if device.startswith("cuda"):
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
print(json.dumps({"value": e.value, "seconds": dt, "rss_before_mb": base / 1024, "rss_peak_mb": peak / 1024,
                  "gpu_peak_mb": None if gpu is None else gpu / 2**20}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dims", default="1,5,20,50", help="comma-separated d (= d_x = d_y)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the ibscope timing (median)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="repeats of each peer timing (median)")
    ap.add_argument("--peer-queries", type=int, default=1000, help="query points the peers run on (scaled to n)")
    ap.add_argument("--full", action="store_true", help="peers on all n query points")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (ibscope only)")
    ap.add_argument("--precision", default="float64", choices=["float64", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--memory-n", type=int, default=50_000, help="n of the peak-memory run (0 to skip)")
    ap.add_argument("--memory-d", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 2
    dims = [int(v) for v in args.dims.split(",")]
    n, k = args.n, args.k
    q = n if args.full else min(n, args.peer_queries)
    scale = n / q
    print(f"KSG-1, k={k}, n={n}, ibscope on {dev} ({args.precision}, torch threads {torch.get_num_threads()}); "
          f"peers on {q} of {n} query points (x{scale:g} to full n)" + (" [full]" if args.full else ""))
    if dev.startswith("cuda"):
        print("GPU:", torch.cuda.get_device_name(torch.device(dev)))
    import os

    print(f"CPU cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (timings are only comparable within one run)")
    head = (f"{'d':>4} {'ibscope s':>10} {'kdtree s':>10} {'numpy s':>10} {'kdtree/ib':>10} {'numpy/ib':>9} "
            f"{'max|dterm|':>11} {'I ibscope':>10} {'truth':>7}")
    print(head)
    rows = []
    for d in dims:
        x, y = make_data(n, d)
        ibscope_terms(x[:500], y[:500], k, dev, args.precision)  # warm-up (CUDA context, kernels)
        t_ib, terms_ib = timed(lambda: ibscope_terms(x, y, k, dev, args.precision), args.repeats)
        t_kd, terms_kd = timed(lambda: kdtree_terms(x, y, k, q), args.peer_repeats)
        t_np, terms_np = timed(lambda: numpy_terms(x, y, k, q), args.peer_repeats)
        t_kd, t_np = t_kd * scale, t_np * scale
        diff = max(float(np.abs(terms_ib[:q] - terms_kd).max()), float(np.abs(terms_ib[:q] - terms_np).max()))
        value = digamma(k) + digamma(n) - float(terms_ib.mean())
        truth = -d / 2 * math.log(1 - 0.36)
        row = dict(d=d, ibscope_s=t_ib, kdtree_s=t_kd, numpy_s=t_np, kdtree_ratio=t_kd / t_ib, numpy_ratio=t_np / t_ib,
                   max_term_diff=diff, value=value, truth=truth)
        rows.append(row)
        print(f"{d:>4} {t_ib:>10.3f} {t_kd:>10.2f} {t_np:>10.2f} {t_kd / t_ib:>10.1f} {t_np / t_ib:>9.1f} "
              f"{diff:>11.2e} {value:>10.4f} {truth:>7.3f}", flush=True)
    mem = None
    if args.memory_n:
        m, md = args.memory_n, args.memory_d
        res = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, str(m), str(md), dev], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        mem = json.loads(res.stdout.strip().splitlines()[-1])
        nn_gb = m * m * 8 / 2**30
        print(f"memory: n={m}, d={md}: KSG {mem['seconds']:.1f} s, peak RSS {mem['rss_peak_mb']:.0f} MB "
              f"(before the call {mem['rss_before_mb']:.0f} MB)"
              + (f", GPU peak {mem['gpu_peak_mb']:.0f} MB" if mem["gpu_peak_mb"] is not None else "")
              + f"; one n x n float64 matrix would be {nn_gb:.1f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "memory": mem}, f, indent=2)
    bad = [r for r in rows if r["max_term_diff"] > 1e-9]
    if bad:
        print("DISAGREEMENT between implementations at d =", [r["d"] for r in bad], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
