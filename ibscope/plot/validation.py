"""The figure of ``ibscope validate``: mean estimate against the truth of each task.

One panel per estimator setting (estimator and parameters, ``x_source`` aside), identical-unit
axes (bits by default), the diagonal y = x where the estimator is unbiased, colour = quantity,
marker = task family, vertical bars = the standard deviation of the estimates over the repeats,
horizontal bars = the Monte Carlo error of the truth where it has one. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import textwrap
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ibscope.plot import style
from ibscope.units import conversion_factor

QUANTITY_COLORS = {"I(X;T)": "#1f77b4", "I(T;Y)": "#d62728"}
FAMILY_MARKERS: dict[str | None, str] = {"gaussian": "o", "mixture": "s", "discrete-layer": "D", "embedding": "^", "layer": "*"}


def _setting(r: dict) -> str:
    p = {k: v for k, v in (r.get("params") or {}).items() if k != "x_source" and v is not None}
    return r["estimator"] + (" (" + ", ".join(f"{k}={v}" for k, v in p.items()) + ")" if p else "")


def validation_figure(rows: Sequence[dict], unit: str = "bits") -> Figure:
    """Mean estimate against truth; rows as written to validation.csv (values in nats)."""
    f = conversion_factor("nats", unit)
    done = [r for r in rows if r.get("bias") is not None]
    settings = list(dict.fromkeys(_setting(r) for r in done)) or ["(no task ran)"]
    n = len(settings)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    with style.context():
        fig = style.new_figure(4.3 * ncols + 0.4, 3.9 * nrows + 1.2)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, s in enumerate(settings):
            ax = axes.flat[i]
            sub = [r for r in done if _setting(r) == s]
            hi = 0.0
            for r in sub:
                tv, me = r["true_value"] * f, r["mean_estimate"] * f
                hi = max(hi, tv, me)
                yerr = (r.get("sd") or 0.0) * f
                xerr = (r.get("true_value_error") or 0.0) * f
                col = QUANTITY_COLORS.get(r["quantity"], "0.3")
                gid = f"task:{r['quantity']}:{r['dims']}:{r['task']}"
                if xerr or yerr:
                    ax.errorbar([tv], [me], xerr=[xerr] if xerr else None, yerr=[yerr] if yerr else None, fmt="none",
                                ecolor=col, elinewidth=0.8, capsize=1.5, alpha=0.7, gid=f"{gid}:err")
                ax.plot([tv], [me], linestyle="none", marker=FAMILY_MARKERS.get(r.get("family"), "o"), color=col,
                        markersize=5.5, markeredgecolor="0.15", markeredgewidth=0.4, alpha=0.85, gid=gid)
            lim = hi * 1.06 if hi > 0 else 1.0
            ax.plot([0, lim], [0, lim], color="0.4", linestyle=(0, (4, 3)), linewidth=1.0, zorder=0, gid="diagonal")
            ax.set_xlim(0, lim)
            ax.set_ylim(0, lim)
            ns = sorted({r["n_used"] for r in sub if r.get("n_used")})
            ax.set_title("\n".join(textwrap.wrap(s, 44)) + (f"\nn = {', '.join(map(str, ns))}" if ns else ""),
                         fontsize=9.5)
            ax.set_xlabel(f"true value  [{unit}]")
            if i % ncols == 0:
                ax.set_ylabel(f"mean estimate  [{unit}]")
        for j in range(n, nrows * ncols):
            axes.flat[j].set_visible(False)
        handles = [Line2D([], [], linestyle="none", marker="o", color=c, label=q) for q, c in QUANTITY_COLORS.items()]
        fams = list(dict.fromkeys(r.get("family") for r in done if r.get("family")))
        handles += [Line2D([], [], linestyle="none", marker=FAMILY_MARKERS.get(fm, "o"), color="0.5",
                           markeredgecolor="0.15", label=f"task: {fm}") for fm in fams]
        handles.append(Line2D([], [], color="0.4", linestyle=(0, (4, 3)), label="unbiased (y = x)"))
        fig.legend(handles=handles, loc="outside lower center",
                   ncols=style.legend_cols(len(handles), fig.get_figwidth(), 1.6))
        fig.suptitle("Validation: mean estimate against the known truth (bars: sd over seeds)")
    fig.ibscope_meta = {"settings": settings, "unit": unit,  # type: ignore[attr-defined]  # ibscope's metadata on the Figure
                        "points": [(json.dumps(r.get("params"), sort_keys=True), r["true_value"] * f,
                                    r["mean_estimate"] * f) for r in done]}
    return fig
