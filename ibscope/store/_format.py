"""The store's on-disk format: names, constants, hashing and checkpoint labels (see :mod:`ibscope.store`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ibscope.errors import UsageError

FORMAT = "ibscope-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.h5"
SHARD_DIR = "checkpoints"
#: bytes a shard writer appends before it asks the OS to write them to disk (see ShardWriter.append)
SYNC_BYTES = 8 * 1024 * 1024


def _h5py() -> Any:  # the h5py module (untyped: no stubs, no py.typed)
    import h5py

    return h5py


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def probe_hash(sample_ids: np.ndarray, labels: np.ndarray | None, inputs: np.ndarray | None) -> str:
    parts = [np.ascontiguousarray(sample_ids, dtype=np.int64).tobytes()]
    parts.append(b"" if labels is None else np.ascontiguousarray(labels).tobytes())
    parts.append(b"" if inputs is None else np.ascontiguousarray(inputs, dtype=np.float32).tobytes())
    return sha256_bytes(*parts)


def check_layer_name(name: str) -> str:
    if not name or "/" in name:
        raise UsageError(f"Layer names must be non-empty and contain no '/'. Got {name!r}.")
    return name


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def checkpoint_label(epoch: int | None, step: int | None, path: str | os.PathLike[str],
                     epoch_exact: float | None = None) -> str:
    """How a checkpoint is named to users: "epoch 12", "step 300", "epoch 3, step 120",
    "epoch 0.5, step 50", or its file name."""
    if epoch_exact is None and epoch is not None:
        epoch_exact = float(epoch)
    parts = []
    if epoch_exact is not None:
        parts.append(f"epoch {_num(epoch_exact)}")
    if step is not None:
        parts.append(f"step {step}")
    return ", ".join(parts) if parts else Path(path).name


@dataclass(frozen=True)
class CheckpointInfo:
    """One captured checkpoint, as the store records it."""

    index: int
    epoch: int | None
    step: int | None
    path: str
    sha256: str
    shard: Path
    metrics: dict[str, float] = field(default_factory=dict)
    #: stored dtype per layer ("float32" / "float16")
    dtypes: dict[str, str] = field(default_factory=dict)
    #: layers with Jacobian spectra in this shard
    jacobian_layers: tuple[str, ...] = ()
    #: where the epoch came from: "checkpoint", "lightning", "safetensors", "trainer_state",
    #: "name", "name-number", "snapshot" (older stores: "file", "name", "position"); "" unknown
    epoch_source: str = ""
    #: where the step came from (same vocabulary; "" in older stores)
    step_source: str = ""
    #: the epoch as recorded, fractions included (a Trainer's 0.5); None when unknown
    epoch_exact: float | None = None

    @property
    def label(self) -> str:
        return checkpoint_label(self.epoch, self.step, self.path, epoch_exact=self.epoch_exact)


def resolve_store_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.name == MANIFEST:
        p = p.parent
    return p


def shard_name(epoch: int | None, step: int | None, sha256: str) -> str:
    """The file name of a checkpoint's shard (``StoreWriter.shard_name``)."""
    e = -1 if epoch is None else epoch
    s = -1 if step is None else step
    return f"e{e:06d}_s{s:010d}_{sha256[:12]}.h5"
