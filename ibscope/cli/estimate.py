"""`ibscope estimate` (store -> results table) and `ibscope estimators` (the registry listing)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Literal, Optional

import typer

from ibscope._locks import DEFAULT_LOCK_TIMEOUT
from ibscope.cli._common import console, guard, parse_kv, reporter
from ibscope.errors import DataError, UsageError
from ibscope.estimate import DEFAULT_NULL_PERMUTATIONS


def parse_params(items: list[str] | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in parse_kv(items, "--param").items():
        if "." not in key:
            raise UsageError(f"--param expects ESTIMATOR.KEY=VALUE (e.g. binning.n_bins=30). Got {key}={value!r}.")
        name, k = key.split(".", 1)
        out.setdefault(name, {})[k] = value
    return out


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def register(app) -> None:
    """Add `estimate` and `estimators` to the app."""

    @app.command("estimate")
    @guard
    def estimate(
        stores: List[Path] = typer.Argument(..., metavar="STORE...", help="Activation store(s) written by `ibscope capture`."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Results CSV to write (default results.csv). "
                                           "A provenance sidecar <stem>.provenance.json is written next to it."),
        estimator: Optional[List[str]] = typer.Option(None, "-e", "--estimator", metavar="NAME",
                                                      help="Estimator to run (repeatable). See `ibscope estimators`. "
                                                           "Default: binning and ksg."),
        param: Optional[List[str]] = typer.Option(None, "--param", metavar="NAME.KEY=VALUE",
                                                  help="Estimator parameter (repeatable), e.g. binning.n_bins=30."),
        config: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML preset (e.g. configs/saxe-kde.yaml): "
                                              "estimators, params, x_source, layers, device, jobs, null_permutations, null_seed, "
                                              "strict, out. Options given on "
                                              "the command line win."),
        device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default auto)."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="CPU worker processes over (checkpoint, layer) "
                                           "cells (default 1)."),
        force: bool = typer.Option(False, "--force", help="Recompute the selected cells even where the results file "
                                   "already holds a row computed from the same store content."),
        x_source: Optional[Literal["identity", "inputs"]] = typer.Option(None, "--x-source", help="What X is in I(X;T) for every pair estimator: "
                                               "'identity' (sample ids) or 'inputs' (probe inputs). Default: each "
                                               "estimator's own (binning/KDE identity, the rest inputs)."),
        layer: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="Only these layers (repeatable)."),
        strict: bool = typer.Option(False, "--strict", help="Exit with code 4 if any cell could not be estimated "
                                    "(its row has an empty value and a note). The results are written first."),
        skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="Skip checkpoint shards of a store that "
                                             "are corrupt or belong to another capture, instead of stopping with exit "
                                             "code 4; what was skipped is listed on stderr and in the provenance."),
        lock_timeout: float = typer.Option(DEFAULT_LOCK_TIMEOUT, "--lock-timeout", metavar="SECONDS",
                                           help="How long to wait while another `ibscope estimate` writes the same "
                                                "results file, then stop with a message naming the lock file and its "
                                                "holder. -1 waits without limit."),
        null_permutations: Optional[int] = typer.Option(
            None, "--null-permutations", metavar="N",
            help=f"Permutation null for every I(T;Y) row and every I(X;T) row with X = the probe inputs: the estimate "
                 f"is recomputed with the rows of one side permuted N times, filling the columns null_mean, null_std "
                 f"and p_value = (1 + #{{null >= value}}) / (N + 1). A value near its null is estimator bias, not "
                 f"information. Costs up to N more estimates per such row, much less for binning, KDE, KSG, gaussian "
                 f"and renyi, which share work with the estimate. 0 turns it off. Default "
                 f"{DEFAULT_NULL_PERMUTATIONS}."),
        null_seed: Optional[int] = typer.Option(None, "--null-seed", metavar="S",
                                                help="Seed of the null's permutations (default 0): the same seed "
                                                     "gives the same null."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no 'Wrote ...' line (warnings "
                                   "about noted cells and dropped rows are still printed)."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                                help="Run the cells on a Dask cluster: tcp://HOST:PORT of `dask "
                                                     "scheduler` (default: $DASK_SCHEDULER_ADDRESS when set; 'local' "
                                                     "ignores it). Workers read the stores themselves: they must see "
                                                     "them at the same path. Needs pip install \"ibscope\\[dask]\"."),
        scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", metavar="FILE",
                                                      help="Like --scheduler, from the JSON file written by `dask "
                                                           "scheduler --scheduler-file FILE` (the HPC / dask-jobqueue "
                                                           "way)."),
    ) -> None:
        """Estimate I(X;T), I(T;Y) and registered single-layer measures for every checkpoint x layer.

        Writes one row per checkpoint x layer x estimator x quantity (values in nats) to a CSV.

        Incremental: a row already in the output is kept while its content key matches the store
        (config and probe hashes, checkpoint sha256, layer, estimator, parameters, ibscope version).
        Other selected cells are computed; --force recomputes all of them.

        One cell, one failure: a cell that cannot be estimated for a data reason (e.g. too few
        samples per class) gets an empty value and a note; the other cells are still computed.
        A constant (e.g. dead ReLU) layer has I = 0 exactly and rank 0; its intrinsic dimension
        is undefined (a note).

        Reading against chance: every row with a cap (log n, H(Y), log batch) gets saturated =
        true/false (within 1% of the cap), and I(T;Y) rows (and I(X;T) with X = the inputs) get a
        permutation null (--null-permutations). At the end, one line per estimator says how many
        cells sit at their cap (see docs/trust.md).

        Exit codes: 0 ok (noted cells are summarised on stderr), 1 I/O error or lock still held
        after --lock-timeout, 2 usage, 4 bad data (or noted cells with --strict), 5 plug-in failure.

        Example: ibscope estimate acts/ -o results.csv -e binning -e ksg --param binning.n_bins=30

        On a Dask cluster: ibscope estimate acts/ -o results.csv --scheduler tcp://HOST:8786 (docs/scaling.md)
        """
        from ibscope.pipeline import EstimateSection, load_estimate_preset

        preset = load_estimate_preset(config) if config else EstimateSection()
        names = list(estimator) if estimator else list(preset.estimators)
        # -e picks estimators (the preset's parameters of other ones are not used); without -e, parameters
        # of an estimator the preset does not list are an error of run_estimate
        params = preset.params_of(names if estimator else preset.params)
        for name, p in parse_params(param).items():
            params.setdefault(name, {}).update(p)
        out_path = out or Path(preset.out or "results.csv")
        from ibscope.estimate import run_estimate, summary_lines

        c = console()

        def show(message, category, filename, lineno, file=None, line=None):  # plain "Warning: ..." lines
            c.print(f"Warning: {message}", markup=False, soft_wrap=True)

        with warnings.catch_warnings():
            warnings.showwarning = show
            res = run_estimate(
                stores, out_path, names, params,
                device=device or preset.device or "auto", force=force,
                jobs=jobs if jobs is not None else preset.jobs,
                x_source=x_source or preset.x_source, layers=list(layer) if layer else preset.layers,
                progress=not quiet, reporter=reporter(quiet), strict=False, skip_bad_shards=skip_bad_shards,
                lock_timeout=lock_timeout,
                null_permutations=_first(null_permutations, preset.null_permutations, DEFAULT_NULL_PERMUTATIONS),
                null_seed=_first(null_seed, preset.null_seed, 0),
                scheduler=scheduler if scheduler is not None or scheduler_file is not None else preset.scheduler,
                scheduler_file=scheduler_file if scheduler is not None or scheduler_file is not None
                else preset.scheduler_file,
            )
        prov = res.provenance
        # skipped shards were named once when the store was opened (and are listed in the provenance)
        for line in summary_lines(res, strict=strict or preset.strict):
            c.print(line, markup=False, soft_wrap=True)
        eng = prov.get("engine") or {}
        if not quiet and eng.get("engine") == "dask":
            c.print(f"Ran {eng.get('tasks', 0)} task(s) on {eng.get('workers_at_end', eng.get('workers'))} Dask "
                    f"worker(s) of {eng.get('scheduler')}.", markup=False)
        if not quiet:
            c.print(f"Wrote {len(res)} rows ({prov.get('cells_computed', 0)} cell(s) computed, "
                    f"{prov.get('rows_kept_from_existing', 0)} row(s) kept) to {out_path}", markup=False)
        if (strict or preset.strict) and prov.get("noted_cells"):
            raise DataError(f"--strict: {prov['noted_cells']} cell(s) could not be estimated (listed above); "
                            f"the results were written to {out_path} with those cells noted.")

    @app.command("estimators")
    @guard
    def estimators(
        as_json: bool = typer.Option(False, "--json", help="Print the listing as JSON on stdout."),
        kind: Optional[Literal["pair", "single", "jacobian"]] = typer.Option(
            None, "--kind", help="Only 'pair', 'single' or 'jacobian' estimators."),
    ) -> None:
        """List the registered estimators: name, kind, quantity, unit, parameters with defaults, reference."""
        import json

        from ibscope.estimators import registry

        rows = []
        for name, cls in registry.available().items():
            if kind and cls.kind != kind:
                continue
            d = registry.describe(name)  # by name: an alias (kde-upper) shows its own name and pinned bound
            d["x_source"] = cls.x_source if cls.kind == "pair" else None
            rows.append(d)
        broken = registry.plugin_errors()
        if as_json:
            typer.echo(json.dumps({"estimators": rows, "plugin_errors": broken}, indent=2, default=str))
            return
        from rich.table import Table

        table = Table(title="ibscope estimators", show_lines=False)
        for col in ("name", "kind", "quantity", "unit", "parameters (defaults)", "reference"):
            table.add_column(col, overflow="fold")
        for d in rows:
            ps = ", ".join(f"{k}={v!r}" for k, v in d["params"].items()) or "-"
            q = d["quantity"] if d["kind"] != "pair" else f"I(X;T) [X={d['x_source']}], I(T;Y)"
            table.add_row(d["name"], d["kind"], q, d["unit"], ps, d["reference"])
        from ibscope._console import listing

        listing().print(table)
        c = console()
        for name, msg in broken.items():
            c.print(f"[yellow]Plug-in '{name}' failed to load:[/] {msg}")
