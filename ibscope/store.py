"""The activation store: the on-disk contract between ``capture`` and everything after it.

A store is a directory::

    acts/
      manifest.h5                      # written once, atomically (tmp + os.replace)
        attrs: format="ibscope-activations", format_version=1, ibscope_version, created,
               config (JSON), config_hash, probe_hash
        /probe/sample_ids  (N,)   int64      fixed row order used by every checkpoint
        /probe/labels      (N,)   int64|float32 (absent if the probe set has no labels)
        /probe/inputs      (N, D) float32    optional, flattened; attr input_shape
        /layers/<name>     empty group; attr meta (JSON: module path, type, reduction,
                           raw output shape, stored dims, call index, io)
      checkpoints/
        e000012_s0000000000_<sha12>.h5  # one shard per checkpoint, written as *.tmp then renamed
          attrs: format, format_version, epoch, step, checkpoint_path, checkpoint_sha256,
                 metrics (JSON: scalar training metrics found in the checkpoint),
                 config_hash, n_samples, created, wall_time_s, complete=True
          /acts/<name>       (N, d) float16|float32, chunked, compressed (lzf or gzip), shuffled;
                             attrs: nonfinite_count, absmax
          /jacobian/<name>   (m, r) float32 singular values of d<name>/d input, per sample;
                             attr rows: probe rows they belong to

Crash safety: a shard only gets its final name after all of its data is written and its
``complete`` attribute set; a killed capture leaves at most a ``*.tmp`` file, which readers
ignore and ``--resume`` deletes. A checkpoint's data is therefore complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ibscope._version import __version__
from ibscope.errors import DataError, UsageError

FORMAT = "ibscope-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.h5"
SHARD_DIR = "checkpoints"


def _h5py():
    import h5py

    return h5py


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
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


def _atomic_h5(final: Path):
    """Open ``final.tmp`` for writing; caller renames it with :func:`os.replace`."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    return tmp, _h5py().File(tmp, "w")


def checkpoint_label(epoch: int | None, step: int | None, path: str | os.PathLike) -> str:
    """How a checkpoint is named to users: "epoch 12", "step 300", or its file name."""
    if epoch is not None:
        return f"epoch {epoch}"
    if step is not None:
        return f"step {step}"
    return Path(path).name


@dataclass(frozen=True)
class CheckpointInfo:
    """One captured checkpoint, as the store records it."""

    index: int
    epoch: int | None
    step: int | None
    path: str
    sha256: str
    shard: Path
    metrics: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return checkpoint_label(self.epoch, self.step, self.path)


def resolve_store_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.name == MANIFEST:
        p = p.parent
    return p


class Store:
    """Read-only view of an activation store (``open_store(path)``)."""

    def __init__(self, path: str | os.PathLike):
        self.dir = resolve_store_dir(path)
        man = self.dir / MANIFEST
        if not self.dir.exists():
            raise DataError(f"Activation store not found: '{path}'.", hint="Create one with `ibscope capture ... --out DIR`.")
        if not man.exists():
            raise DataError(
                f"'{path}' is not an ibscope activation store: expected a directory with {MANIFEST}, found none.",
                hint="Pass the --out directory of `ibscope capture`.",
            )
        h5py = _h5py()
        try:
            f = h5py.File(man, "r")
        except OSError as exc:
            raise DataError(f"Cannot open '{man}' as HDF5: {exc}. The file is corrupt or not HDF5.") from None
        with f:
            fmt = f.attrs.get("format")
            if fmt != FORMAT:
                raise DataError(f"'{man}' is not an ibscope activation store (format attribute {fmt!r}, expected {FORMAT!r}).")
            ver = int(f.attrs.get("format_version", -1))
            if ver != FORMAT_VERSION:
                raise DataError(
                    f"'{man}' has store format version {ver}; this ibscope ({__version__}) reads version {FORMAT_VERSION}.",
                    hint="Re-capture with this ibscope version, or install the ibscope version that wrote it.",
                )
            self.format_version = ver
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            self.config = json.loads(self.attrs.get("config", "{}"))
            self.config_hash = str(self.attrs.get("config_hash", ""))
            self.probe_hash = str(self.attrs.get("probe_hash", ""))
            self.sample_ids = f["probe/sample_ids"][()]
            self.labels = f["probe/labels"][()] if "probe/labels" in f else None
            self.has_inputs = "probe/inputs" in f
            self.input_shape = tuple(f["probe/inputs"].attrs.get("input_shape", ())) if self.has_inputs else None
            self._layer_meta = {name: json.loads(g.attrs.get("meta", "{}")) for name, g in f["layers"].items()}
            order = self.config.get("layer_order") or list(self._layer_meta)
            self.layers = [n for n in order if n in self._layer_meta] + [n for n in self._layer_meta if n not in order]
        self.checkpoints = self._scan()

    # ---------------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.sample_ids.shape[0])

    def layer_meta(self, name: str) -> dict:
        if name not in self._layer_meta:
            from ibscope.errors import unknown_name

            raise unknown_name("layer", name, self._layer_meta)
        return self._layer_meta[name]

    def inputs(self) -> np.ndarray | None:
        if not self.has_inputs:
            return None
        with _h5py().File(self.dir / MANIFEST, "r") as f:
            return f["probe/inputs"][()]

    def _scan(self) -> list[CheckpointInfo]:
        h5py = _h5py()
        infos = []
        sd = self.dir / SHARD_DIR
        if not sd.exists():
            return []
        for p in sorted(sd.glob("*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    if not bool(f.attrs.get("complete", False)) or f.attrs.get("config_hash") != self.config_hash:
                        continue
                    ep = int(f.attrs["epoch"]) if int(f.attrs.get("epoch", -1)) >= 0 else None
                    st = int(f.attrs["step"]) if int(f.attrs.get("step", -1)) >= 0 else None
                    infos.append((ep, st, str(f.attrs.get("checkpoint_path", "")), str(f.attrs.get("checkpoint_sha256", "")), p,
                                  json.loads(f.attrs.get("metrics", "{}"))))
            except OSError:
                continue  # unreadable shard: treat as absent (resume recaptures it)
        infos.sort(key=lambda t: (t[0] if t[0] is not None else -1, t[1] if t[1] is not None else -1, t[2]))
        return [CheckpointInfo(i, *t) for i, t in enumerate(infos)]

    def _ckpt(self, ckpt: CheckpointInfo | int) -> CheckpointInfo:
        if isinstance(ckpt, CheckpointInfo):
            return ckpt
        try:
            return self.checkpoints[ckpt]
        except IndexError:
            raise UsageError(f"Checkpoint index {ckpt} out of range: the store holds {len(self.checkpoints)}.") from None

    def activations(self, ckpt: CheckpointInfo | int, layer: str) -> np.ndarray:
        """The (n_samples, n_features) activations of ``layer`` at ``ckpt``."""
        c = self._ckpt(ckpt)
        self.layer_meta(layer)
        with _h5py().File(c.shard, "r") as f:
            if f"acts/{layer}" not in f:
                raise DataError(f"Shard {c.shard.name} holds no activations for layer '{layer}'.")
            return f[f"acts/{layer}"][()]

    def jacobian(self, ckpt: CheckpointInfo | int, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(singular values (m, r), probe rows (m,)) of d layer / d input, or None if not captured."""
        c = self._ckpt(ckpt)
        with _h5py().File(c.shard, "r") as f:
            key = f"jacobian/{layer}"
            if key not in f:
                return None
            return f[key][()], f[key].attrs["rows"][()]

    def content_hash(self) -> str:
        """Hash of what the store holds: config, probe, and the list of captured checkpoints."""
        parts = [self.config_hash.encode(), self.probe_hash.encode()]
        parts += [c.sha256.encode() for c in self.checkpoints]
        return sha256_bytes(*parts)


def open_store(path: str | os.PathLike) -> Store:
    return Store(path)


class StoreWriter:
    """Creates (or resumes) a store and writes one shard per checkpoint."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        config: dict,
        sample_ids: np.ndarray,
        labels: np.ndarray | None,
        layers: dict[str, dict],
        inputs: np.ndarray | None = None,
        input_shape: tuple[int, ...] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        compression: str = "lzf",
    ):
        self.dir = resolve_store_dir(path)
        # "lzf" | "gzip" | None/"none" (uncompressed, no shuffle: fastest writes)
        self.compression = None if compression in (None, "none") else compression
        for name in layers:
            check_layer_name(name)
        config = dict(config)
        config["layer_order"] = list(layers)
        self.config = config
        self.config_hash = sha256_bytes(canonical_json({"config": config, "layers": layers}).encode())
        self.probe_hash = probe_hash(sample_ids, labels, inputs)
        self.n_samples = int(len(sample_ids))
        man = self.dir / MANIFEST
        if man.exists():
            if not (resume or overwrite):
                raise UsageError(
                    f"Store '{self.dir}' already exists.",
                    hint="Pass --resume to capture only what is missing, or --overwrite to start again.",
                )
            if resume:
                existing = Store(self.dir)
                if existing.probe_hash != self.probe_hash:
                    raise DataError(
                        f"Cannot resume '{self.dir}': it was made from different probe data "
                        f"(probe hash {existing.probe_hash[:12]} vs {self.probe_hash[:12]}).",
                        hint="Use a new --out directory, or --overwrite to replace it.",
                    )
                if existing.config_hash != self.config_hash:
                    diff = sorted(k for k in set(existing.config) | set(config) if existing.config.get(k) != config.get(k))
                    raise DataError(
                        f"Cannot resume '{self.dir}': it was made with different settings ({', '.join(diff) or 'layers'}).",
                        hint="Use a new --out directory, or --overwrite to replace it.",
                    )
                self._clean_tmp()
                return
            import shutil

            shutil.rmtree(self.dir)
        (self.dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        tmp, f = _atomic_h5(man)
        with f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["ibscope_version"] = __version__
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["config"] = canonical_json(config)
            f.attrs["config_hash"] = self.config_hash
            f.attrs["probe_hash"] = self.probe_hash
            g = f.create_group("probe")
            g.create_dataset("sample_ids", data=np.asarray(sample_ids, dtype=np.int64))
            if labels is not None:
                g.create_dataset("labels", data=np.asarray(labels))
            if inputs is not None:
                ds = g.create_dataset("inputs", data=np.asarray(inputs, dtype=np.float32).reshape(len(sample_ids), -1),
                                      chunks=True, compression=self.compression,
                                      shuffle=self.compression is not None)
                ds.attrs["input_shape"] = np.asarray(input_shape or inputs.shape[1:], dtype=np.int64)
            lg = f.create_group("layers")
            for name, meta in layers.items():
                lg.create_group(name).attrs["meta"] = canonical_json(meta)
        os.replace(tmp, man)

    def _clean_tmp(self) -> None:
        sd = self.dir / SHARD_DIR
        if sd.exists():
            for p in sd.glob("*.tmp"):
                p.unlink()

    @staticmethod
    def shard_name(epoch: int | None, step: int | None, sha256: str) -> str:
        e = -1 if epoch is None else epoch
        s = -1 if step is None else step
        return f"e{e:06d}_s{s:010d}_{sha256[:12]}.h5"

    def has_checkpoint(self, sha256: str) -> bool:
        """True if a complete shard for this checkpoint (and these settings) exists."""
        h5py = _h5py()
        for p in (self.dir / SHARD_DIR).glob(f"*_{sha256[:12]}.h5"):
            try:
                with h5py.File(p, "r") as f:
                    if (bool(f.attrs.get("complete", False)) and f.attrs.get("config_hash") == self.config_hash
                            and f.attrs.get("checkpoint_sha256") == sha256):
                        return True
            except OSError:
                pass
        return False

    def checkpoint(self, *, epoch: int | None, step: int | None, path: str, sha256: str,
                   metrics: dict | None = None) -> "ShardWriter":
        """A shard writer for one checkpoint. ``metrics``: scalar training metrics found in
        the checkpoint (e.g. {"accuracy": 0.93, "loss": 0.2}), kept for plots."""
        return ShardWriter(self, epoch=epoch, step=step, path=path, sha256=sha256, metrics=metrics)


class ShardWriter:
    """Context manager writing one checkpoint's shard; renamed into place only on success."""

    def __init__(self, store: StoreWriter, *, epoch, step, path, sha256, metrics=None):
        self.store = store
        self.final = store.dir / SHARD_DIR / StoreWriter.shard_name(epoch, step, sha256)
        self.attrs = dict(epoch=-1 if epoch is None else int(epoch), step=-1 if step is None else int(step),
                          checkpoint_path=str(path), checkpoint_sha256=sha256,
                          metrics=canonical_json({k: float(v) for k, v in (metrics or {}).items()}))
        self._rows: dict[str, int] = {}
        self._absmax: dict[str, float] = {}
        self._nonfinite: dict[str, int] = {}
        self._ds: dict = {}  # open dataset handles (h5py lookups are slow per batch)
        self._width: dict[str, int] = {}

    def __enter__(self) -> "ShardWriter":
        self.t0 = time.perf_counter()
        self.tmp, self.f = _atomic_h5(self.final)
        self.f.create_group("acts")
        return self

    def append(self, layer: str, batch: np.ndarray, dtype: str = "float32", *,
               stats: tuple[int, float] | None = None) -> None:
        """Append rows (batch, d) for ``layer``; rows arrive in probe order. ``stats``:
        (non-finite count, max |finite value|) of ``batch`` when the caller already has them."""
        batch = np.asarray(batch)
        if batch.ndim != 2:
            raise DataError(f"Layer '{layer}': expected a (batch, features) array, got shape {batch.shape}.")
        n = self.store.n_samples
        ds = self._ds.get(layer)
        if ds is None:
            ds = self._ds[layer] = self._create(layer, batch.shape[1], dtype)
            self._width[layer] = batch.shape[1]
            self._rows[layer] = 0
            self._absmax[layer] = 0.0
            self._nonfinite[layer] = 0
        r0 = self._rows[layer]
        if batch.shape[1] != self._width[layer]:
            raise DataError(f"Layer '{layer}': batch has {batch.shape[1]} features, earlier batches had {self._width[layer]}.")
        if r0 + batch.shape[0] > n:
            raise DataError(f"Layer '{layer}': more rows than the probe set's {n} samples.")
        if stats is not None:
            self._nonfinite[layer] += int(stats[0])
            self._absmax[layer] = max(self._absmax[layer], float(stats[1]))
        elif batch.size:
            with np.errstate(invalid="ignore", over="ignore"):
                total = np.add.reduce(batch, axis=None, dtype=np.float64)
            if np.isfinite(total):  # fast path: a finite float64 sum means every value is finite
                self._absmax[layer] = max(self._absmax[layer], float(-batch.min()), float(batch.max()))
            else:
                fin = np.isfinite(batch)
                self._nonfinite[layer] += int(batch.size - fin.sum())
                self._absmax[layer] = max(self._absmax[layer], float(np.abs(np.where(fin, batch, 0)).max()))
        ds[r0:r0 + batch.shape[0]] = batch.astype(dtype, copy=False)
        self._rows[layer] = r0 + batch.shape[0]

    def _create(self, layer: str, d: int, dtype: str):
        n = self.store.n_samples
        return self.f["acts"].create_dataset(layer, shape=(n, d), dtype=dtype, chunks=(self.chunk_rows(d, dtype), d),
                                             compression=self.store.compression,
                                             shuffle=self.store.compression is not None)

    def chunk_rows(self, d: int, dtype: str = "float32") -> int:
        """Rows per HDF5 chunk for a layer of width ``d`` (~512 KiB chunks); write in multiples."""
        return int(max(1, min(self.store.n_samples, (512 * 1024) // max(1, d * np.dtype(dtype).itemsize))))

    def promote(self, layer: str, dtype: str = "float32") -> None:
        """Re-create ``layer``'s dataset with a wider ``dtype``, keeping the rows written so far
        (used when float16 storage would overflow). Marks the dataset with ``dtype_fallback``."""
        ds = self.f["acts"].get(layer)
        if ds is None or ds.dtype == np.dtype(dtype):
            return
        kept = ds[: self._rows[layer]].astype(dtype)
        d = ds.shape[1]
        del self.f["acts"][layer]
        ds = self._ds[layer] = self._create(layer, d, dtype)
        ds[: kept.shape[0]] = kept
        ds.attrs["dtype_fallback"] = str(np.dtype(dtype))

    def set_jacobian(self, layer: str, singular_values: np.ndarray, rows: np.ndarray) -> None:
        g = self.f.require_group("jacobian")
        ds = g.create_dataset(layer, data=np.asarray(singular_values, dtype=np.float32))
        ds.attrs["rows"] = np.asarray(rows, dtype=np.int64)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.f.close()
            self.tmp.unlink(missing_ok=True)
            return
        try:
            self._finish()
        except BaseException:  # incl. Ctrl-C while finishing: leave no half-finished *.tmp behind
            if self.f.id.valid:
                self.f.close()
            self.tmp.unlink(missing_ok=True)
            raise

    def _finish(self) -> None:
        n = self.store.n_samples
        for layer, r in self._rows.items():
            if r != n:
                raise DataError(f"Layer '{layer}': wrote {r} rows, expected {n}; shard discarded.")
            ds = self.f["acts"][layer]
            ds.attrs["nonfinite_count"] = self._nonfinite[layer]
            ds.attrs["absmax"] = self._absmax[layer]
        for k, v in self.attrs.items():
            self.f.attrs[k] = v
        self.f.attrs["format"] = FORMAT
        self.f.attrs["format_version"] = FORMAT_VERSION
        self.f.attrs["config_hash"] = self.store.config_hash
        self.f.attrs["n_samples"] = n
        self.f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.f.attrs["wall_time_s"] = time.perf_counter() - self.t0
        self.f.attrs["complete"] = True
        self.f.flush()
        self.f.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.final)
