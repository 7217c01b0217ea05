"""The information plane: I(X;T) on x, I(T;Y) on y.

Two views of the same numbers:

* **snapshot** (IDNNs / Saxe et al.): one polyline per checkpoint through the layers, coloured by
  epoch on a log colour scale; markers distinguish the layers.
* **trajectory** (Butakov et al.): one line per layer through the checkpoints, in the layer's
  colour, its markers coloured by epoch.

Both draw the caps found in the rows (dashed: log n for I(X;T), H(Y) for I(T;Y)), name the
estimator and its settings in the title, and aggregate several runs (median + inter-quantile bars,
or every run faint behind the median). Panels (one per split, or one per estimator setting) share
their axes and the colour scale.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ibscope.errors import DataError
from ibscope.plot import style
from ibscope.plot._data import (
    ITY,
    IXT,
    PAIR,
    SUBTRACTED,
    Cube,
    cap_label,
    cubes,
    layer_order,
    null_interval,
    saturated_points,
    summarize,
    truth_interval,
)

VIEWS = ("snapshot", "trajectory")
CAP_STYLE: dict[str, Any] = dict(color="0.35", linestyle=(0, (4, 3)), linewidth=1.0, zorder=1)


@dataclass
class Panel:
    title: str
    x: Cube
    y: Cube
    drawn: dict = field(default_factory=lambda: {"null": False, "saturated": False, "validation": False})


def make_panels(panels: Sequence[tuple[str, list[dict]]], time_col: str) -> list[Panel]:
    """Lay each panel's rows out as aligned I(X;T) / I(T;Y) cubes (shared layer order)."""
    layers = layer_order([r for _, rows in panels for r in rows])
    out = []
    for title, rows in panels:
        c = cubes(rows, PAIR, time_col, layers=layers)
        if not np.isfinite(c[IXT].value).any() or not np.isfinite(c[ITY].value).any():
            raise DataError(f"Panel '{title}' has no I(X;T)/I(T;Y) pairs to draw.",
                            hint="The information plane needs a pair estimator (rows with both quantities).")
        out.append(Panel(title, c[IXT], c[ITY]))
    return out


def _limits(panels: list[Panel]) -> tuple[tuple[float, float], tuple[float, float]]:
    def extra(c: Cube) -> list[np.ndarray]:
        out = []
        for a, b in (null_interval(c), truth_interval(c)):
            out += [a[np.isfinite(a)].ravel(), b[np.isfinite(b)].ravel()]
        return out

    def lim(cubes_: list[Cube]):
        vals = np.concatenate([c.value[np.isfinite(c.value)].ravel() for c in cubes_] +
                              [np.asarray(c.caps, float) for c in cubes_] + [e for c in cubes_ for e in extra(c)])
        hi = float(vals.max()) if vals.size else 1.0
        lo = min(0.0, float(vals.min()) if vals.size else 0.0)
        span = (hi - lo) or 1.0
        return lo - (0.04 * span if lo < 0 else 0.0), hi + 0.06 * span

    return lim([p.x for p in panels]), lim([p.y for p in panels])


def draw_caps(ax, panel: Panel) -> None:
    """Dashed cap lines with their value written on them (placed away from typical data)."""
    for cap in panel.x.caps:
        ax.axvline(cap, gid=f"cap:x:{float(cap)!r}", **CAP_STYLE)
        ax.annotate(cap_label(IXT, cap, panel.x.unit, panel.x.n_samples), xy=(cap, 0.03),
                    xycoords=("data", "axes fraction"), xytext=(-3, 0), textcoords="offset points",
                    rotation=90, ha="right", va="bottom", fontsize=8, color="0.3")
    for cap in panel.y.caps:
        ax.axhline(cap, gid=f"cap:y:{float(cap)!r}", **CAP_STYLE)
        ax.annotate(cap_label(ITY, cap, panel.y.unit, panel.y.n_samples), xy=(0.02, cap),
                    xycoords=("axes fraction", "data"), xytext=(0, -3), textcoords="offset points",
                    ha="left", va="top", fontsize=8, color="0.3")


def _runs_note(n_runs: int, mode: str, band: tuple[float, float], view: str) -> str:
    if n_runs < 2:
        return ""
    if mode == "all":
        return f"{n_runs} runs faint, median bold"
    return f"median of {n_runs} runs, bars {band[0]:g}–{band[1]:g}th pct"


def draw_null(ax, panel: Panel, xm: np.ndarray, colors: list | None) -> bool:
    """The permutation null of I(T;Y) per layer: a hatched ribbon [null_mean - 2 sd, null_mean + 2 sd]
    following the layer through the checkpoints (at each point's I(X;T)), gid ``null:<layer>``.
    Returns whether anything was drawn."""
    from matplotlib.collections import PolyCollection

    lo, hi = null_interval(panel.y)
    drawn = False
    for li, layer in enumerate(panel.y.layers):
        x = xm[:, li]
        ok = np.isfinite(lo[:, li]) & np.isfinite(hi[:, li]) & np.isfinite(x)
        idx = np.nonzero(ok)[0]
        if idx.size == 0:
            continue
        polys = []
        for a, b in zip(idx[:-1], idx[1:]):  # one quadrilateral per pair of consecutive checkpoints
            polys.append([(x[a], lo[a, li]), (x[b], lo[b, li]), (x[b], hi[b, li]), (x[a], hi[a, li])])
        if idx.size == 1:
            a = idx[0]
            polys.append([(x[a], lo[a, li]), (x[a], lo[a, li]), (x[a], hi[a, li]), (x[a], hi[a, li])])
        col = colors[li] if colors is not None else "0.4"
        pc = PolyCollection(polys, facecolors="none", edgecolors=[col], hatch="////", linewidths=0.0, alpha=0.55,
                            zorder=1, gid=f"null:{layer}")
        ax.add_collection(pc)
        # the null at each point: a short tick at null_mean, so a single checkpoint shows too
        ax.plot(x[idx], ((lo[:, li] + hi[:, li]) / 2)[idx], linestyle="none", marker="_", markersize=7,
                color=col, alpha=0.8, zorder=1, gid=f"null-mean:{layer}")
        drawn = True
    return drawn


def _hollow(colors: np.ndarray, sat: np.ndarray, edge) -> tuple[np.ndarray, list, np.ndarray]:
    """Face colours with alpha 0 where ``sat``; edges in the point's colour there (else ``edge``)."""
    face = np.array(colors, float, copy=True).reshape(-1, 4)
    edges = [tuple(face[i]) if sat[i] else edge for i in range(len(face))]
    face[sat, 3] = 0.0
    widths = np.where(sat, 1.3, 0.4 if edge == "0.15" else 1.0)
    return face, edges, widths


def _saturation(panel: Panel) -> np.ndarray:
    """(times, layers): the point's I(X;T) or I(T;Y) is saturated."""
    return saturated_points(panel.x) | saturated_points(panel.y)


def draw_validation(ax, panel: Panel, xm, ym, colors: list | None) -> bool:
    """Validation error bars (``ibscope plot --validation``) on both axes, gid ``validation:<layer>``."""
    xlo, xhi = truth_interval(panel.x)
    ylo, yhi = truth_interval(panel.y)
    drawn = False
    for li, layer in enumerate(panel.x.layers):
        okx = np.isfinite(xlo[:, li]) & np.isfinite(xm[:, li]) & np.isfinite(ym[:, li])
        oky = np.isfinite(ylo[:, li]) & np.isfinite(xm[:, li]) & np.isfinite(ym[:, li])
        ok = okx | oky
        if not ok.any():
            continue
        col = colors[li] if colors is not None else "0.3"
        xe = np.where(okx, np.vstack([xm[:, li] - xlo[:, li], xhi[:, li] - xm[:, li]]), 0.0)[:, ok]
        ye = np.where(oky, np.vstack([ym[:, li] - ylo[:, li], yhi[:, li] - ym[:, li]]), 0.0)[:, ok]
        ax.errorbar(xm[ok, li], ym[ok, li], xerr=xe, yerr=ye, fmt="none", ecolor=col, elinewidth=0.9,
                    capsize=2.0, alpha=0.75, zorder=2, gid=f"validation:{layer}")
        drawn = True
    return drawn


def draw_snapshot(ax, panel: Panel, scale: style.TimeScale, mode: str, band) -> None:
    """One polyline per checkpoint across the layers; markers per layer, coloured by epoch."""
    xm, xlo, xhi = summarize(panel.x.value, mode, band)
    ym, ylo, yhi = summarize(panel.y.value, mode, band)
    times = panel.x.times
    if mode == "all" and len(panel.x.runs) > 1:
        for r, run in enumerate(panel.x.runs):
            for ti, t in enumerate(times):
                ax.plot(panel.x.value[r, ti], panel.y.value[r, ti], "-", color=scale.color(t), alpha=0.25,
                        linewidth=0.7, zorder=1, gid=f"run:{run}:{float(t)!r}")
    for ti, t in enumerate(times):
        c = scale.color(t)
        ax.plot(xm[ti], ym[ti], "-", color=c, linewidth=1.0, alpha=0.85, zorder=2, gid=f"snapshot:{float(t)!r}")
        if xlo is not None and mode == "median":
            ax.errorbar(xm[ti], ym[ti], xerr=[xm[ti] - xlo[ti], xhi[ti] - xm[ti]],
                        yerr=[ym[ti] - ylo[ti], yhi[ti] - ym[ti]], fmt="none", ecolor=c, alpha=0.45,
                        elinewidth=0.8, zorder=1)
    sat = _saturation(panel)
    panel.drawn["null"] = draw_null(ax, panel, xm, None) or panel.drawn["null"]
    panel.drawn["validation"] = draw_validation(ax, panel, xm, ym, None) or panel.drawn["validation"]
    for li, layer in enumerate(panel.x.layers):
        face, edges, widths = _hollow(scale.color(times), sat[:, li], "0.15")
        ok = np.isfinite(xm[:, li]) & np.isfinite(ym[:, li])  # gaps (noted cells) are not drawn
        ax.scatter(xm[ok, li], ym[ok, li], c=face[ok], marker=style.layer_marker(li), s=30,
                   edgecolors=[e for e, k in zip(edges, ok) if k], linewidths=widths[ok], zorder=3,
                   gid=f"layer:{layer}")
        panel.drawn["saturated"] = panel.drawn["saturated"] or bool((sat[:, li] & np.isfinite(xm[:, li])).any())


def draw_trajectory(ax, panel: Panel, scale: style.TimeScale, mode: str, band, colors: list) -> None:
    """One line per layer across checkpoints in the layer's colour; markers coloured by epoch."""
    xm, xlo, xhi = summarize(panel.x.value, mode, band)
    ym, ylo, yhi = summarize(panel.y.value, mode, band)
    times = panel.x.times
    sat = _saturation(panel)
    panel.drawn["null"] = draw_null(ax, panel, xm, colors) or panel.drawn["null"]
    panel.drawn["validation"] = draw_validation(ax, panel, xm, ym, colors) or panel.drawn["validation"]
    for li, layer in enumerate(panel.x.layers):
        col = colors[li]
        if mode == "all" and len(panel.x.runs) > 1:
            for r, run in enumerate(panel.x.runs):
                ax.plot(panel.x.value[r, :, li], panel.y.value[r, :, li], "-", color=col, alpha=0.25,
                        linewidth=0.8, zorder=1, gid=f"run:{run}:{layer}")
        ax.plot(xm[:, li], ym[:, li], "-", color=col, linewidth=1.5, zorder=2, gid=f"trajectory:{layer}")
        if xlo is not None and mode == "median":
            ax.errorbar(xm[:, li], ym[:, li], xerr=[xm[:, li] - xlo[:, li], xhi[:, li] - xm[:, li]],
                        yerr=[ym[:, li] - ylo[:, li], yhi[:, li] - ym[:, li]], fmt="none", ecolor=col,
                        alpha=0.35, elinewidth=0.8, zorder=1)
        face, edges, widths = _hollow(scale.color(times), sat[:, li], col)
        ok = np.isfinite(xm[:, li]) & np.isfinite(ym[:, li])
        ax.scatter(xm[ok, li], ym[ok, li], c=face[ok], marker=style.layer_marker(li), s=30,
                   edgecolors=[e for e, k in zip(edges, ok) if k], linewidths=widths[ok], zorder=3,
                   gid=f"layer:{layer}")
        panel.drawn["saturated"] = panel.drawn["saturated"] or bool((sat[:, li] & np.isfinite(xm[:, li])).any())


def plane_figure(panels: Sequence[tuple[str, list[dict]]], *, suptitle: str, view: str = "snapshot",
                 time_col: str = "epoch", mode: str = "median", band=(25.0, 75.0)) -> Figure:
    """A figure with one information-plane panel per ``(title, rows)``; identical axes."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    ps = make_panels(panels, time_col)
    unit = ps[0].x.unit
    all_times = np.concatenate([p.x.times for p in ps])
    scale = style.time_norm(all_times, time_col)
    (x0, x1), (y0, y1) = _limits(ps)
    layers = ps[0].x.layers
    colors = style.layer_colors(len(layers))
    xsub = " − null mean" if any(r.get(SUBTRACTED) for _, rows in panels for r in rows if r["quantity"] == IXT) else ""
    ysub = " − null mean" if any(r.get(SUBTRACTED) for _, rows in panels for r in rows if r["quantity"] == ITY) else ""
    n = len(ps)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    with style.context():
        fig = style.new_figure(4.4 * ncols + 1.4, 3.9 * nrows + 1.3)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
        for i, p in enumerate(ps):
            ax = axes.flat[i]
            draw_caps(ax, p)
            if view == "snapshot":
                draw_snapshot(ax, p, scale, mode, band)
            else:
                draw_trajectory(ax, p, scale, mode, band, colors)
            note = _runs_note(len(p.x.runs), mode, band, view)
            ax.set_title(p.title + (f"\n{note}" if note else ""), fontsize=10)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            if i % ncols == 0:
                ax.set_ylabel(f"I(T;Y){ysub}  [{unit}]")
            if i // ncols == nrows - 1 or i + ncols >= n:
                ax.set_xlabel(f"I(X;T){xsub}  [{unit}]")
                ax.xaxis.set_tick_params(labelbottom=True)
        for j in range(n, nrows * ncols):
            axes.flat[j].set_visible(False)
        style.add_time_colorbar(fig, scale, axes[:, :].ravel().tolist()[:n])
        handles: list[Any] = []  # legend artists (lines and patches)
        for li, layer in enumerate(layers):
            if view == "snapshot":
                handles.append(Line2D([], [], linestyle="none", marker=style.layer_marker(li), color="0.5",
                                      markeredgecolor="0.15", markersize=6, label=layer))
            else:
                handles.append(Line2D([], [], color=colors[li], marker=style.layer_marker(li),
                                      markerfacecolor="0.85", markeredgecolor=colors[li], label=layer))
        if any(p.x.caps or p.y.caps for p in ps):
            handles.append(Line2D([], [], label="cap (log n, H(Y))", **{k: v for k, v in CAP_STYLE.items()
                                                                          if k != "zorder"}))
        from ibscope.plot.curves import null_patch, saturated_handle, validation_handle

        if any(p.drawn["null"] for p in ps):
            handles.append(null_patch())
            handles[-1].set_label("null of I(T;Y): mean ± 2 sd")
        if any(p.drawn["saturated"] for p in ps):
            handles.append(saturated_handle())
            handles[-1].set_label("hollow: I(X;T) or I(T;Y) within 1 % of cap")
        if any(p.drawn["validation"] for p in ps):
            handles.append(validation_handle())
        title = "layers (input → output)" + ("; line = one checkpoint" if view == "snapshot" else "")
        longest = max(len(h.get_label()) for h in handles)
        fig.legend(handles=handles, loc="outside lower center", title=title,
                   ncols=style.legend_cols(len(handles), fig.get_figwidth(), max(1.5, 0.06 * longest)))
        fig.suptitle("\n".join(textwrap.wrap(suptitle, max(40, int(fig.get_figwidth() * 10.5)))))
    fig.ibscope_meta = {"view": view, "scale": scale, "unit": unit, "panels": ps}  # type: ignore[attr-defined]  # ibscope's metadata on the Figure, for tests and captions
    return fig
