"""KDE bound speed and error: ibscope beside numpy references, in one run.

The quantity is the Kolchinsky-Tracey upper bound -(1/n) sum_i log (1/n) sum_j exp(-|t_i - t_j|^2 / 2 sigma^2)
on tanh-like activations (n x d). Implementations, same data, same process:

  * ibscope (auto)  -- ``kde_terms`` as the estimators call it; on CPU: float32 squared distances
                       from hi/lo-split coordinates (numba), exp and sums in float64;
  * ibscope float64 -- ``kde_terms(precision="float64")``: exact float64 distances (the GPU path);
  * numpy float32   -- GEMM-form squared distances |a|^2 + |b|^2 - 2 a.b in float32, float32 exp,
                       float64 row sums (ibsgd's formula, chunked);
  * numpy float64   -- the same in float64.

Each time is a median of --repeats; ratios are reference / ibscope-auto (> 1: ibscope faster);
errors are relative to ibscope float64. The growth exponent p (time ~ n^p) of ibscope-auto is
printed per d.

  python benchmarks/bench_kde.py                   # n in {2000, 8000, 16000}, d in {10, 100}
  python benchmarks/bench_kde.py --device cuda --n 32000   # ibscope (float64 path) on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def timed(fn, repeats):
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def numpy_kde(x, var, dtype, chunk=1024):
    a = x.astype(dtype)
    nn = (a * a).sum(1)
    c = dtype(-0.5 / var)
    tot = 0.0
    for s in range(0, len(a), chunk):
        d2 = nn[s:s + chunk, None] + nn[None, :] - 2 * (a[s:s + chunk] @ a.T)
        np.maximum(d2, 0, out=d2)
        d2 *= c
        np.exp(d2, out=d2)
        tot += float(np.log(d2.mean(1, dtype=np.float64)).sum())
    return -tot / len(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2000,8000,16000")
    ap.add_argument("--dims", default="10,100")
    ap.add_argument("--variance", type=float, default=1e-2, help="sigma^2 (activations are in [-1, 1])")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from ibscope.estimators.kde import kde_terms

    dev = torch.device(args.device)
    ns = [int(v) for v in args.n.split(",")]
    dims = [int(v) for v in args.dims.split(",")]
    print(f"KDE upper bound, sigma^2={args.variance:g}, ibscope on {dev}, torch threads {torch.get_num_threads()}, "
          f"medians of {args.repeats}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'n':>6} {'d':>4} {'ib auto s':>9} {'ib f64 s':>9} {'/auto':>6} {'np f32 s':>9} {'/auto':>6} "
          f"{'np f64 s':>9} {'/auto':>6} {'err auto':>9} {'err np32':>9} {'value':>8}", flush=True)
    times = {}
    for n in ns:
        for d in dims:
            rng = np.random.default_rng(d)
            x = np.tanh(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d))
            t = torch.from_numpy(x).to(dev)

            def ours(precision="auto"):
                v = float(kde_terms(t, args.variance, precision=precision).mean())
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return v

            ours()
            t_a, v_a = timed(ours, args.repeats)
            t_6, v_6 = timed(lambda: ours("float64"), args.repeats)
            t_n32, v_n32 = timed(lambda: numpy_kde(x, args.variance, np.float32), args.repeats)
            t_n64, v_n64 = timed(lambda: numpy_kde(x, args.variance, np.float64), args.repeats)
            times[(n, d)] = t_a
            print(f"{n:>6} {d:>4} {t_a:>9.3f} {t_6:>9.3f} {t_6 / t_a:>6.2f} {t_n32:>9.3f} {t_n32 / t_a:>6.2f} "
                  f"{t_n64:>9.3f} {t_n64 / t_a:>6.2f} {abs(v_a - v_6) / abs(v_6):>9.1e} "
                  f"{abs(v_n32 - v_6) / abs(v_6):>9.1e} {v_6:>8.4f}", flush=True)
            if abs(v_6 - np.log(n)) < 1e-3:
                # every off-diagonal kernel value underflows: each point sees only itself, the bound is
                # log n whatever the distances, and the error columns say nothing about them
                print(f"  (d={d}: the bound is log n = {np.log(n):.4f}: sigma^2 is too small for these distances, "
                      "the errors above are vacuous; raise --variance)", flush=True)
    if len(ns) > 1:
        print("growth exponent p of ibscope (auto) time ~ n^p:", ", ".join(
            f"d={d}: {np.polyfit(np.log(ns), np.log([times[(n, d)] for n in ns]), 1)[0]:.2f}" for d in dims))
    print("ratios: reference time / ibscope-auto time (> 1: ibscope faster); err: relative to ibscope float64. "
          f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
