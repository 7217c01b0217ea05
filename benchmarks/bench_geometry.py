"""Benchmark: ibscope's geometry estimators against their peers, side by side in one run.

* intrinsic dimension: ibscope ``twonn`` / ``mle-id`` vs scikit-dimension's ``TwoNN`` /
  ``MLE`` on the same data (a 6-dim Gaussian embedded in D dims plus small noise);
* effective rank: ibscope ``effective-rank`` vs a plain numpy SVD of the centred data.

Prints, per case, the median wall time over ``--repeats`` runs of each side, the ratio
peer / ibscope (> 1 means ibscope is faster), and the two values (they must agree: both
sides compute the same quantity in float64).

Default sizes are reduced so that a run takes ~2-3 minutes on a 2-core CPU; ``--full``
runs the issue's sizes (ID: n = 20,000, D in {50, 1024}; effective rank: n = 10,000,
d = 4,096). ``--device cuda`` runs ibscope on the GPU (the peers are CPU libraries).

    python benchmarks/bench_geometry.py                  # reduced sizes, CPU
    python benchmarks/bench_geometry.py --full           # the issue's sizes
    python benchmarks/bench_geometry.py --full --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats, device=None):
    """Median wall time (s) and the last value of ``fn()`` over ``repeats`` runs."""
    times, val = [], None
    for _ in range(repeats):
        if device is not None:
            _sync(device)
        t0 = time.perf_counter()
        val = fn()
        if device is not None:
            _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), val


def make_id_data(n, dim, seed=0):
    import numpy as np

    rs = np.random.RandomState(seed)
    q, _ = np.linalg.qr(rs.randn(dim, 6))
    return (rs.randn(n, 6) @ q.T + 1e-3 * rs.randn(n, dim)).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's sizes (slow on CPU: tens of minutes)")
    ap.add_argument("--n-id", type=int, default=None, help="samples for TwoNN/MLE (default 4000; --full 20000)")
    ap.add_argument("--dims-id", default="50,1024", help="ambient dimensions D for TwoNN/MLE (comma-separated)")
    ap.add_argument("--n-rank", type=int, default=None, help="samples for effective rank (default 3000; --full 10000)")
    ap.add_argument("--d-rank", type=int, default=None, help="features for effective rank (default 512; --full 4096)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; medians are reported")
    ap.add_argument("--device", default="cpu", help="device for ibscope: cpu, cuda, cuda:N, auto")
    ap.add_argument("--skip-id", action="store_true", help="skip the intrinsic-dimension cases")
    ap.add_argument("--skip-rank", action="store_true", help="skip the effective-rank case")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    import ibscope

    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    n_id = a.n_id or (20000 if a.full else 4000)
    n_rank = a.n_rank or (10000 if a.full else 3000)
    d_rank = a.d_rank or (4096 if a.full else 512)
    dims = [int(v) for v in a.dims_id.split(",") if v]
    rows = []
    print(f"# bench_geometry: device={dev}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={a.repeats} (medians)", flush=True)

    if not a.skip_id:
        try:
            import skdim
        except ImportError:
            print("scikit-dimension is not installed: pip install scikit-dimension", file=sys.stderr)
            return 1
        for dim in dims:
            x = make_id_data(n_id, dim)
            xt = torch.from_numpy(x).to(dev)
            for ours, peer_name, peer in (
                ("twonn", "skdim.TwoNN", lambda: skdim.id.TwoNN().fit(x.astype(np.float64)).dimension_),
                ("mle-id", "skdim.MLE(k=20)", lambda: skdim.id.MLE().fit(x.astype(np.float64), n_neighbors=20).dimension_),
            ):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t_ours, v_ours = timed(lambda: ibscope.measure(xt, ours).value, a.repeats, dev)
                    t_peer, v_peer = timed(peer, a.repeats)
                rows.append((f"{ours} n={n_id} D={dim}", f"ibscope {ours}", t_ours, v_ours, peer_name, t_peer, float(v_peer)))
                print(_fmt(rows[-1]), flush=True)

    if not a.skip_rank:
        rs = np.random.RandomState(1)
        x = (rs.randn(n_rank, d_rank) * np.linspace(1.0, 0.01, d_rank)).astype(np.float32)
        xt = torch.from_numpy(x).to(dev)

        def numpy_erank():
            z = x.astype(np.float64)
            z -= z.mean(0)
            s = np.linalg.svd(z, compute_uv=False)
            p = s ** 2 / (s ** 2).sum()
            p = p[p > 0]
            return float(np.exp(-(p * np.log(p)).sum()))

        t_ours, v_ours = timed(lambda: ibscope.measure(xt, "effective-rank").value, a.repeats, dev)
        t_peer, v_peer = timed(numpy_erank, a.repeats)
        rows.append((f"effective-rank n={n_rank} d={d_rank}", "ibscope effective-rank", t_ours, v_ours,
                     "numpy SVD", t_peer, v_peer))
        print(_fmt(rows[-1]), flush=True)

    print("\n| case | ibscope median (s) | peer | peer median (s) | ratio peer/ibscope | ibscope value | peer value |")
    print("|---|---|---|---|---|---|---|")
    for case, _o, t_o, v_o, pn, t_p, v_p in rows:
        print(f"| {case} | {t_o:.3f} | {pn} | {t_p:.3f} | {t_p / t_o:.2f}x | {v_o:.4f} | {v_p:.4f} |")
    return 0


def _fmt(r):
    case, on, t_o, v_o, pn, t_p, v_p = r
    return f"{case:32s} {on}: {t_o:8.3f}s ({v_o:.4f})   {pn}: {t_p:8.3f}s ({v_p:.4f})   ratio {t_p / t_o:6.2f}x"


if __name__ == "__main__":
    sys.exit(main())
