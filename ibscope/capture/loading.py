"""Model factories, checkpoint discovery and ordering, safe and strict checkpoint loading.

The names of the loader, in three modules:

* :mod:`ibscope.capture.factory`: ``resolve_factory("pkg.module:factory" | "path/file.py:factory"
  | callable)`` returns a zero-argument builder of the user's ``nn.Module``;
* this module: ``discover_checkpoints(glob | dir | [paths])`` lists checkpoint files, reads the
  epoch/step stored in each (``epoch``, ``step``, ``global_step`` keys) or parses it from the
  file name, and orders them (see :mod:`ibscope.capture.series`);
* :mod:`ibscope.capture.checkpoints`: ``read_checkpoint(path)`` reads a checkpoint safely
  (``weights_only=True`` with a small allow-list), ``extract_state_dict`` unwraps the usual
  containers and ``load_into(model, state)`` loads strictly.

Everything stays importable from here.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import re
from pathlib import Path

from ibscope.capture.checkpoints import (  # noqa: F401 - re-exported: the public names of the loader
    STATE_KEYS,
    _describe_unpickle_failure,
    _global_name,
    _import_global,
    _looks_like_torch_file,
    _prefix_candidates,
    _prefix_relation,
    _safetensors_metadata,
    _strip_known_prefixes,
    _tied_groups,
    align_state_dict,
    describe_alignment,
    extract_state_dict,
    load_checkpoint_into,
    load_into,
    numpy_safe_globals,
    read_checkpoint,
    resolve_safe_globals,
)
from ibscope.capture.factory import _import_file, model_spec_id, resolve_factory, resolve_object, unwrap_model  # noqa: F401
from ibscope.capture.series import (  # noqa: F401 - re-exported: the public names of the loader
    HF_WEIGHT_FILES,
    CheckpointFile,
    checkpoint_metadata,
    discover_series,
    folder_weights,
    index_shards,
    is_checkpoint_folder,
    parse_name,
)
from ibscope.errors import UsageError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def _from_name(path: Path) -> tuple[int | None, int | None]:
    """(epoch, step) that a file name says (see :func:`ibscope.capture.series.parse_name`)."""
    n = parse_name(Path(path).name)
    return n.epoch, n.step


def _dir_checkpoints(p: Path) -> list[Path]:
    """A directory given as checkpoints: itself when it is a checkpoint folder (weights from
    save_pretrained / the Trainer); else its ``checkpoint-N`` folders (a Trainer output
    directory); else its checkpoint files."""
    subs = [q for q in p.iterdir() if q.is_dir() and re.fullmatch(r"checkpoint-\d+", q.name) and is_checkpoint_folder(q)]
    if subs:
        if is_checkpoint_folder(p):
            log.info("'%s' holds checkpoint-N folders and weights of its own (a final save_model); capturing the "
                     "checkpoint-N folders (pass '%s' to add the final weights).", p, folder_weights(p))
        return sorted(subs)
    if is_checkpoint_folder(p):
        return [p]
    found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix in CHECKPOINT_SUFFIXES)
    if not found:
        raise UsageError(f"Directory '{p}' holds no checkpoints: no files ending {', '.join(CHECKPOINT_SUFFIXES)}, no "
                         f"Hugging Face weights ({', '.join(HF_WEIGHT_FILES)}) and no checkpoint-N folders.")
    return found


def list_checkpoint_paths(checkpoints: str | os.PathLike | list) -> list[Path]:
    """Expand a glob, a directory or a list (of paths/globs) into existing checkpoints,
    deduplicated. A Hugging Face checkpoint folder (``checkpoint-400/`` with
    ``model.safetensors``, ``pytorch_model.bin`` or a sharded index) is one checkpoint."""
    items = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not items:
        raise UsageError("No checkpoints given.", hint="Pass a glob ('runs/exp1/*.pt'), a directory or a list of files.")
    out: list[Path] = []
    for it in items:
        s = str(it)
        p = Path(s)
        if p.is_dir():
            out += _dir_checkpoints(p)
        elif any(c in s for c in "*?["):
            matched = [Path(q) for q in _glob.glob(s, recursive=True)]
            found = sorted(q for q in matched if q.is_file() or is_checkpoint_folder(q))
            if not found:
                dirs = [q for q in matched if q.is_dir()]
                raise UsageError(f"The checkpoint pattern '{s}' matched no files"
                                 + (f" (only {len(dirs)} folder(s) without model weights, e.g. '{dirs[0]}')." if dirs else "."),
                                 hint="Quote the pattern so your shell does not expand it, and check the directory.")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"Checkpoint '{s}' not found.", hint="Pass existing files, a directory or a glob.")
    seen, uniq = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def discover_checkpoints(checkpoints, *, trust_checkpoint: bool = False, safe_globals=None, order: str = "auto",
                         warn: bool = True) -> list[CheckpointFile]:
    """Checkpoints in run order, each with epoch/step, where each came from, hash and metrics.

    ``safe_globals``: classes to allow when reading the files, besides the numpy scalar, array
    and dtype globals allowed by default (see :func:`read_checkpoint`). Numbers come from the
    checkpoint's metadata, else its name; the series is ordered by step, else epoch, else name
    (``order`` forces one of "step", "epoch", "name"). Doubtful series (duplicates, checkpoints
    without numbers, orders that disagree) are logged as warnings (``warn=False``: not logged);
    an undecidable order is a :class:`UsageError`. See :mod:`ibscope.capture.series`.
    """
    allowed = resolve_safe_globals(safe_globals)  # a bad name is a usage error before any file is read
    files, warns = discover_series(list_checkpoint_paths(checkpoints), trust_checkpoint=trust_checkpoint,
                                   safe_globals=allowed, order=order)
    if warn:
        for w in warns:
            log.warning("%s", w)
    return files
