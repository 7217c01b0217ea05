"""Accuracy of the continuous MI estimators against closed-form ground truth.

Task families, all generated here with numpy at n = 5,000 and a mutual information known in
closed form (nats). Every map applied below is invertible (or injective) on each side, so it
leaves I(X;Y) unchanged:

  gauss-low     correlated Gaussians, d <= 5 per side (pairs with correlation rho_i, then a random
                rotation within X and within Y): I = -1/2 sum log(1 - rho_i^2)
  gauss-25x25   the same at 25 + 25 dims: 2 pairs at rho = 0.8 (sparse), or 25 weak pairs (dense)
  transformed   gauss-low tasks with monotone maps of every coordinate (cube, exp, normal CDF,
                arcsinh of a scaled value)
  student-t     multivariate Student-t (nu = 3, 5) with identity or correlated dispersion:
                I = I_gauss(dispersion) + log G(nu/2) + log G((nu+dx+dy)/2) - log G((nu+dx)/2)
                    - log G((nu+dy)/2) + (nu+dx)/2 psi((nu+dx)/2) + (nu+dy)/2 psi((nu+dy)/2)
                    - nu/2 psi(nu/2) - (nu+dx+dy)/2 psi((nu+dx+dy)/2)
  spiral        gauss-low tasks with a spiral on each side: the plane of the first two coordinates
                rotated by the angle |x|^2 / 3 (invertible: the rotation keeps |x|; speed 1/3 as in
                the spiral tasks of the "Beyond Normal" benchmark, Czyz et al. 2023)
  embedded      2-dim latents (Zx, Zy correlated Gaussians) embedded injectively in 16, 32 or 64
                dims: X = Q [Zx, tanh(A Zx + a), sin(B Zx + b)] with Q a random rotation

For every estimator it prints the mean absolute error (nats) per family (over tasks and seeds),
the worst family, and the mean error over the d <= 5 families (gauss-low, transformed,
student-t, spiral). Negative or failed estimates count as they are (a failure is reported).

Examples:
  python benchmarks/bench_accuracy.py                                  # default estimators, 1 seed
  python benchmarks/bench_accuracy.py -e ksg -e gcmi --seeds 3
  python benchmarks/bench_accuracy.py -e "ksg:copula=true" -e "infonce:steps=1000"
  python benchmarks/bench_accuracy.py --list                           # tasks and their true MI
  python benchmarks/bench_accuracy.py --json out.json                  # also write every estimate
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
from scipy.special import digamma, gammaln, ndtr
from scipy.stats import special_ortho_group

N = 5000
LOW_FAMILIES = ("gauss-low", "transformed", "student-t", "spiral")


def _rotation(d, rng):
    return special_ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))


def _pairs_cov(dx, dy, rhos):
    """Joint covariance of (X, Y), unit variances, cov(x_i, y_i) = rho_i for i < len(rhos)."""
    c = np.eye(dx + dy)
    for i, r in enumerate(rhos):
        c[i, dx + i] = c[dx + i, i] = r
    return c


def _gauss_mi(rhos):
    return float(-0.5 * np.sum(np.log1p(-np.asarray(rhos) ** 2)))


def _rho_for(mi_total, k):
    """rho for k equal pairs with total MI mi_total."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi_total / k))


def _sample_gauss(dx, dy, rhos, n, rng, rotate=True):
    z = rng.multivariate_normal(np.zeros(dx + dy), _pairs_cov(dx, dy, rhos), size=n)
    x, y = z[:, :dx], z[:, dx:]
    if rotate:
        x, y = x @ _rotation(dx, rng).T, y @ _rotation(dy, rng).T
    return x, y


def _student_correction(nu, dx, dy):
    d = dx + dy
    return float(gammaln(nu / 2) + gammaln((nu + d) / 2) - gammaln((nu + dx) / 2) - gammaln((nu + dy) / 2)
                 + (nu + dx) / 2 * digamma((nu + dx) / 2) + (nu + dy) / 2 * digamma((nu + dy) / 2)
                 - nu / 2 * digamma(nu / 2) - (nu + d) / 2 * digamma((nu + d) / 2))


def _spiral(x, speed=1.0 / 3.0):
    if x.shape[1] < 2:
        return x
    ang = speed * (x * x).sum(1)
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    out[:, 0] = c * x[:, 0] - s * x[:, 1]
    out[:, 1] = s * x[:, 0] + c * x[:, 1]
    return out


MONOTONE = [lambda v: v ** 3, np.exp, ndtr, lambda v: np.arcsinh(3.0 * v)]


def _transform(a, offset):
    out = np.empty_like(a)
    for j in range(a.shape[1]):
        out[:, j] = MONOTONE[(j + offset) % len(MONOTONE)](a[:, j])
    return out


def _embed(z, dim, rng):
    m = (dim - 2) // 2
    a, b = rng.standard_normal((m, 2)), rng.standard_normal((dim - 2 - m, 2))
    oa, ob = rng.uniform(-1, 1, m), rng.uniform(0, 2 * np.pi, dim - 2 - m)
    g = np.hstack([z, np.tanh(z @ a.T + oa), np.sin(z @ b.T + ob)])
    return g @ _rotation(dim, rng).T


def tasks():
    """(family, name, true MI in nats, sampler(n, rng) -> (x, y))."""
    out = []
    low = [("1+1 rho=0.5", 1, 1, [0.5]), ("1+1 rho=0.9", 1, 1, [0.9]),
           ("2+2 MI=0.5", 2, 2, [_rho_for(0.5, 2)] * 2), ("3+3 MI=1", 3, 3, [_rho_for(1.0, 3)] * 3),
           ("5+5 MI=1", 5, 5, [_rho_for(1.0, 5)] * 5), ("5+5 MI=2", 5, 5, [_rho_for(2.0, 5)] * 5)]
    for name, dx, dy, rhos in low:
        out.append(("gauss-low", name, _gauss_mi(rhos),
                    lambda n, rng, dx=dx, dy=dy, rhos=rhos: _sample_gauss(dx, dy, rhos, n, rng)))
    for name, rhos in [("sparse 2 pairs rho=0.8", [0.8, 0.8]), ("dense 25 pairs MI=1", [_rho_for(1.0, 25)] * 25),
                       ("dense 25 pairs MI=2", [_rho_for(2.0, 25)] * 25)]:
        out.append(("gauss-25x25", name, _gauss_mi(rhos),
                    lambda n, rng, rhos=rhos: _sample_gauss(25, 25, rhos, n, rng)))
    for name, dx, dy, rhos in low[1:5]:
        def samp(n, rng, dx=dx, dy=dy, rhos=rhos):
            x, y = _sample_gauss(dx, dy, rhos, n, rng)
            return _transform(x, 0), _transform(y, 1)
        out.append(("transformed", name + " monotone", _gauss_mi(rhos), samp))
    for nu, dx, dy, rho in [(3, 1, 1, 0.0), (3, 2, 2, 0.0), (5, 1, 1, 0.6), (5, 2, 2, 0.5), (3, 3, 3, 0.5)]:
        rhos = [rho] * min(dx, dy) if rho else []
        truth = _gauss_mi(rhos) + _student_correction(nu, dx, dy)

        def samp(n, rng, nu=nu, dx=dx, dy=dy, rhos=rhos):
            g = rng.multivariate_normal(np.zeros(dx + dy), _pairs_cov(dx, dy, rhos), size=n)
            w = np.sqrt(nu / rng.chisquare(nu, size=(n, 1)))
            z = g * w
            return z[:, :dx], z[:, dx:]
        out.append(("student-t", f"nu={nu} {dx}+{dy} rho={rho}", truth, samp))
    for name, dx, dy, rhos in [low[2], low[3], low[4]]:
        def samp(n, rng, dx=dx, dy=dy, rhos=rhos):
            x, y = _sample_gauss(dx, dy, rhos, n, rng, rotate=False)
            return _spiral(x), _spiral(y)
        out.append(("spiral", name + " spiral", _gauss_mi(rhos), samp))
    for dim, mi in [(16, 0.5), (32, 1.0), (64, 1.5)]:
        rhos = [_rho_for(mi, 2)] * 2

        def samp(n, rng, dim=dim, rhos=rhos):
            zx, zy = _sample_gauss(2, 2, rhos, n, rng, rotate=False)
            return _embed(zx, dim, rng), _embed(zy, dim, rng)
        out.append(("embedded", f"2-dim latents in {dim}+{dim} MI={mi}", _gauss_mi(rhos), samp))
    return out


def _parse_spec(spec):
    """'name' or 'name:key=value,key=value' -> (label, name, params)."""
    if ":" not in spec:
        return spec, spec, {}
    name, rest = spec.split(":", 1)
    params = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return spec, name, params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-e", "--estimator", action="append", dest="estimators",
                    help="estimator name, optionally with parameters: 'ksg:k=5,copula=true' (repeatable)")
    ap.add_argument("--seeds", type=int, default=1, help="independent samples per task (default 1)")
    ap.add_argument("-n", type=int, default=N, help=f"samples per task (default {N})")
    ap.add_argument("--family", action="append", help="only these families (repeatable)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--list", action="store_true", help="list the tasks and their true MI, then exit")
    ap.add_argument("--json", help="write every estimate to this file")
    args = ap.parse_args(argv)

    all_tasks = [t for t in tasks() if not args.family or t[0] in args.family]
    if args.list:
        for fam, name, truth, _ in all_tasks:
            print(f"{fam:12s} {name:34s} I = {truth:.4f} nats")
        return 0

    import torch

    import ibscope
    from ibscope.estimators import registry

    specs = args.estimators or ["ksg", "gaussian", "compressed", "infonce"]
    specs = [_parse_spec(s) for s in specs]
    known = set(registry.available())
    for label, name, _ in specs:
        if name not in known:
            print(f"unknown estimator {name!r} (this ibscope has: {', '.join(sorted(known))})", file=sys.stderr)
            return 2

    print(f"ibscope {ibscope.__version__} ({ibscope.__file__}), torch {torch.__version__}, n = {args.n}, "
          f"seeds = {args.seeds}, device {args.device}")
    rows = []
    for ti, (fam, tname, truth, sampler) in enumerate(tasks()):
        if args.family and fam not in args.family:
            continue
        for seed in range(args.seeds):
            # the data of a task depend only on the task and the seed, not on which estimators run
            rng = np.random.default_rng(1000 * seed + ti)
            x, y = sampler(args.n, rng)
            xt = torch.as_tensor(x, dtype=torch.float64, device=args.device)
            yt = torch.as_tensor(y, dtype=torch.float64, device=args.device)
            for label, name, params in specs:
                t0 = time.perf_counter()
                try:
                    v = float(ibscope.mutual_information(xt, yt, method=name, **params).value)
                    err = None
                except Exception as exc:  # a failure is a result too
                    v, err = float("nan"), f"{type(exc).__name__}: {exc}"
                dt = time.perf_counter() - t0
                rows.append({"family": fam, "task": tname, "seed": seed, "truth": truth, "estimator": label,
                             "estimate": v, "error": err, "seconds": dt})
                flag = "" if err is None else f"  FAILED {err[:80]}"
                print(f"  {fam:12s} {tname:34s} seed {seed} {label:28s} {v:8.4f} (truth {truth:.4f}) "
                      f"{dt:6.1f} s{flag}", flush=True)

    fams = list(dict.fromkeys(r["family"] for r in rows))
    labels = [s[0] for s in specs]

    def mae(lab, fam_set):
        errs = [abs(r["estimate"] - r["truth"]) for r in rows if r["estimator"] == lab and r["family"] in fam_set]
        return statistics.fmean(errs) if errs else float("nan")

    width = max(12, max(len(x) for x in labels) + 1)
    print()
    print("Mean absolute error (nats) per family; n = %d, %d seed(s); NaN = a failed estimate" % (args.n, args.seeds))
    head = f"{'estimator':{width}s}" + "".join(f"{f:>13s}" for f in fams) + f"{'d<=5 all':>11s}{'worst':>9s}{'s/est':>8s}"
    print(head)
    print("-" * len(head))
    summary = {}
    for lab in labels:
        per = {f: mae(lab, {f}) for f in fams}
        low = mae(lab, set(LOW_FAMILIES) & set(fams))
        worst = max(per.values())
        secs = statistics.median(r["seconds"] for r in rows if r["estimator"] == lab)
        summary[lab] = {"per_family": per, "d<=5": low, "worst": worst, "median_seconds": secs}
        print(f"{lab:{width}s}" + "".join(f"{per[f]:13.3f}" for f in fams) + f"{low:11.3f}{worst:9.3f}{secs:8.2f}")
    best_low = min(labels, key=lambda lab: summary[lab]["d<=5"])
    best_worst = min(labels, key=lambda lab: summary[lab]["worst"])
    print()
    print(f"best at d <= 5: {best_low} ({summary[best_low]['d<=5']:.3f} nats; goal <= 0.05)")
    print(f"smallest worst-family error: {best_worst} ({summary[best_worst]['worst']:.3f} nats; goal <= 0.15)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "summary": summary}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
