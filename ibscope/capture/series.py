"""Checkpoint series: which checkpoint is which epoch and step, where each number came from,
and the order in which they are captured.

Numbers are read, in this order of precedence (metadata wins over names):

1. keys stored in the checkpoint (``epoch`` / ``current_epoch``; ``global_step`` / ``step`` /
   ``iteration`` / ``iter``); source ``"lightning"`` for a Lightning ``.ckpt`` (it has a
   ``pytorch-lightning_version`` key), else ``"checkpoint"``;
2. the metadata of a ``.safetensors`` file (strings), source ``"safetensors"``;
3. ``trainer_state.json`` of a Hugging Face Trainer folder (``global_step``, ``epoch``: a
   fraction of an epoch is kept in ``epoch_exact``), source ``"trainer_state"``;
4. the file name, else the name of its folder, source ``"name"``: word-bounded patterns
   (:func:`parse_name`) -- ``epoch=3-step=120``, ``ep12``, ``e012``, ``epoch_7`` (epochs);
   ``step-200``, ``model_step8``, ``global_step=120``, ``iter_5000``, ``checkpoint-400`` (steps).
   A name with only a bare number (``run_7.pt``) gives an epoch, source ``"name-number"``.

Step and epoch are kept apart: an epoch is never read from a step pattern nor the reverse.
The series is ordered by step when every checkpoint has one, else by epoch, else by name;
duplicates, checkpoints without any number and step/epoch orders that disagree are warnings
listing the files and numbers, and a series whose order cannot be decided (some files with
only a step, others with only an epoch) is a :class:`~ibscope.errors.UsageError` unless
``order`` says how.

Training metrics come with each checkpoint from its keys (``acc``, ``loss``, ... or a
``metrics`` dict), Lightning's ``ModelCheckpoint`` state (the monitored metric's
``current_score``), metric values in Lightning file names (``val_acc=0.912``), a Lightning
``CSVLogger`` file ``metrics.csv`` next to the checkpoints (or one folder up), and
``trainer_state.json``'s ``log_history`` (the last value logged at or before the
checkpoint's step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ibscope._order import natural_key, sort_series
from ibscope.capture.trainlogs import (  # noqa: F401 - re-exported (callbacks and tests import them from here)
    LOGGED_METRIC_RE,
    TRAINER_STATE,
    as_float,
    as_int,
    csv_metrics,
    history_metrics,
    lightning_log_file,
    read_trainer_state,
)
from ibscope.errors import CheckpointError, UsageError
from ibscope.reporting import Table

log = logging.getLogger(__name__)

#: how each source is shown to users
SOURCE_NAMES = {
    "checkpoint": "key in the checkpoint",
    "lightning": "Lightning checkpoint",
    "safetensors": "safetensors metadata",
    "trainer_state": "trainer_state.json",
    "name": "file name",
    "name-number": "number in the name",
    "snapshot": "given at capture",
    "": "unknown",
}
#: sources that are the checkpoint's own metadata (they win over names)
METADATA_SOURCES = ("checkpoint", "lightning", "safetensors", "trainer_state", "snapshot")
ORDERS = ("auto", "step", "epoch", "name")

_EPOCH_KEYS = ("epoch", "current_epoch")
_STEP_KEYS = ("global_step", "step", "iteration", "iter")
#: keys of a checkpoint dict that are training metrics
METRIC_RE = re.compile(r"(^|_)(acc|accuracy|loss|error|err|nll|ce)(_|$)", re.IGNORECASE)

_B = r"(?<![A-Za-z0-9])"  # a word boundary that treats "_", "-", "=", "." as separators
_EPOCH_NAME = re.compile(_B + r"(?:epochs|epoch|ep|e)[=_\-]?(\d+)(?![0-9])", re.IGNORECASE)
_STEP_NAME = re.compile(_B + r"(?:global_step|steps|step|iteration|iter)[=_\-]?(\d+)(?![0-9])", re.IGNORECASE)
_HF_STEP_NAME = re.compile(_B + r"checkpoint-(\d+)(?![0-9])", re.IGNORECASE)
_PAIR = re.compile(_B + r"([A-Za-z][A-Za-z0-9_]*)=(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![0-9])")
_BARE = re.compile(r"(?<![0-9.])(\d+)(?![0-9])")

#: files that make a folder one Hugging Face checkpoint, in the order they are looked for
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


@dataclass
class CheckpointFile:
    """One checkpoint (a file, or a Hugging Face checkpoint folder) with its place in the run.

    ``epoch_source`` / ``step_source``: where each number came from (keys of
    :data:`SOURCE_NAMES`). ``epoch_exact``: the epoch as recorded, fractions included
    (``trainer_state.json`` says 0.5 half-way through the first epoch; ``epoch`` is then None).
    ``sha256``: of the file; of a folder, of its config and weight files (:func:`folder_sha256`).
    """

    path: Path
    epoch: int | None = None
    step: int | None = None
    epoch_source: str = ""
    step_source: str = ""
    sha256: str = ""
    metrics: dict = field(default_factory=dict)
    epoch_exact: float | None = None
    metric_sources: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.epoch_exact is None and self.epoch is not None:
            self.epoch_exact = float(self.epoch)

    @property
    def source(self) -> str:
        """Coarse source of the order: "file" (metadata of the checkpoint), "name" or ""."""
        srcs = {s for s in (self.epoch_source, self.step_source) if s}
        if srcs & set(METADATA_SOURCES):
            return "file"
        if srcs:
            return "name"
        return ""

    @property
    def label(self) -> str:
        from ibscope.store import checkpoint_label

        return checkpoint_label(self.epoch, self.step, self.path, epoch_exact=self.epoch_exact)

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def describe_sources(self) -> str:
        e, s = self.epoch_source if self.epoch_exact is not None else "", self.step_source if self.step is not None else ""
        if e and s and e == s:
            return SOURCE_NAMES.get(e, e)
        parts = []
        if e:
            parts.append(f"epoch: {SOURCE_NAMES.get(e, e)}")
        if s:
            parts.append(f"step: {SOURCE_NAMES.get(s, s)}")
        return "; ".join(parts) or "none (ordered by name)"


def checkpoint_metadata(obj: Any) -> tuple[int | None, int | None, dict]:
    """(epoch, step, scalar training metrics) stored in a checkpoint object or metadata dict."""
    if not isinstance(obj, dict):
        return None, None, {}
    epoch = next((e for e in (as_int(obj.get(k)) for k in _EPOCH_KEYS) if e is not None), None)
    step = next((s for s in (as_int(obj.get(k)) for k in _STEP_KEYS) if s is not None), None)
    metrics: dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(k, str) and METRIC_RE.search(k):
            f = as_float(v)
            if f is not None:
                metrics[k] = f
    inner = obj.get("metrics")
    if isinstance(inner, dict):
        for k, v in inner.items():
            f = as_float(v)
            if f is not None and isinstance(k, str):
                metrics[k] = f
    return epoch, step, metrics


def lightning_callback_metrics(obj: Any) -> dict:
    """The monitored metric of each Lightning ``ModelCheckpoint`` state saved in a ``.ckpt``
    (``{"val_acc": 0.91}``): its ``current_score`` when the checkpoint was written."""
    out: dict[str, float] = {}
    cbs = obj.get("callbacks") if isinstance(obj, dict) else None
    if not isinstance(cbs, dict):
        return out
    for state in cbs.values():
        if not isinstance(state, dict):
            continue
        mon, score = state.get("monitor"), as_float(state.get("current_score"))
        if isinstance(mon, str) and mon and score is not None:
            out[mon] = score
    return out


@dataclass
class NameNumbers:
    """What a file or folder name says: epoch, step, metric values, and doubts."""

    epoch: int | None = None
    step: int | None = None
    bare: bool = False  # the epoch is a bare number, not a keyword pattern
    metrics: dict = field(default_factory=dict)
    doubts: list = field(default_factory=list)


def _stem(name: str) -> str:
    low = name.lower()
    for suf in (".index.json", ".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".tar", ".pkl"):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def parse_name(name: str) -> NameNumbers:
    """Epoch and step from one file or folder name, with word boundaries.

    ``epoch=3-step=120`` -> epoch 3, step 120; ``step-200`` / ``model_step8`` /
    ``checkpoint-400`` / ``iter_5000`` -> steps only; ``ep12`` / ``e012`` -> epochs only
    (the "ep" inside "step" is not an epoch). Without either pattern, a bare number gives an
    epoch (``bare``). ``key=value`` pairs whose key looks like a metric (``val_acc=0.912``,
    Lightning's file names) are returned as metrics and never read as numbers of the series.
    """
    stem = _stem(name)
    out = NameNumbers()
    for k, v in _PAIR.findall(stem):
        if k.lower() in ("epoch", "step", "global_step", "epochs", "steps"):
            continue
        f = as_float(v)
        if f is not None and LOGGED_METRIC_RE.search(k):
            out.metrics[k] = f
    no_pairs = _PAIR.sub(lambda m: m.group(0) if m.group(1).lower() in ("epoch", "step", "global_step") else "_", stem)
    epochs = [int(v) for v in _EPOCH_NAME.findall(no_pairs)]
    steps = [int(v) for v in _STEP_NAME.findall(no_pairs)] + [int(v) for v in _HF_STEP_NAME.findall(no_pairs)]
    if len(set(epochs)) > 1:
        out.doubts.append(f"the name '{name}' holds several epochs ({', '.join(map(str, epochs))}); the last is used")
    if len(set(steps)) > 1:
        out.doubts.append(f"the name '{name}' holds several steps ({', '.join(map(str, steps))}); the last is used")
    out.epoch = epochs[-1] if epochs else None
    out.step = steps[-1] if steps else None
    if out.epoch is None and out.step is None:
        nums = _BARE.findall(no_pairs)
        if nums:
            out.epoch, out.bare = int(nums[-1]), True
    return out


# ------------------------------------------------------------------------------ files
def folder_weights(d: Path) -> Path | None:
    """The weights file of a Hugging Face checkpoint folder (see :data:`HF_WEIGHT_FILES`)."""
    for name in HF_WEIGHT_FILES:
        p = d / name
        if p.is_file():
            return p
    return None


def is_checkpoint_folder(d: Path) -> bool:
    return d.is_dir() and folder_weights(d) is not None


def index_shards(index: Path) -> list[Path]:
    """The shard files named by a ``*.index.json`` (``weight_map``), each inside its folder."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        wm = doc["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map must map names to file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"'{index}' is not a readable sharded-checkpoint index: {type(exc).__name__}: {exc}",
                              hint="It must be JSON with a 'weight_map' {parameter: shard file}, as written by "
                                   "save_pretrained.") from None
    base = index.parent.resolve()
    out = []
    for f in sorted(set(wm.values()), key=natural_key):
        p = (index.parent / f)
        if p.resolve().parent != base:
            raise CheckpointError(f"'{index}' names the shard {f!r} outside its folder; refusing to read it.")
        if not p.is_file():
            raise CheckpointError(f"'{index}' names the shard '{f}', which is missing from '{index.parent}'.",
                                  hint="Copy every shard of the checkpoint, or pass a complete checkpoint folder.")
        out.append(p)
    return out


def content_files(path: Path) -> list[Path]:
    """The files whose bytes make a checkpoint: the file itself; for a folder its
    ``config.json`` (when present) and weight files (every shard of an index)."""
    if not path.is_dir():
        if path.name.endswith(".index.json"):
            return [path, *index_shards(path)]
        return [path]
    w = folder_weights(path)
    if w is None:
        raise CheckpointError(f"'{path}' is a folder without model weights ({', '.join(HF_WEIGHT_FILES)}).")
    files = [path / "config.json"] if (path / "config.json").is_file() else []
    files.append(w)
    if w.name.endswith(".index.json"):
        files += index_shards(w)
    return files


def folder_sha256(path: Path) -> str:
    """sha256 of a checkpoint: of the file's bytes; for a folder or a sharded index, of
    "<name>\\0<sha256 of the file>\\n" over :func:`content_files` in order."""
    from ibscope.store import file_sha256

    files = content_files(path)
    if len(files) == 1 and not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ discovery
def describe_checkpoint(p: Path, *, trust_checkpoint: bool = False, safe_globals=None) -> CheckpointFile:
    """Epoch, step (with their sources), hash and training metrics of one checkpoint."""
    from ibscope.capture.checkpoints import _safetensors_metadata, read_checkpoint

    ck = CheckpointFile(p)
    notes: list[str] = []
    meta: Any = None
    src = ""
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        w = folder_weights(p)
        if w is not None and w.suffix == ".safetensors":
            meta, src = _safetensors_metadata(w), "safetensors"
    elif p.suffix == ".safetensors":
        meta, src = _safetensors_metadata(p), "safetensors"
    elif p.name.endswith(".index.json"):
        meta = None
    else:  # memory-mapped: only the small bookkeeping entries are read here
        meta = read_checkpoint(p, trust_checkpoint=trust_checkpoint, mmap=True, safe_globals=safe_globals)
        src = "lightning" if isinstance(meta, dict) and "pytorch-lightning_version" in meta else "checkpoint"
    epoch, step, metrics = checkpoint_metadata(meta)
    msrc = {k: src for k in metrics}
    if src == "lightning":
        for k, v in lightning_callback_metrics(meta).items():
            if k not in metrics:
                metrics[k], msrc[k] = v, "Lightning ModelCheckpoint state"
    del meta
    epoch_exact = None if epoch is None else float(epoch)
    e_src = src if epoch is not None else ""
    s_src = src if step is not None else ""
    ts = read_trainer_state(folder) if (p.is_dir() or p.name in HF_WEIGHT_FILES) else None
    if ts is not None:
        t_step, t_epoch = as_int(ts.get("global_step")), as_float(ts.get("epoch"))
        if step is None and t_step is not None:
            step, s_src = t_step, "trainer_state"
        if epoch_exact is None and t_epoch is not None:
            epoch_exact, e_src = t_epoch, "trainer_state"
            epoch = int(t_epoch) if float(t_epoch).is_integer() else None
        for k, v in history_metrics(ts.get("log_history"), step).items():
            if k not in metrics:
                metrics[k], msrc[k] = v, TRAINER_STATE
    # the name: the file's, else its folder's (model.safetensors inside checkpoint-400/)
    nn_ = parse_name(p.name)
    if nn_.epoch is None and nn_.step is None and not p.is_dir():
        parent = parse_name(p.parent.name)
        if (parent.epoch is not None and not parent.bare) or parent.step is not None:
            nn_ = parent
    notes += nn_.doubts
    name_src = "name-number" if nn_.bare else "name"
    if nn_.epoch is not None:
        if epoch_exact is None:
            epoch, epoch_exact, e_src = nn_.epoch, float(nn_.epoch), name_src
        elif not nn_.bare and float(nn_.epoch) != epoch_exact:
            notes.append(f"'{p}': the name says epoch {nn_.epoch} but the {SOURCE_NAMES[e_src]} says "
                         f"{_fmt_num(epoch_exact)}; using {_fmt_num(epoch_exact)}")
    named_hf = nn_.step is not None and (_HF_STEP_NAME.search(p.name) or (
        not p.is_dir() and _HF_STEP_NAME.search(p.parent.name)))
    if nn_.step is not None and step is None and named_hf and ts is None and epoch is not None \
            and e_src not in ("", "name", "name-number") and nn_.step == epoch:
        pass  # timm-style 'checkpoint-12.pth.tar' holding {'epoch': 12}: the number is the epoch, the step unknown
    elif nn_.step is not None:
        if step is None:
            step, s_src = nn_.step, "name"
        elif nn_.step != step:
            notes.append(f"'{p}': the name says step {nn_.step} but the {SOURCE_NAMES[s_src]} says {step}; "
                         f"using {step}")
    if (not p.is_dir() and p.suffix == ".ckpt") or src == "lightning":
        logp = lightning_log_file(p)
        if logp is not None:  # full precision: before the rounded values of the file name
            for k, v in csv_metrics(logp, epoch, step).items():
                if k not in metrics:
                    metrics[k], msrc[k] = v, str(logp)
    for k, v in nn_.metrics.items():
        if k not in metrics:
            metrics[k], msrc[k] = v, "file name"
    ck.epoch, ck.epoch_exact, ck.step = epoch, epoch_exact, step
    ck.epoch_source, ck.step_source = (e_src if epoch_exact is not None else ""), (s_src if step is not None else "")
    ck.metrics, ck.metric_sources, ck.notes = metrics, msrc, notes
    ck.sha256 = folder_sha256(p)
    return ck


def _fmt_num(v: float | int | None) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _numbers(c: CheckpointFile) -> str:
    parts = []
    if c.epoch_exact is not None:
        parts.append(f"epoch {_fmt_num(c.epoch_exact)}")
    if c.step is not None:
        parts.append(f"step {c.step}")
    return ", ".join(parts) or "no epoch or step"


def _listing(files, limit: int = 12) -> str:
    lines = [f"  {c.path}: {_numbers(c)}" + (f" ({c.describe_sources()})" if c.source else "") for c in files[:limit]]
    if len(files) > limit:
        lines.append(f"  ... and {len(files) - limit} more")
    return "\n".join(lines)


def order_series(files: list[CheckpointFile], order: str = "auto") -> tuple[list[CheckpointFile], list[str]]:
    """(checkpoints in run order, warnings). ``order``: "auto" (step, else epoch, else name),
    "step", "epoch" or "name". Raises :class:`UsageError` when the order cannot be decided."""
    if order not in ORDERS:
        raise UsageError(f"--order must be one of {', '.join(ORDERS)}. Got {order!r}.")
    warns: list[str] = [n for c in files for n in c.notes]
    # the same bytes given twice (a copy, a symlink): captured once
    seen: dict[tuple, CheckpointFile] = {}
    uniq = []
    for c in files:
        k = (c.sha256, c.epoch_exact, c.step)
        if k in seen:
            warns.append(f"'{c.path}' has the same content and numbers as '{seen[k].path}'; it is captured once.")
            continue
        seen[k] = c
        uniq.append(c)
    files = uniq

    def ep(c):
        return c.epoch_exact

    def st(c):
        return c.step

    def nm(c):
        return str(c.path)

    if order == "name":
        return sort_series(files, ep, st, nm, mode="name"), warns
    if order in ("step", "epoch"):
        missing = [c for c in files if (st(c) if order == "step" else ep(c)) is None]
        if missing:
            raise UsageError(f"--order {order}: {len(missing)} checkpoint(s) have no {order}:\n{_listing(missing)}",
                             hint="Use --order auto (step, else epoch, else name) or --order name, or pass only "
                                  f"checkpoints whose {order} is known (`ibscope checkpoints PATTERN` lists them).")
        mode = order
        numbered, bare = files, []
    else:
        numbered = [c for c in files if ep(c) is not None or st(c) is not None]
        bare = [c for c in files if ep(c) is None and st(c) is None]
        if not numbered:
            if len(files) > 1:
                warns.append(f"No epoch or step found for any of the {len(files)} checkpoints (not in the files, their "
                             "metadata or their names): they are ordered by name and labelled by file name.")
            return sort_series(files, ep, st, nm, mode="name"), warns
        if all(st(c) is not None for c in numbered):
            mode = "step"
        elif all(ep(c) is not None for c in numbered):
            mode = "epoch"
        else:
            only_s = [c for c in numbered if ep(c) is None]
            only_e = [c for c in numbered if st(c) is None]
            raise UsageError(
                "The checkpoint order cannot be decided: some checkpoints have only a step, others only an epoch, and "
                f"steps and epochs cannot be compared.\nOnly a step:\n{_listing(only_s)}\nOnly an epoch:\n{_listing(only_e)}",
                hint="Pass checkpoints of one series (`ibscope checkpoints PATTERN` shows what is read from each), or "
                     "choose the order: --order name (by file name) / --order epoch / --order step.")
        if bare:
            warns.append(f"{len(bare)} of {len(files)} checkpoints have no epoch or step (not in the file, its metadata "
                         f"or its name); they are captured after the others, by name, and labelled by file name:\n"
                         f"{_listing(bare)}\nThe others:\n{_listing(numbered)}")
    ordered = sort_series(numbered, ep, st, nm, mode=mode) + sort_series(bare, ep, st, nm, mode="name")
    # duplicates: two different checkpoints at the same point of the run
    groups: dict[Any, list[CheckpointFile]] = {}
    for c in numbered:
        groups.setdefault((st(c) if mode == "step" else ep(c)), []).append(c)
    for k, cs in groups.items():
        if len(cs) > 1:
            what = f"step {k}" if mode == "step" else f"epoch {_fmt_num(k)}"
            warns.append(f"{len(cs)} different checkpoints share {what}; all are captured (in name order):\n"
                         f"{_listing(cs)}\nPass one of them (e.g. leave out Lightning's last.ckpt) if they are copies.")
    # step order and epoch order must agree
    both = [c for c in sort_series(numbered, ep, st, nm, mode=mode) if ep(c) is not None and st(c) is not None]
    bad = [(a, b) for a, b in zip(both, both[1:])
           if (mode == "step" and ep(b) < ep(a)) or (mode == "epoch" and st(b) < st(a))]
    if bad:
        pairs = "\n".join(f"  {a.path} ({_numbers(a)}) then {b.path} ({_numbers(b)})" for a, b in bad[:8])
        warns.append(f"Ordered by {mode}, the {'epochs' if mode == 'step' else 'steps'} go backwards:\n{pairs}\n"
                     "The checkpoints may come from different runs, or a run that was restarted.")
    return ordered, warns


def discover_series(paths: list[Path], *, trust_checkpoint: bool = False, safe_globals=None,
                    order: str = "auto") -> tuple[list[CheckpointFile], list[str]]:
    files = [describe_checkpoint(p, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals) for p in paths]
    return order_series(files, order)


def series_table(ckpts: list[CheckpointFile], title: str = "Checkpoints, in capture order") -> Table:
    """The series as a table (:class:`ibscope.reporting.Table`): file, epoch, step, where each
    came from, metrics."""
    return Table(title, ["#", "checkpoint", "epoch", "step", "from", "metrics"],
                 [[str(i), str(c.path) + ("/" if c.is_folder else ""), _fmt_num(c.epoch_exact),
                   "" if c.step is None else str(c.step), c.describe_sources(),
                   ", ".join(f"{k}={v:.4g}" for k, v in c.metrics.items())] for i, c in enumerate(ckpts)])


def series_json(ckpts: list[CheckpointFile]) -> list[dict]:
    return [{"index": i, "path": str(c.path), "folder": c.is_folder, "epoch": c.epoch, "epoch_exact": c.epoch_exact,
             "step": c.step, "epoch_source": c.epoch_source, "step_source": c.step_source, "sha256": c.sha256,
             "metrics": c.metrics, "metric_sources": c.metric_sources} for i, c in enumerate(ckpts)]


def state_dict_sha256(state: dict) -> str:
    """A stable sha256 of a state dict's content, for checkpoints without a file
    (:func:`ibscope.capture.snapshot`): over the keys in sorted order, for each
    ``"<key>\\0<dtype>\\0<shape>\\n"`` followed by the tensor's bytes (C order, on the CPU).
    Equal weights give equal hashes whatever device or memory layout they had."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            h.update(f"{k}\0{type(v).__name__}\0{v!r}\n".encode())
            continue
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}\0{str(v.dtype).replace('torch.', '')}\0{tuple(v.shape)}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()
