"""Reading checkpoint files safely and loading them strictly into a model.

* ``read_checkpoint(path)`` reads a checkpoint with ``weights_only=True``, allow-listing only
  the numpy globals that rebuild scalars, arrays and dtypes (:func:`numpy_safe_globals`) plus
  the classes named in ``safe_globals``; it never falls back to full unpickling unless
  ``trust_checkpoint=True``. Hugging Face folders (safetensors, ``.bin``, sharded indexes) are
  read as one state dict.
* ``extract_state_dict`` unwraps the usual containers (``state_dict``, ``model_state_dict``,
  Lightning's ...).
* ``load_into(model, state)`` strips ``module.`` / ``_orig_mod.`` / Lightning attribute prefixes
  (or adds the one a wrapper needs) and loads strictly: missing or unexpected keys are an error
  that lists them. ``load_checkpoint_into`` does all three for one checkpoint.

Which files are checkpoints, and in which order, is :mod:`ibscope.capture.loading` and
:mod:`ibscope.capture.series`.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

from ibscope.capture.series import HF_WEIGHT_FILES, CheckpointFile, folder_weights, index_shards
from ibscope.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "state_dict_ema")


def numpy_safe_globals() -> list:
    """Globals allowed by default on top of torch's own ``weights_only`` set.

    The numpy functions and classes that rebuild scalars (``np.float64(0.81)``:
    ``multiarray.scalar`` + ``numpy.dtype`` and its per-type classes ``numpy.dtypes.Float64DType``
    ...) and arrays (``multiarray._reconstruct`` + ``numpy.ndarray``). They only build numbers
    from bytes; none can import a module or call anything else. Elements of object arrays go
    through the same restricted unpickler, so they stay restricted. Functions are given as
    ``(function, "module.name")`` pairs under both the numpy >= 2 (``numpy._core``) and numpy 1.x
    (``numpy.core``) paths, as files written under either carry that name.
    """
    import numpy as np

    try:
        mu = importlib.import_module("numpy._core.multiarray")  # numpy >= 2 (no DeprecationWarning)
    except ImportError:  # pragma: no cover - numpy 1.x
        mu = importlib.import_module("numpy.core.multiarray")
    out: list = [np.ndarray, np.dtype]
    for prefix in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(mu.scalar, f"{prefix}.scalar"), (mu._reconstruct, f"{prefix}._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype (BUILD checks the type)
    if dtypes is not None:
        out += [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype) and c is not np.dtype]
    return out


def _global_name(obj) -> str:
    if isinstance(obj, tuple):
        return obj[1]
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _import_global(name: str):
    """Import ``"pkg.module.Class"`` (or ``"pkg.module:Class"``, nested ``Outer.Inner`` allowed)."""
    if ":" in name:
        mod_part, _, attr = name.partition(":")
        candidates = [(mod_part, attr)]
    else:
        parts = name.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    errors = []
    for mod_part, attr in candidates:
        if not mod_part or not attr:
            continue
        try:
            mod = importlib.import_module(mod_part)
        except ImportError as exc:
            if os.getcwd() not in sys.path:  # a training script's own module next to the user (mynet.Config)
                sys.path.append(os.getcwd())
                try:
                    mod = importlib.import_module(mod_part)
                except ImportError:
                    errors.append(f"{mod_part}: {exc}")
                    continue
                finally:
                    sys.path.remove(os.getcwd())
            else:
                errors.append(f"{mod_part}: {exc}")
                continue
        except Exception as exc:  # noqa: BLE001 - the module itself failed while importing
            errors.append(f"{mod_part}: {type(exc).__name__}: {exc}")
            continue
        obj = mod
        try:
            for a in attr.split("."):
                obj = getattr(obj, a)
        except AttributeError:
            errors.append(f"module '{mod_part}' has no attribute '{attr}'")
            continue
        return obj
    raise UsageError(
        f"--safe-globals: cannot import {name!r}" + (f" ({'; '.join(errors[:2])})" if errors else "") + ".",
        hint="Give the full import path of a class, e.g. --safe-globals mypkg.config.TrainConfig (its module must be "
             "importable from here: installed, or a .py file in the current directory).")


def resolve_safe_globals(safe_globals=None) -> list:
    """Allow-list entries for ``torch.serialization.safe_globals``: ``"module.Class"`` strings are
    imported (:class:`UsageError` naming the one that cannot be), classes and functions pass
    through, ``(obj, "module.name")`` pairs too. A string is registered under the name given as
    well as under the object's own, so an alias such as ``numpy.core.multiarray.scalar`` works."""
    if safe_globals is None:
        return []
    if isinstance(safe_globals, (str, type)):
        safe_globals = [safe_globals]
    out: list = []
    for item in safe_globals:
        if isinstance(item, str):
            name = item.strip()
            if not name or not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", name):
                raise UsageError(f"--safe-globals expects a dotted import path like 'module.Class'. Got {item!r}.")
            obj = _import_global(name)
            out += [obj, (obj, name.replace(":", "."))]
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            out.append(item)
        elif callable(item) and hasattr(item, "__module__") and hasattr(item, "__qualname__"):
            out.append(item)
        else:
            raise UsageError(f"safe_globals entries must be 'module.Class' strings, classes or functions. Got {item!r}.")
    return out


def _describe_unpickle_failure(path: Path, exc: Exception, allowed: list) -> CheckpointError:
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        names = get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy formats cannot be inspected
        names = []
    ok = {_global_name(a) for a in allowed}
    refused = sorted(set(names) - ok)
    if refused:
        listed = ", ".join(refused)
        first = refused[0]
        return CheckpointError(
            f"Checkpoint '{path}' holds Python objects that safe loading (torch.load weights_only=True) does not "
            f"allow: {listed}. Loading them means unpickling, which can run code from the file.",
            hint=f"If these are harmless classes you trust, allow just them: --safe-globals {first}"
                 + (" (repeat for each)" if len(refused) > 1 else "")
                 + ", or safe_globals=[...] in Python. Last resort, for a file you trust entirely: --trust-checkpoint "
                   "(unpickles everything). Safer still: re-save only the weights, e.g. "
                   "torch.save({'epoch': e, 'state_dict': model.state_dict()}, path).",
        )
    lines = str(exc).strip().splitlines()
    reason = next((ln.strip() for ln in lines if ln.strip().startswith(("WeightsUnpickler error", "Unsupported"))),
                  lines[0].strip() if lines else type(exc).__name__)
    return CheckpointError(
        f"Checkpoint '{path}' cannot be loaded safely (torch.load weights_only=True): {reason[:300]}",
        hint="If it needs classes you trust, allow them with --safe-globals module.Class (repeatable). Last resort, "
             "for a file you trust entirely: --trust-checkpoint (unpickles everything).",
    )


def _looks_like_torch_file(path: Path) -> bool:
    """A torch zip archive, or a legacy pickle (protocol opcode 0x80 first)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_checkpoint(path: str | os.PathLike, *, trust_checkpoint: bool = False, mmap: bool = False,
                    safe_globals=None) -> Any:
    """The raw object in a checkpoint file (a dict for torch files, a state dict for safetensors).

    Loads with ``weights_only=True``, allowing :func:`numpy_safe_globals` and ``safe_globals``
    (``"module.Class"`` strings, classes, or entries already resolved by
    :func:`resolve_safe_globals`). Anything else is refused with a :class:`CheckpointError`
    naming the classes, unless ``trust_checkpoint`` (full unpickling)."""
    import torch
    from torch.serialization import safe_globals as _allow

    allowed = numpy_safe_globals() + resolve_safe_globals(safe_globals)

    path = Path(path)
    if path.is_dir():  # a Hugging Face checkpoint folder
        w = folder_weights(path)
        if w is None:
            raise CheckpointError(f"'{path}' is a folder without model weights (looked for {', '.join(HF_WEIGHT_FILES)}).")
        return read_checkpoint(w, trust_checkpoint=trust_checkpoint, mmap=mmap, safe_globals=safe_globals)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file '{path}' not found.")
    if path.name.endswith(".index.json"):  # sharded weights (save_pretrained): every shard, merged
        state: dict = {}
        for shard in index_shards(path):
            part, _ = extract_state_dict(read_checkpoint(shard, trust_checkpoint=trust_checkpoint, mmap=mmap,
                                                         safe_globals=safe_globals), shard)
            state.update(part)
        return state
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from None
    try:
        with _allow(allowed):
            if mmap and zipfile.is_zipfile(path):  # legacy (non-zip) files cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_like_torch_file(path):
            raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (neither a torch zip archive nor a pickle).",
                                  hint="Pass only checkpoint files (.pt, .pth, .ckpt, .safetensors).") from None
        if not trust_checkpoint:
            raise _describe_unpickle_failure(path, exc, allowed) from None
        log.warning("Loading '%s' with full unpickling (--trust-checkpoint).", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001
            raise CheckpointError(f"Unpickling '{path}' failed even with --trust-checkpoint: "
                                  f"{type(exc2).__name__}: {exc2}",
                                  hint="Classes stored in the file must be importable under the same module path.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint: {str(exc).splitlines()[0][:300]}",
                              hint="Was the file fully written? Pass only checkpoint files (.pt, .pth, .ckpt, .safetensors).") from None


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {exc}") from None


def _is_tensor_mapping(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, path: str | os.PathLike = "?") -> tuple[dict, str]:
    """(state dict, where it was found) from whatever a checkpoint file holds."""
    import torch.nn as nn

    if isinstance(obj, nn.Module):
        return obj.state_dict(), "<pickled module>"
    if _is_tensor_mapping(obj):
        return dict(obj), "<top level>"
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if key in obj:
                inner = obj[key]
                if isinstance(inner, nn.Module):
                    return inner.state_dict(), key
                if _is_tensor_mapping(inner):
                    return dict(inner), key
        # a dict mixing tensors with bookkeeping (e.g. {'fc.weight': ..., 'epoch': 3})
        tensors = {k: v for k, v in obj.items() if _is_tensor_mapping({k: v})}
        if tensors and all(isinstance(k, str) and "." in k for k in tensors):
            return tensors, "<top level tensors>"
        keys = ", ".join(map(str, list(obj)[:15]))
        raise CheckpointError(
            f"Could not find model weights in '{path}'. Top-level keys: {keys}.",
            hint=f"Weights are looked for at the top level or under one of: {', '.join(STATE_KEYS)}.",
        )
    raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not model weights (a state dict or a dict holding one).")


def _strip_known_prefixes(state: dict) -> tuple[dict, list[str]]:
    """Remove leading ``module.`` (DataParallel/DDP) and any ``_orig_mod.`` (torch.compile)."""
    stripped: list[str] = []
    out = {}
    for k, v in state.items():
        nk = k
        while nk.startswith("module."):
            nk = nk[len("module."):]
        if "_orig_mod." in nk:
            nk = nk.replace("_orig_mod.", "")
        out[nk] = v
    if any(k.startswith("module.") for k in state):
        stripped.append("module.")
    if any("_orig_mod." in k for k in state):
        stripped.append("_orig_mod.")
    if len(out) != len(state):
        raise CheckpointError("Stripping 'module.' / '_orig_mod.' prefixes made checkpoint keys collide; "
                              "the file mixes wrapped and unwrapped copies of the weights.")
    return out, stripped


def _prefix_candidates(keys) -> list[str]:
    cands = set()
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            cands.add(".".join(parts[:i]) + ".")
    return sorted(cands, key=lambda p: (p.count("."), p))


def align_state_dict(state: dict, model_keys: set[str]) -> tuple[dict, dict]:
    """Normalise checkpoint keys to the model's. Returns (state, info about what was done).

    1. ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) are stripped;
    2. an attribute prefix of the checkpoint (a LightningModule's ``model.``) is stripped when
       the keys under it cover the model's best; keys outside it are dropped;
    3. a prefix that every key of the model has and the checkpoint lacks (a wrapper module,
       ``self.model = Inner()``) is added when that makes the keys cover the model's.

    ``info``: ``stripped`` (list), ``prefix`` (stripped attribute prefix), ``dropped`` (keys
    outside it), ``added`` (prefix added). The strict check of :func:`load_into` still follows.
    """
    state, stripped = _strip_known_prefixes(state)
    info: dict[str, Any] = {"stripped": stripped, "prefix": "", "dropped": 0, "added": ""}
    have = set(state)
    if model_keys <= have:
        return state, info
    best, best_cov = "", len(model_keys & have)
    for p in _prefix_candidates(have):
        cov = len(model_keys & {k[len(p):] for k in have if k.startswith(p)})
        if cov > best_cov:
            best, best_cov = p, cov
    if best:  # Lightning-style attribute prefix: keep only that attribute's keys
        sub = {k[len(best):]: v for k, v in state.items() if k.startswith(best)}
        info["prefix"] = best
        info["dropped"] = len(state) - len(sub)
        state = sub
        have = set(state)
        if model_keys <= have:
            return state, info
    cov0 = len(model_keys & have)
    add, add_cov = "", cov0
    for p in _prefix_candidates(model_keys):
        if all(k.startswith(p) for k in model_keys):
            cov = len(model_keys & {p + k for k in have})
            if cov > add_cov:
                add, add_cov = p, cov
    if add:  # the model wraps the module the checkpoint was saved from
        state = {add + k: v for k, v in state.items()}
        info["added"] = add
    return state, info


def describe_alignment(info: dict) -> str:
    """One line saying which prefixes were stripped or added (empty when none)."""
    parts = []
    if info.get("stripped"):
        parts.append("stripped " + " and ".join(f"'{p}'" for p in info["stripped"]))
    if info.get("prefix"):
        parts.append(f"stripped the attribute prefix '{info['prefix']}'"
                     + (f" (dropping {info['dropped']} key(s) outside it)" if info.get("dropped") else ""))
    if info.get("added"):
        parts.append(f"added the prefix '{info['added']}' that every key of the model has (the model wraps the "
                     "module the checkpoint was saved from)")
    if info.get("tied"):
        parts.append(f"filled {len(info['tied'])} tied weight(s) from their twin ({', '.join(info['tied'][:3])})")
    return "; ".join(parts)


def _prefix_relation(missing: list[str], unexpected: list[str]) -> tuple[int, str, str] | None:
    """(count, prefix, who has it) when many missing keys are unexpected keys with one prefix
    added ("model") or removed ("checkpoint")."""
    best = None
    une, mis = set(unexpected), set(missing)
    for p in _prefix_candidates(missing):
        n = len({k[len(p):] for k in missing if k.startswith(p)} & une)
        if n and (best is None or n > best[0]):
            best = (n, p, "model")
    for p in _prefix_candidates(unexpected):
        n = len({k[len(p):] for k in unexpected if k.startswith(p)} & mis)
        if n and (best is None or n > best[0]):
            best = (n, p, "checkpoint")
    return best


def _tied_groups(own: dict) -> dict[str, list[str]]:
    """Keys of the model's state dict that share one tensor (tied weights, e.g. an LM head and
    the input embedding): key -> every key of its group."""
    import torch

    groups: dict[tuple, list[str]] = {}
    for k, v in own.items():
        if isinstance(v, torch.Tensor) and v.numel() and v.device.type != "meta":
            groups.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), v.dtype, tuple(v.shape),
                               tuple(v.stride())), []).append(k)
    return {k: ks for ks in groups.values() if len(ks) > 1 for k in ks}


def load_into(model, state: dict, path: str | os.PathLike = "?") -> dict:
    """Load ``state`` into ``model`` strictly after normalising prefixes. Returns what was done.

    A key of the model missing from ``state`` is filled from its tied twin (a parameter the
    model shares between two names, which ``save_pretrained`` stores once); every other
    missing, unexpected or mis-shaped key is a :class:`CheckpointError` listing them."""
    import torch

    own = model.state_dict()
    state, info = align_state_dict(state, set(own))
    missing = sorted(set(own) - set(state))
    tied = _tied_groups(own) if missing else {}
    filled: list[str] = []
    for k in list(missing):
        twin = next((o for o in tied.get(k, ()) if o != k and o in state), None)
        if twin is not None:
            state = dict(state) if not filled else state
            state[k] = state[twin]
            filled.append(k)
    if filled:
        info["tied"] = filled
        missing = [k for k in missing if k not in filled]
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state))
              if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def first(xs):
            return ", ".join(xs[:10]) + (f" ... (+{len(xs) - 10} more)" if len(xs) > 10 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {first(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {first(shapes)}")
        done = describe_alignment(info) or "none needed"
        rel = _prefix_relation(missing, unexpected)
        if rel is not None:
            n, p, who = rel
            other = "checkpoint" if who == "model" else "model"
            hint = (f"{n} key(s) differ only by the prefix '{p}', which the {who}'s keys have and the {other}'s lack, "
                    f"but not every key does ({len(missing)} missing, {len(unexpected)} unexpected), so it was not "
                    f"{'added' if who == 'model' else 'stripped'}: the {other} holds more or other modules. Build the "
                    f"model whose state dict the checkpoint holds (`ibscope layers` lists the model's modules).")
        else:
            hint = ("Check --model and --model-args (architecture and sizes) against the run that wrote the "
                    "checkpoint. ibscope never captures a partly loaded model.")
        raise CheckpointError(
            f"Checkpoint '{path}' does not match the model: " + "; ".join(parts) + f". Prefixes: {done}.",
            hint=hint,
        )
    model.load_state_dict(state, strict=True)
    return info


def load_checkpoint_into(model, ckpt: CheckpointFile | str | os.PathLike, *, trust_checkpoint: bool = False,
                         safe_globals=None) -> dict:
    """Read a checkpoint (file or Hugging Face folder) and load it strictly into ``model``.
    Returns what was done (``state_key``, prefixes ``stripped`` / ``prefix`` / ``added``).

    ``safe_globals``: extra classes to allow (see :func:`read_checkpoint`)."""
    path = ckpt.path if isinstance(ckpt, CheckpointFile) else Path(ckpt)
    obj = read_checkpoint(path, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals)
    state, where = extract_state_dict(obj, path)
    info = load_into(model, state, path)
    info["state_key"] = where
    return info
