"""Benchmark: the information-plane animation and the default figure set.

Peer: matplotlib's standard animation path, ``FuncAnimation(fig, update).save(path,
writer=PillowWriter(fps))`` — what IDNNs and deep-bottleneck use for their movies — driven on the
*identical* figure and update function that ``ibscope plot --animate`` builds. Ours draws the
static parts once and blits only the moving artists per frame. Both are timed in the same run,
alternating, and the medians and their ratio are printed. The default figure set
(``plot_results`` with no kinds) is timed too, to show where the time of a whole `ibscope plot`
goes.

    python benchmarks/bench_plot.py                    # ~1.5 min of CPU (more on a busy machine)
    python benchmarks/bench_plot.py --epochs 60 --layers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_rows(epochs: int, layers: int, n: int = 4096) -> list[dict]:
    from ibscope.results import make_row

    ln2 = math.log(2)
    times = sorted({0, *np.unique(np.round(np.logspace(0, 3, epochs - 1)).astype(int)).tolist()})
    rows = []
    for ci, e in enumerate(times):
        f = math.log1p(e) / math.log1p(times[-1])
        for li in range(layers):
            d = li / max(layers - 1, 1)
            kw = dict(checkpoint=ci, epoch=e, layer=f"fc{li + 1}", layer_index=li, estimator="binning",
                      params={"n_bins": 30}, n_samples=n)
            rows.append(make_row(quantity="I(X;T)", value=12 * (1 - 0.7 * d) * (0.6 + 0.4 * f) * ln2, unit="nats",
                                 cap=math.log(n), **kw))
            rows.append(make_row(quantity="I(T;Y)", value=(0.2 + 0.78 * f) * (1 - 0.15 * d) * ln2, unit="nats",
                                 cap=ln2, **kw))
        rows.append(make_row(checkpoint=ci, epoch=e, layer="-", estimator="metrics", quantity="accuracy",
                             value=0.5 + 0.49 * f, unit="ratio"))
    return rows


def peer_funcanimation(rows, path: Path, fps: float, dpi: int) -> None:
    import matplotlib
    from matplotlib.animation import FuncAnimation, PillowWriter

    from ibscope.plot import style
    from ibscope.plot.animate import build_animation

    metric_rows = [r for r in rows if r["estimator"] == "metrics"]
    pair = [r for r in rows if r["estimator"] != "metrics"]
    with style.context(), matplotlib.rc_context({"savefig.bbox": None}):
        anim = build_animation(pair, title="peer", time_col="epoch", metric_rows=metric_rows)
        fa = FuncAnimation(anim.fig, anim.update, frames=anim.n_frames, blit=False, repeat=False)
        fa.save(str(path), writer=PillowWriter(fps=fps), dpi=dpi)


def ours(rows, path: Path, fps: float, dpi: int) -> None:
    from ibscope.plot.animate import animate_plane

    metric_rows = [r for r in rows if r["estimator"] == "metrics"]
    pair = [r for r in rows if r["estimator"] != "metrics"]
    animate_plane(pair, path, title="ours", time_col="epoch", metric_rows=metric_rows, fmt="gif", fps=fps, dpi=dpi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20, help="checkpoints (log-spaced epochs 0..1000)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dpi", type=int, default=100)
    args = ap.parse_args()

    from PIL import Image

    from ibscope.plot import plot_results
    from ibscope.results import write_results

    rows = synthetic_rows(args.epochs, args.layers)
    n_frames = len({r["epoch"] for r in rows})
    t_ours, t_peer, t_default = [], [], []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        csv = write_results(d / "bench.csv", rows)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours(rows, d / "ours.gif", 2.0, args.dpi)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            peer_funcanimation(rows, d / "peer.gif", 2.0, args.dpi)
            t_peer.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plot_results(csv, d / "figs")
            t_default.append(time.perf_counter() - t0)
        with Image.open(d / "ours.gif") as a, Image.open(d / "peer.gif") as b:
            assert a.n_frames == b.n_frames == n_frames, (a.n_frames, b.n_frames, n_frames)
            a.seek(n_frames - 1)
            b.seek(n_frames - 1)
            diff = np.abs(np.asarray(a.convert("L"), float) - np.asarray(b.convert("L"), float))
            same_size = a.size == b.size
    mo, mp, md = statistics.median(t_ours), statistics.median(t_peer), statistics.median(t_default)
    print(f"information-plane animation: {n_frames} frames, {args.layers} layers, dpi {args.dpi}, "
          f"{args.repeats} repeats (median wall seconds)")
    print(f"  ibscope (blitted frames)            {mo:7.2f} s   {1000 * mo / n_frames:6.1f} ms/frame")
    print(f"  matplotlib FuncAnimation+Pillow     {mp:7.2f} s   {1000 * mp / n_frames:6.1f} ms/frame")
    print(f"  speed-up (peer / ibscope)           {mp / mo:7.2f} x")
    print(f"  last frames: same size {same_size}, mean |difference| {diff.mean():.2f} grey levels of 255")
    print(f"default `ibscope plot` figure set (plane, trajectory, 2 curves, metrics): {md:.2f} s")


if __name__ == "__main__":
    main()
