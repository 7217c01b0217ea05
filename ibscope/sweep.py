"""``ibscope sweep``: several run configs (or one config over a seed list) in parallel, then one
combined report per experiment.

Each run is one piece of work for an :mod:`ibscope.executor` (in this process, ``--jobs N``
local processes, or a Dask cluster with ``--scheduler``): the whole pipeline of that config
(:func:`ibscope.pipeline.run_pipeline`, so stages that are up to date are skipped as with
``ibscope run``) into ``OUT/runs/<name>`` (``<name>-s<seed>`` with ``--seeds``). On a
cluster, runs go to GPU workers when there are any (training and capture use the GPU).

Every config is read and checked before any run starts (a bad key, value or estimator name
stops the sweep with exit 2). A run that fails does not stop the others: its error is listed at the end and the exit code
is the worst of the failed runs' codes. When every run of an experiment has a results table,
``OUT/<experiment>_report.html`` shows its seeds together: every curve and information plane
as the median over the seeds with a band (the 25th-75th percentiles), as ``ibscope plot`` and
``ibscope report`` do for several results files. ``OUT/sweep.json`` lists every run with its
status, folder, results and report.

Within a run everything stays where the run is: its estimate cells run in that process
(``estimate.scheduler`` is set to "local"), so a run on a cluster worker never waits for cells
queued behind it on the same cluster. This module only calls the pipeline's public entry points
(``load_config``, ``deep_merge``, ``run_pipeline``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ibscope.errors import IbscopeError, UsageError
from ibscope.reporting import NullReporter, Reporter, reporter_or_null


@dataclass
class SweepRun:
    """One run of a sweep: its experiment (the config's name), seed, folder and outcome."""

    experiment: str
    name: str
    config: str
    seed: int | None
    out: Path
    status: str = "pending"  # "ok" | "failed"
    results: Path | None = None
    report: Path | None = None
    ran: list[str] = field(default_factory=list)
    error: str = ""
    exit_code: int = 0
    worker: str = ""
    seconds: float = 0.0


@dataclass
class SweepResult:
    out: Path
    runs: list[SweepRun]
    reports: dict[str, Path]
    engine: dict

    @property
    def failed(self) -> list[SweepRun]:
        return [r for r in self.runs if r.status != "ok"]


def parse_seeds(text: str | Sequence[int] | None) -> list[int] | None:
    """``"0,1,2"``, ``"0-4"`` (inclusive) or a list of ints -> [seeds]; None stays None."""
    if text is None:
        return None
    if not isinstance(text, str):
        vals = list(text)
    else:
        vals = []
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            lo, dash, hi = part.partition("-")
            try:
                vals += list(range(int(lo), int(hi) + 1)) if dash and lo else [int(part)]
            except ValueError:
                raise UsageError(f"--seeds expects integers like 0,1,2 or 0-4. Got {text!r}.") from None
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
        raise UsageError(f"--seeds expects integers like 0,1,2 or 0-4. Got {text!r}.")
    if len(set(vals)) != len(vals):
        raise UsageError(f"--seeds lists a seed twice: {text!r}.")
    return vals


def plan_sweep(configs: Sequence[str | os.PathLike], out: Path, *, seeds: Sequence[int] | None = None,
               quick: bool = False, overrides: dict | None = None) -> list[SweepRun]:
    """The runs of a sweep, each config read and checked first (usage errors before any work)."""
    from ibscope.pipeline import load_config

    if not configs:
        raise UsageError("No run config given.", hint="ibscope sweep CONFIG.yaml... -o OUT [--seeds 0,1,2]")
    runs: list[SweepRun] = []
    seen: dict[str, str] = {}
    for c in configs:
        spec = str(Path(c).resolve()) if Path(c).exists() else str(c)  # a packaged name stays a name
        cfg, _, _ = load_config(spec, quick=quick, overrides=dict(overrides or {}))
        exp = str(cfg.name)
        if exp in seen:
            raise UsageError(f"The configs '{seen[exp]}' and '{c}' both have the name '{exp}'; their runs would "
                             f"share folders.", hint="Give each experiment its own 'name:' (or --set name=...).")
        seen[exp] = str(c)
        for s in (seeds if seeds is not None else [None]):
            name = exp if s is None else f"{exp}-s{s}"
            runs.append(SweepRun(exp, name, spec, s, (out / "runs" / name).resolve()))
    return runs


def _stamped_since(out: Path, since: float) -> list[str]:
    """The stages of the run folder ``out`` whose stamps were written at or after ``since`` (the
    stages a run that then failed completed), in pipeline order."""
    from ibscope.pipeline.config import STAGES
    from ibscope.pipeline.runner import STAMP_DIR

    d = out / STAMP_DIR
    return [s for s in STAGES if (d / f"{s}.json").is_file() and (d / f"{s}.json").stat().st_mtime >= since - 1e-3]


def _run_task(p: dict, device: str) -> dict:
    """One run of a sweep, wherever it runs: the pipeline of its config, with its seed and name."""
    from ibscope.pipeline import run_pipeline

    t0, wall0 = time.perf_counter(), time.time()
    from ibscope.pipeline import deep_merge

    # the sweep spreads the runs; each run's cells stay where the run is (a run on a cluster worker
    # that waited for cells on the same cluster could hold the very threads they need)
    over = deep_merge(dict(p["overrides"] or {}), {"estimate": {"scheduler": "local", "scheduler_file": None}})
    over["name"] = p["name"]
    if p["seed"] is not None:
        over["seed"] = p["seed"]
    try:
        res = run_pipeline(p["config"], out=p["out"], quick=p["quick"], overrides=over, force=p["force"],
                           until=p["until"], device=None if device in (None, "") else device, progress=False,
                           quiet=True, lock_timeout=p["lock_timeout"])
    except IbscopeError as exc:  # one run's failure is reported, the others go on
        return {"status": "failed", "error": str(exc), "exit_code": exc.exit_code,
                "seconds": time.perf_counter() - t0, "ran": _stamped_since(Path(p["out"]), wall0)}
    return {"status": "ok", "results": str(res.results) if res.results else None,
            "report": str(res.report) if res.report else None, "ran": res.ran(),
            "seconds": time.perf_counter() - t0}


def run_sweep(configs: Sequence[str | os.PathLike], out: str | os.PathLike, *, seeds: Sequence[int] | None = None,
              jobs: int = 1, scheduler: str | None = None, scheduler_file: str | os.PathLike | None = None,
              device: str | None = None, quick: bool = False, overrides: dict | None = None, force: bool = False,
              until: str | None = None, lock_timeout: float | None = 10.0, progress: bool = True,
              report: bool = True, reporter: Reporter | None = None) -> SweepResult:
    """Run every config (x every seed) through its pipeline on the chosen executor, then write
    one combined report per experiment and ``OUT/sweep.json``. See the module docstring.
    The progress (one step per finished run) goes to ``reporter`` (:mod:`ibscope.reporting`;
    ``None``: silent, as is ``progress=False``)."""
    from ibscope.executor import Piece, make_executor, remote_device, resolve_engine

    spec = resolve_engine(jobs, scheduler, scheduler_file)
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o '{out}' is a file; expected a folder for the sweep.")
    runs = plan_sweep(configs, out, seeds=seeds, quick=quick, overrides=overrides)
    dev = remote_device(device) if spec.remote else (device or "")
    pieces = [Piece(_run_task, {"config": r.config, "out": str(r.out), "name": r.name, "seed": r.seed, "quick": quick,
                                "overrides": overrides, "force": force, "until": until, "lock_timeout": lock_timeout},
                    gpu=True, label=f"run {r.name}") for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    with make_executor(spec, dev or "cpu") as ex, \
            (reporter_or_null(reporter) if progress else NullReporter()).task("sweep", len(pieces)) as bar:
        for o in ex.run(pieces):
            r, v = runs[o.index], o.value
            r.status, r.seconds, r.worker = v["status"], v["seconds"], o.worker
            r.error, r.exit_code = v.get("error", ""), v.get("exit_code", 0)
            r.results = Path(v["results"]) if v.get("results") else None
            r.report = Path(v["report"]) if v.get("report") else None
            r.ran = v.get("ran", [])
            bar.advance(note=f"{r.name}: {r.status}")
        engine = ex.describe()
    reports: dict[str, Path] = {}
    if report:
        for exp in dict.fromkeys(r.experiment for r in runs):
            mine = [r for r in runs if r.experiment == exp]
            if all(r.status == "ok" and r.results is not None and r.results.exists() for r in mine):
                reports[exp] = combined_report(exp, [r.results for r in mine if r.results is not None], out / f"{exp}_report.html",
                                               n_seeds=sum(r.seed is not None for r in mine))
    doc = {"out": str(out), "engine": engine, "seeds": list(seeds) if seeds is not None else None,
           "runs": [{"experiment": r.experiment, "name": r.name, "config": r.config, "seed": r.seed,
                     "out": str(r.out), "status": r.status, "results": str(r.results) if r.results else None,
                     "report": str(r.report) if r.report else None, "stages_ran": r.ran, "error": r.error or None,
                     "worker": r.worker or None, "seconds": round(r.seconds, 3)} for r in runs],
           "reports": {k: str(v) for k, v in reports.items()}}
    from ibscope._atomic import write_text_atomic

    write_text_atomic(out / "sweep.json", json.dumps(doc, indent=2))
    return SweepResult(out, runs, reports, engine)


def combined_report(experiment: str, results: Sequence[Path], out_html: Path, *, n_seeds: int = 0) -> Path:
    """The report of one experiment over its runs' results tables: curves and planes as the
    median over the runs with a 25-75 % band (:func:`ibscope.report.write_report`)."""
    from ibscope.report import write_report

    title = f"{experiment}: " + (f"{len(results)} seeds, median and 25-75 % band" if n_seeds > 1
                                 else f"{len(results)} run(s)")
    return write_report([str(p) for p in results], out_html, title=title, runs_mode="median")
