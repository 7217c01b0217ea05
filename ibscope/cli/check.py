"""`ibscope check`: regression checks of compression curves for CI (exit 3 on regression)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from ibscope.cli._common import console, guard, setup_logging


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command(
        "check",
        epilog=(
            "Examples:\n\n"
            "  ibscope check results.csv --baseline baseline.csv --rtol 0.1 --atol 0.02 --junit check.xml\n\n"
            "  ibscope check results.csv --rules rules.yaml --json summary.json\n\n"
            "  ibscope check results.csv --baseline seeds.csv --sigma 3\n\n"
            "  ibscope check results.csv --baseline baseline.csv --update-baseline\n\n"
            "Exit codes: 0 all checks hold, 2 bad option or rules file, 3 regression found, "
            "4 unusable results or baseline table."
        ),
    )
    @guard
    def check(
        results: List[Path] = typer.Argument(
            ..., metavar="RESULTS...", help="Results table(s) written by `ibscope estimate` (CSV; several are concatenated)."),
        baseline: Optional[Path] = typer.Option(
            None, "--baseline", "-b", help="Baseline results table to compare with (a results CSV, e.g. written by --update-baseline)."),
        rules: Optional[Path] = typer.Option(
            None, "--rules", "-r", help="YAML file with shape rules and/or per-curve tolerances (see docs/check.md)."),
        rtol: Optional[float] = typer.Option(
            None, "--rtol", help="Relative tolerance: a point holds when |current - baseline| <= atol + rtol*|baseline| (default 0.1)."),
        atol: Optional[float] = typer.Option(
            None, "--atol", help="Absolute tolerance, in the comparison unit (nats unless --unit bits) (default 0.02)."),
        sigma: Optional[float] = typer.Option(
            None, "--sigma", help="Also allow sigma standard deviations of the difference, from the tables' stderr "
                                  "column or from the spread of several seeds (runs) in the baseline."),
        tol: Optional[List[str]] = typer.Option(
            None, "--tol", help="Per-curve tolerance: SELECTOR:KEY=VALUE,... where SELECTOR is a quantity or "
                                "estimator name (glob ok) or FIELD=PATTERN and the keys are rtol, atol, sigma, "
                                "fail_on (both, decrease or increase). E.g. --tol 'I(T;Y):rtol=0.05'. Repeatable."),
        unit: Optional[Literal["nats", "bits"]] = typer.Option(
            None, "--unit", help="Unit in which information is compared (default nats)."),
        missing: Optional[Literal["fail", "warn", "ignore"]] = typer.Option(
            None, "--missing", help="A baseline curve or point absent from the results (default fail)."),
        extra: Optional[Literal["fail", "warn", "ignore"]] = typer.Option(
            None, "--extra", help="A curve or point not in the baseline (default warn)."),
        align: Optional[Literal["auto", "epoch", "step", "checkpoint"]] = typer.Option(
            None, "--align", help="The x axis the curves are aligned on; auto picks the first of epoch, step, checkpoint "
                                  "that every row has (default auto)."),
        seeds: Optional[bool] = typer.Option(
            None, "--seeds/--no-seeds", help="Pool runs as seeds (compare means; spread gives sigma). "
                                             "Default: pool when --sigma is set and the baseline holds several runs."),
        junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here (one test case per curve and per rule)."),
        json_out: Optional[str] = typer.Option(None, "--json", help="Write the JSON summary to this file ('-' for stdout)."),
        update_baseline: bool = typer.Option(
            False, "--update-baseline", help="Write RESULTS to --baseline (with provenance) instead of comparing; rules still run."),
        show_passing: bool = typer.Option(False, "--show-passing", help="List passing checks in the table too."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary line (and errors)."),
    ) -> None:
        """Check a results table against a baseline and/or shape rules; exit 3 on a regression.

        Curves are aligned on (run, split, layer, estimator, quantity) and epoch (or step /
        checkpoint), converted to one unit and compared within tolerances. Missing curves fail
        and extra curves warn unless --missing/--extra say otherwise. Shape rules (compression
        phase exists, final I(T;Y) >= V, local rank drops, epoch of peak I(X;T)) need no
        baseline; each is reported with the numbers it used. Failures are listed on stderr;
        --json and --junit write machine-readable reports for CI.
        """
        import json

        from rich.markup import escape

        from ibscope.check import atomic_write_text, junit_for_error, run_check
        from ibscope.errors import IbscopeError, RegressionFound

        setup_logging(quiet=quiet)
        try:
            report = run_check(
                [str(p) for p in results] if len(results) > 1 else str(results[0]),
                baseline=None if baseline is None else str(baseline),
                rules=None if rules is None else str(rules),
                rtol=rtol, atol=atol, sigma=sigma, tolerances=tol or None, unit=unit,
                missing=missing, extra=extra, align=align, seeds=seeds, update_baseline=update_baseline,
            )
        except IbscopeError as exc:
            if junit is not None:  # CI reporters then show why the check could not run
                atomic_write_text(junit, junit_for_error(str(exc), exc.exit_code))
            raise
        if junit is not None:
            report.write_junit(junit)
        if json_out == "-":
            typer.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str))
        elif json_out:
            report.write_json(json_out)
        c = console()
        if not quiet:
            if report.failures or report.warnings or show_passing:
                c.print(report.table(show_passing=show_passing))
            for note in report.notes:
                c.print(f"[dim]note:[/] {escape(note)}", soft_wrap=True)
        if report.ok:
            c.print(f"[green]ibscope check:[/] {report.summary()}", soft_wrap=True)
            return
        raise RegressionFound(
            f"ibscope check: {report.summary()}.",
            hint="See the table above (and --json/--junit); update the baseline with --update-baseline "
                 "if the change is intended.",
        )
