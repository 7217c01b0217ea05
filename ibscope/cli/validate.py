"""`ibscope validate`: the estimators of a results table on tasks with a known answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Literal, Optional

import typer

from ibscope.cli._common import console, guard, progress_callback, setup_logging


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command(
        "validate",
        epilog=(
            "Examples:\n\n"
            "  ibscope validate results.csv -o validation/\n\n"
            "  ibscope validate ibscope-demo/tanh/results.csv -o val --repeats 2\n\n"
            "  ibscope validate results.csv -o val -e ksg --quantity 'I(X;T)' --max-n 5000\n\n"
            "  ibscope plot results.csv --validation val/    # the measured biases as error bars\n\n"
            "  ibscope report results.csv --validation val/  # the table in 'Can these numbers be trusted?'\n\n"
            "Exit codes: 0 ok, 1 error (I/O), 2 bad option or unknown name, 4 unusable results table "
            "(or one without information estimates), 5 plug-in failure."
        ),
    )
    @guard
    def validate(
        results: Path = typer.Argument(..., metavar="RESULTS", help="Results table written by `ibscope estimate`."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write validation.csv, validation.png and "
                                                         "validation.json into (created; files replaced atomically)."),
        repeats: int = typer.Option(3, "--repeats", "-n", help="Runs of each task with different seeds: the bias is "
                                                                "their mean error, the rmse their root-mean-square error."),
        seed: int = typer.Option(0, "--seed", help="Base seed of the tasks (everything is reproducible)."),
        max_n: int = typer.Option(10_000, "--max-n", help="Validate keys with more samples at this n instead (said in "
                                                          "the output; biases depend on n)."),
        max_widths: int = typer.Option(4, "--max-widths", help="At most this many layer widths per estimator, quantity "
                                                              "and n: the narrowest, the widest and evenly spaced "
                                                              "ones between (said in the output); 0 = every width."),
        task: Optional[List[str]] = typer.Option(
            None, "--task", "-t", help="Task families to run (repeatable): gaussian, mixture, discrete-layer, "
                                       "embedding, layer. Default: every family that applies to each estimate."),
        estimator: Optional[List[str]] = typer.Option(None, "--estimator", "-e", help="Only these estimators."),
        quantity: Optional[List[str]] = typer.Option(None, "--quantity", help="Only I(X;T) or I(T;Y)."),
        device: str = typer.Option("cpu", "--device", help="Where the estimators run: cpu, cuda, cuda:N or auto."),
        no_store: bool = typer.Option(False, "--no-store", help="Do not read the activation store named in the "
                                                                "results' provenance (no layer-matched tasks)."),
        unit: Literal["nats", "bits"] = typer.Option("bits", "--unit", "-u", help="Unit of the figure and the summary (the CSV is in nats)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    ) -> None:
        """Run each estimator of RESULTS on synthetic tasks whose answer is known, at the same n and dims.

        For every (estimator, parameters, quantity, n, dims) in the table, tasks of the same size are
        drawn and the same estimator (same parameters, through the registry) is run on them with
        --repeats seeds. validation.csv gives, per task, the true value (with its Monte Carlo error),
        the mean estimate, bias = mean estimate - truth, and the rmse. Task families: correlated
        Gaussians (three MI levels spanning the table's estimates) and tanh embeddings of a
        low-dimensional latent for continuous pairs; class-conditional Gaussian mixtures for I(T;Y)
        with class labels; finite populations of activation patterns for I(X;T) with X = sample
        identity (binning, KDE), whose truth is the binned entropy or the noisy-channel information
        the estimator stands for; and a task matched to the user's layer when the store named in the
        results' provenance is reachable. What "truth" means for each: docs/trust.md.
        """
        import time

        from ibscope.errors import UsageError
        from ibscope.validate import summary_lines, validate_results

        if unit not in ("bits", "nats"):
            raise UsageError(f"--unit must be bits or nats. Got {unit!r}.")
        setup_logging(quiet=quiet)
        c = console()
        t0 = time.perf_counter()
        kw: dict[str, Any] = dict(repeats=repeats, seed=seed, max_n=max_n, max_widths=max_widths, families=task or None,
                  estimators=estimator or None,
                  quantities=quantity or None, device=device, use_store=not no_store, unit=unit)
        with progress_callback(quiet, "validate") as cb:
            run = validate_results(results, out, progress=cb, **kw)
        if not quiet:
            c.print(f"Validated {len({(r['estimator'], str(r['params']), r['quantity'], r['dims']) for r in run.rows})}"
                    f" estimate setting(s) on {len(run.rows)} task(s) in {time.perf_counter() - t0:.1f} s "
                    f"({repeats} seed(s) each).", soft_wrap=True)
            for line in summary_lines(run, unit):
                c.print("  " + line, soft_wrap=True, highlight=False, markup=False)
            for note in run.notes:
                c.print(f"[yellow]Note:[/] {note}", soft_wrap=True, highlight=False)
            c.print(f"Wrote [bold]{run.out_dir}[/]: " + ", ".join(p.name for p in run.paths), soft_wrap=True)
