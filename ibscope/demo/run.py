"""``ibscope demo``: the tanh and ReLU runs of the 12-bit task through the whole pipeline, and
their information planes side by side."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ibscope._atomic import atomic_path
from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, writer_lock
from ibscope._paths import inside
from ibscope.errors import UsageError
from ibscope.pipeline import Pipeline, PipelineResult, deep_merge, load_config
from ibscope.reporting import Reporter

DEMO_RUNS = ("demo-tanh", "demo-relu")


@dataclass
class DemoResult:
    out: Path
    runs: dict[str, PipelineResult]
    figures: list[Path]
    report: Path | None  # the first run's report (each run has its own: runs[name].report)
    seconds: float
    comparison: Path | None = None  # side-by-side information planes of the runs


def run_demo(out: str | os.PathLike = "ibscope-demo", *, quick: bool = False, force: bool = False,
             device: str | None = None, progress: bool = True, quiet: bool = False,
             configs: Sequence[str | os.PathLike] = DEMO_RUNS, overrides: Mapping | None = None,
             lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT, reporter: Reporter | None = None) -> DemoResult:
    """Train the tanh and ReLU 12-10-7-5-4-3-2 networks and run the whole pipeline on both.

    Each run lives in ``OUT/<run>/`` (data, checkpoints, stores, results.csv, figures/,
    report.html). The runs are separate experiments (not seeds of one), so each gets its own
    figures and report; ``OUT/info-plane_<run>_vs_<run>.png`` puts their fixed-binning
    information planes side by side. Every config is checked before anything runs; the demo
    folder's writer lock (and each run folder's) is held throughout (``lock_timeout``,
    ``reporter``, ``progress`` and ``quiet`` as in :func:`ibscope.pipeline.run_pipeline`).
    """
    t0 = time.perf_counter()
    od = Path(out).resolve()
    if od.exists() and not od.is_dir():
        raise UsageError(f"--out '{od}' is a file; it must be a folder.")
    check_timeout(lock_timeout)
    # the estimate stage is most of the demo's time: one worker process per core (up to 2)
    overrides = deep_merge({"estimate": {"jobs": max(1, min(2, os.cpu_count() or 1))}}, overrides or {})
    pipes: dict[str, Pipeline] = {}
    for c in configs:  # every config checked (names, paths) before anything is written
        cfg, base, _ = load_config(c, quick=quick, overrides=overrides)
        name = cfg.name or "run"
        if name in pipes:
            raise UsageError(f"Two demo configs are both named '{name}'.")
        pipes[name] = Pipeline(cfg, base, inside(od, od / name, "run folder"), device=device,
                               progress=progress and not quiet, force=force,
                               reporter=None if quiet else reporter, lock_timeout=lock_timeout)
    comparison_path = inside(od, od / f"info-plane_{'_vs_'.join(pipes)}.png", "comparison figure")
    with writer_lock(od, what="demo folder", timeout=lock_timeout):
        runs = {name: p.run() for name, p in pipes.items()}
        figs = [f for r in runs.values() for f in r.figures]
        comparison = None
        planes = [next((f for f in r.figures if f.name.startswith("info-plane_binning")), None) for r in runs.values()]
        if len(planes) > 1 and all(planes):
            comparison = side_by_side([p for p in planes if p is not None], comparison_path, titles=list(runs))
    first = next(iter(runs.values()))
    return DemoResult(od, runs, figs, first.report, time.perf_counter() - t0, comparison)


def side_by_side(images: Sequence[Path], out: Path, titles: Sequence[str] | None = None) -> Path:
    """Place already-drawn figures (PNG) next to each other in one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    imgs = [mpimg.imread(str(p)) for p in images]
    h = max(i.shape[0] for i in imgs)
    w = sum(i.shape[1] for i in imgs)
    dpi = 100
    fig, axes = plt.subplots(1, len(imgs), figsize=(w / dpi, h / dpi + (0.4 if titles else 0)), dpi=dpi,
                             gridspec_kw={"width_ratios": [i.shape[1] for i in imgs]})
    for k, (ax, im) in enumerate(zip(np.atleast_1d(axes), imgs)):
        ax.imshow(im)
        ax.set_axis_off()
        if titles:
            ax.set_title(titles[k], fontsize=16, fontweight="bold")
    fig.tight_layout(pad=0.2)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out, out.with_name(out.stem + ".tmp.png")) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(fig)
    return out
