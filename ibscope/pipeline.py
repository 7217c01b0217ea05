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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, writer_lock
from ibscope._paths import inside, safe_name
from ibscope._version import __version__
from ibscope.errors import DataError, RegressionFound, UsageError, did_you_mean, unknown_name

log = logging.getLogger(__name__)

STAGES = ("data", "train", "capture", "estimate", "plot", "ood", "report", "check")
TASKS = ("twelve-bit", "digits")
STAMP_DIR = Path(".ibscope") / "stages"
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


# ======================================================================================
# config schema
# ======================================================================================
@dataclass(frozen=True)
class F:
    """One config field: its type, default and a line of documentation."""

    type: str  # str | int | float | bool | dict | list | strlist | paths | any
    default: Any = None
    doc: str = ""
    required: bool = False
    nullable: bool = True
    choices: tuple = ()


#: The schema: nested dicts are sections; leaves are :class:`F`. ``describe_schema()`` prints it.
SCHEMA: dict[str, Any] = {
    "name": F("str", None, "run name (the results' 'run' column); default: the config file's stem"),
    "description": F("str", "", "free text shown in the report"),
    "out": F("str", None, "output folder (relative to the config file); --out overrides"),
    "seed": F("int", 0, "seed of the training run (initialisation and minibatch order)", nullable=False),
    "device": F("str", "auto", "auto | cpu | cuda:N for capture, estimate and ood", nullable=False),
    "skip_bad_shards": F("bool", False, "estimate and ood skip (and list) corrupt, foreign or partial shards "
                                        "instead of stopping with exit 4", nullable=False),
    "model": {
        "factory": F("str", None, "'pkg.module:factory' or 'path/file.py:factory'", required=True),
        "args": F("dict", {}, "keyword arguments of the factory"),
    },
    "data": {
        "task": F("str", None, "built-in task: twelve-bit | digits (writes the probe files)", choices=TASKS),
        "options": F("dict", {}, "options of the built-in task (see docs/demo.md)"),
        "train": F("str", None, ".npz with x, y: the training split (needed by the train stage)"),
        "test": F("str", None, ".npz with x, y: the test split (test metrics in checkpoints)"),
        "probes": F("dict", {}, "{name: probe file} extra probe sets (.npz/.h5/.pt)"),
        "probe": F("str", None, "the probe set the information plane is measured on"),
        "subsets": F("dict", {}, "{name: {probe: NAME, n: N, seed: S}}: seeded random subsets, written as probe sets"),
    },
    "train": {
        "epochs": F("int", 3000, "training epochs", nullable=False),
        "checkpoints": F("int", 30, "about this many log-spaced checkpoints (plus epoch 0)", nullable=False),
        "checkpoint_epochs": F("list", None, "explicit checkpoint epochs (overrides 'checkpoints')"),
        "lr": F("float", 1e-3, "learning rate", nullable=False),
        "batch_size": F("int", None, "minibatch size; null = full batch"),
        "optimizer": F("str", "adam", "adam | sgd (momentum 0.9)", nullable=False, choices=("adam", "sgd")),
        "weight_decay": F("float", 0.0, "L2 weight decay", nullable=False),
        "device": F("str", "cpu", "device for training (tiny nets are fastest on cpu)", nullable=False),
    },
    "checkpoints": F("paths", None, "existing checkpoints (glob, folder or list) instead of a train: recipe"),
    "capture": {
        "layers": F("strlist", ["type:Linear"], "layer selectors (see `ibscope capture --help`)", nullable=False),
        "probes": F("strlist", None, "probe sets to capture (default: those that estimate and ood use)"),
        "reduce": F("any", None, "reduction for wide/conv layers (one op or {layer: op})"),
        "batch_size": F("int", 1024, "probe batch size", nullable=False),
        "dtype": F("str", "float32", "float32 | float16", nullable=False, choices=("float32", "float16")),
        "max_samples": F("int", None, "use at most this many probe samples"),
        "sample_seed": F("int", None, "with max_samples: a seeded random subset (null = the first N)"),
        "jacobian_samples": F("int", 0, "store Jacobian spectra for this many samples (local-rank)", nullable=False),
        "safe_globals": F("strlist", [], "classes ('module.Class') checkpoints may hold, allowed when loading "
                                         "them with weights_only", nullable=False),
    },
    "estimate": {
        "estimators": F("strlist", ["binning", "kde"], "registered estimator names (`ibscope estimators`)",
                        nullable=False),
        "params": F("dict", {}, "{estimator: {param: value}}"),
        "probes": F("strlist", None, "probe sets to estimate on (default: data.probe)"),
        "probes_for": F("dict", {}, "{estimator: [probe sets]}: run these estimators on other probe sets "
                                    "(e.g. a data.subsets subset for O(n^2) estimators)"),
        "jobs": F("int", 1, "parallel jobs", nullable=False),
        "strict": F("bool", False, "exit 4 when any cell could not be estimated (after everything is written)",
                    nullable=False),
        "null_permutations": F("int", None, "permutations of the null of I(T;Y) (and of I(X;T) with X = the "
                                            "inputs); null = ibscope estimate's default (10), 0 = none"),
        "null_seed": F("int", None, "seed of the null's permutations (null = 0)"),
        "scheduler": F("str", None, "Dask scheduler address (tcp://HOST:PORT) to run the cells on; null = local "
                                    "(or $DASK_SCHEDULER_ADDRESS); see docs/scaling.md"),
        "scheduler_file": F("str", None, "Dask scheduler file (instead of scheduler)"),
    },
    "plot": {
        "enabled": F("bool", True, "draw figures", nullable=False),
        "kinds": F("strlist", None, "figure kinds (default: all that the results support)"),
        "unit": F("str", "bits", "bits | nats", nullable=False, choices=("bits", "nats")),
        "fmt": F("str", "png", "png | svg | pdf", nullable=False, choices=("png", "svg", "pdf")),
        "options": F("dict", {}, "further keyword options of ibscope.plot.plot_results"),
    },
    "report": {
        "enabled": F("bool", True, "write report.html", nullable=False),
    },
    "ood": {
        "fit": F("str", None, "probe set the detectors are fitted on", required=True),
        "test": F("str", None, "in-distribution probe set", required=True),
        "ood": F("strlist", None, "OOD probe sets", required=True),
        "layer": F("str", None, "layer whose features are scored", required=True),
        "detectors": F("strlist", ["mahalanobis", "knn"], "mahalanobis | knn", nullable=False),
        "reductions": F("strlist", ["none"], "feature reductions (e.g. none, std+pca:16)", nullable=False),
        "checkpoint": F("any", -1, "checkpoint index (-1 = last), list, or 'all'"),
        "options": F("dict", {}, "further keyword options of ibscope.ood.run_ood"),
    },
    "check": {
        "baseline": F("str", None, "baseline results CSV"),
        "rules": F("str", None, "rules YAML"),
        "rtol": F("float", None, "relative tolerance"),
        "atol": F("float", None, "absolute tolerance"),
        "sigma": F("float", None, "tolerance in standard errors"),
        "junit": F("bool", True, "also write check.xml (JUnit)", nullable=False),
    },
    "quick": F("dict", {}, "overrides merged in with --quick (same keys as the config)"),
}

#: sections that may be absent (then the stage does not run)
OPTIONAL_SECTIONS = ("train", "ood", "check")


def _type_ok(f: F, v: Any) -> bool:
    if v is None:
        return f.nullable and not f.required
    t = f.type
    if t == "any":
        return True
    if t == "str":
        return isinstance(v, str)
    if t == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "bool":
        return isinstance(v, bool)
    if t == "dict":
        return isinstance(v, dict)
    if t == "list":
        return isinstance(v, list)
    if t in ("strlist", "paths"):
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    raise AssertionError(t)


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict": "a mapping", "list": "a list", "strlist": "a string or a list of strings",
               "paths": "a path, glob or list of paths", "any": "any value"}


def _validate_section(raw: Any, schema: dict, where: str, source: str) -> dict:
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: '{where or 'the config'}' must be a mapping. Got {type(raw).__name__}: {raw!r}.")
    out: dict[str, Any] = {}
    for key in raw:
        if not isinstance(key, str) or key not in schema:
            path = f"{where}.{key}" if where else str(key)
            raise UsageError(
                f"{source}: unknown config key '{path}'.{did_you_mean(str(key), schema)}",
                hint=f"Valid keys{' in ' + where if where else ''}: {', '.join(schema)}. See `ibscope run --help` or docs/demo.md.",
            )
    for key, spec in schema.items():
        path = f"{where}.{key}" if where else key
        if isinstance(spec, dict):
            if key in raw and raw[key] is not None:
                out[key] = _validate_section(raw[key], spec, path, source)
            elif key in OPTIONAL_SECTIONS:
                out[key] = None
            else:
                out[key] = _validate_section({}, spec, path, source)
            continue
        if key not in raw:
            if spec.required:
                raise UsageError(f"{source}: missing required key '{path}' ({spec.doc}).")
            out[key] = copy.deepcopy(spec.default)
            continue
        v = raw[key]
        if spec.type == "float" and isinstance(v, str):  # YAML reads 1e-3 as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if not _type_ok(spec, v):
            raise UsageError(f"{source}: '{path}' must be {_TYPE_WORDS[spec.type]}"
                             f"{'' if spec.nullable and not spec.required else ' (not null)'}. Got {v!r}.",
                             hint=f"{path}: {spec.doc}")
        if spec.choices and v is not None and v not in spec.choices:
            raise UsageError(f"{source}: '{path}' must be one of {', '.join(spec.choices)}. Got {v!r}."
                             f"{did_you_mean(str(v), spec.choices)}")
        if spec.type == "strlist" and isinstance(v, str):
            v = [v]
        if spec.type == "float" and v is not None:
            v = float(v)
        out[key] = v
    return out


def deep_merge(base: dict, over: Mapping) -> dict:
    """``base`` updated recursively with ``over`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(items: Sequence[str] | None) -> dict:
    """``["train.epochs=500", "plot.unit=nats"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise UsageError(f"--set expects KEY.PATH=VALUE. Got {it!r}.", hint="Example: --set train.epochs=500")
        k, v = it.split("=", 1)
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError:
            val = v
        node = out
        parts = [p for p in k.strip().split(".") if p]
        if not parts:
            raise UsageError(f"--set expects KEY.PATH=VALUE. Got {it!r}.")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {it!r} conflicts with an earlier --set of '{p}'.")
        node[parts[-1]] = val
    return out


def load_config(config: str | os.PathLike | Mapping, *, quick: bool = False, overrides: Mapping | None = None,
                base_dir: str | os.PathLike | None = None) -> tuple[dict, Path, str]:
    """Read and validate a run config. Returns (config with defaults, base folder, source label).

    ``config``: a YAML file, the name of a packaged config (``demo-tanh``), or a mapping.
    ``quick`` merges the config's ``quick:`` section; ``overrides`` (``--set``) are merged last.
    """
    import yaml

    if isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
        base = Path(base_dir or ".").resolve()
        source = "config"
        stem = "run"
    else:
        p = Path(config)
        if not p.is_file() and not p.suffix and (PACKAGED_CONFIGS / f"{p.name}.yaml").exists():
            p = PACKAGED_CONFIGS / f"{p.name}.yaml"
        if not p.exists():
            avail = sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.yaml"))
            raise UsageError(f"Config file not found: '{config}'.{did_you_mean(p.stem, avail) if not p.suffix else ''}",
                             hint="Packaged configs: " + ", ".join(avail) if avail else None)
        if p.is_dir():
            raise UsageError(f"'{config}' is a folder; `ibscope run` expects a YAML file.")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"'{p}' is not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"'{p}' is not a text file; `ibscope run` expects a YAML file.") from None
        if raw is None:
            raise UsageError(f"'{p}' is empty; a run config needs at least a 'model:' section.")
        if not isinstance(raw, dict):
            raise UsageError(f"'{p}' must hold a YAML mapping (key: value). Got {type(raw).__name__}.")
        base = Path(base_dir).resolve() if base_dir else p.resolve().parent
        source = str(p)
        stem = p.stem
    quick_section = raw.get("quick") or {}
    if not isinstance(quick_section, dict):
        raise UsageError(f"{source}: 'quick' must be a mapping of overrides. Got {quick_section!r}.")
    if quick:
        raw = deep_merge(raw, quick_section)
    if overrides:
        raw = deep_merge(raw, overrides)
    cfg = _validate_section(raw, SCHEMA, "", source)
    # quick overrides must themselves be valid keys, even when not applied
    _validate_keys_only(quick_section, SCHEMA, "quick", source)
    if cfg["name"] is None:  # from the file name, which may hold characters a path part must not
        cfg["name"] = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:128] or "run"
    _check_consistency(cfg, source)
    return cfg, base, source


def _validate_keys_only(raw: Mapping, schema: dict, where: str, source: str) -> None:
    for k, v in raw.items():
        if k not in schema or k == "quick":
            raise UsageError(f"{source}: unknown config key '{where}.{k}'.{did_you_mean(str(k), schema)}")
        if isinstance(schema[k], dict) and isinstance(v, Mapping):
            _validate_keys_only(v, schema[k], f"{where}.{k}", source)


#: 'module.Class' (dotted Python names): an entry of capture.safe_globals / --safe-globals
_GLOBAL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def check_safe_globals(names: Sequence[Any], what: str = "capture.safe_globals") -> list[str]:
    """Validate 'module.Class' names for weights_only checkpoint loading; UsageError naming the bad one."""
    for n in names:
        if not isinstance(n, str) or not _GLOBAL_NAME.match(n):
            raise UsageError(f"{what} expects 'module.Class' names (e.g. numpy.dtype, collections.OrderedDict). "
                             f"Got {n!r}.")
    return list(dict.fromkeys(names))


def _check_names(cfg: dict, source: str) -> None:
    """Every config name that becomes a path part (or selects one) must be a safe name."""
    d = cfg["data"]
    checks: list[tuple[Any, str]] = [(cfg["name"], "'name'")]
    checks += [(k, "a 'data.probes' key") for k in (d["probes"] or {})]
    checks += [(k, "a 'data.subsets' key") for k in (d["subsets"] or {})]
    checks += [(d["probe"], "'data.probe'")] if d["probe"] is not None else []
    checks += [(sub.get("probe"), f"'data.subsets.{k}.probe'") for k, sub in (d["subsets"] or {}).items()
               if isinstance(sub, dict) and isinstance(sub.get("probe"), str)]
    checks += [(n, "an entry of 'capture.probes'") for n in cfg["capture"]["probes"] or []]
    checks += [(n, "an entry of 'estimate.probes'") for n in cfg["estimate"]["probes"] or []]
    for e, v in (cfg["estimate"]["probes_for"] or {}).items():
        checks += [(n, f"an entry of 'estimate.probes_for.{e}'") for n in ([v] if isinstance(v, str) else v or [])
                   if isinstance(n, str)]
    if cfg["ood"] is not None:
        o = cfg["ood"]
        checks += [(o["fit"], "'ood.fit'"), (o["test"], "'ood.test'")]
        checks += [(n, "an entry of 'ood.ood'") for n in o["ood"] or []]
    try:
        for value, what in checks:
            safe_name(value, what)
        check_safe_globals(cfg["capture"]["safe_globals"], "'capture.safe_globals'")
    except UsageError as exc:
        raise UsageError(f"{source}: {exc.message}", hint=exc.hint) from None
    f = cfg["model"]["factory"]
    if ":" not in f or f.startswith(":") or f.endswith(":"):
        raise UsageError(f"{source}: 'model.factory' must be 'pkg.module:factory' or 'path/file.py:factory'. Got {f!r}.")


def _check_consistency(cfg: dict, source: str) -> None:
    _check_names(cfg, source)
    if cfg["train"] is None and not cfg["checkpoints"]:
        raise UsageError(f"{source}: give either a 'train:' recipe or 'checkpoints:' (existing checkpoint files).")
    if cfg["train"] is not None and cfg["checkpoints"]:
        raise UsageError(f"{source}: 'train:' and 'checkpoints:' exclude each other.",
                         hint="Remove 'checkpoints:' to train here, or 'train:' to analyse existing checkpoints.")
    d = cfg["data"]
    if d["task"] is None:
        if cfg["train"] is not None and not d["train"]:
            raise UsageError(f"{source}: the train stage needs 'data.train' (an .npz with x, y) or a built-in 'data.task'.")
        if not (d["probes"] or d["train"] or d["test"]):
            raise UsageError(f"{source}: no probe data: set 'data.task', or 'data.probes' / 'data.train' / 'data.test'.")
    elif d["task"] == "twelve-bit":
        _check_options(d["options"], ("train_fraction", "split_seed"), "data.options", source)
    elif d["task"] == "digits":
        _check_options(d["options"], ("holdout", "test_fraction", "split_seed", "transform"), "data.options", source)
    if cfg["train"] is not None:
        tc = _train_config(cfg)
        try:
            tc.validate()
        except UsageError as exc:
            raise UsageError(f"{source}: {exc.message}", hint=exc.hint) from None
    for k in ("batch_size", "jacobian_samples"):
        v = cfg["capture"][k]
        if v is not None and v < (1 if k == "batch_size" else 0):
            raise UsageError(f"{source}: 'capture.{k}' must be >= {1 if k == 'batch_size' else 0}. Got {v}.")
    for name, sub in (d["subsets"] or {}).items():
        if not isinstance(sub, dict):
            raise UsageError(f"{source}: 'data.subsets.{name}' must be a mapping {{probe, n, seed}}. Got {sub!r}.")
        _check_options(sub, ("probe", "n", "seed"), f"data.subsets.{name}", source)
        n = sub.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"{source}: 'data.subsets.{name}.n' must be an integer >= 1. Got {n!r}.")
        if not isinstance(sub.get("probe"), str):
            raise UsageError(f"{source}: 'data.subsets.{name}.probe' must name a probe set. Got {sub.get('probe')!r}.")
    for k, v in (cfg["estimate"]["probes_for"] or {}).items():
        if k not in cfg["estimate"]["estimators"]:  # allowed (unused) when it names a real estimator
            from ibscope.estimators import registry

            if k not in registry.available():
                raise UsageError(f"{source}: 'estimate.probes_for' names '{k}', which is not a registered estimator."
                                 f"{did_you_mean(k, [*cfg['estimate']['estimators'], *registry.available()])}")
        if not (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))):
            raise UsageError(f"{source}: 'estimate.probes_for.{k}' must be a probe set name or a list of them. Got {v!r}.")
    if not cfg["estimate"]["estimators"]:
        raise UsageError(f"{source}: 'estimate.estimators' is empty; name at least one estimator.")
    if cfg["estimate"]["jobs"] < 1:
        raise UsageError(f"{source}: 'estimate.jobs' must be >= 1. Got {cfg['estimate']['jobs']}.")
    if cfg["estimate"]["null_permutations"] is not None and cfg["estimate"]["null_permutations"] < 0:
        raise UsageError(f"{source}: 'estimate.null_permutations' must be >= 0 (0 = no null). "
                         f"Got {cfg['estimate']['null_permutations']}.")
    params = cfg["estimate"]["params"]
    for k, v in params.items():
        if not isinstance(v, dict):
            raise UsageError(f"{source}: 'estimate.params.{k}' must be a mapping {{param: value}}. Got {v!r}.")
        if k not in cfg["estimate"]["estimators"]:
            raise UsageError(f"{source}: 'estimate.params' sets parameters of '{k}', which is not in estimate.estimators."
                             f"{did_you_mean(k, cfg['estimate']['estimators'])}")


def _check_options(opts: Mapping, allowed: Sequence[str], where: str, source: str) -> None:
    for k in opts:
        if k not in allowed:
            raise UsageError(f"{source}: unknown key '{where}.{k}'.{did_you_mean(str(k), allowed)}",
                             hint=f"Valid keys in {where}: {', '.join(allowed)}")


def _train_config(cfg: dict):
    from ibscope.demo.train import TrainConfig

    t = cfg["train"]
    return TrainConfig(epochs=t["epochs"], checkpoints=t["checkpoints"], lr=t["lr"], batch_size=t["batch_size"],
                       optimizer=t["optimizer"], weight_decay=t["weight_decay"], seed=cfg["seed"],
                       checkpoint_epochs=t["checkpoint_epochs"])


def describe_schema(schema: dict | None = None, indent: int = 0) -> str:
    """The config keys with types, defaults and documentation, as indented text."""
    lines = []
    for k, v in (schema or SCHEMA).items():
        pad = "  " * indent
        if isinstance(v, dict):
            lines.append(f"{pad}{k}:")
            lines.append(describe_schema(v, indent + 1))
        else:
            d = "" if v.default in (None, {}, "") else f" (default {v.default!r})"
            req = " [required]" if v.required else ""
            lines.append(f"{pad}{k}: {v.type}{req}{d} - {v.doc}")
    return "\n".join(lines)


# ======================================================================================
# stamps: is a stage up to date?
# ======================================================================================
#: version of the stamp layout; a stamp of another layout makes its stage run again
STAMP_FORMAT = 2


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def _is_temp(name: str) -> bool:
    """ibscope's temporary files (``x.tmp``, ``x.tmp.npz``, ``.fig.tmp.png``): never part of a fingerprint."""
    return name.endswith(".tmp") or ".tmp." in name


def _write_json_atomic(path: Path, obj: Any) -> Path:
    from ibscope._atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class ContentHashes:
    """sha256 of files, remembered by (path, size, mtime_ns) so unchanged files are hashed once.

    ``record(path)`` describes a file (``{"size", "mtime_ns", "sha256"}``) or a folder
    (``{"folder": true, "sha256", "files": {relative path: file record}}``, temporary files left
    out; its sha256 covers the list of files and their contents), or is ``None`` when the path
    does not exist. Records read back from a stamp seed the cache (:meth:`remember`).
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}

    def remember(self, path: str | os.PathLike, rec: Any) -> None:
        if not isinstance(rec, dict):
            return
        if rec.get("folder"):
            for rel, f in (rec.get("files") or {}).items():
                self.remember(Path(path) / rel, f)
        elif isinstance(rec.get("sha256"), str) and isinstance(rec.get("size"), int) and isinstance(rec.get("mtime_ns"), int):
            self._known[(os.path.abspath(path), rec["size"], rec["mtime_ns"])] = rec["sha256"]

    def _file(self, p: Path) -> dict:
        st = p.stat()
        key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
        h = self._known.get(key)
        if h is None:
            d = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    d.update(block)
            h = d.hexdigest()
            self._known[key] = h
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h}

    def record(self, path: str | os.PathLike) -> dict | None:
        p = Path(path)
        if p.is_dir():
            files = {q.relative_to(p).as_posix(): self._file(q) for q in sorted(p.rglob("*"))
                     if q.is_file() and not any(_is_temp(part) for part in q.relative_to(p).parts)}
            return {"folder": True, "sha256": _hash({k: v["sha256"] for k, v in files.items()}), "files": files}
        if p.is_file():
            return self._file(p)
        return None


def _same(a: dict | None, b: dict | None) -> bool:
    return (a is None) == (b is None) and (a or {}).get("sha256") == (b or {}).get("sha256")


def _difference(old: dict | None, new: dict | None) -> tuple[str, str, str] | None:
    """How a path changed between two records: (file inside a folder or '', 'missing' | 'new' |
    'changed', size detail), or None when its contents are the same."""
    if _same(old, new):
        return None
    if new is None or old is None:
        return "", "missing" if new is None else "new", ""
    if old.get("folder") and new.get("folder"):
        of, nf = old.get("files") or {}, new.get("files") or {}
        for rel in sorted(set(of) | set(nf)):
            if rel not in nf or rel not in of:
                return rel, "missing" if rel not in nf else "new", ""
            if not _same(of[rel], nf[rel]):
                return rel, "changed", _sizes(of[rel], nf[rel])
    return "", "changed", _sizes(old, new)


def _sizes(old: dict, new: dict) -> str:
    a, b = old.get("size"), new.get("size")
    return f"{a} -> {b} bytes" if isinstance(a, int) and isinstance(b, int) and a != b else ""


@dataclass
class Stage:
    """One unit of work: what it depends on and how to make its outputs.

    ``inputs``: files or folders it reads (their contents are part of its fingerprint, and so are
    the model factory's source files when listed here); ``upstream``: stages whose runs it follows.
    """

    name: str
    config: Any
    inputs: list[Path]
    upstream: list[str]
    run: Callable[[], list[Path]]
    label: str = ""


@dataclass
class StageStatus:
    name: str
    status: str  # "ran" | "skipped" | "disabled"
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    reason: str = ""


class StageRunner:
    """Runs stages in order, skipping those whose stamp says they are up to date.

    A stage's stamp (``OUT/.ibscope/stages/<stage>.json``) records its fingerprint: the hash of
    its config section, the digests of the upstream stages' last runs, the sha256 of each input
    file (folders: of their file list and contents) and the ibscope version; and, when it
    finished, the sha256 of each output. The stage runs again when any of these differs, an input
    or output is missing, or an output changed since the stage wrote it (edited, truncated).
    Hashes are cached in the stamp by (path, size, mtime_ns), so unchanged files are not re-read.
    """

    def __init__(self, out: Path, *, force: bool = False, only: Sequence[str] | None = None, say=None,
                 base: Path | None = None):
        self.out = Path(out)
        self.base = Path(base) if base is not None else None
        self.force = force
        self.only = set(only) if only else None
        self.digests: dict[str, str] = {}
        self.status: list[StageStatus] = []
        self.say = say or (lambda msg: None)
        self.hashes = ContentHashes()

    def stamp_path(self, name: str) -> Path:
        return self.out / STAMP_DIR / f"{name}.json"

    def read_stamp(self, name: str) -> dict | None:
        p = self.stamp_path(name)
        if not p.exists():
            return None
        try:
            stamp = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return {}
        return stamp if isinstance(stamp, dict) else {}

    def show(self, path: str | os.PathLike) -> str:
        """A path as the user knows it: relative to the config's folder or the output folder when inside."""
        p = os.path.abspath(path)
        for root in (self.base, self.out):
            if root is not None:
                r = os.path.abspath(root)
                if p.startswith(r + os.sep):
                    return os.path.relpath(p, r)
        return p

    def input_records(self, st: Stage) -> dict[str, dict | None]:
        return {os.path.abspath(p): self.hashes.record(p) for p in st.inputs}

    def output_records(self, outputs: Sequence[Path]) -> dict[str, dict | None]:
        return {os.path.relpath(inside(self.out, p, "stage output"), self.out.resolve()): self.hashes.record(p)
                for p in outputs}

    def _seed(self, stamp: dict) -> None:
        for p, rec in (stamp.get("inputs") or {}).items():
            self.hashes.remember(p, rec)
        for rel, rec in (stamp.get("output_hashes") or {}).items():
            self.hashes.remember(self.out / rel, rec)

    def _input_change(self, p: str, old_in: dict, new_in: dict) -> str:
        """Why input ``p`` makes the stage run again ('' when it does not)."""
        shown = self.show(p)
        if p not in new_in:
            return f"input {shown} was deleted" if not os.path.exists(p) else f"{shown} is no longer an input"
        if p not in old_in:
            return f"input {shown} is new" if new_in[p] is not None else f"input {shown} is missing"
        diff = _difference(old_in[p], new_in[p])
        if diff is None:
            return ""
        sub, kind, size = diff
        name = f"{shown}/{sub}" if sub else shown
        words = {"missing": "was deleted", "new": "is new", "changed": "changed"}[kind]
        return f"input {name} {words}" + (f" ({size})" if size else "")

    def up_to_date(self, st: Stage, cfg_hash: str, up: dict) -> tuple[bool, str, list[Path]]:
        stamp = self.read_stamp(st.name)
        if stamp is None:
            return False, "never ran here", []
        if stamp.get("format") != STAMP_FORMAT:
            return False, ("its stamp is unreadable" if not stamp else
                           f"its stamp has an older format (written by ibscope {stamp.get('ibscope_version', '?')})"), []
        if stamp.get("ibscope_version") != __version__:
            return False, f"ibscope version changed {stamp.get('ibscope_version')} -> {__version__}", []
        if stamp.get("config_hash") != cfg_hash:
            return False, "its config changed", []
        if stamp.get("upstream") != up:
            return False, "an earlier stage ran again", []
        self._seed(stamp)
        old_in = stamp.get("inputs") or {}
        new_in = self.input_records(st)
        for p in sorted(set(old_in) | set(new_in)):
            why = self._input_change(p, old_in, new_in)
            if why:
                return False, why, []
        old_out = stamp.get("output_hashes") or {}
        outputs = [self.out / rel for rel in stamp.get("outputs", [])]
        for rel, p in zip(stamp.get("outputs", []), outputs):
            diff = _difference(old_out.get(rel), self.hashes.record(p))
            if diff is None:
                continue
            sub, kind, size = diff
            if not sub and kind == "missing":
                return False, f"output {rel} is missing", []
            detail = f"{sub} {'is ' if kind != 'changed' else ''}{kind}" if sub else ""
            detail = ", ".join(x for x in (detail, size) if x)
            return False, f"output {rel} changed since it was written" + (f" ({detail})" if detail else ""), []
        # same contents: refresh the (size, mtime_ns) cache of touched files so they are not re-hashed next time
        new_out = self.output_records(outputs)
        if new_in != old_in or new_out != old_out:
            _write_json_atomic(self.stamp_path(st.name), {**stamp, "inputs": new_in, "output_hashes": new_out})
        return True, "up to date", outputs

    def __call__(self, st: Stage) -> list[Path]:
        cfg_hash = _hash(st.config)
        up = {u: self.digests[u] for u in st.upstream if u in self.digests}
        selected = self.only is None or st.name in self.only
        ok, reason, outputs = self.up_to_date(st, cfg_hash, up)
        if ok and not self.force or not selected:
            if not ok and not selected:
                stamp = self.read_stamp(st.name)
                if not stamp or "digest" not in stamp:
                    raise UsageError(f"Stage '{st.name}' has not run yet in '{self.out}', so it cannot be left out.",
                                     hint="Run without --only first.")
                outputs = [self.out / p for p in stamp.get("outputs", [])]
                reason = f"not selected by --only, though not up to date: {reason}"
            self.digests[st.name] = self.read_stamp(st.name)["digest"]
            self.status.append(StageStatus(st.name, "skipped", 0.0, outputs, reason))
            self.say(f"[dim]- {st.label or st.name}: skipped ({reason})[/]")
            return outputs
        why = "forced" if (ok and self.force) else reason
        self.say(f"[bold cyan]> {st.label or st.name}[/] [dim]({why})[/]")
        self.stamp_path(st.name).unlink(missing_ok=True)  # a failed run leaves no stale stamp
        inputs = self.input_records(st)  # what the stage reads, as it was when it started
        t0 = time.perf_counter()
        outputs = [Path(p) for p in st.run()]
        dt = time.perf_counter() - t0
        out_recs = self.output_records(outputs)
        digest = _hash({"config": cfg_hash, "upstream": up, "inputs": {k: (v or {}).get("sha256") for k, v in inputs.items()},
                        "outputs": {k: (v or {}).get("sha256") for k, v in out_recs.items()}, "time": time.time()})
        _write_json_atomic(self.stamp_path(st.name), {
            "format": STAMP_FORMAT, "stage": st.name, "ibscope_version": __version__,
            "config_hash": cfg_hash, "config": st.config, "upstream": up, "digest": digest,
            "inputs": inputs, "outputs": list(out_recs), "output_hashes": out_recs,
            "seconds": dt, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self.digests[st.name] = digest
        self.status.append(StageStatus(st.name, "ran", dt, outputs, why))
        self.say(f"  [green]done[/] in {dt:.1f} s")
        return outputs


# ======================================================================================
# the pipeline
# ======================================================================================
@dataclass
class PipelineResult:
    """What ``run_pipeline`` produced (paths are absolute)."""

    name: str
    out: Path
    config: dict
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


def _resolve(base: Path, p: str | None) -> Path | None:
    if p is None:
        return None
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else base / q


def _resolve_factory_spec(base: Path, spec: str) -> str:
    mod, _, attr = spec.rpartition(":")
    if mod.endswith(".py") or "/" in mod or os.sep in mod:
        return f"{_resolve(base, mod)}:{attr}"
    return spec


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
    if mod.endswith(".py") or "/" in mod or os.sep in mod:
        return _resolve(base, mod)
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


def _npz_xy(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"{what} file not found: '{path}'.")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{what} '{path}' must be an .npz with arrays 'x' and 'y'. Found: {sorted(z.files)}.")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {what} '{path}' as .npz: {exc}") from None
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataError(f"{what} '{path}': x has {x.shape[0]} rows and y has {y.shape[0]}; they must match and be > 0.")
    if y.dtype.kind not in "iub":
        raise DataError(f"{what} '{path}': y must hold integer class labels for training. Got dtype {y.dtype}.")
    return x, y.astype(np.int64)


def write_subset(src: Path, dst: Path, n: int, seed: int) -> Path:
    """Write a seeded random subset of ``n`` rows of probe file ``src`` (.npz) to ``dst``, in source order."""
    if src.suffix != ".npz":
        raise UsageError(f"data.subsets needs an .npz probe set to draw from. Got '{src}'.")
    if not src.exists():
        raise DataError(f"Probe file not found: '{src}'.")
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if "x" not in arrays:
        raise DataError(f"Probe file '{src}' has no array 'x'. Found: {sorted(arrays)}.")
    total = arrays["x"].shape[0]
    if n > total:
        raise UsageError(f"data.subsets: cannot draw {n} samples from '{src.name}', which holds {total}.")
    if "ids" not in arrays:
        arrays["ids"] = np.arange(total, dtype=np.int64)
    rows = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.stem + ".tmp.npz")
    np.savez(tmp, **{k: v[rows] if v.ndim and v.shape[0] == total else v for k, v in arrays.items()})
    os.replace(tmp, dst)
    return dst


def _resolve_device(device: str) -> str:
    from ibscope._device import resolve_device

    return str(resolve_device(device))


class Pipeline:
    """One run config -> stages. Use :func:`run_pipeline`."""

    def __init__(self, cfg: dict, base: Path, out: Path, *, device: str | None = None, progress: bool = True,
                 force: bool = False, only: Sequence[str] | None = None, quiet: bool = False,
                 lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT):
        self.cfg = cfg
        self.base = base
        self.out = Path(out).resolve()
        self.lock_timeout = check_timeout(lock_timeout)
        self.device = device or cfg["device"]
        self.progress = progress and not quiet
        self.quiet = quiet
        if only:
            for s in only:
                if s not in STAGES:
                    raise unknown_name("stage", s, STAGES)
        from ibscope.capture import resolve_device

        resolve_device(self.device)  # fail on a bad or unavailable --device before any work
        resolve_device(cfg["train"]["device"] if cfg["train"] else "cpu")
        self.check_paths()  # every output path inside the output folder, before anything is written
        self.runner = StageRunner(self.out, force=force, only=only, say=self.say, base=base)
        self.result = PipelineResult(cfg["name"], self.out, cfg, self.runner.status)

    def check_paths(self) -> None:
        """Raise a UsageError (exit 2) unless every path this run writes lies inside the output folder."""
        probes = self.probes()
        planned = [("probe file (data.subsets)", probes[k]) for k in self.cfg["data"]["subsets"] or {}]
        planned += [("activation store", self.out / "stores" / n) for n in self.capture_probes()]
        planned += [(what, self.out / rel) for what, rel in (
            ("checkpoint folder", "checkpoints"), ("results file", "results.csv"), ("figure folder", "figures"),
            ("OOD folder", "ood"), ("report", "report.html"), ("check result", "check.json"),
            ("stage stamps", STAMP_DIR))]
        for what, p in planned:
            inside(self.out, p, what)

    def factory_inputs(self) -> list[Path]:
        src = factory_source(self.base, self.cfg["model"]["factory"])
        return [src] if src is not None else []

    def say(self, msg: str) -> None:
        if not self.quiet:
            from ibscope.cli._common import console

            console().print(msg)

    # ---------------------------------------------------------------- data
    def probes(self) -> dict[str, Path]:
        d = self.cfg["data"]
        out: dict[str, Path] = {}
        if d["task"] == "twelve-bit":
            out = {k: self.out / "data" / f"{k}.npz" for k in ("all", "train", "test")}
        elif d["task"] == "digits":
            from ibscope.demo.digits import PROBE_NAMES

            out = {k: self.out / "data" / f"{k}.npz" for k in PROBE_NAMES}
        else:
            if d["train"]:
                out["train"] = _resolve(self.base, d["train"])
            if d["test"]:
                out["test"] = _resolve(self.base, d["test"])
        for k, v in (d["probes"] or {}).items():
            if not isinstance(v, str):
                raise UsageError(f"data.probes.{k} must be a file path. Got {v!r}.")
            out[str(k)] = _resolve(self.base, v)
        for k, sub in (d["subsets"] or {}).items():
            if sub["probe"] not in out:
                raise unknown_name(f"probe set (data.subsets.{k}.probe)", sub["probe"], out)
            out[str(k)] = self.out / "data" / f"{k}.npz"
        return out

    def main_probe(self) -> str:
        d = self.cfg["data"]
        probes = self.probes()
        if d["probe"]:
            if d["probe"] not in probes:
                raise unknown_name("probe set (data.probe)", d["probe"], probes)
            return d["probe"]
        default = {"twelve-bit": "all", "digits": "train"}.get(d["task"] or "", None)
        if default:
            return default
        return "train" if "train" in probes else next(iter(probes))

    def _stage_data(self) -> None:
        d = self.cfg["data"]
        if d["task"] is None and not d["subsets"]:
            return
        probes = self.probes()

        def run() -> list[Path]:
            (self.out / "data").mkdir(parents=True, exist_ok=True)
            written: list[Path] = []
            if d["task"] == "twelve-bit":
                from ibscope.demo.tasks import write_probe_files

                written += write_probe_files(self.out / "data", **d["options"])
            elif d["task"] == "digits":
                from ibscope.demo.digits import write_probe_files

                written += write_probe_files(self.out / "data", **d["options"])
            for name, sub in (d["subsets"] or {}).items():
                written.append(write_subset(probes[sub["probe"]], probes[name], int(sub["n"]), int(sub.get("seed", 0))))
            return written

        user_files = [p for k, p in probes.items() if not str(p).startswith(str(self.out / "data"))]
        self.runner(Stage("data", {"task": d["task"], "options": d["options"], "subsets": d["subsets"]}, user_files, [],
                          run, label=f"data ({d['task'] or 'subsets'})"))

    # ---------------------------------------------------------------- train
    def checkpoint_source(self) -> Any:
        if self.cfg["train"] is not None:
            return self.out / "checkpoints"
        cks = self.cfg["checkpoints"]
        if isinstance(cks, str):
            return str(_resolve(self.base, cks))
        return [str(_resolve(self.base, c)) for c in cks]

    def _stage_train(self) -> list[Path]:
        cfg = self.cfg
        if cfg["train"] is None:
            return []
        probes = self.probes()
        d = cfg["data"]
        train_p = probes.get("train") if d["task"] else _resolve(self.base, d["train"])
        test_p = probes.get("test") if d["task"] else _resolve(self.base, d["test"])
        factory = _resolve_factory_spec(self.base, cfg["model"]["factory"])
        tconf = _train_config(cfg)
        inputs = [p for p in (train_p, test_p) if p is not None] + self.factory_inputs()
        stage_cfg = {"model": {"factory": cfg["model"]["factory"], "args": cfg["model"]["args"]}, "train": cfg["train"],
                     "seed": cfg["seed"], "data": d}

        def run() -> list[Path]:
            from ibscope.capture.loading import resolve_factory
            from ibscope.demo.train import train_classifier

            x, y = _npz_xy(train_p, "Training data")
            xt, yt = _npz_xy(test_p, "Test data") if test_p is not None else (None, None)
            build = resolve_factory(factory, cfg["model"]["args"])
            ck_dir = self.out / "checkpoints"
            if ck_dir.exists():
                for old in ck_dir.glob("epoch_*.pt"):
                    old.unlink()
            dev = _resolve_device(cfg["train"]["device"])
            if self.progress:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                from ibscope.cli._common import console

                with Progress(TextColumn(f"train {cfg['name']}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("epochs"), TimeElapsedColumn(), console=console(), transient=True) as bar:
                    task = bar.add_task("train", total=tconf.epochs)
                    every = max(1, tconf.epochs // 200)

                    def tick(e: int, n: int) -> None:
                        if e % every == 0 or e == n:
                            bar.update(task, completed=e)

                    train_classifier(build, x, y, xt, yt, ck_dir, tconf, device=dev, progress=tick)
            else:
                train_classifier(build, x, y, xt, yt, ck_dir, tconf, device=dev)
            return [ck_dir]

        outs = self.runner(Stage("train", stage_cfg, inputs, ["data"], run, label=f"train ({cfg['name']})"))
        ck = self.out / "checkpoints"
        self.result.checkpoints = sorted(ck.glob("epoch_*.pt"))
        return outs

    # ---------------------------------------------------------------- capture
    def capture_probes(self) -> list[str]:
        c = self.cfg
        if c["capture"]["probes"]:
            names = list(c["capture"]["probes"])
        else:
            names = list(c["estimate"]["probes"] or [self.main_probe()])
            for e, v in (c["estimate"]["probes_for"] or {}).items():
                if e in c["estimate"]["estimators"]:
                    names += [v] if isinstance(v, str) else list(v)
            if c["ood"] is not None:
                names += [c["ood"]["fit"], c["ood"]["test"], *c["ood"]["ood"]]
        names = list(dict.fromkeys(names))
        probes = self.probes()
        for n in names:
            if n not in probes:
                raise unknown_name("probe set", n, probes)
        return names

    def _stage_capture(self) -> dict[str, Path]:
        cfg = self.cfg
        probes = self.probes()
        names = self.capture_probes()
        src = self.checkpoint_source()
        factory = _resolve_factory_spec(self.base, cfg["model"]["factory"])
        cap = cfg["capture"]
        stores = {n: self.out / "stores" / n for n in names}
        ck_inputs = [src] if isinstance(src, Path) else []
        if not isinstance(src, Path):
            from ibscope.capture.loading import list_checkpoint_paths

            ck_inputs = list_checkpoint_paths(src)
        stage_cfg = {"model": cfg["model"], "capture": cap, "probes": {n: str(probes[n]) for n in names},
                     "checkpoints": str(src), "name": cfg["name"]}

        def run() -> list[Path]:
            from ibscope.capture import capture

            out = []
            for n in names:
                self.say(f"  capture probe set '{n}' ({probes[n].name})")
                out.append(capture(factory, src, str(probes[n]), cap["layers"], stores[n], model_args=cfg["model"]["args"],
                                   reduce=cap["reduce"], max_samples=cap["max_samples"], sample_seed=cap["sample_seed"],
                                   batch_size=cap["batch_size"],
                                   device=self.device, dtype=cap["dtype"], jacobian_samples=cap["jacobian_samples"],
                                   split=n, run=cfg["name"], overwrite=True, progress=self.progress,
                                   safe_globals=list(cap["safe_globals"])))
            return [Path(p) for p in out]

        inputs = [*ck_inputs, *(probes[n] for n in names), *self.factory_inputs()]
        self.runner(Stage("capture", stage_cfg, inputs, ["data", "train"], run,
                          label=f"capture ({cfg['name']})"))
        self.result.stores = stores
        return stores

    # ---------------------------------------------------------------- estimate
    def _stage_estimate(self, stores: dict[str, Path]) -> Path:
        cfg = self.cfg
        est = cfg["estimate"]
        names = list(est["probes"] or [self.main_probe()])
        groups: dict[tuple, list[str]] = {}  # probe sets -> estimators run on them
        for e in est["estimators"]:
            v = (est["probes_for"] or {}).get(e, names)  # entries for estimators not selected are unused
            groups.setdefault(tuple([v] if isinstance(v, str) else v), []).append(e)
        used = list(dict.fromkeys(n for g in groups for n in g))
        for n in used:
            if n not in stores:
                raise unknown_name("captured probe set (estimate.probes / probes_for)", n, stores)
        results = self.out / "results.csv"

        def run() -> list[Path]:
            from ibscope.estimate import run_estimate, summary_lines
            from ibscope.results import provenance_path, read_results, write_results

            # start from an empty table: run_estimate keeps rows already in its output file, which
            # here would leave rows of estimators or parameters no longer in the config
            for old in (results, provenance_path(results)):
                old.unlink(missing_ok=True)
            # estimate.strict is checked once every stage has written its outputs (see _strict_check)
            extra = {"skip_bad_shards": bool(cfg["skip_bad_shards"]),
                     **({"null_permutations": est["null_permutations"]} if est["null_permutations"] is not None
                        else {}),
                     **({"null_seed": est["null_seed"]} if est["null_seed"] is not None else {}),
                     "scheduler": est["scheduler"], "scheduler_file": est["scheduler_file"]}

            def tell(res) -> None:  # noted cells, saturated cells, dropped rows: the same summary as `ibscope estimate`
                from rich.markup import escape

                for line in summary_lines(res, strict=bool(est["strict"])):
                    self.say(f"  [yellow]{escape(line)}[/]")

            if len(groups) == 1:
                (g, ests), = groups.items()
                tell(run_estimate([stores[n] for n in g], results, ests, est["params"], device=self.device,
                                  force=True, jobs=est["jobs"], progress=self.progress, **extra))
                return [results, provenance_path(results)]
            tmp_dir = self.out / ".ibscope" / "estimate-parts"
            shutil.rmtree(tmp_dir, ignore_errors=True)
            rows, provs, seen = [], [], set()
            for i, (g, ests) in enumerate(groups.items()):
                part = tmp_dir / f"part{i}.csv"
                res = run_estimate([stores[n] for n in g], part, ests,
                                   {k: v for k, v in est["params"].items() if k in ests}, device=self.device,
                                   force=True, jobs=est["jobs"], progress=self.progress, **extra)
                tell(res)
                provs.append({"probes": list(g), "estimators": ests, **res.provenance})
                for r in read_results(part).rows:
                    if r["estimator"] == "metrics":  # the same training metrics come with every group of a split
                        key = (r["run"], r["split"], r["checkpoint"], r["quantity"])
                        if key in seen:
                            continue
                        seen.add(key)
                    rows.append(r)
            write_results(results, rows, {"ibscope_version": __version__, "parts": provs,
                                          "resolved_config": {"estimate": est}})
            shutil.rmtree(tmp_dir, ignore_errors=True)
            return [results, provenance_path(results)]

        # `strict` changes no output (it is checked at the end of the run): toggling it re-runs nothing
        # nor does where the cells run (the results are the same locally and on a cluster)
        stage_est = {k: v for k, v in est.items() if k not in ("strict", "scheduler", "scheduler_file")}
        self.runner(Stage("estimate", {"estimate": stage_est, "probes": names, "groups": [[list(g), e] for g, e in groups.items()],
                                       "skip_bad_shards": cfg["skip_bad_shards"]},
                          [stores[n] for n in used], ["capture"], run, label=f"estimate ({cfg['name']})"))
        self.result.results = results
        return results

    # ---------------------------------------------------------------- plot / ood / report / check
    def _stage_plot(self, results: list[Path] | Path, figures_dir: Path | None = None, name: str = "plot") -> list[Path]:
        pc = self.cfg["plot"]
        if not pc["enabled"]:
            self.runner.status.append(StageStatus(name, "disabled"))
            return []
        figures_dir = figures_dir or (self.out / "figures")
        results_l = [results] if isinstance(results, Path) else list(results)

        def run() -> list[Path]:
            from ibscope.plot import plot_results

            if figures_dir.exists():
                shutil.rmtree(figures_dir)
            figures_dir.mkdir(parents=True)
            src = results_l[0] if len(results_l) == 1 else [str(p) for p in results_l]
            kw = dict(kinds=pc["kinds"], unit=pc["unit"], fmt=pc["fmt"], **pc["options"])
            if self.progress:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                from ibscope.cli._common import console

                with Progress(TextColumn("figures"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                              TimeElapsedColumn(), console=console(), transient=True) as bar:
                    task = bar.add_task("", total=None)

                    def tick(done: int, total: int, path) -> None:
                        bar.update(task, completed=done, total=total, description=Path(path).name)

                    figs = plot_results(src, figures_dir, callback=tick, **kw)
            else:
                figs = plot_results(src, figures_dir, **kw)
            return [Path(f) for f in figs] or [figures_dir]

        figs = self.runner(Stage(name, {"plot": pc}, results_l, ["estimate"], run, label=name))
        self.result.figures = [f for f in figs if f.is_file()]
        return self.result.figures

    def _stage_ood(self, stores: dict[str, Path]) -> Path | None:
        oc = self.cfg["ood"]
        if oc is None:
            return None
        out_dir = self.out / "ood"

        def run() -> list[Path]:
            from ibscope.ood import run_ood

            if out_dir.exists():
                shutil.rmtree(out_dir)
            doc = run_ood(stores[oc["fit"]], stores[oc["test"]], {n: stores[n] for n in oc["ood"]}, oc["layer"],
                          detectors=oc["detectors"], reductions=oc["reductions"], checkpoint=oc["checkpoint"],
                          out_dir=out_dir, device=self.device, progress=self.progress, seed=self.cfg["seed"],
                          skip_bad_shards=bool(self.cfg["skip_bad_shards"]), **oc["options"])
            # every file of the output set: one missing or changed makes the stage run again
            return [out_dir / "ood_metrics.json", *(out_dir / f for f in doc["output_set"]["files"]), out_dir]

        used = [stores[oc["fit"]], stores[oc["test"]], *(stores[n] for n in oc["ood"])]
        self.runner(Stage("ood", {"ood": oc, "skip_bad_shards": self.cfg["skip_bad_shards"]}, used, ["capture"], run, label=f"ood ({self.cfg['name']})"))
        self.result.ood = out_dir / "ood_metrics.json"
        return self.result.ood

    def _stage_report(self, results: list[Path] | Path, figures_dir: Path | None = None, html: Path | None = None,
                      ood: Path | None = None) -> Path | None:
        if not self.cfg["report"]["enabled"]:
            self.runner.status.append(StageStatus("report", "disabled"))
            return None
        html = html or (self.out / "report.html")
        figures_dir = figures_dir or (self.out / "figures")
        results_l = [results] if isinstance(results, Path) else list(results)
        title = f"ibscope: {self.cfg['name']}" + (f" - {self.cfg['description'].strip()}" if self.cfg["description"] else "")

        def run() -> list[Path]:
            from ibscope.report import write_report

            src = results_l[0] if len(results_l) == 1 else [str(p) for p in results_l]
            write_report(src, html, ood=ood, figures_dir=figures_dir if figures_dir.exists() else None,
                         unit=self.cfg["plot"]["unit"], title=title)
            return [html]

        inputs = [*results_l, *([ood] if ood else [])]
        self.runner(Stage("report", {"report": self.cfg["report"], "title": title, "unit": self.cfg["plot"]["unit"],
                                     "ood": str(ood) if ood else None}, inputs, ["estimate", "plot", "ood"], run,
                          label="report"))
        self.result.report = html
        return html

    def _stage_check(self, results: Path) -> Any:
        cc = self.cfg["check"]
        if cc is None:
            return None
        if not cc["baseline"] and not cc["rules"]:
            raise UsageError("The 'check:' section needs 'baseline' and/or 'rules'.")
        from ibscope.check import run_check

        self.say("[bold cyan]> check[/]")
        t0 = time.perf_counter()
        rep = run_check(results, baseline=_resolve(self.base, cc["baseline"]), rules=_resolve(self.base, cc["rules"]),
                        rtol=cc["rtol"], atol=cc["atol"], sigma=cc["sigma"])
        rep.write_json(self.out / "check.json")
        if cc["junit"]:
            rep.write_junit(self.out / "check.xml")
        self.runner.status.append(StageStatus("check", "ran", time.perf_counter() - t0,
                                              [self.out / "check.json"], "always runs"))
        self.result.check = rep
        self.say(f"  {rep.summary()}")
        return rep

    # ---------------------------------------------------------------- all
    def run(self, until: str | None = None) -> PipelineResult:
        """Run the stages up to ``until``, holding the run folder's writer lock throughout."""
        if until is not None and until not in STAGES:
            raise unknown_name("stage", until, STAGES)
        with writer_lock(self.out, what="run folder", timeout=self.lock_timeout):
            return self._run(until)

    def _run(self, until: str | None) -> PipelineResult:
        self.out.mkdir(parents=True, exist_ok=True)
        stop = STAGES.index(until) if until else len(STAGES) - 1
        self._stage_data()
        if stop >= STAGES.index("train"):
            self._stage_train()
        if stop < STAGES.index("capture"):
            return self.result
        stores = self._stage_capture()
        if stop < STAGES.index("estimate"):
            return self.result
        results = self._stage_estimate(stores)
        if stop >= STAGES.index("plot"):
            self._stage_plot(results)
        if stop >= STAGES.index("ood"):
            self._stage_ood(stores)
        if stop >= STAGES.index("report"):
            self._stage_report(results, ood=self.result.ood)
        rep = self._stage_check(results) if stop >= STAGES.index("check") else None
        self._strict_check(results, rep)
        if rep is not None and not rep.ok:
            raise RegressionFound(f"ibscope check found {len(rep.failures)} regression(s): see {self.out / 'check.json'}.",
                                  hint=rep.summary())
        return self.result

    def _strict_check(self, results: Path, rep: Any) -> None:
        """``estimate.strict`` / ``--strict``: exit 4 when the results table has cells without a
        value, after every stage has written its outputs (also when estimate was up to date)."""
        if not self.cfg["estimate"]["strict"] or not results.exists():
            return
        from ibscope.results import read_results

        noted = [r for r in read_results(results, allow_empty=True).rows if r["value"] is None and r.get("note")]
        if not noted:
            return
        first = list(dict.fromkeys(r["note"] for r in noted))[:3]
        also = "" if rep is None or rep.ok else f" The check stage also found {len(rep.failures)} regression(s)."
        raise DataError(
            f"{len(noted)} row(s) of '{results}' have no value (estimate.strict / --strict). First reasons:\n"
            + "\n".join(f"  - {n}" for n in first) + ("\n  ..." if len(noted) > 3 else "")
            + f"\nEvery stage has written its outputs.{also}",
            hint="See the 'note' column of the results table; fix the data, or run without --strict to accept "
                 "rows without a value.")


def output_dir(cfg: dict, base: Path, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out).resolve()
    if cfg["out"]:
        return _resolve(base, cfg["out"]).resolve()
    return (Path("ibscope-runs") / cfg["name"]).resolve()


def run_pipeline(config: str | os.PathLike | Mapping, *, out: str | os.PathLike | None = None, quick: bool = False,
                 overrides: Mapping | None = None, force: bool = False, only: Sequence[str] | None = None,
                 until: str | None = None, device: str | None = None, progress: bool = True, quiet: bool = False,
                 base_dir: str | os.PathLike | None = None, strict: bool = False, skip_bad_shards: bool = False,
                 safe_globals: Sequence[str] = (), lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> PipelineResult:
    """Run (or bring up to date) the pipeline of one run config; see the module docstring.

    ``only``: run just these stages (others must be up to date already); ``until``: stop after
    this stage; ``force``: re-run every stage. ``strict`` and ``skip_bad_shards`` switch on the
    config keys ``estimate.strict`` and ``skip_bad_shards``; ``safe_globals`` adds to
    ``capture.safe_globals``. ``lock_timeout``: seconds to wait for another run writing the same
    output folder (0: refuse at once; negative or None: wait for ever), then
    :class:`~ibscope._locks.LockTimeout`. Raises :class:`~ibscope.errors.RegressionFound`
    when the check stage finds a regression (after everything else is written).
    """
    check_timeout(lock_timeout)
    extra_globals = check_safe_globals(list(safe_globals), "--safe-globals")
    flags = {**({"estimate": {"strict": True}} if strict else {}), **({"skip_bad_shards": True} if skip_bad_shards else {})}
    cfg, base, _ = load_config(config, quick=quick, overrides=deep_merge(dict(overrides or {}), flags),
                               base_dir=base_dir)
    cfg["capture"]["safe_globals"] = list(dict.fromkeys([*cfg["capture"]["safe_globals"], *extra_globals]))
    if until is not None and until not in STAGES:
        raise unknown_name("stage", until, STAGES)
    od = output_dir(cfg, base, out)
    if od.exists() and not od.is_dir():
        raise UsageError(f"Output folder '{od}' is a file.")
    pipe = Pipeline(cfg, base, od, device=device, progress=progress, force=force, only=only, quiet=quiet,
                    lock_timeout=lock_timeout)
    return pipe.run(until=until)


# ======================================================================================
# ibscope demo
# ======================================================================================
DEMO_RUNS = ("demo-tanh", "demo-relu")


@dataclass
class DemoResult:
    out: Path
    runs: dict[str, PipelineResult]
    figures: list[Path]
    report: Path | None  # the first run's report (each run has its own: runs[name].report)
    seconds: float
    comparison: Path | None = None  # side-by-side information planes of the runs


def run_demo(out: str | os.PathLike = "ibscope-demo", *, quick: bool = False, force: bool = False,
             device: str | None = None, progress: bool = True, quiet: bool = False,
             configs: Sequence[str | os.PathLike] = DEMO_RUNS, overrides: Mapping | None = None,
             lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> DemoResult:
    """Train the tanh and ReLU 12-10-7-5-4-3-2 networks and run the whole pipeline on both.

    Each run lives in ``OUT/<run>/`` (data, checkpoints, stores, results.csv, figures/,
    report.html). The runs are separate experiments (not seeds of one), so each gets its own
    figures and report; ``OUT/info-plane_<run>_vs_<run>.png`` puts their fixed-binning
    information planes side by side. Every config is checked before anything runs; the demo
    folder's writer lock (and each run folder's) is held throughout (``lock_timeout`` as in
    :func:`run_pipeline`).
    """
    t0 = time.perf_counter()
    od = Path(out).resolve()
    if od.exists() and not od.is_dir():
        raise UsageError(f"--out '{od}' is a file; it must be a folder.")
    check_timeout(lock_timeout)
    # the estimate stage is most of the demo's time: one worker process per core (up to 2)
    overrides = deep_merge({"estimate": {"jobs": max(1, min(2, os.cpu_count() or 1))}}, overrides or {})
    pipes: dict[str, Pipeline] = {}
    for c in configs:  # every config checked (names, paths) before anything is written
        cfg, base, _ = load_config(c, quick=quick, overrides=overrides)
        if cfg["name"] in pipes:
            raise UsageError(f"Two demo configs are both named '{cfg['name']}'.")
        pipes[cfg["name"]] = Pipeline(cfg, base, inside(od, od / cfg["name"], "run folder"), device=device,
                                      progress=progress, force=force, quiet=quiet, lock_timeout=lock_timeout)
    comparison_path = inside(od, od / f"info-plane_{'_vs_'.join(pipes)}.png", "comparison figure")
    with writer_lock(od, what="demo folder", timeout=lock_timeout):
        runs = {name: p.run() for name, p in pipes.items()}
        figs = [f for r in runs.values() for f in r.figures]
        comparison = None
        planes = [next((f for f in r.figures if f.name.startswith("info-plane_binning")), None) for r in runs.values()]
        if len(planes) > 1 and all(planes):
            comparison = side_by_side(planes, comparison_path, titles=list(runs))
    first = next(iter(runs.values()))
    return DemoResult(od, runs, figs, first.report, time.perf_counter() - t0, comparison)


def side_by_side(images: Sequence[Path], out: Path, titles: Sequence[str] | None = None) -> Path:
    """Place already-drawn figures (PNG) next to each other in one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    imgs = [mpimg.imread(str(p)) for p in images]
    h = max(i.shape[0] for i in imgs)
    w = sum(i.shape[1] for i in imgs)
    dpi = 100
    fig, axes = plt.subplots(1, len(imgs), figsize=(w / dpi, h / dpi + (0.4 if titles else 0)), dpi=dpi,
                             gridspec_kw={"width_ratios": [i.shape[1] for i in imgs]})
    for k, (ax, im) in enumerate(zip(np.atleast_1d(axes), imgs)):
        ax.imshow(im)
        ax.set_axis_off()
        if titles:
            ax.set_title(titles[k], fontsize=16, fontweight="bold")
    fig.tight_layout(pad=0.2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _read_digest(out: Path, stage: str) -> str | None:
    p = out / STAMP_DIR / f"{stage}.json"
    try:
        return json.loads(p.read_text()).get("digest")
    except (OSError, json.JSONDecodeError):
        return None
