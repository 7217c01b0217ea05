"""What every stage of one run needs: the typed config, its folders, the device, the reporter, the
stage runner, the probe sets and paths it plans (:class:`RunContext`), and what the run produced
(:class:`PipelineResult`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout
from ibscope._paths import inside
from ibscope.errors import UsageError, unknown_name
from ibscope.pipeline.config import STAGES, RunConfig
from ibscope.pipeline.runner import STAMP_DIR, StageRunner, StageStatus
from ibscope.reporting import NullReporter, Reporter, Task, is_silent, reporter_or_null


@dataclass
class PipelineResult:
    """What ``run_pipeline`` produced (paths are absolute)."""

    name: str
    out: Path
    config: RunConfig
    stages: list[StageStatus]
    checkpoints: list[Path] = field(default_factory=list)
    stores: dict[str, Path] = field(default_factory=dict)
    results: Path | None = None
    figures: list[Path] = field(default_factory=list)
    ood: Path | None = None
    report: Path | None = None
    check: Any = None

    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]

    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]


def resolve_path(base: Path, p: str | None) -> Path | None:
    """``p`` (``~`` expanded) relative to ``base`` unless absolute; ``None`` stays ``None``."""
    if p is None:
        return None
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else base / q


def _is_file_spec(mod: str) -> bool:
    return mod.endswith(".py") or "/" in mod or os.sep in mod


def resolve_factory_spec(base: Path, spec: str) -> str:
    """``path/file.py:factory`` with the path resolved against ``base``; ``pkg.module:factory`` as is."""
    mod, _, attr = spec.rpartition(":")
    return f"{resolve_path(base, mod)}:{attr}" if _is_file_spec(mod) else spec


def factory_source(base: Path, spec: str) -> Path | None:
    """The source file of a model factory spec, whose contents are part of the train and capture fingerprints.

    ``path/file.py:factory``: that file (resolved against ``base``; it may be missing, which the
    stage then reports). ``pkg.module:factory``: the module's file, found with
    :func:`importlib.util.find_spec` (imports only the parent packages), else by importing the
    module. ``None`` for a module without a source file.
    """
    import importlib
    import importlib.util
    import inspect

    mod, _, _ = spec.rpartition(":")
    if _is_file_spec(mod):
        return resolve_path(base, mod)
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        found = None
    origin = getattr(found, "origin", None)
    if origin and os.path.isfile(origin):
        return Path(origin)
    try:
        m = importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001 - the user's module: any import failure is theirs
        raise UsageError(f"model.factory: cannot import module '{mod}': {type(exc).__name__}: {exc}",
                         hint="Install the package, or name a file: 'path/to/file.py:factory'.") from None
    try:
        src = inspect.getsourcefile(m) or getattr(m, "__file__", None)
    except TypeError:  # a built-in module
        src = None
    return Path(src) if src and os.path.isfile(src) else None


class RunContext:
    """One run config, resolved against its folders: everything a stage function reads.

    Checks, before anything is written: ``only`` names stages, the devices are valid and
    available, every planned output path lies inside the output folder.
    """

    def __init__(self, cfg: RunConfig, base: Path, out: Path, *, device: str | None = None, progress: bool = True,
                 force: bool = False, only: Any = None, reporter: Reporter | None = None,
                 lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT):
        from ibscope._device import resolve_device

        self.cfg = cfg
        self.base = base
        self.out = Path(out).resolve()
        self.lock_timeout = check_timeout(lock_timeout)
        self.device = device or cfg.device
        self.reporter = reporter_or_null(reporter)
        #: progress bars of the library calls (capture, estimate, ood): only when someone shows them
        self.progress = progress and not is_silent(reporter)
        for s in only or ():
            if s not in STAGES:
                raise unknown_name("stage", s, STAGES)
        resolve_device(self.device)  # fail on a bad or unavailable --device before any work
        resolve_device(cfg.train.device if cfg.train else "cpu")
        if cfg.estimate.device is not None:
            resolve_device(cfg.estimate.device)
        self.check_paths()
        self.check_inputs()
        self.runner = StageRunner(self.out, force=force, only=only, reporter=self.reporter, base=base)
        self.result = PipelineResult(cfg.name or "run", self.out, cfg, self.runner.status)

    def task(self, label: str, total: int | None = None) -> ContextManager[Task]:
        """A progress task of the reporter (a silent one when progress is off)."""
        return (self.reporter if self.progress else NullReporter()).task(label, total)

    @property
    def name(self) -> str:
        return self.cfg.name or "run"

    def path(self, p: str) -> Path:
        """A path of the config, resolved against the config's folder."""
        q = resolve_path(self.base, p)
        assert q is not None
        return q

    def check_inputs(self) -> None:
        """Raise a UsageError (exit 2) naming the config key when a file the config names (the model
        factory's .py file, the data.train / data.test / data.probes files) does not exist; files
        inside the output folder are left to the stages that write them."""
        missing = []
        mod, _, _ = self.cfg.model.factory.rpartition(":")
        if _is_file_spec(mod):
            missing.append(("model.factory", mod))
        d = self.cfg.data
        missing += [(f"data.{k}", v) for k, v in (("train", d.train), ("test", d.test)) if v]
        missing += [(f"data.probes.{k}", v) for k, v in (d.probes or {}).items()]
        for key, given in missing:
            p = self.path(given)
            if p.exists() or p.resolve().is_relative_to(self.out):
                continue
            raise UsageError(f"'{key}': file '{given}' not found (looked for '{p}').",
                             hint=f"Paths in a run config are relative to the config file's folder ('{self.base}'), "
                                  "not to the current directory.")

    def check_paths(self) -> None:
        """Raise a UsageError (exit 2) unless every path this run writes lies inside the output folder."""
        probes = self.probes()
        planned = [("probe file (data.subsets)", probes[k]) for k in self.cfg.data.subsets or {}]
        planned += [("activation store", self.out / "stores" / n) for n in self.capture_probes()]
        planned += [(what, self.out / rel) for what, rel in (
            ("checkpoint folder", "checkpoints"), ("results file", "results.csv"), ("figure folder", "figures"),
            ("OOD folder", "ood"), ("report", "report.html"), ("check result", "check.json"),
            ("stage stamps", STAMP_DIR))]
        for what, p in planned:
            inside(self.out, p, what)

    def factory_spec(self) -> str:
        return resolve_factory_spec(self.base, self.cfg.model.factory)

    def factory_inputs(self) -> list[Path]:
        src = factory_source(self.base, self.cfg.model.factory)
        return [src] if src is not None else []

    # ------------------------------------------------------------------ probe sets
    def probes(self) -> dict[str, Path]:
        """Every probe set of the run: name -> file."""
        d = self.cfg.data
        out: dict[str, Path] = {}
        if d.task == "twelve-bit":
            out = {k: self.out / "data" / f"{k}.npz" for k in ("all", "train", "test")}
        elif d.task == "digits":
            from ibscope.demo.digits import PROBE_NAMES

            out = {k: self.out / "data" / f"{k}.npz" for k in PROBE_NAMES}
        else:
            if d.train:
                out["train"] = self.path(d.train)
            if d.test:
                out["test"] = self.path(d.test)
        for k, v in (d.probes or {}).items():
            out[str(k)] = self.path(v)
        for k, sub in (d.subsets or {}).items():
            if sub.probe not in out:
                raise unknown_name(f"probe set (data.subsets.{k}.probe)", sub.probe, out)
            out[str(k)] = self.out / "data" / f"{k}.npz"
        return out

    def main_probe(self) -> str:
        """The probe set the information plane is measured on."""
        d = self.cfg.data
        probes = self.probes()
        if d.probe:
            if d.probe not in probes:
                raise unknown_name("probe set (data.probe)", d.probe, probes)
            return d.probe
        default = {"twelve-bit": "all", "digits": "train"}.get(d.task or "", None)
        if default:
            return default
        return "train" if "train" in probes else next(iter(probes))

    def capture_probes(self) -> list[str]:
        """The probe sets the capture stage writes a store for."""
        c = self.cfg
        if c.capture.probes:
            names = list(c.capture.probes)
        else:
            names = list(c.estimate.probes or [self.main_probe()])
            for e, v in (c.estimate.probes_for or {}).items():
                if e in c.estimate.estimators:
                    names += [v] if isinstance(v, str) else list(v)
            if c.ood is not None:
                names += [c.ood.fit, c.ood.test, *c.ood.ood]
        names = list(dict.fromkeys(names))
        probes = self.probes()
        for n in names:
            if n not in probes:
                raise unknown_name("probe set", n, probes)
        return names

    def checkpoint_source(self) -> Any:
        """The checkpoints the capture stage reads: the train stage's folder, or ``checkpoints:`` resolved."""
        if self.cfg.train is not None:
            return self.out / "checkpoints"
        cks = self.cfg.checkpoints
        if isinstance(cks, str):
            return str(resolve_path(self.base, cks))
        return [str(resolve_path(self.base, c)) for c in cks or []]
