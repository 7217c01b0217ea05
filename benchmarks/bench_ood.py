"""Benchmark: ibscope's OOD detectors against scikit-learn, side by side in one run.

1. k-NN scoring (Sun et al.: L2-normalised features, distance to the k-th neighbour) on
   N_train x N_test points at d in {64, 512}: ``ibscope.ood.KNNDetector`` (torch, exact, chunked;
   also faiss when installed) vs ``sklearn.neighbors.NearestNeighbors`` with ``algorithm="brute"``
   and a tree (``ball_tree`` / ``kd_tree``). Trees are very slow at these dimensions, so by
   default they answer a random subset of ``--tree-queries`` queries and the time is scaled to
   the full query set (printed as such; pass ``--tree-queries 5000`` for the full run).
2. Mahalanobis at d = 4,096: ``ibscope.ood.MahalanobisDetector(covariance="empirical")`` (float64
   covariance + Cholesky, chunked triangular solves) vs ``sklearn.covariance.EmpiricalCovariance``
   (whose ``precision_`` is ``scipy.linalg.pinvh``) + ``.mahalanobis``, fit + score.

Every measurement is wall-clock, median over repeats (fit + score together); ratios are
peer / ibscope (> 1 = ibscope faster). Scores are compared for agreement.

    python benchmarks/bench_ood.py                      # default sizes, ~3 min on 2 cores
    python benchmarks/bench_ood.py --device cuda        # ibscope side on a GPU
    python benchmarks/bench_ood.py --tree-queries 5000 --md-repeats 3   # full, slow
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        if _cuda_sync is not None:
            _cuda_sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


_cuda_sync = None


def bench_knn(args) -> list[tuple]:
    import torch
    from sklearn.neighbors import NearestNeighbors

    from ibscope.ood import KNNDetector

    rows = []
    rng = np.random.default_rng(0)
    for d in args.dims:
        ref = rng.standard_normal((args.n_train, d)).astype(np.float32)
        q = rng.standard_normal((args.n_test, d)).astype(np.float32)
        refn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        dev = torch.device(args.device)
        ref_t, q_t = torch.from_numpy(ref).to(dev), torch.from_numpy(q).to(dev)

        def ours():
            return KNNDetector(k=args.k, normalize=True, backend="torch").fit(ref_t).score(q_t)

        KNNDetector(k=args.k).fit(ref_t[:100]).score(q_t[:10])             # warm-up (allocator, threads)
        t_ours, s_ours = timed(ours, args.repeats)
        rows.append((f"knn d={d}", f"ibscope torch ({args.device})", t_ours, None, 0.0))

        def brute():
            nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute").fit(refn)
            return nn.kneighbors(qn)[0][:, -1]

        t_b, s_b = timed(brute, args.peer_repeats)
        rows.append((f"knn d={d}", "sklearn NearestNeighbors brute", t_b, t_b / t_ours, float(np.abs(s_b - s_ours).max())))

        try:
            import faiss  # noqa: F401

            def fa():
                return KNNDetector(k=args.k, normalize=True, backend="faiss").fit(ref).score(q)

            t_f, s_f = timed(fa, args.repeats)
            rows.append((f"knn d={d}", "ibscope faiss backend (CPU)", t_f, t_f / t_ours, float(np.abs(s_f - s_ours).max())))
        except ImportError:
            pass

        m = min(args.tree_queries, args.n_test)
        sub = np.sort(rng.choice(args.n_test, m, replace=False))
        for alg in args.trees:
            def tree():
                nn = NearestNeighbors(n_neighbors=args.k, algorithm=alg).fit(refn)
                return nn.kneighbors(qn[sub])[0][:, -1]

            t_t, s_t = timed(tree, 1)
            scaled = t_t * args.n_test / m
            label = f"sklearn NearestNeighbors {alg}" + (f" ({m} queries, time x{args.n_test / m:g})" if m < args.n_test else "")
            rows.append((f"knn d={d}", label, scaled, scaled / t_ours, float(np.abs(s_t - s_ours[sub]).max())))
    return rows


def bench_md(args) -> list[tuple]:
    import torch
    from sklearn.covariance import EmpiricalCovariance

    from ibscope.ood import MahalanobisDetector

    rng = np.random.default_rng(1)
    d = args.md_dim
    x = rng.standard_normal((args.md_n, d))
    t = rng.standard_normal((args.md_test, d)) * 1.1
    dev = torch.device(args.device)
    x_t, t_t = torch.from_numpy(x).to(dev), torch.from_numpy(t).to(dev)

    def ours():
        return MahalanobisDetector(covariance="empirical", memory_limit="16GB").fit(x_t).score(t_t)

    t_ours, s_ours = timed(ours, args.repeats)

    def peer():
        return np.sqrt(EmpiricalCovariance().fit(x).mahalanobis(t))

    t_p, s_p = timed(peer, args.md_repeats)
    rel = float(np.max(np.abs(s_p - s_ours) / s_p))
    return [(f"mahalanobis d={d}", f"ibscope empirical + Cholesky ({args.device})", t_ours, None, 0.0),
            (f"mahalanobis d={d}", "sklearn EmpiricalCovariance (pinvh) + mahalanobis", t_p, t_p / t_ours, rel)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the ibscope side (median)")
    ap.add_argument("--peer-repeats", type=int, default=3, help="repeats of sklearn brute (median)")
    ap.add_argument("--trees", nargs="*", default=["ball_tree", "kd_tree"], help="tree algorithms to compare")
    ap.add_argument("--tree-queries", type=int, default=250, help="queries answered by the trees (time scaled)")
    ap.add_argument("--md-dim", type=int, default=4096)
    ap.add_argument("--md-n", type=int, default=8192, help="fit samples for Mahalanobis")
    ap.add_argument("--md-test", type=int, default=2000)
    ap.add_argument("--md-repeats", type=int, default=1, help="repeats of the sklearn Mahalanobis side (slow)")
    ap.add_argument("--device", default="cpu", help="device of the ibscope side: cpu or cuda[:N]")
    ap.add_argument("--skip-knn", action="store_true")
    ap.add_argument("--skip-md", action="store_true")
    args = ap.parse_args(argv)

    import torch

    global _cuda_sync
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("CUDA is not available here; use --device cpu.", file=sys.stderr)
            return 2
        _cuda_sync = torch.cuda.synchronize
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}", flush=True)
    rows = []
    if not args.skip_knn:
        rows += bench_knn(args)
    if not args.skip_md:
        rows += bench_md(args)
    print(f"\nk-NN: N_train={args.n_train}, N_test={args.n_test}, k={args.k}, float32, L2-normalised; "
          f"Mahalanobis: N_fit={args.md_n}, N_test={args.md_test}, float64. Median wall time (fit + score).")
    print(f"{'case':<20} {'implementation':<62} {'median s':>9} {'ratio':>8} {'max |diff|':>11}")
    for case, impl, sec, ratio, diff in rows:
        r = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"{case:<20} {impl:<62} {sec:9.3f} {r:>8} {diff:11.2e}")
    print("ratio = peer time / ibscope time (> 1: ibscope faster). Mahalanobis diff is relative.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
