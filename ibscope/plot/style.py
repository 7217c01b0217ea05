"""One style for every ibscope figure, plus the colour conventions shared by all views.

* ``context()``: a fixed rcParams set (DejaVu Sans, sizes legible at print width, light grid,
  no top/right spines, constrained layout). Every plot function draws inside it.
* ``new_figure()``: a :class:`matplotlib.figure.Figure` on an Agg canvas. We never use pyplot:
  no global figure state, no GUI backend, safe in servers and tests.
* ``time_norm()``: the colour scale for epochs (log scale; epochs that start at 0 are shifted by
  one and the colour bar says so, with tick labels in real epochs).
* ``layer_colors()``: a qualitative colour per layer, ordered from input to output.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

EPOCH_CMAP = "viridis"
LAYER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
SPLIT_STYLES = ("-", "--", ":", "-.")

RC: dict[Any, Any] = {  # matplotlib types the keys as a Literal of every rcParam
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.axisbelow": True,
    "lines.linewidth": 1.6,
    "lines.markersize": 6,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.08,
    "figure.constrained_layout.use": True,
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
    "image.cmap": EPOCH_CMAP,
}


@contextlib.contextmanager
def context() -> Iterator[None]:
    """Draw inside the ibscope style (restores the user's rcParams afterwards)."""
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas (no pyplot, no GUI); call inside :func:`context`."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass(frozen=True)
class TimeScale:
    """How an epoch (or step/checkpoint) value maps to a colour.

    ``offset`` is added before normalising (1 when the smallest value is 0, so a log scale
    works); ``label`` is the colour-bar label and says so; ``ticks`` are in real units.
    """

    norm: mcolors.Normalize
    offset: float
    label: str
    ticks: tuple[float, ...]
    cmap: str = EPOCH_CMAP

    def color(self, t: float | np.ndarray):
        return matplotlib.colormaps[self.cmap](self.norm(np.asarray(t, float) + self.offset))

    def scalar(self, t: float | np.ndarray) -> np.ndarray:
        """The value handed to the norm (``t + offset``)."""
        return np.asarray(t, float) + self.offset


def _nice_ticks(lo: float, hi: float) -> list[float]:
    out = [lo]
    k = 0 if lo < 1 else math.ceil(math.log10(max(lo, 1e-12)))
    while 10 ** k <= hi:
        if 10 ** k > lo * 1.5:
            out.append(float(10 ** k))
        k += 1
    if hi not in out and (len(out) < 2 or hi > out[-1] * 1.8):
        out.append(hi)
    return out


def time_norm(values: Sequence[float] | np.ndarray, name: str = "epoch") -> TimeScale:
    """Log colour scale over the time values (epochs), shifted by one when they start at 0."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        raise ValueError("time_norm needs at least one finite value")
    lo, hi = float(v.min()), float(v.max())
    if lo < 0:  # cannot log-scale negative times: linear, said so
        return TimeScale(mcolors.Normalize(lo, hi if hi > lo else lo + 1), 0.0, f"{name} (linear scale)",
                         tuple(np.linspace(lo, hi, 5)))
    if hi == lo:
        return TimeScale(mcolors.Normalize(lo - 1, hi + 1), 0.0, name, (lo,))
    offset = 1.0 if lo < 1 else 0.0
    label = f"{name} (colour: log scale of {name} + 1)" if offset else f"{name} (log scale)"
    ticks = tuple(_nice_ticks(lo, hi))
    return TimeScale(mcolors.LogNorm(lo + offset, hi + offset), offset, label, ticks)


def add_time_colorbar(fig: Figure, scale: TimeScale, axes) -> object:
    """A colour bar for ``scale`` next to ``axes``, ticks labelled in real epochs."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import FixedLocator, NullLocator

    sm = ScalarMappable(norm=scale.norm, cmap=scale.cmap)
    cb = fig.colorbar(sm, ax=axes, shrink=0.9, aspect=30, pad=0.02)
    cb.set_label(scale.label)
    pos = [t + scale.offset for t in scale.ticks]
    cb.ax.yaxis.set_major_locator(FixedLocator(pos))
    cb.ax.yaxis.set_minor_locator(NullLocator())
    cb.ax.set_yticklabels([_fmt_tick(t) for t in scale.ticks])
    return cb


def _fmt_tick(t: float) -> str:
    return str(int(round(t))) if abs(t - round(t)) < 1e-9 else f"{t:.3g}"


def layer_colors(n: int) -> list:
    """One qualitative colour per layer (tab10, tab20 beyond ten layers)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def layer_marker(i: int) -> str:
    return LAYER_MARKERS[i % len(LAYER_MARKERS)]


def split_style(i: int) -> str:
    return SPLIT_STYLES[i % len(SPLIT_STYLES)]


def legend_cols(n: int, width_in: float, item_in: float = 1.5) -> int:
    """Columns for a figure legend of ``n`` entries that fits ``width_in`` inches, rows balanced."""
    most = max(1, int(width_in / item_in))
    if n <= most:
        return max(n, 1)
    rows = math.ceil(n / most)
    return math.ceil(n / rows)


def plain_log_ticks(axis) -> None:
    """Tick labels 1, 10, 100 instead of 10^0, 10^1 on a log/symlog axis (epochs read better)."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
