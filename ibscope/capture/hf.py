"""Hugging Face Transformers models for ``ibscope capture --model hf`` / ``--model hf:DIR``.

The model is built from a folder's ``config.json`` alone: the class named first in
``config.architectures`` (e.g. ``BertForSequenceClassification``), looked up in
``transformers`` itself, is instantiated from the config (``local_files_only``: nothing is
ever downloaded, and no remote code is run). The weights are then loaded by ibscope's own
safe and strict loader (``model.safetensors``, ``pytorch_model.bin`` read with
``weights_only=True``, or the shards of an ``*.index.json``), exactly like any other checkpoint;
weights the model ties (an LM head sharing the input embedding, stored once) are filled from
their twin.

* ``--model hf``: every checkpoint's model is built from that checkpoint's own folder (a
  Trainer's ``checkpoint-N/``, or the folder holding the weights file);
* ``--model hf:DIR``: one folder's config for every checkpoint.

``--model-args`` override config attributes (``{"num_labels": 3}``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, TypeGuard

from ibscope.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "ibscope[hf]"'
#: config attributes that do not change the model (ignored when comparing two checkpoints' configs)
_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset")


def is_hf_spec(model: Any) -> TypeGuard[str]:
    return isinstance(model, str) and (model == "hf" or model.startswith("hf:"))


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("--model hf needs the Hugging Face 'transformers' package, which is not installed.",
                         hint=f"Install it with: {INSTALL_HINT}") from None
    return transformers


def config_folder(path: Path) -> Path | None:
    """The folder whose ``config.json`` describes a checkpoint: the checkpoint folder itself,
    or the folder of a weights file."""
    d = path if path.is_dir() else path.parent
    return d if (d / "config.json").is_file() else None


def read_config(folder: Path) -> dict:
    p = folder / "config.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"'{folder}' has no config.json, so --model hf cannot tell which model to build.",
                         hint="Use --model hf:DIR with the folder written by save_pretrained (config.json), or a "
                              "factory --model file.py:build.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"'{p}' is not readable JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"'{p}' must hold a JSON object; got {type(doc).__name__}.")
    return doc


def config_identity(folder: Path, overrides: dict | None = None) -> str:
    """What makes two folders' models the same: their config without volatile fields."""
    doc = {k: v for k, v in read_config(folder).items() if k not in _VOLATILE}
    doc.update(overrides or {})
    return json.dumps(doc, sort_keys=True, default=str)


def build_model(folder: Path, overrides: dict | None = None):
    """A fresh model of the class ``config.architectures[0]`` built from ``folder/config.json``."""
    transformers = require_transformers()
    folder = Path(folder)
    doc = read_config(folder)  # clear errors for a missing or broken config before transformers reads it
    archs = doc.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise UsageError(f"'{folder / 'config.json'}' names no model class ('architectures' is {archs!r}).",
                         hint="Save the model with save_pretrained (it writes 'architectures'), or build it with a "
                              "factory: --model file.py:build.")
    if doc.get("auto_map"):
        log.debug("Ignoring auto_map in %s: remote code is never run.", folder / "config.json")
    name = archs[0]
    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise UsageError(f"'{folder / 'config.json'}' names the model class {name!r}, which transformers "
                         f"{transformers.__version__} does not provide (custom code is never run).",
                         hint="Upgrade transformers, or build the model with a factory: --model file.py:build.")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, **(overrides or {}))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise CheckpointError(f"transformers could not read '{folder / 'config.json'}': {type(exc).__name__}: {exc}",
                              hint="Check --model-args (config attributes) and the file.") from None
    try:
        model = cls(config)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"Building {name} from '{folder / 'config.json'}' failed: {type(exc).__name__}: {exc}") from None
    return model.eval()


def factory(spec: str, overrides: dict | None = None) -> Callable[[Path | None], Any]:
    """``build(checkpoint_path)`` for ``--model hf`` (each checkpoint's own folder) or
    ``hf:DIR`` (always DIR)."""
    require_transformers()
    if spec.startswith("hf:"):
        d = Path(spec[3:])
        if not d.is_dir() or not (d / "config.json").is_file():
            raise UsageError(f"--model {spec}: '{d}' is not a folder with a config.json.",
                             hint="Give the folder written by save_pretrained (or a Trainer's checkpoint-N folder).")

        def build_dir(_path: Path | None = None) -> Any:
            return build_model(d, overrides)

        return build_dir

    def build(path: Path | None):
        if path is None:
            raise UsageError("--model hf builds each checkpoint's model from its folder; no checkpoint was given.",
                             hint="Pass --checkpoint (or use --model hf:DIR).")
        d = config_folder(Path(path))
        if d is None:
            raise UsageError(f"--model hf: checkpoint '{path}' has no config.json in its folder, so the model cannot "
                             "be built from it.", hint="Use --model hf:DIR naming a folder with the config.json.")
        return build_model(d, overrides)

    return build
