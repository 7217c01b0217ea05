"""Calibration of `ibscope check --sigma` on the demo pipeline (not part of the test suite).

Trains the small demo run (`demo-tanh`: 12-10-7-5-4-3-2 tanh net, 12-bit task) with seeds
0..N-1 as the baseline, then checks a held-out seed (should hold) and the same run with ReLU
(a deliberate change: should fail) against the pooled seeds at several sigmas, with
rtol = atol = 0 so that only the seed spread sets the tolerance. Prints, per sigma, how many
curves fail and the worst points (|diff| / tol).

    python benchmarks/bench_check_sigma.py                  # 4 baseline seeds, ~1 min of CPU
    python benchmarks/bench_check_sigma.py --seeds 8 --epochs 100 --sigmas 2 3 4 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4, help="baseline seeds (the next seed is the held-out run)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1024, help="probe inputs (of 4096)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[2, 3, 4])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args()

    from ibscope.check import run_check
    from ibscope.pipeline import run_pipeline

    small = {"train": {"epochs": a.epochs, "checkpoints": a.checkpoints},
             "capture": {"jacobian_samples": 0, "batch_size": a.samples, "max_samples": a.samples,
                         "layers": ["hidden1", "hidden3", "hidden5"]},
             "estimate": {"estimators": ["binning"]}}
    work = Path(a.out or tempfile.mkdtemp(prefix="ibscope-sigma-"))
    t0 = time.perf_counter()

    def run(name, seed, **extra):
        r = run_pipeline("demo-tanh", out=work / name, overrides={**small, "seed": seed, "name": name, **extra},
                         until="estimate", progress=False, quiet=True)
        return str(r.results)

    base = [run(f"s{s}", s) for s in range(a.seeds)]
    held = run(f"s{a.seeds}", a.seeds)
    relu = run("relu", a.seeds, model={"args": {"activation": "relu"}})
    print(f"pipelines: {a.seeds + 2} runs in {time.perf_counter() - t0:.0f} s ({work})")
    print(f"{'current':<10} {'sigma':>5}  {'failed':>8}  worst |diff|/tol (curve)")
    for label, path in ((f"seed {a.seeds}", held), ("relu", relu)):
        for k in a.sigmas:
            rep = run_check(path, baseline=base, rtol=0, atol=0, sigma=k, seeds=True)
            c = rep.counts()
            worst = sorted(((cs.details.get("worst") or {}).get("ratio", 0.0), cs.name) for cs in rep.cases)[-1]
            print(f"{label:<10} {k:>5g}  {c['failed']:>3}/{c['cases']:<4}  {worst[0]:.2f} ({worst[1]})")


if __name__ == "__main__":
    main()
