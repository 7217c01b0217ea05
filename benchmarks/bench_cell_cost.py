"""What one cell costs: I(X;T) and I(T;Y) per estimator as n and the layer width d grow.

A cell of ``ibscope estimate`` is one (checkpoint, layer): for a pair estimator, I(X;T) (X =
sample ids for binning / KDE, the probe inputs for KSG) and I(T;Y). This times both estimates
through the API on tanh-like activations, median of --repeats, for n in --n and d in --d,
and prints the growth exponent p (time ~ n^p) between the smallest and largest n. A whole run
costs about cells x (time per cell) / workers (see benchmarks/bench_scaling.py for the
workers' side).

  python benchmarks/bench_cell_cost.py                     # binning, kde, ksg; n 1000..4000; d 10, 100
  python benchmarks/bench_cell_cost.py -e ksg --n 2000 8000 --d 10
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--estimator", action="append", default=None)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--d", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # saturation notes on this synthetic data: the time is what is measured
    import torch

    from ibscope.api import mutual_information

    ests = args.estimator or ["binning", "kde", "ksg"]
    print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()}")
    print(f"{'estimator':<10} {'d':>4} " + " ".join(f"{'n=' + str(n):>10}" for n in args.n) + "   p (t ~ n^p)")
    rng = np.random.default_rng(0)
    for est in ests:
        for d in args.d:
            times = []
            for n in args.n:
                x = torch.from_numpy(rng.normal(size=(n, 12)))
                t = torch.tanh(x @ torch.from_numpy(rng.normal(size=(12, d))))
                y = (x[:, 0] > 0).long()
                xid = torch.arange(n) if est != "ksg" else x
                mutual_information(xid, t, est)  # warm-up (numba JIT, first calls)
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    mutual_information(xid, t, est)
                    mutual_information(t, y, est)
                    ts.append(time.perf_counter() - t0)
                times.append(statistics.median(ts))
            p = math.log(times[-1] / times[0]) / math.log(args.n[-1] / args.n[0]) if len(times) > 1 else float("nan")
            print(f"{est:<10} {d:>4} " + " ".join(f"{1000 * s:8.1f}ms" for s in times) + f"   {p:.2f}")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
