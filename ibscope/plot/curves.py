"""Curves: any quantity against epoch, one line per layer; and the training-metrics panel.

* one panel per estimator setting (identical y axes, so estimators compare at a glance);
* colour = layer, line style = probe split (train solid, test dashed, ...);
* several runs: median line with an inter-quantile band, or every run faint behind the median;
  one run with estimator standard errors: a +/- 1 stderr band;
* caps from the rows drawn dashed; log-x when epochs span decades (symlog when they start at 0).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ibscope.plot import style
from ibscope.plot._data import (
    METRICS,
    SUBTRACTED,
    Setting,
    cap_label,
    cubes,
    layer_order,
    null_interval,
    rows_of,
    saturated_points,
    summarize,
    truth_interval,
)

CAP_STYLE: dict[str, Any] = dict(color="0.35", linestyle=(0, (4, 3)), linewidth=1.0, zorder=1)
NULL_HATCH = "////"
#: legend texts shared with the information plane
NULL_LABEL = "permutation null: mean ± 2 sd (chance level)"
SATURATED_LABEL = "hollow: saturated (within 1 % of cap)"
VALIDATION_LABEL = "bars: truth range from validated bias"


def null_patch() -> Patch:
    return Patch(facecolor="none", edgecolor="0.35", hatch=NULL_HATCH, linewidth=0.0, label=NULL_LABEL)


def saturated_handle() -> Line2D:
    return Line2D([], [], linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                  markeredgecolor="0.2", label=SATURATED_LABEL)


def validation_handle() -> Line2D:
    return Line2D([], [], color="0.3", marker="|", markersize=8, linewidth=1.0, label=VALIDATION_LABEL)


def auto_logx(times: np.ndarray) -> bool:
    """Log-x when the positive times span more than a factor of 30 (log-spaced checkpoints)."""
    pos = times[times > 0]
    return bool(pos.size >= 3 and pos.max() / max(pos.min(), 1.0) >= 30)


def set_time_axis(ax, times: np.ndarray, time_col: str, logx: bool | None) -> None:
    if logx is None:
        logx = auto_logx(times)
    if logx:
        if times.size and times.min() <= 0:
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.4)
            ax.set_xlabel(f"{time_col} (log scale; linear below 1)")
            ax.set_xlim(left=min(0.0, float(times.min())))
            style.plain_log_ticks(ax.xaxis)
        else:
            ax.set_xscale("log")
            ax.set_xlabel(f"{time_col} (log scale)")
            style.plain_log_ticks(ax.xaxis)
    else:
        ax.set_xlabel(time_col)
    if time_col in ("epoch", "step", "checkpoint"):  # whole numbers: no 0.5 epochs on the axis
        from matplotlib.ticker import MaxNLocator

        if ax.get_xscale() == "linear":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_series(ax, times, value, stderr, *, color, ls, mode, band, gid, has_stderr, saturated=None,
                 null=None, truth=None) -> dict:
    """One line (median over runs) with its band; ``saturated`` (bool per time) draws those markers
    hollow (a separate line ``<gid>:saturated``), ``null`` = (lo, hi) a hatched band ``<gid>:null``,
    ``truth`` = (lo, hi) validation error bars ``<gid>:validation``. Returns what was drawn."""
    drawn = {"null": False, "saturated": False, "validation": False}
    med, lo, hi = summarize(value, mode, band)
    if null is not None and np.isfinite(null[0]).any():
        ok = np.isfinite(null[0]) & np.isfinite(null[1])
        ax.fill_between(times, np.where(ok, null[0], np.nan), np.where(ok, null[1], np.nan), where=ok,
                        facecolor="none", edgecolor=color, hatch=NULL_HATCH, linewidth=0.0, alpha=0.6, zorder=1,
                        gid=f"{gid}:null")
        drawn["null"] = True
    if mode == "all" and value.shape[0] > 1:
        for r in range(value.shape[0]):
            ax.plot(times, value[r], ls, color=color, alpha=0.25, linewidth=0.8, zorder=1, gid=f"{gid}:run{r}")
    elif lo is not None:
        ax.fill_between(times, lo, hi, color=color, alpha=0.18, linewidth=0, zorder=1, gid=f"{gid}:band")
    elif has_stderr:
        ax.fill_between(times, value[0] - stderr[0], value[0] + stderr[0], color=color, alpha=0.15,
                        linewidth=0, zorder=1, gid=f"{gid}:stderr")
    sat = np.zeros(len(times), bool) if saturated is None else (np.asarray(saturated, bool) & np.isfinite(med))
    filled = [i for i in range(len(times)) if not sat[i]]
    ax.plot(times, med, ls, color=color, marker="o", markersize=3.2, zorder=2, gid=gid, markevery=filled)
    if sat.any():
        ax.plot(np.asarray(times)[sat], med[sat], linestyle="none", marker="o", markersize=4.2,
                markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.1, zorder=3, gid=f"{gid}:saturated")
        drawn["saturated"] = True
    if truth is not None and np.isfinite(truth[0]).any():
        ok = np.isfinite(truth[0]) & np.isfinite(med)
        t = np.asarray(times)[ok]
        ax.errorbar(t, med[ok], yerr=[med[ok] - truth[0][ok], truth[1][ok] - med[ok]], fmt="none", ecolor=color,
                    elinewidth=1.0, capsize=2.0, alpha=0.8, zorder=2, gid=f"{gid}:validation")
        drawn["validation"] = True
    return drawn


def curves_figure(rows: Sequence[dict], quantity: str, *, settings_: Sequence[Setting], time_col: str,
                  mode: str = "median", band=(25.0, 75.0), logx: bool | None = None) -> Figure:
    """``quantity`` against time, one panel per estimator setting, one line per layer (x split)."""
    rows = [r for r in rows if r["quantity"] == quantity and r["estimator"] != METRICS]
    layers = layer_order(rows)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    colors = style.layer_colors(len(layers))
    n = len(settings_)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    all_times = np.asarray(sorted({float(r[time_col]) for r in rows}), float)
    unit = rows[0]["unit"]
    n_runs = len({r["run"] for r in rows})
    any_stderr = False
    any_layer_caps = False
    drawn = {"null": False, "saturated": False, "validation": False}
    subtracted = any(r.get(SUBTRACTED) for r in rows)
    ylabel = f"{quantity} − null mean  [{unit}]" if subtracted else f"{quantity}  [{unit}]"
    with style.context():
        fig = style.new_figure(4.6 * ncols + 0.6, 3.5 * nrows + 1.3)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
        for i, s in enumerate(settings_):
            ax = axes.flat[i]
            caps: dict[float, tuple] = {}
            for si, split in enumerate(splits):
                sub = rows_of(rows, s, split)
                if not sub:
                    continue
                c = cubes(sub, [quantity], time_col, layers=layers)[quantity]
                for cap in c.caps:
                    caps.setdefault(cap, (c.n_samples,))
                for li, layer in enumerate(layers):
                    v = c.value[:, :, li]
                    if not np.isfinite(v).any():
                        continue
                    has_err = c.value.shape[0] == 1 and bool(np.isfinite(c.stderr[:, :, li]).any())
                    any_stderr = any_stderr or has_err
                    nlo, nhi = null_interval(c)
                    tlo, thi = truth_interval(c)
                    got = _draw_series(ax, c.times, v, c.stderr[:, :, li], color=colors[li],
                                       ls=style.split_style(si), mode=mode, band=band, gid=f"curve:{split}:{layer}",
                                       has_stderr=has_err, saturated=saturated_points(c)[:, li],
                                       null=(nlo[:, li], nhi[:, li]), truth=(tlo[:, li], thi[:, li]))
                    for k, v_ in got.items():
                        drawn[k] = drawn[k] or v_
            per_layer = _layer_caps(rows_of(rows, s))
            if len(set(per_layer.values())) > 1:  # caps differ by layer (e.g. a rank capped by the width)
                any_layer_caps = True
                for li, layer in enumerate(layers):
                    for cap in per_layer.get(layer, ()):
                        ax.axhline(cap, color=colors[li], linestyle=(0, (4, 3)), linewidth=0.9, alpha=0.6,
                                   zorder=1, gid=f"cap:{layer}:{float(cap)!r}")
            else:
                for cap, (ns,) in caps.items():
                    ax.axhline(cap, gid=f"cap:{float(cap)!r}", **CAP_STYLE)
                    ax.annotate(cap_label(quantity, cap, unit, ns), xy=(0.02, cap),
                                xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points",
                                ha="left", va="bottom", fontsize=8, color="0.3")
            ax.set_title("\n".join(textwrap.wrap(s.label(), 50)), fontsize=10)
            set_time_axis(ax, all_times, time_col, logx)
            if i % ncols == 0:
                ax.set_ylabel(ylabel)
            ax.xaxis.set_tick_params(labelbottom=True)
        for j in range(n, nrows * ncols):
            axes.flat[j].set_visible(False)
        handles: list = [Line2D([], [], color=colors[li], marker="o", markersize=3.2, label=layer)
                         for li, layer in enumerate(layers)]
        if len(splits) > 1:
            handles += [Line2D([], [], color="0.2", linestyle=style.split_style(si),  # type: ignore[arg-type]  # a dash pattern
                               label=f"split: {sp}")
                        for si, sp in enumerate(splits)]
        if any_layer_caps:
            handles.append(Line2D([], [], color="0.4", linestyle=(0, (4, 3)), linewidth=0.9,
                                  label="cap of each layer (its colour)"))
        if n_runs > 1:
            handles.append(Patch(color="0.6", alpha=0.4, label=(
                f"{band[0]:g}–{band[1]:g}th pct of {n_runs} runs" if mode == "median" else f"each of {n_runs} runs")))
        elif any_stderr:
            handles.append(Patch(color="0.6", alpha=0.4, label="± 1 standard error"))
        if drawn["null"]:
            handles.append(null_patch())
        if drawn["saturated"]:
            handles.append(saturated_handle())
        if drawn["validation"]:
            handles.append(validation_handle())
        longest = max(len(h.get_label()) for h in handles)
        fig.legend(handles=handles, loc="outside lower center", title="layers (input → output)",
                   ncols=style.legend_cols(len(handles), fig.get_figwidth(), max(1.7, 0.06 * longest)))
        agg = f" (median of {n_runs} runs)" if n_runs > 1 else ""
        nsub = ", permutation null subtracted" if subtracted else ""
        fig.suptitle(f"{quantity} over training{agg}{nsub}")
    fig.ibscope_meta = {"quantity": quantity, "unit": unit, "layers": layers, "splits": splits, "drawn": drawn}  # type: ignore[attr-defined]  # ibscope's metadata on the Figure
    return fig


def _layer_caps(rows: Sequence[dict]) -> dict[str, tuple]:
    """Per layer, the distinct finite caps of its rows."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["cap"] is not None and math.isfinite(r["cap"]):
            out.setdefault(r["layer"], {})[round(float(r["cap"]), 9)] = None
    return {k: tuple(sorted(v)) for k, v in out.items()}


def metrics_figure(rows: Sequence[dict], *, time_col: str, mode: str = "median", band=(25.0, 75.0),
                   logx: bool | None = None) -> Figure:
    """Training metrics (accuracy, loss, ...) against time: one panel per unit, one line per metric.

    Metrics belong to the checkpoint, not to the probe split, so rows repeated under several
    splits are counted once.
    """
    seen: set = set()
    uniq = []
    for r in rows:
        if r["estimator"] != METRICS:
            continue
        key = (r["run"], r[time_col], r["quantity"])
        if key in seen:
            continue
        seen.add(key)
        uniq.append(r)
    units = list(dict.fromkeys(r["unit"] for r in uniq))
    all_times = np.asarray(sorted({float(r[time_col]) for r in uniq}), float)
    n_runs = len({r["run"] for r in uniq})
    with style.context():
        fig = style.new_figure(4.6 * len(units) + 0.6, 3.6)
        axes = fig.subplots(1, len(units), squeeze=False)[0]
        for ax, unit in zip(axes, units):
            sub = [r for r in uniq if r["unit"] == unit]
            names = sorted(dict.fromkeys(r["quantity"] for r in sub), key=_metric_order)
            c = cubes(sub, list(names), time_col, layer_col="quantity")
            for qi, q in enumerate(names):
                cube = c[q]
                v = cube.value[:, :, cube.layers.index(q)]
                color = _metric_color(q, qi)
                ls = "--" if "test" in q or "val" in q else "-"
                _draw_series(ax, cube.times, v, cube.stderr[:, :, cube.layers.index(q)], color=color, ls=ls,
                             mode=mode, band=band, gid=f"metric:{q}", has_stderr=False)
                ax.lines[-1].set_label(q)
            set_time_axis(ax, all_times, time_col, logx)
            ax.set_ylabel(_metric_axis(unit))
            ax.legend(loc="best")
            if unit == "ratio":
                ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(1.0, ax.get_ylim()[1]))
        agg = f" (median of {n_runs} runs)" if n_runs > 1 else ""
        fig.suptitle(f"Training metrics{agg}")
    fig.ibscope_meta = {"units": units}  # type: ignore[attr-defined]  # ibscope's metadata on the Figure
    return fig


def _metric_order(name: str) -> tuple:
    return ("test" in name or "val" in name, name)


def _metric_color(name: str, i: int):
    base = {"train": "#1f77b4", "test": "#d62728", "val": "#ff7f0e"}
    for k, v in base.items():
        if k in name:
            return v
    if name in ("accuracy", "loss", "acc"):  # the canonical checkpoint keys are training metrics
        return base["train"]
    return style.layer_colors(10)[(i + 2) % 10]


def _metric_axis(unit: str) -> str:
    if unit == "ratio":
        return "accuracy (ratio)"
    if unit == "loss":
        return "loss (as logged)"
    return unit
