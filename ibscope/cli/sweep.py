"""``ibscope sweep CONFIG... -o OUT``: several runs in parallel (locally or on Dask), one combined report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from ibscope._locks import DEFAULT_LOCK_TIMEOUT as LOCK_TIMEOUT
from ibscope.cli._common import console, guard, reporter, setup_logging


def register(app: typer.Typer) -> None:
    @app.command("sweep", no_args_is_help=True)
    @guard
    def sweep_cmd(
        configs: List[Path] = typer.Argument(..., metavar="CONFIG...", help="Run configs (YAML, as for `ibscope run`), "
                                             "or names of packaged ones (demo-tanh, demo-relu, digits)."),
        out: Path = typer.Option(..., "--out", "-o", help="Sweep folder: runs go to OUT/runs/NAME, reports to "
                                 "OUT/EXPERIMENT_report.html, the list of runs to OUT/sweep.json."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Run each config once per seed: 0,1,2 or 0-4 "
                                            "(sets the config's 'seed'; runs are named NAME-sS)."),
        jobs: int = typer.Option(1, "--jobs", "-j", help="Runs at a time in local worker processes (each limited "
                                 "to cores // N threads)."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                                help="Run the runs on a Dask cluster (tcp://HOST:PORT; default "
                                                     "$DASK_SCHEDULER_ADDRESS when set; 'local' ignores it). "
                                                     "Configs, data and OUT must be at the same paths on every "
                                                     "worker. GPU workers (--resources GPU=1) get the runs."),
        scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", metavar="FILE",
                                                      help="Like --scheduler, from `dask scheduler --scheduler-file`."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda:N for capture, estimate and "
                                             "ood of every run (default: each config's)."),
        quick: bool = typer.Option(False, "--quick", help="Merge each config's 'quick:' section."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key of every config, e.g. --set "
                                                 "train.epochs=500 (repeatable; values are YAML)."),
        until: Optional[Literal["data", "train", "capture", "estimate", "plot", "ood", "report", "check"]] = typer.Option(None, "--until", help="Stop every run after this stage (the combined "
                                            "report needs 'estimate')."),
        force: bool = typer.Option(False, "--force", help="Re-run every stage of every run."),
        lock_timeout: float = typer.Option(LOCK_TIMEOUT, "--lock-timeout", metavar="SECONDS",
                                           help="How long a run waits for another process writing its folder."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    ) -> None:
        """Run several configs, or one config over a list of seeds, in parallel; then one report per experiment.

        Each run is the whole `ibscope run` pipeline of its config (up-to-date stages are skipped),
        into OUT/runs/NAME. Runs go to --jobs local processes or to a Dask cluster (--scheduler).
        Every config is read and checked first (a bad key or estimator stops the sweep before
        any run, exit 2). A failed run does not stop the others; it is listed at the end and the
        exit code is the worst of the failed runs' (1 error, 2 usage, 4 bad data). The seeds of one experiment are
        shown together in OUT/EXPERIMENT_report.html: curves and information planes as the median
        over seeds with a 25-75 % band.

        Example: ibscope sweep configs/demo-tanh.yaml configs/demo-relu.yaml --seeds 0-4 -o sweep --jobs 2
        """
        from ibscope.pipeline import parse_overrides
        from ibscope.sweep import parse_seeds, run_sweep

        setup_logging(quiet=True)
        res = run_sweep([str(c) for c in configs], out, seeds=parse_seeds(seeds), jobs=jobs, scheduler=scheduler,
                        scheduler_file=scheduler_file, device=device, quick=quick, overrides=parse_overrides(set_),
                        force=force, until=until, lock_timeout=lock_timeout, progress=not quiet,
                        reporter=reporter(quiet))
        c = console()
        if not quiet:
            from rich.table import Table

            tab = Table(title=f"ibscope sweep: {len(res.runs)} run(s)", title_justify="left")
            for col in ("run", "status", "seconds", "stages ran", "results"):
                tab.add_column(col, overflow="fold")
            for r in res.runs:
                tab.add_row(r.name, r.status, f"{r.seconds:.1f}", ", ".join(r.ran) or "-",
                            str(r.results) if r.results else "-")
            c.print(tab)
            for exp, path in res.reports.items():
                c.print(f"Report of {exp}: [bold]{path}[/]")
            c.print(f"Runs listed in {res.out / 'sweep.json'}")
        for r in res.failed:
            c.print(f"[red]Run {r.name} failed:[/] {r.error}", soft_wrap=True)
        if res.failed:
            raise typer.Exit(code=max(r.exit_code or 1 for r in res.failed))
