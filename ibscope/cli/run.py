"""``ibscope run CONFIG.yaml`` and ``ibscope demo``: the whole pipeline in one command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from ibscope._locks import DEFAULT_LOCK_TIMEOUT as LOCK_TIMEOUT  # a light module: --help stays fast
from ibscope.cli._common import console, guard, reporter, setup_logging

STAGE_NAMES = "data, train, capture, estimate, plot, ood, report, check"  # ibscope.pipeline.STAGES (kept light)


def _summary(res, title: str) -> None:
    from rich.table import Table

    tab = Table(title=title, title_justify="left")
    for col in ("stage", "status", "seconds", "why"):
        tab.add_column(col)
    for s in res.stages:
        tab.add_row(s.name, s.status, f"{s.seconds:.1f}" if s.status == "ran" else "", s.reason)
    console().print(tab)


def register(app: typer.Typer) -> None:
    @app.command("run")
    @guard
    def run_cmd(
        config: Optional[Path] = typer.Argument(None, help="Run config (YAML), or the name of a packaged one: demo-tanh, demo-relu, digits."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the config's 'out', else ./ibscope-runs/NAME)."),
        quick: bool = typer.Option(False, "--quick", help="Merge the config's 'quick:' section (small settings for a fast try)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key, e.g. --set train.epochs=500 (repeatable; values are YAML)."),
        only: Optional[List[str]] = typer.Option(None, "--only", help=f"Run only these stages ({STAGE_NAMES}); the others must be up to date."),
        until: Optional[Literal["data", "train", "capture", "estimate", "plot", "ood", "report", "check"]] = typer.Option(None, "--until", help="Stop after this stage."),
        force: bool = typer.Option(False, "--force", help="Re-run every stage even when its outputs are up to date."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda:N for capture/estimate/ood (default: the config's)."),
        strict: bool = typer.Option(False, "--strict", help="Exit 4 when any cell could not be estimated, after everything is written (config: estimate.strict)."),
        skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="estimate and ood skip corrupt, foreign or partial shards and list them, instead of exit 4 (config: skip_bad_shards)."),
        safe_globals: Optional[List[str]] = typer.Option(None, "--safe-globals", metavar="MODULE.CLASS", help="Allow this class in checkpoints loaded with weights_only (repeatable; added to capture.safe_globals)."),
        lock_timeout: float = typer.Option(LOCK_TIMEOUT, "--lock-timeout", metavar="SECONDS", help="Wait this long for another run writing the same output folder, then stop (0: at once; -1: no limit)."),
        show_schema: bool = typer.Option(False, "--show-schema", help="Print the config's JSON Schema (every key with its type, default, constraints and description), then exit."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; only errors."),
    ) -> None:
        """Run the pipeline of one YAML config: data -> train -> capture -> estimate -> plot -> ood -> report -> check.

        Each stage is skipped when its stamp in OUT/.ibscope/stages/ still matches: the same config section, ibscope version and input contents (sha256, the model factory's file included), and outputs unchanged since the stage wrote them. So re-running after changing only plot options re-draws the figures and nothing else. One run at a time per output folder (a second one waits --lock-timeout seconds, then exits 1 naming the lock). Names that become paths (name, probe and subset names) must be letters, digits, '.', '_' or '-'. Exit codes: 0 ok, 1 error, 2 usage (unknown key, unsafe name), 3 regression found by the check stage, 4 bad data. See docs/demo.md for the config format.

        Example: ibscope run configs/demo-tanh.yaml -o runs/tanh --quick
        """
        from ibscope.pipeline import RunConfig, parse_overrides, run_pipeline

        if show_schema:
            import json

            typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))
            raise typer.Exit()
        if config is None:
            from ibscope.errors import UsageError

            raise UsageError("Missing the run config: ibscope run CONFIG.yaml",
                             hint="Packaged configs: demo-tanh, demo-relu, digits (e.g. `ibscope run digits`).")
        setup_logging(quiet=True)
        res = run_pipeline(config, out=out, quick=quick, overrides=parse_overrides(set_), force=force, only=only,
                           until=until, device=device, progress=not quiet, quiet=quiet, strict=strict,
                           skip_bad_shards=skip_bad_shards, safe_globals=safe_globals or (), lock_timeout=lock_timeout,
                           reporter=reporter(quiet))
        if not quiet:
            _summary(res, f"ibscope run: {res.name}")
            c = console()
            c.print(f"Output folder: [bold]{res.out}[/]")
            if res.results:
                c.print(f"Results table: {res.results}")
            if res.figures:
                c.print(f"Figures:       {res.figures[0].parent} ({len(res.figures)} files)")
            if res.ood:
                c.print(f"OOD metrics:   {res.ood}")
            if res.report:
                c.print(f"Report:        [bold]{res.report}[/]")

    @app.command("demo")
    @guard
    def demo_cmd(
        out: Path = typer.Option(Path("ibscope-demo"), "--out", "-o", help="Output folder."),
        quick: bool = typer.Option(False, "--quick", help="400 epochs, 9 checkpoints and a random 1024 of the inputs: a first look in about a third of the time."),
        force: bool = typer.Option(False, "--force", help="Re-run every stage even when up to date."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda:N for capture and estimate."),
        lock_timeout: float = typer.Option(LOCK_TIMEOUT, "--lock-timeout", metavar="SECONDS", help="Wait this long for another run writing the same folder, then stop (0: at once; -1: no limit)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display; print only the output paths."),
    ) -> None:
        """Reproduce the information-plane papers in a few minutes, with no arguments.

        Trains the 12-10-7-5-4-3-2 network of Shwartz-Ziv & Tishby on the built-in 12-bit task (4096 inputs) with tanh and with ReLU, saving checkpoints at log-spaced epochs; captures every layer; estimates I(X;T) and I(T;Y) (fixed binning, KDE bounds, adaptive binning) and the layers' local and effective rank; draws the information planes and writes an HTML report per run, plus the two fixed-binning information planes side by side. Run again and finished stages are skipped.

        Example: ibscope demo --out ibscope-demo
        """
        from ibscope.demo.run import run_demo

        setup_logging(quiet=True)
        res = run_demo(out, quick=quick, force=force, device=device, progress=not quiet, quiet=quiet,
                       lock_timeout=lock_timeout, reporter=reporter(quiet))
        c = console()
        if not quiet:
            for name, r in res.runs.items():
                _summary(r, f"run {name}")
            c.print(f"Demo finished in {res.seconds:.0f} s. Output folder: [bold]{res.out}[/]")
        for name, r in res.runs.items():
            c.print(f"  {name}: report [bold]{r.report}[/]  figures {r.figures[0].parent if r.figures else '-'}")
        if res.comparison:
            c.print(f"  information planes side by side: [bold]{res.comparison}[/]")
