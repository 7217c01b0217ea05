"""The run config and the estimate presets as typed models (pydantic v2).

:class:`RunConfig` is the YAML file of ``ibscope run``; :class:`EstimateSection` is both its
``estimate:`` section and an ``ibscope estimate --config`` preset (one model, one default
estimator list, :data:`DEFAULT_ESTIMATORS`). Every model forbids unknown keys and is strict
(``true`` is not an integer, ``1`` is not a boolean); the few conveniences of the YAML format
are explicit before-validators: one string where a list of strings is expected
(:data:`StrList`), a number written as a string (YAML reads ``1e-3`` as one) where a number is
expected (:data:`Number`).

Cross-field rules (``train:`` versus ``checkpoints:``, safe names, options of a built-in task,
parameters of estimators that are not selected, ...) live in the one model validator
:meth:`RunConfig._consistency`. Reading files and turning pydantic's errors into ibscope's
:class:`~ibscope.errors.UsageError` (exit 2, with the key's location and a did-you-mean) is
:mod:`ibscope.pipeline.loading`'s job.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, model_serializer, model_validator

from ibscope.errors import UsageError, did_you_mean

STAGES = ("data", "train", "capture", "estimate", "plot", "ood", "report", "check")
TASKS = ("twelve-bit", "digits")
#: options of the built-in tasks (keyword arguments of their write_probe_files)
TASK_OPTIONS = {"twelve-bit": ("train_fraction", "split_seed"),
                "digits": ("holdout", "test_fraction", "split_seed", "transform")}
#: the estimators of ``ibscope estimate`` without -e and of a run config without estimate.estimators
DEFAULT_ESTIMATORS = ("binning", "ksg")
#: sections that may be absent (then their stage does not run)
OPTIONAL_SECTIONS = ("train", "ood", "check")


def _one_to_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def _number(v: Any) -> Any:
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            return v
    return v


class Kind(str):
    """Annotation marker: the value's kind in messages and in :func:`~ibscope.pipeline.loading.describe_schema`."""


#: a list of strings; one string is a list of one
StrList = Annotated[list[str], BeforeValidator(_one_to_list), Kind("strlist")]
#: a number (an integer is accepted and becomes a float)
Number = Annotated[float, BeforeValidator(_number), Kind("float")]
#: a path, a glob, or a list of them (kept as written)
Paths = Annotated[str | list[str], Kind("paths")]


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class ModelSection(Section):
    factory: str = Field(description="'pkg.module:factory' or 'path/file.py:factory'")
    args: Optional[dict[str, Any]] = Field(default_factory=dict, description="keyword arguments of the factory")


class SubsetSpec(Section):
    """``data.subsets.<name>``: a seeded random subset of a probe set, written as a probe set."""

    probe: str = Field(description="the probe set to draw from")
    n: int = Field(ge=1, description="number of samples")
    seed: int = Field(0, description="seed of the draw")

    @model_serializer(mode="wrap")
    def _as_written(self, handler):  # the keys the user wrote (part of the data stage's fingerprint)
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class DataSection(Section):
    task: Optional[Literal["twelve-bit", "digits"]] = Field(
        None, description="built-in task: twelve-bit | digits (writes the probe files)")
    options: Optional[dict[str, Any]] = Field(default_factory=dict,
                                              description="options of the built-in task (see docs/demo.md)")
    train: Optional[str] = Field(None, description=".npz with x, y: the training split (needed by the train stage)")
    test: Optional[str] = Field(None, description=".npz with x, y: the test split (test metrics in checkpoints)")
    probes: Optional[dict[str, str]] = Field(default_factory=dict,
                                             description="{name: probe file} extra probe sets (.npz/.h5/.pt)")
    probe: Optional[str] = Field(None, description="the probe set the information plane is measured on")
    subsets: Optional[dict[str, SubsetSpec]] = Field(
        default_factory=dict, description="{name: {probe: NAME, n: N, seed: S}}: seeded random subsets, written as "
                                          "probe sets")


class TrainSection(Section):
    epochs: int = Field(3000, ge=1, description="training epochs")
    checkpoints: int = Field(30, ge=1, description="about this many log-spaced checkpoints (plus epoch 0)")
    checkpoint_epochs: Optional[list[int]] = Field(None, description="explicit checkpoint epochs (overrides "
                                                                     "'checkpoints')")
    lr: Number = Field(1e-3, gt=0, description="learning rate")
    batch_size: Optional[int] = Field(None, ge=1, description="minibatch size; null = full batch")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam | sgd (momentum 0.9)")
    weight_decay: Number = Field(0.0, ge=0, description="L2 weight decay")
    device: str = Field("cpu", description="device for training (tiny nets are fastest on cpu)")


class CaptureSection(Section):
    layers: StrList = Field(default_factory=lambda: ["type:Linear"],
                            description="layer selectors (see `ibscope capture --help`)")
    probes: Optional[StrList] = Field(None, description="probe sets to capture (default: those that estimate and ood "
                                                        "use)")
    reduce: Any = Field(None, description="reduction for wide/conv layers (one op or {layer: op})")
    batch_size: int = Field(1024, ge=1, description="probe batch size")
    dtype: Literal["float32", "float16"] = Field("float32", description="float32 | float16")
    max_samples: Optional[int] = Field(None, ge=1, description="use at most this many probe samples")
    sample_seed: Optional[int] = Field(None, description="with max_samples: a seeded random subset (null = the "
                                                         "first N)")
    jacobian_samples: int = Field(0, ge=0, description="store Jacobian spectra for this many samples (local-rank)")
    safe_globals: StrList = Field(default_factory=list, description="classes ('module.Class') checkpoints may hold, "
                                                                    "allowed when loading them with weights_only")


def _estimator_entries(data: Any) -> Any:
    """``estimators`` as a list of names; ``{name: {param: value}}`` entries (a preset's form) move
    their parameters into ``params`` (before the ``params:`` key's, which win)."""
    if not isinstance(data, dict):
        return data
    raw = data.get("estimators")
    if isinstance(raw, dict):
        raw = [{k: v} for k, v in raw.items()]
    if not isinstance(raw, list) or all(isinstance(x, str) for x in raw):
        return data
    names: list[Any] = []
    inline: dict[str, dict] = {}
    for item in raw:
        if isinstance(item, dict) and len(item) == 1:
            (name, p), = item.items()
            names.append(str(name))
            if p:
                if not isinstance(p, dict):
                    raise UsageError(f"Parameters of estimator '{name}' must be a mapping {{param: value}}. Got {p!r}.")
                inline.setdefault(str(name), {}).update(p)
        elif isinstance(item, dict):
            raise UsageError(f"Each entry of 'estimators' must be a name or {{name: {{param: value}}}}. Got {item!r}.")
        else:
            names.append(item)
    params = data.get("params")
    if inline and (params is None or isinstance(params, dict)):
        merged = {k: dict(v) for k, v in inline.items()}
        for k, v in (params or {}).items():
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k].update(v)
            else:
                merged[k] = v
        params = merged
    return {**data, "estimators": names, **({"params": params} if params is not None else {})}


class EstimateSection(Section):
    """What to estimate: a run config's ``estimate:`` section and an ``ibscope estimate --config`` preset.

    ``probes``/``probes_for`` are used by ``ibscope run`` only (a preset ignores them); ``out``
    by ``ibscope estimate`` only (a run writes ``OUT/results.csv``).
    """

    estimators: StrList = Field(default_factory=lambda: list(DEFAULT_ESTIMATORS), min_length=1,
                                description="registered estimator names (`ibscope estimators`); a preset may also "
                                            "write {name: {param: value}} entries")
    params: dict[str, Optional[dict[str, Any]]] = Field(default_factory=dict,
                                                        description="{estimator: {param: value}}")
    x_source: Optional[Literal["identity", "inputs"]] = Field(
        None, description="X of I(X;T) for every pair estimator (null = each estimator's own)")
    layers: Optional[StrList] = Field(None, description="only these layers (null = all)")
    device: Optional[str] = Field(None, description="device of the estimators (null = the run's / auto)")
    probes: Optional[StrList] = Field(None, description="probe sets to estimate on (default: data.probe)")
    probes_for: Optional[dict[str, Annotated[str | Annotated[list[str], Field(min_length=1)],
                                             Kind("probe set name or a list of them")]]] = Field(
        default_factory=dict, description="{estimator: [probe sets]}: run these estimators on other probe sets "
                                          "(e.g. a data.subsets subset for O(n^2) estimators)")
    jobs: int = Field(1, ge=1, description="parallel jobs")
    strict: bool = Field(False, description="exit 4 when any cell could not be estimated (after everything is "
                                            "written)")
    null_permutations: Optional[int] = Field(
        None, ge=0, description="permutations of the null of I(T;Y) (and of I(X;T) with X = the inputs); null = "
                                "ibscope estimate's default (10), 0 = none")
    null_seed: Optional[int] = Field(None, description="seed of the null's permutations (null = 0)")
    out: Optional[str] = Field(None, description="results CSV of `ibscope estimate` (presets only)")
    scheduler: Optional[str] = Field(None, description="Dask scheduler address (tcp://HOST:PORT) to run the cells "
                                                       "on; null = local (or $DASK_SCHEDULER_ADDRESS); "
                                                       "docs/scaling.md")
    scheduler_file: Optional[str] = Field(None, description="Dask scheduler file (instead of scheduler)")
    description: Optional[str] = Field(None, description="free text")
    reference: Optional[str] = Field(None, description="where the preset comes from")

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any) -> Any:
        return _estimator_entries(data)

    def params_of(self, names: Any) -> dict[str, dict[str, Any]]:
        """``params`` of the estimators in ``names`` (``None`` entries as ``{}``)."""
        return {k: dict(v or {}) for k, v in self.params.items() if k in names}


class PlotSection(Section):
    enabled: bool = Field(True, description="draw figures")
    kinds: Optional[StrList] = Field(None, description="figure kinds (default: all that the results support)")
    unit: Literal["bits", "nats"] = Field("bits", description="bits | nats")
    fmt: Literal["png", "svg", "pdf"] = Field("png", description="png | svg | pdf")
    options: Optional[dict[str, Any]] = Field(default_factory=dict,
                                              description="further keyword options of ibscope.plot.plot_results")


class ReportSection(Section):
    enabled: bool = Field(True, description="write report.html")


class OodSection(Section):
    fit: str = Field(description="probe set the detectors are fitted on")
    test: str = Field(description="in-distribution probe set")
    ood: StrList = Field(description="OOD probe sets")
    layer: str = Field(description="layer whose features are scored")
    detectors: StrList = Field(default_factory=lambda: ["mahalanobis", "knn"], description="mahalanobis | knn")
    reductions: StrList = Field(default_factory=lambda: ["none"],
                                description="feature reductions (e.g. none, std+pca:16)")
    checkpoint: Any = Field(-1, description="checkpoint index (-1 = last), list, or 'all'")
    options: Optional[dict[str, Any]] = Field(default_factory=dict,
                                              description="further keyword options of ibscope.ood.run_ood")


class CheckSection(Section):
    baseline: Optional[str] = Field(None, description="baseline results CSV")
    rules: Optional[str] = Field(None, description="rules YAML")
    rtol: Optional[Number] = Field(None, description="relative tolerance")
    atol: Optional[Number] = Field(None, description="absolute tolerance")
    sigma: Optional[Number] = Field(None, description="tolerance in standard errors")
    junit: bool = Field(True, description="also write check.xml (JUnit)")


#: 'module.Class' (dotted Python names): an entry of capture.safe_globals / --safe-globals
_GLOBAL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def check_safe_globals(names: Any, what: str = "capture.safe_globals") -> list[str]:
    """Validate 'module.Class' names for weights_only checkpoint loading; UsageError naming the bad one."""
    for n in names:
        if not isinstance(n, str) or not _GLOBAL_NAME.match(n):
            raise UsageError(f"{what} expects 'module.Class' names (e.g. numpy.dtype, collections.OrderedDict). "
                             f"Got {n!r}.")
    return list(dict.fromkeys(names))


class RunConfig(Section):
    """An ``ibscope run`` config (see docs/demo.md, "The config file")."""

    name: Optional[str] = Field(None, description="run name (the results' 'run' column); default: the config file's "
                                                  "stem")
    description: Optional[str] = Field("", description="free text shown in the report")
    out: Optional[str] = Field(None, description="output folder (relative to the config file); --out overrides")
    seed: int = Field(0, description="seed of the training run (initialisation and minibatch order)")
    device: str = Field("auto", description="auto | cpu | cuda:N for capture, estimate and ood")
    skip_bad_shards: bool = Field(False, description="estimate and ood skip (and list) corrupt, foreign or partial "
                                                     "shards instead of stopping with exit 4")
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    train: Optional[TrainSection] = Field(None, description="a training recipe (or 'checkpoints:')")
    checkpoints: Optional[Paths] = Field(None, description="existing checkpoints (glob, folder or list) instead of a "
                                                           "train: recipe")
    capture: CaptureSection = Field(default_factory=CaptureSection)
    estimate: EstimateSection = Field(default_factory=EstimateSection)
    plot: PlotSection = Field(default_factory=PlotSection)
    report: ReportSection = Field(default_factory=ReportSection)
    ood: Optional[OodSection] = Field(None, description="out-of-distribution detection (optional)")
    check: Optional[CheckSection] = Field(None, description="regression check (optional; exit 3 on a regression)")
    quick: Optional[dict[str, Any]] = Field(default_factory=dict,
                                            description="overrides merged in with --quick (same keys as the config)")

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        """A section that is absent or null gets its defaults (optional sections stay null)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, f in cls.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and data.get(key) is None:
                data[key] = {}
        return data

    @model_validator(mode="after")
    def _consistency(self, info: ValidationInfo) -> RunConfig:
        """The cross-field rules. The default name comes from ``context["stem"]`` (the file name)."""
        if self.name is None:  # from the file name, which may hold characters a path part must not
            stem = str((info.context or {}).get("stem", "run"))
            self.name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:128] or "run"
        self._check_names()
        if self.train is None and not self.checkpoints:
            raise UsageError("give either a 'train:' recipe or 'checkpoints:' (existing checkpoint files).")
        if self.train is not None and self.checkpoints:
            raise UsageError("'train:' and 'checkpoints:' exclude each other.",
                             hint="Remove 'checkpoints:' to train here, or 'train:' to analyse existing checkpoints.")
        d = self.data
        if d.task is None:
            if self.train is not None and not d.train:
                raise UsageError("the train stage needs 'data.train' (an .npz with x, y) or a built-in 'data.task'.")
            if not (d.probes or d.train or d.test):
                raise UsageError("no probe data: set 'data.task', or 'data.probes' / 'data.train' / 'data.test'.")
        else:
            _known_keys(d.options or {}, TASK_OPTIONS[d.task], "data.options")
        t = self.train
        if t is not None and t.checkpoint_epochs is not None:
            bad = [e for e in t.checkpoint_epochs if not 0 <= e <= t.epochs]
            if bad:
                raise UsageError(f"train.checkpoint_epochs must lie in [0, epochs={t.epochs}]. Got {bad}.")
        est = self.estimate
        for k in est.probes_for or {}:
            if k not in est.estimators:  # allowed (unused) when it names a real estimator
                from ibscope.estimators import registry

                if k not in registry.available():
                    raise UsageError(f"'estimate.probes_for' names '{k}', which is not a registered estimator."
                                     f"{did_you_mean(k, [*est.estimators, *registry.available()])}")
        for k in est.params:
            if k not in est.estimators:
                raise UsageError(f"'estimate.params' sets parameters of '{k}', which is not in estimate.estimators."
                                 f"{did_you_mean(k, est.estimators)}")
        if est.out is not None:
            raise UsageError("'estimate.out' is a key of `ibscope estimate` presets; `ibscope run` writes "
                             "OUT/results.csv.", hint="Remove 'estimate.out', or use --out for the run folder.")
        return self

    def _check_names(self) -> None:
        """Every config name that becomes a path part (or selects one) must be a safe name."""
        from ibscope._paths import safe_name

        d = self.data
        checks: list[tuple[Any, str]] = [(self.name, "'name'")]
        checks += [(k, "a 'data.probes' key") for k in (d.probes or {})]
        checks += [(k, "a 'data.subsets' key") for k in (d.subsets or {})]
        checks += [(d.probe, "'data.probe'")] if d.probe is not None else []
        checks += [(sub.probe, f"'data.subsets.{k}.probe'") for k, sub in (d.subsets or {}).items()]
        checks += [(n, "an entry of 'capture.probes'") for n in self.capture.probes or []]
        checks += [(n, "an entry of 'estimate.probes'") for n in self.estimate.probes or []]
        for e, v in (self.estimate.probes_for or {}).items():
            checks += [(n, f"an entry of 'estimate.probes_for.{e}'") for n in ([v] if isinstance(v, str) else v)]
        if self.ood is not None:
            o = self.ood
            checks += [(o.fit, "'ood.fit'"), (o.test, "'ood.test'")]
            checks += [(n, "an entry of 'ood.ood'") for n in o.ood]
        for value, what in checks:
            safe_name(value, what)
        check_safe_globals(self.capture.safe_globals, "'capture.safe_globals'")
        f = self.model.factory
        if ":" not in f or f.startswith(":") or f.endswith(":"):
            raise UsageError(f"'model.factory' must be 'pkg.module:factory' or 'path/file.py:factory'. Got {f!r}.")

    def train_config(self):
        """The ``train:`` section as :class:`ibscope.demo.train.TrainConfig` (with the run's seed)."""
        from ibscope.demo.train import TrainConfig

        t = self.train
        if t is None:
            raise UsageError("This run config has no 'train:' section.")
        return TrainConfig(epochs=t.epochs, checkpoints=t.checkpoints, lr=t.lr, batch_size=t.batch_size,
                           optimizer=t.optimizer, weight_decay=t.weight_decay, seed=self.seed,
                           checkpoint_epochs=t.checkpoint_epochs)


def _known_keys(opts: Any, allowed: Any, where: str) -> None:
    for k in opts:
        if k not in allowed:
            raise UsageError(f"unknown key '{where}.{k}'.{did_you_mean(str(k), allowed)}",
                             hint=f"Valid keys in {where}: {', '.join(allowed)}")
