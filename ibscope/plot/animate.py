"""An animation of the information plane over training (GIF, or MP4 when ffmpeg is on PATH).

Each frame shows the current checkpoint's snapshot (polyline through the layers, bold), the earlier
snapshots faint, an epoch counter, and, when the results carry training metrics, an accuracy/loss
panel below with a marker at the current epoch (the deep-bottleneck movie layout, 2:1).
"""

from __future__ import annotations

import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import matplotlib
import numpy as np

from ibscope._atomic import atomic_path
from ibscope.errors import UsageError
from ibscope.plot import style
from ibscope.plot._data import METRICS, cubes, summarize
from ibscope.plot.curves import _metric_axis, _metric_color, _metric_order, set_time_axis
from ibscope.plot.info_plane import _limits, draw_caps, make_panels

ANIMATION_FORMATS = ("auto", "gif", "mp4")

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def resolve_format(fmt: str) -> str:
    """'auto' -> 'mp4' when ffmpeg is on PATH, else 'gif'; 'mp4' without ffmpeg is a usage error."""
    if fmt not in ANIMATION_FORMATS:
        raise UsageError(f"--animation-format must be one of {', '.join(ANIMATION_FORMATS)}. Got {fmt!r}.")
    has_ffmpeg = shutil.which("ffmpeg") is not None
    if fmt == "auto":
        return "mp4" if has_ffmpeg else "gif"
    if fmt == "mp4" and not has_ffmpeg:
        raise UsageError("MP4 needs ffmpeg, which is not on PATH.",
                         hint="Install ffmpeg, or use --animation-format gif.")
    return fmt


@dataclass
class Animation:
    """A figure, the artists that change between frames, and ``update(i)`` to set frame i."""

    fig: Figure
    moving: list
    update: Callable[[int], None]
    n_frames: int


def build_animation(rows: Sequence[dict], *, title: str, time_col: str, metric_rows: Sequence[dict] = (),
                    mode: str = "median", band=(25.0, 75.0)) -> Animation:
    """Lay out the animated plane of one (setting, split); nothing is written."""
    from matplotlib.lines import Line2D

    (panel,) = make_panels([("", list(rows))], time_col)
    xm, _, _ = summarize(panel.x.value, mode, band)
    ym, _, _ = summarize(panel.y.value, mode, band)
    times = panel.x.times
    scale = style.time_norm(times, time_col)
    (x0, x1), (y0, y1) = _limits([panel])
    unit = panel.x.unit
    has_metrics = bool(metric_rows)
    with style.context():
        fig = style.new_figure(6.6, 7.2 if has_metrics else 5.2)
        if has_metrics:
            ax, axm = fig.subplots(2, 1, gridspec_kw={"height_ratios": [2.2, 1.0]})
        else:
            ax, axm = fig.subplots(1, 1), None
        draw_caps(ax, panel)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(f"I(X;T)  [{unit}]")
        ax.set_ylabel(f"I(T;Y)  [{unit}]")
        style.add_time_colorbar(fig, scale, ax)
        fig.suptitle("\n".join(textwrap.wrap(title, 66)))
        history = [ax.plot([], [], "-", color=scale.color(t), alpha=0.25, linewidth=0.8)[0] for t in times]
        (current,) = ax.plot([], [], "-", color="0.2", linewidth=1.8, zorder=3)
        points = [ax.plot([], [], linestyle="none", marker=style.layer_marker(li), markersize=8,
                          markeredgecolor="0.1", zorder=4, label=layer)[0]
                  for li, layer in enumerate(panel.x.layers)]
        proxies = [Line2D([], [], linestyle="none", marker=style.layer_marker(li), color="0.5", markeredgecolor="0.15",
                          markersize=7, label=layer) for li, layer in enumerate(panel.x.layers)]
        ax.legend(handles=proxies, loc="upper left", bbox_to_anchor=(0.0, -0.16), title="layers (input → output)",
                  fontsize=8, ncols=style.legend_cols(len(points), 5.0, 0.9), borderaxespad=0.0)
        counter = ax.set_title(f"{time_col} {style._fmt_tick(times[-1])}", loc="left", fontsize=12, fontweight="bold")
        cursor = None
        if axm is not None:
            units = list(dict.fromkeys(r["unit"] for r in metric_rows))
            unit_m = "ratio" if "ratio" in units else units[0]
            sub = [r for r in metric_rows if r["unit"] == unit_m and r["estimator"] == METRICS]
            names = sorted(dict.fromkeys(r["quantity"] for r in sub), key=_metric_order)
            seen, uniq = set(), []
            for r in sub:
                key = (r["run"], r[time_col], r["quantity"])
                if key not in seen:
                    seen.add(key)
                    uniq.append(r)
            c = cubes(uniq, names, time_col, layer_col="quantity")
            for qi, q in enumerate(names):
                cube = c[q]
                med, _, _ = summarize(cube.value[:, :, cube.layers.index(q)], mode, band)
                axm.plot(cube.times, med, "--" if ("test" in q or "val" in q) else "-", marker="o", markersize=3,
                         color=_metric_color(q, qi), label=q)
            set_time_axis(axm, times, time_col, None)
            axm.set_ylabel(_metric_axis(unit_m))
            axm.legend(loc="best", fontsize=8)
            cursor = axm.axvline(times[0], color="0.2", linewidth=1.2)

        def update(i: int):
            t = times[i]
            for j, h in enumerate(history):
                h.set_data(xm[j], ym[j]) if j < i else h.set_data([], [])
            current.set_data(xm[i], ym[i])
            current.set_color(scale.color(t))
            for li, pt in enumerate(points):
                pt.set_data([xm[i, li]], [ym[i, li]])
                pt.set_markerfacecolor(scale.color(t))
            counter.set_text(f"{time_col} {style._fmt_tick(t)}")
            if cursor is not None:
                cursor.set_xdata([t, t])

        moving = [*history, current, *points, counter] + ([cursor] if cursor is not None else [])
    return Animation(fig, moving, update, len(times))


def animate_plane(rows: Sequence[dict], out: str | os.PathLike, *, title: str, time_col: str,
                  metric_rows: Sequence[dict] = (), mode: str = "median", band=(25.0, 75.0),
                  fmt: str = "gif", fps: float = 2.0, dpi: int = 100) -> Path:
    """Write the animation of one (setting, split) plane to ``out`` (atomically)."""
    from matplotlib.animation import FFMpegWriter

    out = Path(out)
    fmt = resolve_format(fmt)
    if fps <= 0:
        raise UsageError(f"--fps must be > 0. Got {fps}.")
    anim = build_animation(rows, title=title, time_col=time_col, metric_rows=metric_rows, mode=mode, band=band)
    fig = anim.fig
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, out.with_name(f".{out.stem}.tmp{out.suffix}"), "writing the animation") as tmp, \
            style.context():
        if fmt == "gif":
            _write_gif_blitted(fig, anim.moving, anim.update, anim.n_frames, tmp, fps=fps, dpi=dpi)
        else:
            fig.canvas.draw()  # settle the constrained layout once, then freeze it
            fig.set_layout_engine("none")
            writer = FFMpegWriter(fps=fps)  # type: ignore[arg-type]  # matplotlib's stub says int; ffmpeg takes 2.5
            # one draw per frame; no tight bbox (frames must keep one size)
            with matplotlib.rc_context({"savefig.bbox": None}), writer.saving(fig, str(tmp), dpi):
                for i in range(anim.n_frames):
                    anim.update(i)
                    writer.grab_frame()
    return out


def _write_gif_blitted(fig, moving: list, update, n_frames: int, path: Path, *, fps: float, dpi: int) -> None:
    """Draw the static figure once, then only the moving artists per frame (blitting); save a GIF.

    A full redraw costs ~0.4 s per frame (text layout); a blitted frame a few milliseconds.
    """
    from PIL import Image

    fig.set_dpi(dpi)
    for a in moving:
        a.set_animated(True)  # left out of the full draw below
    update(n_frames - 1)  # widest counter text for the layout
    fig.canvas.draw()
    fig.set_layout_engine("none")
    canvas = fig.canvas
    background = canvas.copy_from_bbox(fig.bbox)
    frames = []
    for i in range(n_frames):
        update(i)
        canvas.restore_region(background)
        for a in moving:
            (a.axes or fig).draw_artist(a)
        rgba = np.asarray(canvas.buffer_rgba())
        frames.append(Image.fromarray(rgba[..., :3].copy()))
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(int(round(1000 / fps)), 20), loop=0)


def frame_count(path: str | os.PathLike) -> int:
    """Frames in a GIF written by :func:`animate_plane` (for checks)."""
    from PIL import Image

    with Image.open(path) as im:
        return int(getattr(im, "n_frames", 1))


__all__ = ["ANIMATION_FORMATS", "Animation", "build_animation", "animate_plane", "resolve_format", "frame_count"]
