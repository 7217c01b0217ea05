"""Figures of an OOD run: score histograms, ROC / PR curves, metric vs k / n components /
checkpoint, and a 2-D embedding of fit vs test vs OOD features. Each is written atomically
(tmp file + rename) under ``out_dir/figures`` and listed relative to ``out_dir``."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_CONFIG_FIGURES = 24


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from ibscope._atomic import atomic_path

    try:
        with atomic_path(path, path.with_name(path.stem + ".tmp" + path.suffix)) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        try:
            matplotlib.use("Agg")
        except Exception:  # a GUI backend already in use: keep it
            pass
    import matplotlib.pyplot as plt

    return plt


def draw_histograms(ax, scores: dict[str, np.ndarray], threshold: float, bins: int = 40) -> dict[str, np.ndarray]:
    """Overlaid, density-normalised score histograms per set with the threshold line.
    Returns the plotted densities {set: heights} (for tests)."""
    allv = np.concatenate([np.asarray(v) for v in scores.values()])
    lo, hi = float(np.min(allv)), float(np.max(allv))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    heights = {}
    for name, v in scores.items():
        h, _, _ = ax.hist(v, bins=edges, density=True, histtype="stepfilled" if name in ("val", "test") else "step",
                          alpha=0.35 if name in ("val", "test") else 1.0, linewidth=1.5, label=f"{name} (n={len(v)})")
        heights[name] = np.asarray(h)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("OOD score (higher = more OOD)")
    ax.set_ylabel("density")
    ax.set_title("Score distributions", fontsize=10)
    ax.legend(fontsize=7)
    return heights


def draw_roc(ax, id_scores: np.ndarray, ood: dict[str, np.ndarray]) -> None:
    """ROC curves (OOD positive) of each OOD set against the ID test set."""
    from ibscope.ood.metrics import auroc, roc_curve_points

    for name, s in ood.items():
        fpr, tpr = roc_curve_points(id_scores, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(id_scores, s):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (ID flagged)")
    ax.set_ylabel("true positive rate (OOD flagged)")
    ax.set_title("ROC, OOD positive", fontsize=10)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=7)


def draw_pr(ax, id_scores: np.ndarray, ood: dict[str, np.ndarray]) -> None:
    """Precision-recall curves with OOD positive (AUPR-Out)."""
    from ibscope.ood.metrics import aupr_out, pr_curve_points

    for name, s in ood.items():
        rec, prec = pr_curve_points(id_scores, s)
        ax.step(rec, prec, where="post", label=f"{name} (AUPR-Out {aupr_out(id_scores, s):.3f})")
    ax.set_xlabel("recall (OOD)")
    ax.set_ylabel("precision (OOD)")
    ax.set_title("Precision-recall, OOD positive", fontsize=10)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=7)


def config_figure(scores: dict[str, np.ndarray], threshold: float, ood_names: list[str], title: str):
    """One configuration: score histograms (val, test, OOD sets), ROC and PR-Out curves."""
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    draw_histograms(a1, scores, threshold)
    ood = {n: scores[n] for n in ood_names}
    draw_roc(a2, scores["test"], ood)
    draw_pr(a3, scores["test"], ood)
    fig.suptitle(title, fontsize=11)
    return fig


def metric_curve_figure(series: dict[str, tuple[list, list]], xlabel: str, title: str, logx: bool = False,
                        metric: str = "auroc"):
    """Lines of ``metric`` against a parameter: {label: (xs, ys)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    if xlabel in ("epoch", "step", "checkpoint") and not logx:  # whole numbers on the axis
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric.upper() if metric == "auroc" else metric)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def embedding_2d(feats: dict[str, np.ndarray], seed: int = 0, max_points: int = 1500):
    """2-D PCA of standardised features, fitted on the fit split only. Returns {set: (m, 2)}."""
    from sklearn.decomposition import PCA

    fit = np.asarray(feats["fit"], dtype=np.float64)
    mean, sd = fit.mean(0), fit.std(0)
    sd = np.where(sd <= 1e-12, 1.0, sd)
    nc = min(2, fit.shape[0], fit.shape[1])
    pca = PCA(n_components=nc, svd_solver="full").fit((fit - mean) / sd)
    rng = np.random.default_rng(seed)
    out = {}
    for name, f in feats.items():
        f = np.asarray(f, dtype=np.float64)
        if f.shape[0] > max_points:
            f = f[np.sort(rng.choice(f.shape[0], max_points, replace=False))]
        e = pca.transform((f - mean) / sd)
        out[name] = e if e.shape[1] == 2 else np.c_[e, np.zeros(len(e))]
    return out


def embedding_figure(emb: dict[str, np.ndarray], title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0), layout="constrained")
    for name, e in emb.items():
        ax.scatter(e[:, 0], e[:, 1], s=6, alpha=0.5 if name == "fit" else 0.7, label=name)
    ax.set_xlabel("PC 1 (fit split)")
    ax.set_ylabel("PC 2 (fit split)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, markerscale=2)
    return fig


def make_figures(out: Path, results: list[dict], score_store: dict, plot_data: dict, *, ood_names: list[str],
                 tpr: float, seed: int, warnings_out: list[str]) -> list[str]:
    """Write all figures; return their paths relative to ``out``."""
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []

    def save(fig, name: str) -> None:
        _save(fig, figdir / name)
        paths.append(f"figures/{name}")

    from ibscope.ood.runner import ckpt_name

    last_ck = max(r["checkpoint"] for r in results)
    entry = score_store[f"checkpoint_{last_ck}"]
    last_name = ckpt_name(entry.get("epoch"), entry.get("step"), last_ck)
    configs = list(entry["configs"])
    if len(configs) > MAX_CONFIG_FIGURES:
        warnings_out.append(f"{len(configs)} configurations: histograms and ROC/PR figures drawn for the first "
                            f"{MAX_CONFIG_FIGURES} only (all metrics are in the JSON).")
    thresholds = {(r["config"], r["checkpoint"]): r["threshold"] for r in results}
    for cid in configs[:MAX_CONFIG_FIGURES]:
        sc = entry["configs"][cid]
        sets = {"val": sc["val"], "test": sc["test"], **{n: sc[n] for n in ood_names}}
        save(config_figure(sets, thresholds[(cid, last_ck)], ood_names, f"{cid} ({last_name})"),
             f"scores_{slug(cid)}.png")

    last = [r for r in results if r["checkpoint"] == last_ck]
    # AUROC vs k (knn, one line per reduction x OOD set)
    ks = sorted({r["k"] for r in last if r["detector"] == "knn"})
    if len(ks) > 1:
        series: dict[str, tuple[list, list]] = {}
        for red in dict.fromkeys(r["reduction"] for r in last):
            for name in ood_names:
                rows = sorted((r for r in last if r["detector"] == "knn" and r["reduction"] == red and r["ood_set"] == name),
                              key=lambda r: r["k"])
                series[f"{red} / {name}"] = ([r["k"] for r in rows], [r["auroc"] for r in rows])
        save(metric_curve_figure(series, "k (neighbour index)", f"k-NN AUROC vs k ({last_name})", logx=True),
             "auroc_vs_k.png")
    # AUROC vs number of components (pca:N / umap:N with the same prefix)
    groups: dict[tuple, list] = defaultdict(list)
    for r in last:
        m = re.match(r"^(.*?)(pca|umap):(\d+)$", r["reduction"])
        if m:
            groups[(m.group(1), m.group(2), r["detector"], r["k"], r["ood_set"])].append((int(m.group(3)), r["auroc"]))
    series = {}
    for (prefix, op, det, k, name), pts in groups.items():
        if len({n for n, _ in pts}) > 1:
            pts.sort()
            label = f"{det}{'' if k is None else f' k={k}'} {prefix}{op} / {name}"
            series[label] = ([p[0] for p in pts], [p[1] for p in pts])
    if series:
        save(metric_curve_figure(series, "number of components", f"AUROC vs components ({last_name})", logx=True),
             "auroc_vs_components.png")
    # AUROC vs checkpoint
    cks = sorted({r["checkpoint"] for r in results})
    # the time axis: epoch when every checkpoint has a distinct one, else step, else the index
    tcol = "checkpoint"
    for col in ("epoch", "step"):
        vals = {r["checkpoint"]: r[col] for r in results}
        if all(v is not None for v in vals.values()) and len(set(vals.values())) == len(vals):
            tcol = col
            break
    if len(cks) > 1:
        series = {}
        for cid in dict.fromkeys(r["config"] for r in results):
            for name in ood_names:
                rows = sorted((r for r in results if r["config"] == cid and r["ood_set"] == name), key=lambda r: r["checkpoint"])
                xs = [r[tcol] for r in rows]
                series[f"{cid} / {name}"] = (xs, [r["auroc"] for r in rows])
        save(metric_curve_figure(series, tcol, "AUROC across training"),
             "auroc_vs_checkpoint.png")
    if plot_data:
        emb = embedding_2d(plot_data["feats"], seed=seed)
        save(embedding_figure(emb, f"2-D PCA of the layer features, fitted on the fit split "
                                     f"({ckpt_name(*_ep_step(score_store, plot_data['checkpoint']), plot_data['checkpoint'])})"),
             "embedding_2d.png")
    return paths


def _ep_step(score_store: dict, ck: int) -> tuple[Any, Any]:
    e = score_store.get(f"checkpoint_{ck}", {})
    return e.get("epoch"), e.get("step")
