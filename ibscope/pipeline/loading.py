"""Config files to typed models: packaged-config lookup, YAML reading, ``--set`` overrides, and
pydantic's validation errors as ibscope :class:`~ibscope.errors.UsageError` (exit 2) naming the
key's location, what was expected and what was got, with a did-you-mean.

* :func:`load_config`: an ``ibscope run`` config -> :class:`~ibscope.pipeline.config.RunConfig`.
* :func:`load_estimate_preset`: an ``ibscope estimate --config`` preset (or the ``estimate:``
  section of a run config) -> :class:`~ibscope.pipeline.config.EstimateSection`.
* :func:`describe_schema`: the run config's keys with kinds, defaults and descriptions as text;
  ``RunConfig.model_json_schema()`` is the machine-readable form (``ibscope run --show-schema``).
"""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

from pydantic import BaseModel, ValidationError

from ibscope.errors import IbscopeError, UsageError, did_you_mean
from ibscope.pipeline.config import EstimateSection, Kind, RunConfig, _estimator_entries

PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "dict": "a mapping",
          "list": "a list", "strlist": "a string or a list of strings", "paths": "a path, glob or list of paths",
          "any": "any value", "section": "a mapping"}


# ----------------------------------------------------------------------------------- files
def packaged_configs(kind: Literal["run", "preset"] | None = None) -> list[str]:
    """Names of the configs installed with ibscope (``ibscope/configs/*.yaml``): all of them, or
    the run configs (``ibscope run``: those with a ``model:`` section) or the estimate presets
    (``ibscope estimate --config``: the others)."""
    names = []
    for q in sorted(PACKAGED_CONFIGS.glob("*.yaml")):
        if kind is not None:
            is_run = any(line.startswith("model:") for line in q.read_text().splitlines())
            if is_run != (kind == "run"):
                continue
        names.append(q.stem)
    return names


def find_config(config: str | os.PathLike, *, command: str, hint: str,
                kind: Literal["run", "preset"] | None = None) -> Path:
    """The file a config argument names: a file, else a packaged config of that bare name
    (``kind``: which packaged configs the hint lists).

    A packaged name wins over a folder of that name (e.g. an earlier run's output folder).
    """
    p = Path(config)
    if p.is_file():
        return p
    if str(config) == p.name:  # a bare name: the installed copy
        q = PACKAGED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
        if q.is_file():
            return q
    if p.is_dir():
        raise UsageError(f"'{config}' is a folder; `{command}` expects a YAML file.")
    avail = packaged_configs(kind)
    raise UsageError(f"Config file not found: '{config}'.{did_you_mean(p.stem, avail)}",
                     hint=f"{hint}: {', '.join(avail)}" if avail else None)


def read_mapping(p: Path, *, command: str, empty: str | None) -> dict:
    """A YAML (or JSON) file holding a mapping. ``empty``: the message for an empty file (None: ``{}``)."""
    import yaml

    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"'{p}' is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"'{p}' is not a text file; `{command}` expects a YAML file.") from None
    if raw is None:
        if empty is not None:
            raise UsageError(f"'{p}' is {empty}")
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"'{p}' must hold a YAML mapping (key: value). Got {type(raw).__name__}.")
    return raw


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

    from ibscope._options import parse_kv

    out: dict = {}
    for k, v in parse_kv(items, "--set", form="KEY.PATH=VALUE", example="train.epochs=500", strip=False).items():
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError:
            val = v
        node = out
        parts = [p for p in k.strip().split(".") if p]
        if not parts:
            raise UsageError(f"--set expects KEY.PATH=VALUE. Got {k + '=' + v!r}.")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {k + '=' + v!r} conflicts with an earlier --set of '{p}'.")
        node[parts[-1]] = val
    return out


# ----------------------------------------------------------------------------------- models
def load_config(config: str | os.PathLike | Mapping, *, quick: bool = False, overrides: Mapping | None = None,
                base_dir: str | os.PathLike | None = None) -> tuple[RunConfig, Path, str]:
    """Read and validate a run config. Returns (the config, base folder, source label).

    ``config``: a YAML file, the name of a packaged config (``demo-tanh``), or a mapping.
    ``quick`` merges the config's ``quick:`` section; ``overrides`` (``--set``) are merged last.
    """
    if isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
        base = Path(base_dir or ".").resolve()
        source, stem = "config", "run"
    else:
        p = find_config(config, command="ibscope run", hint="Packaged run configs", kind="run")
        raw = read_mapping(p, command="ibscope run", empty="empty; a run config needs at least a 'model:' section.")
        base = Path(base_dir).resolve() if base_dir else p.resolve().parent
        source, stem = str(p), p.stem
        if "model" not in raw and raw and set(raw) <= set(EstimateSection.model_fields):
            raise UsageError(f"'{config}' is an estimate preset (what to estimate), not a run config: it has no "
                             "'model:' section.",
                             hint=f"Use it with `ibscope estimate STORE -c {config}`, or as the estimate: section "
                                  f"of a run config. Packaged run configs: {', '.join(packaged_configs('run'))}.")
    quick_section = raw.get("quick") or {}
    if not isinstance(quick_section, dict):
        raise UsageError(f"{source}: 'quick' must be a mapping of overrides. Got {quick_section!r}.")
    # keys of the quick section and of --set are checked where they were written, so an unknown key
    # is named as 'quick.train.epoch' or as a --set override, not as a key of the file's own sections;
    # they are reported with every other problem of the config (and left out of the merge)
    pre: list[IbscopeError] = []
    quick_section = _without_unknown_keys(quick_section, RunConfig, "quick", source, pre)  # even when not applied
    if overrides:
        overrides = _without_unknown_keys(overrides, RunConfig, "", "--set", pre)
    origin: dict[tuple, str] = {}  # where a merged value was written, for its error message
    if quick:
        raw = deep_merge(raw, quick_section)
        origin.update({k: "'quick." + ".".join(map(str, k)) + "'" for k in _leaves(quick_section)})
    if overrides:
        raw = deep_merge(raw, overrides)
        origin.update({k: "--set " + ".".join(map(str, k)) for k in _leaves(overrides)})
    try:
        cfg = RunConfig.model_validate(raw, context={"stem": stem})
    except ValidationError as exc:
        est = raw.get("estimate")
        est = est if isinstance(est, Mapping) else {}
        raise combine(source, pre + config_problems(exc, RunConfig, raw, source, origin=origin)
                      + estimator_problems(est, source, origin)) from None
    found = pre + estimator_problems(cfg.estimate, source, origin)  # names and parameters, before any stage runs
    if found:
        raise combine(source, found)
    return cfg, base, source


def estimator_problems(section: EstimateSection | Mapping, source: str, origin: Mapping[tuple, str] | None = None,
                       prefix: str = "estimate") -> list[IbscopeError]:
    """The unknown estimator names and bad parameters of an estimate section (the typed model, or
    the raw mapping of a config that has other errors too: then what can be read is checked, so
    that one message names every mistake). Each parameter is tried on its own (every bad one is
    named), then all of an estimator's together (rules between parameters)."""
    from ibscope.estimators import registry

    if isinstance(section, EstimateSection):
        names, params = list(section.estimators), dict(section.params)
    else:
        try:
            raw = _estimator_entries(dict(section))
        except IbscopeError:
            return []  # a malformed entry: the schema's own error names it
        names = [n for n in (raw.get("estimators") or []) if isinstance(n, str)] \
            if isinstance(raw.get("estimators"), list) else []
        params = raw.get("params") if isinstance(raw.get("params"), dict) else {}
    found: list[IbscopeError] = []

    def named(key: tuple, exc: IbscopeError) -> IbscopeError:
        full = (prefix, *key) if prefix else key
        by = _set_by(full, origin or {})
        where = ".".join(map(str, full))
        return type(exc)(f"{source}: '{where}': {exc.message}" + (f" (The value was set by {by}.)" if by else ""),
                         hint=exc.hint)

    known = []
    for name in names:
        try:
            registry.get(name)
            known.append(name)
        except IbscopeError as exc:
            found.append(named(("estimators",), exc))
    for name, p in params.items():  # (params only of selected estimators: the model's own rule)
        if name not in known or not isinstance(p, dict):
            continue
        bad = False
        for key, value in p.items():
            try:
                registry.create(name, **{key: value})
            except IbscopeError as exc:
                found.append(named(("params", name, key), exc))
                bad = True
        if not bad:
            try:
                registry.create(name, **p)
            except IbscopeError as exc:
                found.append(named(("params", name), exc))
    return found


def _leaves(d: Mapping, prefix: tuple = ()) -> list[tuple]:
    """The key paths of the non-mapping values in ``d``."""
    out: list[tuple] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += _leaves(v, (*prefix, k))  # an empty mapping sets nothing
        else:
            out.append((*prefix, k))
    return out


def load_estimate_preset(path: str | os.PathLike) -> EstimateSection:
    """An ``ibscope estimate --config`` preset (YAML or JSON; a bare name reads the packaged copy).

    The ``estimate:`` section of an ``ibscope run`` config works too (its other sections are not
    read). A key set to null takes its default.
    """
    p = find_config(path, command="ibscope estimate --config", hint="Pass a YAML file, or a preset name",
                    kind="preset")
    raw = read_mapping(p, command="ibscope estimate --config", empty=None)
    nested = isinstance(raw.get("estimate"), dict)
    data = raw["estimate"] if nested else raw
    data = {k: v for k, v in data.items() if v is not None}
    return validate(EstimateSection, data, str(p), prefix="estimate" if nested else "", preset=True)


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], raw: Any, source: str, *, context: dict | None = None, prefix: str = "",
             preset: bool = False, origin: Mapping[tuple, str] | None = None) -> M:
    """``model.model_validate(raw)``, its errors as a UsageError (see :func:`config_problems`, :func:`combine`)."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as exc:
        raise combine(source, config_problems(exc, model, raw, source, prefix=prefix, preset=preset,
                                              origin=origin)) from None


# ----------------------------------------------------------------------------------- errors
def _is_tag(part: Any) -> bool:
    """Union-member and validator tags that pydantic puts into an error's location."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-")
                                      or part in ("str", "int", "float", "bool", "list", "dict", "none"))


def _unwrap(ann: Any) -> tuple[Any, list, bool]:
    """(core type, Annotated metadata, None allowed) of an annotation."""
    meta: list = []
    nullable = False
    while True:
        if typing.get_origin(ann) is typing.Annotated:
            meta += list(ann.__metadata__)
            ann = ann.__origin__
            continue
        if typing.get_origin(ann) in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(ann))
            if len(args) == 1:
                ann = args[0]
                continue
        return ann, meta, nullable


def _model_of(ann: Any) -> type[BaseModel] | None:
    core, _, _ = _unwrap(ann)
    return core if isinstance(core, type) and issubclass(core, BaseModel) else None


def _kind(ann: Any, meta: Sequence = ()) -> str:
    core, inner, _ = _unwrap(ann)
    for m in [*meta, *inner]:
        if isinstance(m, Kind):
            return str(m)
    if _model_of(core) is not None:
        return "section"
    origin = typing.get_origin(core) or core
    if origin is Literal:
        return "str"
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (dict, "dict"), (list, "list")):
        if origin is t:
            return name
    return "any"


class _Where:
    """What a location in the raw config refers to (walked through the models)."""

    def __init__(self, model: type[BaseModel], names: Sequence[Any]):
        self.field = None  # FieldInfo of the last named field
        self.ann: Any = model
        self.meta: list = []
        self.siblings: list[str] = list(model.model_fields)
        self.dynamic = False  # the path went through a user-named key ({name: ...} mappings)
        self.in_mapping = False  # the location is a value of such a mapping
        for name in names:
            core, _, _ = _unwrap(self.ann)
            sub = _model_of(core)
            if sub is not None:
                self.siblings = list(sub.model_fields)
                if name not in sub.model_fields:
                    self.field = None
                    return
                self.field = sub.model_fields[name]
                self.ann, self.meta = self.field.annotation, list(self.field.metadata)
                self.in_mapping = False
            elif (typing.get_origin(core) or core) is dict and len(typing.get_args(core)) == 2:
                self.ann, self.meta = typing.get_args(core)[1], []
                self.dynamic = self.in_mapping = True
            else:
                return
        last = _model_of(self.ann)
        if last is not None:  # the location is a section: its keys are the choices
            self.siblings = list(last.model_fields)

    def word(self) -> str:
        k = _kind(self.ann, self.meta)
        return _WORDS.get(k, f"a {k}")

    def nullable(self) -> bool:
        if self.in_mapping:  # a value in a {name: value} mapping: "null" is not a choice worth naming
            return True
        return _unwrap(self.ann)[2] and not (self.field is not None and self.field.is_required())

    def choices(self) -> list[str]:
        core, _, _ = _unwrap(self.ann)
        return [str(a) for a in typing.get_args(core)] if typing.get_origin(core) is Literal else []


def _value_at(raw: Any, names: Sequence[Any]) -> Any:
    for n in names:
        if not isinstance(raw, Mapping) or n not in raw:
            return None
        raw = raw[n]
    return raw


_OPS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
        "less_than": ("lt", "<")}


def combine(source: str, found: list[IbscopeError]) -> IbscopeError:
    """One problem: itself; several: ``SOURCE: N problems:`` and one line each, with the first
    one's hint (and its type: a plug-in that failed to load stays exit 5)."""
    if len(found) == 1:
        return found[0]
    lines = "\n".join("  - " + f.message.removeprefix(f"{source}: ") for f in found)
    return type(found[0])(f"{source}: {len(found)} problems:\n{lines}", hint=found[0].hint)


def config_problems(exc: ValidationError, model: type[BaseModel], raw: Any, source: str, *, prefix: str = "",
                    preset: bool = False, origin: Mapping[tuple, str] | None = None) -> list[IbscopeError]:
    """pydantic's errors as UsageErrors for the user: every bad key once, unknown keys first.
    ``origin``: where merged values were written (``{("train", "epochs"): "'quick.train.epochs'"}``),
    named in the message of an error about them."""
    # unknown keys first, then broken constraints (within a union: the member's rule that applies), then types
    errors = sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden",
                                                 e["type"].endswith(("_type", "_parsing"))))
    by_key: dict[tuple, Any] = {}
    for e in errors:
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, IbscopeError):  # a rule of a model validator: its own message
            return [type(cause)(f"{source}: {cause.message}", hint=cause.hint)]
        by_key.setdefault(_names(e), e)  # within a union: the first after sorting, as above
    # a misspelt key also shows as the right key missing: the misspelling says it all
    misspelt = {k[:-1] for k, e in by_key.items() if e["type"] == "extra_forbidden"}
    picked = [e for k, e in by_key.items() if not (e["type"] == "missing" and k[:-1] in misspelt)]
    found = [_one_error(e, model, raw, source, prefix=prefix, preset=preset) for e in picked]
    for f, e in zip(found, picked):
        by = _set_by(_names(e), origin or {})
        if by and e["type"] != "extra_forbidden":
            f.message = f"{f.message.rstrip()} (The value was set by {by}.)"
    return found


def _set_by(names: tuple, origin: Mapping[tuple, str]) -> str | None:
    """Where the value at ``names`` (or a value inside it) was written, if it was merged in."""
    if names in origin:
        return origin[names]
    inside = [v for k, v in origin.items() if k[:len(names)] == names or names[:len(k)] == k]
    return ", ".join(dict.fromkeys(inside)) or None


def _names(e: Any) -> tuple:
    """The keys of an error's location, without union tags; a list item's error is reported on
    the list."""
    names: list = []
    for p in e["loc"]:
        if _is_tag(p):
            continue
        if isinstance(p, int) and not isinstance(p, bool):
            break
        names.append(p)
    return tuple(names)


def _one_error(e: Any, model: type[BaseModel], raw: Any, source: str, *, prefix: str,
               preset: bool) -> IbscopeError:
    """One of pydantic's errors as a UsageError naming the key, what it must be and what it got."""
    names = list(_names(e))
    shown = ".".join(str(n) for n in ([prefix] if prefix else []) + names)
    value = _value_at(raw, names)
    t = e["type"]
    if t == "extra_forbidden":
        where = _Where(model, names[:-1])
        key = str(names[-1])
        parent = shown.rpartition(".")[0]
        if preset and not where.dynamic and not parent:
            return UsageError(f"Unknown key '{key}' in config '{source}'.{did_you_mean(key, where.siblings, n=1)}",
                              hint="Valid keys: " + ", ".join(where.siblings))
        what = "unknown key" if where.dynamic else "unknown config key"
        return UsageError(f"{source}: {what} '{shown}'.{did_you_mean(key, where.siblings, n=1)}",
                          hint=f"Valid keys{' in ' + parent if parent else ''}: {', '.join(where.siblings)}. "
                               f"See `ibscope run --show-schema` or docs/demo.md.")
    where = _Where(model, names)
    doc = where.field.description if where.field is not None and where.field.description else ""
    hint = f"{shown}: {doc}" if doc else None
    if t == "missing":
        return UsageError(f"{source}: missing required key '{shown}'" + (f" ({doc})." if doc else "."))
    if t == "literal_error":
        ch = where.choices()
        return UsageError(f"{source}: '{shown}' must be one of {', '.join(ch)}. Got {value!r}."
                          f"{did_you_mean(str(value), ch)}", hint=hint)
    if t in _OPS:
        key, op = _OPS[t]
        limit = e["ctx"][key]
        limit = f"{limit:g}" if isinstance(limit, float) else limit
        return UsageError(f"{source}: '{shown}' must be {op} {limit}. Got {value!r}.", hint=hint)
    if t == "too_short":
        if names and names[-1] == "estimators":
            return UsageError(f"{source}: '{shown}' is empty; name at least one estimator.", hint=hint)
        return UsageError(f"{source}: '{shown}' must not be empty. Got {value!r}.", hint=hint)
    if t in ("model_type", "model_attributes_type", "dict_type") and where.word() == "a mapping":
        return UsageError(f"{source}: '{shown}' must be a mapping. Got {type(value).__name__}: {value!r}.", hint=hint)
    null = "" if where.nullable() else " (not null)"
    return UsageError(f"{source}: '{shown}' must be {where.word()}{null}. Got {value!r}.", hint=hint)


def _without_unknown_keys(raw: Mapping, model: type[BaseModel], where: str, source: str,
                          found: list[IbscopeError]) -> dict:
    """``raw`` without the keys that ``model`` does not have (recursively; ``quick`` itself
    excluded), each of them reported into ``found``; values are not checked here."""
    kept: dict = {}
    for k, v in raw.items():
        name = f"{where}.{k}" if where else str(k)
        if k not in model.model_fields or (model is RunConfig and k == "quick"):
            found.append(UsageError(
                f"{source}: unknown config key '{name}'.{did_you_mean(str(k), model.model_fields)}",
                hint="Valid keys" + (f" in {where}" if where else "") + ": "
                     + ", ".join(f for f in model.model_fields if not (model is RunConfig and f == "quick"))
                     + ". See `ibscope run --show-schema`."))
            continue
        sub = _model_of(model.model_fields[k].annotation)
        kept[k] = _without_unknown_keys(v, sub, name, source, found) if sub is not None and isinstance(v, Mapping) else v
    return kept


# ----------------------------------------------------------------------------------- schema text
def describe_schema(model: type[BaseModel] = RunConfig, indent: int = 0) -> str:
    """The config keys with kinds, defaults and documentation, as indented text."""
    lines = []
    pad = "  " * indent
    for k, f in model.model_fields.items():
        sub = _model_of(f.annotation)
        if sub is not None:
            lines.append(f"{pad}{k}:" + (f"  # {f.description}" if f.description else ""))
            lines.append(describe_schema(sub, indent + 1))
            continue
        req = " [required]" if f.is_required() else ""
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        d = "" if default in (None, {}, "") else f" (default {default!r})"
        lines.append(f"{pad}{k}: {_kind(f.annotation, f.metadata)}{req}{d} - {f.description or ''}")
    return "\n".join(lines)
