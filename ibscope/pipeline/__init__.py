"""``ibscope run CONFIG.yaml``: the whole pipeline from one YAML file.

Stages, in order (each reads only what the stage before it wrote)::

    data -> train -> capture -> estimate -> plot -> ood -> report -> check

* **data**: a built-in task (``twelve-bit``, ``digits``) writes its ``.npz`` probe files, or the
  config names the user's own files.
* **train**: a training recipe (``train:`` section) writes checkpoints at log-spaced epochs; a run
  that already has checkpoints names them with ``checkpoints:`` instead and this stage is skipped.
* **capture** (one activation store per probe set), **estimate** (results CSV), **plot**
  (figures), **ood** (optional), **report** (HTML), **check** (optional, exit code 3 on a
  regression).

Up-to-date stages are skipped: each stage writes a stamp (``OUT/.ibscope/stages/<stage>.json``)
holding its fingerprint: the hash of its resolved config section, the digests of the upstream
stages' last runs, the sha256 of every input file (the model factory's source file included) and
the ibscope version; and the sha256 of every output it wrote. A stage runs again when any of these
changed, an input was deleted, or an output is missing or changed since the stage wrote it
(:class:`StageRunner`). Re-running after changing only ``plot:`` re-draws the figures and the
report and nothing else.

Names that become path parts (run name, probe-set and subset names) must be safe names
(:func:`ibscope._paths.safe_name`), and every output path is checked to lie inside the output
folder before anything is written. One run at a time writes an output folder: the run holds its
writer lock (:func:`ibscope._locks.writer_lock`) throughout.

Relative paths inside a config are resolved against the config file's folder; ``--out`` on the
command line is relative to the current folder; without either, output goes to
``./ibscope-runs/<name>``.

The package: :mod:`~ibscope.pipeline.config` (the typed run config and estimate section),
:mod:`~ibscope.pipeline.loading` (files, overrides, errors), :mod:`~ibscope.pipeline.runner`
(stages and stamps), :mod:`~ibscope.pipeline.context` (one run's config, folders and probe sets),
:mod:`~ibscope.pipeline.stages` (one function per stage). ``ibscope demo`` is
:mod:`ibscope.demo.run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, writer_lock
from ibscope.errors import RegressionFound, UsageError, unknown_name
from ibscope.pipeline import stages
from ibscope.pipeline.config import (
    DEFAULT_ESTIMATORS,
    OPTIONAL_SECTIONS,
    STAGES,
    TASKS,
    EstimateSection,
    RunConfig,
    check_safe_globals,
)
from ibscope.pipeline.context import PipelineResult, RunContext, factory_source, resolve_path
from ibscope.pipeline.loading import (
    PACKAGED_CONFIGS,
    deep_merge,
    describe_schema,
    load_config,
    load_estimate_preset,
    parse_overrides,
)
from ibscope.pipeline.runner import STAMP_DIR, STAMP_FORMAT, ContentHashes, Stage, StageRunner, StageStatus
from ibscope.pipeline.stages import write_subset
from ibscope.reporting import Reporter

__all__ = ["STAGES", "TASKS", "OPTIONAL_SECTIONS", "DEFAULT_ESTIMATORS", "PACKAGED_CONFIGS", "STAMP_DIR",
           "STAMP_FORMAT", "RunConfig", "EstimateSection", "load_config", "load_estimate_preset", "describe_schema",
           "deep_merge", "parse_overrides", "check_safe_globals", "Stage", "StageStatus", "StageRunner",
           "ContentHashes", "PipelineResult", "RunContext", "Pipeline", "factory_source", "write_subset",
           "output_dir", "run_pipeline", "run_demo", "side_by_side", "DemoResult", "DEMO_RUNS"]


class Pipeline:
    """One run config -> its stages, run in order under the output folder's writer lock."""

    def __init__(self, cfg: RunConfig, base: Path, out: Path, **kw: Any):
        self.ctx = RunContext(cfg, base, out, **kw)
        self.out = self.ctx.out
        self.result = self.ctx.result

    def run(self, until: str | None = None) -> PipelineResult:
        """Run the stages up to ``until``, holding the run folder's writer lock throughout."""
        if until is not None and until not in STAGES:
            raise unknown_name("stage", until, STAGES)
        with writer_lock(self.out, what="run folder", timeout=self.ctx.lock_timeout):
            return self._run(STAGES.index(until) if until else len(STAGES) - 1)

    def _run(self, stop: int) -> PipelineResult:
        ctx = self.ctx
        ctx.out.mkdir(parents=True, exist_ok=True)

        def upto(stage: str) -> bool:
            return stop >= STAGES.index(stage)

        stages.data(ctx)
        if upto("train"):
            stages.train(ctx)
        if not upto("capture"):
            return ctx.result
        stores = stages.capture(ctx)
        if not upto("estimate"):
            return ctx.result
        results = stages.estimate(ctx, stores)
        if upto("plot"):
            stages.plot(ctx, results)
        if upto("ood"):
            stages.ood(ctx, stores)
        if upto("report"):
            stages.report(ctx, results, ood_json=ctx.result.ood)
        rep = stages.check(ctx, results) if upto("check") else None
        stages.strict_check(ctx, results, rep)
        if rep is not None and not rep.ok:
            raise RegressionFound(f"ibscope check found {len(rep.failures)} regression(s): see {ctx.out / 'check.json'}.",
                                  hint=rep.summary())
        return ctx.result


def output_dir(cfg: RunConfig, base: Path, out: str | os.PathLike | None) -> Path:
    """The run's output folder: ``out`` (from the current folder), else the config's ``out`` (from
    the config's folder), else ``./ibscope-runs/<name>``."""
    if out is not None:
        return Path(out).resolve()
    if cfg.out:
        return resolve_path(base, cfg.out).resolve()  # type: ignore[union-attr]
    return (Path("ibscope-runs") / (cfg.name or "run")).resolve()


def run_pipeline(config: str | os.PathLike | Mapping, *, out: str | os.PathLike | None = None, quick: bool = False,
                 overrides: Mapping | None = None, force: bool = False, only: Sequence[str] | None = None,
                 until: str | None = None, device: str | None = None, progress: bool = True, quiet: bool = False,
                 base_dir: str | os.PathLike | None = None, strict: bool = False, skip_bad_shards: bool = False,
                 safe_globals: Sequence[str] = (), lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                 reporter: Reporter | None = None) -> PipelineResult:
    """Run (or bring up to date) the pipeline of one run config; see the module docstring.

    ``only``: run just these stages (others must be up to date already); ``until``: stop after
    this stage; ``force``: re-run every stage. ``strict`` and ``skip_bad_shards`` switch on the
    config keys ``estimate.strict`` and ``skip_bad_shards``; ``safe_globals`` adds to
    ``capture.safe_globals``. ``lock_timeout``: seconds to wait for another run writing the same
    output folder (0: refuse at once; negative or None: wait for ever), then
    :class:`~ibscope._locks.LockTimeout`. ``reporter`` receives the stage messages and progress
    (default: none, the API is silent); ``progress=False`` or ``quiet=True`` turn its progress
    bars off, ``quiet=True`` its messages too. Raises :class:`~ibscope.errors.RegressionFound`
    when the check stage finds a regression (after everything else is written).
    """
    check_timeout(lock_timeout)
    extra_globals = check_safe_globals(list(safe_globals), "--safe-globals")
    flags = {**({"estimate": {"strict": True}} if strict else {}), **({"skip_bad_shards": True} if skip_bad_shards else {})}
    cfg, base, _ = load_config(config, quick=quick, overrides=deep_merge(dict(overrides or {}), flags),
                               base_dir=base_dir)
    cfg.capture.safe_globals = list(dict.fromkeys([*cfg.capture.safe_globals, *extra_globals]))
    if until is not None and until not in STAGES:
        raise unknown_name("stage", until, STAGES)
    od = output_dir(cfg, base, out)
    if od.exists() and not od.is_dir():
        raise UsageError(f"Output folder '{od}' is a file.")
    pipe = Pipeline(cfg, base, od, device=device, progress=progress and not quiet, force=force, only=only,
                    reporter=None if quiet else reporter, lock_timeout=lock_timeout)
    return pipe.run(until=until)


def __getattr__(name: str) -> Any:  # ibscope demo lives in ibscope.demo.run (it imports this package)
    if name in ("run_demo", "side_by_side", "DemoResult", "DEMO_RUNS"):
        from ibscope.demo import run as demo_run

        return getattr(demo_run, name)
    raise AttributeError(f"module 'ibscope.pipeline' has no attribute {name!r}")
