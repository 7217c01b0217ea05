"""Figures from a results table: information plane, curves, comparisons, metrics, animation.

Public API::

    plot_results(results, out_dir=None, *, kinds=None, unit="bits", fmt="png", ...) -> list[Path]
    figures(results, *, kinds=None, unit="bits", ...) -> list[FigureJob]   # build without saving
    KINDS, FORMATS, default_out_dir(results)

Plot kinds (``KINDS``):

``info-plane``   snapshot view per estimator setting; one panel per probe split (train vs test)
``trajectory``   per-layer trajectory view, same panels
``estimators``   one panel per estimator setting, identical axes (per split)
``curves``       every quantity against epoch, one line per layer, one panel per estimator setting
``metrics``      accuracy / loss against epoch (rows with estimator "metrics")
``animation``    GIF (MP4 with ffmpeg) of the plane over epochs with an epoch counter and metrics

With ``kinds=None`` every kind the data supports is drawn except the animation (ask for it).
Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ibscope._atomic import atomic_path
from ibscope._paths import inside, prepare_output
from ibscope.errors import DataError, UsageError, unknown_name
from ibscope.plot._data import (
    METRICS,
    PAIR,
    Setting,
    apply_trust,
    load_results,
    pair_settings,
    parse_band,
    prepare,
    rows_of,
    select,
    settings,
    side_note,
    slug,
    time_axis,
)

log = logging.getLogger(__name__)

KINDS = ("info-plane", "trajectory", "estimators", "curves", "metrics", "animation")
FORMATS = ("png", "svg", "pdf")

__all__ = ["KINDS", "FORMATS", "FigureJob", "plot_results", "figures", "default_out_dir", "load_results",
           "prepare", "select"]


@dataclass
class FigureJob:
    """One figure to draw: its kind, file stem, a caption, and how to build it."""

    kind: str
    name: str
    caption: str
    make: Callable[..., Any] | None  # None: an animation, written from meta
    meta: dict = field(default_factory=dict)


def default_out_dir(results: Any) -> Path:
    """``<stem>_plots`` next to the (first) results file."""
    first = results.path if hasattr(results, "rows") else (
        results if isinstance(results, (str, os.PathLike)) else next(iter(results), None))
    if first is None:
        raise UsageError("No output folder given and the results have no file to place it next to.",
                         hint="Pass out_dir (CLI: -o DIR).")
    p = Path(first)
    return p.with_name(p.stem + "_plots")


def _check_kinds(kinds: Sequence[str] | None) -> list[str] | None:
    if kinds is None:
        return None
    out = []
    for k in kinds:
        if k not in KINDS:
            raise unknown_name("plot kind", k, KINDS)
        if k not in out:
            out.append(k)
    return out


def _n_note(rows: Sequence[dict]) -> str:
    ns = sorted({r["n_samples"] for r in rows if r["n_samples"] is not None})
    if not ns:
        return ""
    return " · n = " + (str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}")


def _order_quantities(qs: list[str]) -> list[str]:
    return [q for q in PAIR if q in qs] + sorted(q for q in qs if q not in PAIR)


def figures(results: Any, *, kinds: Sequence[str] | None = None, unit: str = "bits",
            estimators: Sequence[str] | None = None, splits: Sequence[str] | None = None,
            runs: Sequence[str] | None = None, layers: Sequence[str] | None = None,
            quantities: Sequence[str] | None = None, runs_mode: str = "median",
            band: Sequence[float] | str = (25.0, 75.0), logx: bool | None = None, null: str = "band",
            validation: Any = None) -> list[FigureJob]:
    """Validate the results and plan the figures (nothing is drawn until ``job.make()``).

    ``null``: how the permutation nulls in the table are shown: "band" (null_mean ± 2 null_std,
    hatched, per layer), "subtract" (value − null_mean where a row has a null) or "off".
    ``validation``: a folder (or validation.csv) written by ``ibscope validate``: its biases become
    error bars. Saturated estimates are always drawn hollow.

    Raises DataError (empty table, no rows of an asked-for kind, unconvertible mixed units, a bad
    validation table) or UsageError (unknown kind / estimator / split / run / layer / quantity,
    with did-you-mean; a bad ``null``).
    """
    from ibscope.plot.curves import curves_figure, metrics_figure
    from ibscope.plot.info_plane import plane_figure

    want = _check_kinds(kinds)
    band_t = parse_band(band)
    if runs_mode not in ("median", "all"):
        raise UsageError(f"--runs must be 'median' or 'all'. Got {runs_mode!r}.")
    res = prepare(select(load_results(results), estimators=estimators, splits=splits, runs=runs, layers=layers,
                         quantities=quantities), unit)
    res, trust = apply_trust(res, null, validation)
    rows = res.rows
    with_validation = validation is not None
    tcol = time_axis(rows)
    info = [r for r in rows if r["estimator"] != METRICS]
    metric_rows = [r for r in rows if r["estimator"] == METRICS]
    psets = pair_settings(info)
    all_splits = list(dict.fromkeys(r["split"] for r in info))
    qs = _order_quantities(list(dict.fromkeys(r["quantity"] for r in info)))
    kw = dict(time_col=tcol, mode=runs_mode, band=band_t)
    multi = {s.estimator for s in settings(info) if sum(t.estimator == s.estimator for t in settings(info)) > 1}

    def sslug(s: Setting) -> str:
        return s.slug(s.estimator in multi)

    if want is None:
        want = []
        if psets:
            want += ["info-plane", "trajectory"]
            if len(psets) > 1:
                want.append("estimators")
        if info:
            want.append("curves")
        if metric_rows:
            want.append("metrics")
    jobs: list[FigureJob] = []
    for kind in want:
        if kind in ("info-plane", "trajectory", "estimators", "animation") and not psets:
            have = ", ".join(qs) or "none"
            raise DataError(f"Plot kind '{kind}' needs rows with both I(X;T) and I(T;Y) from one estimator; "
                            f"the results have quantities: {have}.",
                            hint="Estimate with a pair estimator (see `ibscope estimators`), or drop this kind.")
        if kind == "metrics" and not metric_rows:
            raise DataError("Plot kind 'metrics' needs training-metric rows (estimator 'metrics'); the results have none.",
                            hint="Save accuracy/loss in the checkpoint dict so capture stores them.")
        if kind == "curves" and not info:
            raise DataError("Plot kind 'curves' needs estimator rows; the results hold only training metrics.")
        if kind in ("info-plane", "trajectory"):
            view = "snapshot" if kind == "info-plane" else "trajectory"
            for s in psets:
                srows = rows_of(info, s)
                srows = [r for r in srows if r["quantity"] in PAIR]
                sp = list(dict.fromkeys(r["split"] for r in srows))
                panels = [(f"split: {p}{_n_note(rows_of(srows, split=p))}", rows_of(srows, split=p)) for p in sp]
                side = side_note(srows)
                title = f"Information plane ({view} view) — {s.label()}" + (f" — {side}" if side else "")
                what = ("one line per checkpoint across the layers, coloured by epoch" if view == "snapshot"
                        else "one line per layer across checkpoints, markers coloured by epoch")
                cap = (f"{title}: {what}; {unit}; dashed lines are the caps (log n for I(X;T), H(Y) for I(T;Y))"
                       + (f"; splits side by side: {', '.join(sp)}" if len(sp) > 1 else "")
                       + _trust_note(srows, null, with_validation) + ".")
                jobs.append(FigureJob(kind, f"{kind}_{sslug(s)}", cap,
                                      _bind(plane_figure, panels, suptitle=title, view=view, **kw),
                                      {"setting": s, "splits": sp}))
        elif kind == "estimators":
            for sp in all_splits:
                panels = []
                for s in psets:
                    srows = [r for r in rows_of(info, s, sp) if r["quantity"] in PAIR]
                    if srows:
                        panels.append(("\n".join(textwrap.wrap(s.label(), 48)) + _n_note(srows), srows))
                if not panels:
                    continue
                name = "estimators" if len(all_splits) == 1 else f"estimators_{slug(sp)}"
                title = f"Estimator comparison on the information plane — split: {sp}"
                jobs.append(FigureJob(kind, name, title + " (identical axes and colour scale).",
                                      _bind(plane_figure, panels, suptitle=title, view="snapshot", **kw),
                                      {"split": sp}))
        elif kind == "curves":
            for q in qs:
                qrows = [r for r in info if r["quantity"] == q]
                ss = settings(qrows)
                unit_q = qrows[0]["unit"]
                cap = (f"{q} [{unit_q}] against {tcol}, one line per layer, one panel per estimator setting "
                       f"({'; '.join(s.label() for s in ss)})" + _trust_note(qrows, null, with_validation) + ".")
                jobs.append(FigureJob(kind, f"curves_{slug(q)}", cap,
                                      _bind(curves_figure, qrows, q, settings_=ss, logx=logx, **kw),
                                      {"quantity": q}))
        elif kind == "metrics":
            jobs.append(FigureJob(kind, "metrics", f"Training metrics recorded with the checkpoints, against {tcol}.",
                                  _bind(metrics_figure, metric_rows, logx=logx, **kw)))
        elif kind == "animation":
            for s in psets:
                for sp in dict.fromkeys(r["split"] for r in rows_of(info, s)):
                    srows = [r for r in rows_of(info, s, sp) if r["quantity"] in PAIR]
                    name = f"animation_{sslug(s)}" + (f"_{slug(sp)}" if len(all_splits) > 1 else "")
                    title = f"Information plane over training — {s.label()} — split: {sp}"
                    jobs.append(FigureJob(kind, name, title, None,
                                          {"rows": srows, "metric_rows": metric_rows, "title": title, **kw}))
    return jobs


def _trust_note(rows: Sequence[dict], null: str, with_validation: bool) -> str:
    """What a figure shows of saturation, nulls and validation, for its caption (from its rows)."""
    from ibscope.plot._data import SATURATED, SUBTRACTED, TRUTH_LO
    from ibscope.trust import has_null

    rows = [r for r in rows if r["estimator"] != METRICS]
    parts = []
    sat = sum(bool(r.get(SATURATED)) for r in rows)
    if sat:
        parts.append(f"{sat} saturated estimate(s) (within 1 % of the cap) drawn hollow")
    with_q = {r["quantity"] for r in rows if r.get(SUBTRACTED) or has_null(r)}
    if with_q and null == "band":
        parts.append("hatched: permutation null, mean ± 2 sd")
    elif with_q and null == "subtract":
        sub = sum(bool(r.get(SUBTRACTED)) for r in rows)
        without = sum(1 for r in rows if r["quantity"] in with_q and not r.get(SUBTRACTED))
        parts.append(f"null mean subtracted from {sub} estimate(s)"
                     + (f"; {without} without a null drawn as estimated" if without else ""))
    if with_validation:
        done = sum(r.get(TRUTH_LO) is not None for r in rows)
        info = sum(r["unit"] in ("nats", "bits") for r in rows)
        parts.append(f"error bars: bias range measured by `ibscope validate` ({done} estimate(s)"
                     + (f"; {info - done} not covered by the validation" if info > done else "") + ")")
    return ("; " + "; ".join(parts)) if parts else ""


def _bind(fn: Callable, *args, **kwargs) -> Callable[[], Any]:
    def make():
        return fn(*args, **kwargs)

    return make


def save_figure(fig, path: Path, fmt: str, dpi: int, title: str, description: str) -> Path:
    """Save atomically (temporary file + rename) with title/description metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    md = {"Title": title, "Subject" if fmt == "pdf" else "Description": description}
    # disk full, read-only, ...: an error naming the figure, and no temporary file left
    with atomic_path(path, path.with_name(f".{path.stem}.tmp.{fmt}"), "writing the figure") as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=md)
    return path


def plot_results(results: Any, out_dir: str | os.PathLike | None = None, *, kinds: Sequence[str] | None = None,
                 unit: str = "bits", fmt: str = "png", estimators: Sequence[str] | None = None,
                 splits: Sequence[str] | None = None, runs: Sequence[str] | None = None,
                 layers: Sequence[str] | None = None, quantities: Sequence[str] | None = None,
                 runs_mode: str = "median", band: Sequence[float] | str = (25.0, 75.0), logx: bool | None = None,
                 dpi: int = 150, animate: bool = False, animation_format: str = "auto", fps: float = 2.0,
                 null: str = "band", validation: Any = None,
                 callback: Callable[[int, int, Path], None] | None = None) -> list[Path]:
    """Draw the figures of a results table (path(s) or a Results) into ``out_dir``.

    ``out_dir`` defaults to ``<results stem>_plots`` next to the results file. Files are named
    ``<kind>[_<estimator>][_<split>].<fmt>`` (``curves_<quantity>``, ``metrics``). Returns the
    written paths; ``callback(done, total, path)`` is called after each one.
    """
    from ibscope.plot.animate import animate_plane, resolve_format

    if fmt not in FORMATS:
        raise unknown_name("figure format", fmt, FORMATS)
    if dpi < 20 or dpi > 1200:
        raise UsageError(f"--dpi must be between 20 and 1200. Got {dpi}.")
    if not fps > 0:
        raise UsageError(f"--fps must be > 0. Got {fps}.")
    if animate and kinds is not None and "animation" not in kinds:
        kinds = [*kinds, "animation"]
    anim_fmt = resolve_format(animation_format) if (animate or (kinds and "animation" in kinds)) else None
    res = load_results(results)
    out = prepare_output(out_dir if out_dir is not None else default_out_dir(res), folder=True, what="figure folder",
                         create=False)
    jobs = figures(res, kinds=kinds, unit=unit, estimators=estimators, splits=splits, runs=runs, layers=layers,
                   quantities=quantities, runs_mode=runs_mode, band=band, logx=logx, null=null, validation=validation)
    if animate and kinds is None:
        jobs += figures(res, kinds=["animation"], unit=unit, estimators=estimators, splits=splits, runs=runs,
                        layers=layers, quantities=quantities, runs_mode=runs_mode, band=band, logx=logx, null=null,
                        validation=validation)
    for job in jobs:  # names built from results (splits, quantities) must not leave the figure folder
        inside(out, out / f"{job.name}.{anim_fmt if job.kind == 'animation' else fmt}", "figure file")
    written: list[Path] = []
    for i, job in enumerate(jobs):
        if job.kind == "animation":
            m = job.meta
            path = out / f"{job.name}.{anim_fmt}"
            animate_plane(m["rows"], path, title=m["title"], time_col=m["time_col"], metric_rows=m["metric_rows"],
                          mode=m["mode"], band=m["band"], fmt=anim_fmt,  # type: ignore[arg-type]  # set for animation jobs
                          fps=fps, dpi=min(dpi, 110))
        else:
            assert job.make is not None  # only animations are written from meta
            fig = job.make()
            path = save_figure(fig, out / f"{job.name}.{fmt}", fmt, dpi, job.caption.split(":")[0], job.caption)
        written.append(path)
        log.debug("wrote %s", path)
        if callback is not None:
            callback(i + 1, len(jobs), path)
    return written
