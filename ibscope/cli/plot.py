"""`ibscope plot` and `ibscope report`: figures and a self-contained HTML report from a results table.

matplotlib is imported inside the commands only, so `ibscope --help` stays fast; nothing here
imports torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer

from ibscope.cli._common import console, guard, setup_logging
from ibscope.cli._common import progress_callback as _progress

_KINDS_HELP = ("info-plane (snapshot view: a line per checkpoint across layers), trajectory (a line per layer "
               "across checkpoints), estimators (one panel per estimator setting, identical axes), curves "
               "(each quantity against epoch), metrics (accuracy/loss), animation (GIF/MP4). Repeatable. "
               "Default: every kind the results support except the animation.")


def _bool_or_auto(value: str, what: str) -> Optional[bool]:
    from ibscope.errors import UsageError

    v = value.strip().lower()
    if v == "auto":
        return None
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise UsageError(f"{what} must be auto, on or off. Got {value!r}.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command(
        "plot",
        epilog=(
            "Examples:\n\n"
            "  ibscope plot results.csv                      # all default plots into results_plots/\n\n"
            "  ibscope plot results.csv -k info-plane --unit nats --format pdf -o figs/\n\n"
            "  ibscope plot seed*.csv --runs all --animate   # several seeds; every run faint; GIF\n\n"
            "  ibscope plot results.csv -k curves --quantity effective_rank --logx on\n\n"
            "  ibscope plot results.csv --null subtract --validation val/   # chance removed; validated bias bars\n\n"
            "Exit codes: 0 ok, 1 error, 2 bad option or unknown name, 4 empty or unusable results table."
        ),
    )
    @guard
    def plot(
        results: List[Path] = typer.Argument(
            ..., metavar="RESULTS...", help="Results table(s) written by `ibscope estimate`. Several files are "
                                            "read together (runs renamed <file stem>/<run> if their names clash)."),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o", help="Folder for the figures. \\[default: <results stem>_plots/ next to the results]"),
        kind: Optional[List[str]] = typer.Option(None, "--kind", "-k", help=_KINDS_HELP),
        unit: Literal["nats", "bits"] = typer.Option("bits", "--unit", "-u", help="Unit of information on the axes."),
        fmt: Literal["png", "svg", "pdf"] = typer.Option("png", "--format", "-f", help="Figure file format."),
        quantity: Optional[List[str]] = typer.Option(
            None, "--quantity", help="Only these quantities, e.g. 'I(X;T)', effective_rank. Repeatable."),
        estimator: Optional[List[str]] = typer.Option(None, "--estimator", "-e", help="Only these estimators. Repeatable."),
        split: Optional[List[str]] = typer.Option(None, "--split", "-s", help="Only these probe splits (e.g. train, test)."),
        run: Optional[List[str]] = typer.Option(None, "--run", "-r", help="Only these runs / seeds. Repeatable."),
        layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="Only these layers. Repeatable."),
        runs: Literal["median", "all"] = typer.Option(
            "median", "--runs", help="Several runs: 'median' (median line, inter-quantile band/bars) or 'all' "
                                     "(every run faint, median bold)."),
        band: str = typer.Option("25:75", "--band", help="Percentiles LO:HI of the band across runs."),
        logx: str = typer.Option(
            "auto", "--logx", help="Log epoch axis on curves: auto (when epochs span > 30x), on or off. "
                                   "Epochs starting at 0 use a symlog axis (linear below 1)."),
        animate: bool = typer.Option(False, "--animate", help="Also write an animation of the plane over epochs "
                                                              "(epoch counter; accuracy/loss panel when present)."),
        animation_format: Literal["auto", "gif", "mp4"] = typer.Option(
            "auto", "--animation-format", help="gif, mp4 (needs ffmpeg on PATH) or auto (mp4 when ffmpeg is found)."),
        fps: float = typer.Option(2.0, "--fps", help="Frames (checkpoints) per second of the animation."),
        dpi: int = typer.Option(150, "--dpi", help="Resolution of raster figures."),
        null: Literal["band", "subtract", "off"] = typer.Option(
            "band", "--null", help="Permutation nulls in the table (columns null_mean, null_std): 'band' draws "
                                   "null_mean ± 2·null_std per layer, hatched (chance level; an estimate inside it "
                                   "is not distinguishable from chance); 'subtract' plots value − null_mean; 'off' "
                                   "ignores them."),
        validation: Optional[Path] = typer.Option(
            None, "--validation", help="Folder (or validation.csv) written by `ibscope validate` on these results: "
                                       "each estimate gets an error bar [v − largest bias, v − smallest bias] from "
                                       "the biases measured at its estimator, parameters, n and dims."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no list of written files."),
    ) -> None:
        """Draw information planes, curves and comparisons from a results table.

        Information is shown in bits (--unit nats to keep nats). Every figure names the estimator and
        its settings, draws the caps found in the table (log n for I(X;T), H(Y) for I(T;Y)) and colours
        epochs on a log scale. Several runs or seeds give a median with an inter-quantile band; several
        probe splits (train/test) sit side by side with identical axes. Estimates within 1 % of their
        cap (saturated: the estimator cannot show more at this n and width) are drawn hollow; the
        permutation null of each estimate, where the table has one, is a hatched band (--null). The
        written paths are listed on stderr. How to read all this: docs/trust.md.
        """
        from ibscope.plot import plot_results

        setup_logging(quiet=quiet)
        kw: dict[str, Any] = dict(kinds=kind or None, unit=unit, fmt=fmt, quantities=quantity, estimators=estimator, splits=split,
                  runs=run, layers=layer, runs_mode=runs, band=band, logx=_bool_or_auto(logx, "--logx"),
                  dpi=dpi, animate=animate, animation_format=animation_format, fps=fps, null=null,
                  validation=validation)
        with _progress(quiet, "plot") as cb:
            paths = plot_results([str(p) for p in results], out, callback=cb, **kw)
        if not quiet:
            c = console()
            folder = paths[0].parent if paths else out
            c.print(f"Wrote {len(paths)} file(s) to [bold]{folder}[/]:", soft_wrap=True)
            for p in paths:
                c.print(f"  {p}", soft_wrap=True, highlight=False, markup=False)

    @app.command(
        "report",
        epilog=(
            "Examples:\n\n"
            "  ibscope report results.csv                          # -> results_report.html\n\n"
            "  ibscope report results.csv --ood ood_out/ood_metrics.json -o report.html\n\n"
            "  ibscope report results.csv --validation val/      # with the validation table (ibscope validate)\n\n"
            "Exit codes: 0 ok, 1 error, 2 bad option or unknown name, 4 empty or unusable results / OOD file."
        ),
    )
    @guard
    def report(
        results: List[Path] = typer.Argument(..., metavar="RESULTS...", help="Results table(s) written by `ibscope estimate`."),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o", help="HTML file to write. \\[default: <results stem>_report.html next to the results]"),
        ood: Optional[Path] = typer.Option(
            None, "--ood", help="ood_metrics.json (or its folder) written by `ibscope ood`: adds the OOD section."),
        unit: Literal["nats", "bits"] = typer.Option("bits", "--unit", "-u", help="Unit of information in figures and tables."),
        kind: Optional[List[str]] = typer.Option(
            None, "--kind", "-k", help="Figure kinds to include, repeatable: info-plane, trajectory, estimators, curves, "
                                       "metrics (as in `ibscope plot`; default: all the results support)."),
        runs: Literal["median", "all"] = typer.Option(
            "median", "--runs", help="Several runs: 'median' (with band) or 'all' (each faint)."),
        figures_dir: Optional[Path] = typer.Option(
            None, "--figures-dir", help="Folder of PNGs from `ibscope plot` on the same results: those newer than "
                                        "the results are embedded as they are, the others drawn and saved there."),
        title: Optional[str] = typer.Option(None, "--title", help="Title of the report page."),
        max_columns: int = typer.Option(10, "--max-columns", help="Most epochs shown per table (evenly spaced; the "
                                                                  "full table is embedded as CSV)."),
        validation: Optional[Path] = typer.Option(
            None, "--validation", help="Folder (or validation.csv) written by `ibscope validate`: its table of "
                                       "biases and its figure go into the section 'Can these numbers be trusted?'."),
        null: Literal["band", "subtract", "off"] = typer.Option(
            "band", "--null", help="How figures show permutation nulls (as in `ibscope plot`)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no final message."),
    ) -> None:
        """Write one self-contained HTML report: planes, curves, tables of numbers, provenance, OOD.

        Images are embedded (base64) and the full results table is attached as a CSV download, so the
        single file opens offline in any browser and can be shared as is. The section "Can these numbers
        be trusted?" counts saturated estimates and estimates indistinguishable from their permutation
        null, and shows the validation table when given --validation (see docs/trust.md).
        """
        from ibscope.report import write_report

        setup_logging(quiet=quiet)
        kw: dict[str, Any] = dict(ood=ood, figures_dir=figures_dir, unit=unit, title=title, kinds=kind or None, runs_mode=runs,
                  max_columns=max_columns, validation=validation, null=null)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _progress(quiet, "report") as cb:
                path = write_report([str(p) for p in results], out, callback=cb, **kw)
        for w in caught:  # e.g. an OOD figure listed in the JSON but missing: said, not hidden
            console().print(f"[yellow]Warning:[/] {w.message}", soft_wrap=True)
        if not quiet:
            console().print(f"Wrote the report to [bold]{path}[/] ({path.stat().st_size / 1e6:.1f} MB).", soft_wrap=True)
