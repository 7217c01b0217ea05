"""Writing a store: :class:`StoreWriter` (create or resume) and :class:`ShardWriter` (one shard)
(see :mod:`ibscope.store`)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ibscope._h5io import AtomicH5
from ibscope._version import __version__
from ibscope.errors import DataError, UsageError, io_error
from ibscope.store._format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_DIR,
    SYNC_BYTES,
    canonical_json,
    check_layer_name,
    probe_hash,
    resolve_store_dir,
    sha256_bytes,
    shard_name,
)
from ibscope.store.reader import _MAX_LISTED, REPAIRABLE, Store

log = logging.getLogger("ibscope.store")


class StoreWriter:
    """Creates (or resumes) a store and writes one shard per checkpoint."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: dict[str, Any],
        sample_ids: np.ndarray,
        labels: np.ndarray | None,
        layers: dict[str, dict[str, Any]],
        inputs: np.ndarray | None = None,
        input_shape: tuple[int, ...] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        compression: str = "lzf",
        replace_empty: bool = False,
    ):
        """``replace_empty``: replace an existing store that holds no shard at all (left by a
        capture that stopped before its first checkpoint) as if ``overwrite`` were given;
        ``capture`` passes it while holding the store's writer lock."""
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
        self.layer_dims = {name: meta.get("dims") for name, meta in layers.items()}
        self._have: set[str] = set()
        self._points: set[tuple[float | None, int | None]] = set()
        #: True when this writer made the store (new, or replacing one); shards committed since
        self.created = False
        self.written = 0
        man = self.dir / MANIFEST
        if replace_empty and man.exists() and not overwrite and self._holds_nothing():
            # a store left by a capture that stopped before its first checkpoint: nothing to keep
            log.info("Replacing the empty store '%s' (no checkpoint was captured into it).", self.dir)
            overwrite, resume = True, False
        if man.exists():
            if not (resume or overwrite):
                raise UsageError(
                    f"Store '{self.dir}' already exists.",
                    hint="Pass --resume to capture only what is missing, or --overwrite to start again.",
                )
            if resume:
                self._resume(config, layers)
                return
            import shutil

            try:
                shutil.rmtree(self.dir)
            except OSError as exc:
                raise io_error(exc, exc.filename or self.dir, "removing the old store") from None
        created = not self.dir.exists()
        self._made_dir = created
        self.created = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._clean_tmp()
            with AtomicH5(man) as w:
                f = w.f
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
                w.check()
                if inputs is not None:
                    ds = g.create_dataset("inputs", data=np.asarray(inputs, dtype=np.float32).reshape(len(sample_ids), -1),
                                          chunks=True, compression=self.compression,
                                          shuffle=self.compression is not None)
                    ds.attrs["input_shape"] = np.asarray(input_shape or inputs.shape[1:], dtype=np.int64)
                    w.check()
                lg = f.create_group("layers")
                for name, meta in layers.items():
                    lg.create_group(name).attrs["meta"] = canonical_json(meta)
            (self.dir / SHARD_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            self._undo_create(created)
            raise io_error(exc, exc.filename or self.dir, "creating the store") from None
        except BaseException:
            self._undo_create(created)
            raise

    @classmethod
    def attach(cls, path: str | os.PathLike[str], *, config_hash: str, n_samples: int, layer_dims: dict[str, int],
               compression: str | None = "lzf") -> StoreWriter:
        """A writer of shards into an existing store whose manifest another process wrote and
        whose lock that process holds: a cluster worker capturing one checkpoint of it (see
        :mod:`ibscope.executor`). Shards are written exactly as by the creating writer."""
        self = cls.__new__(cls)
        self.dir = resolve_store_dir(path)
        self.compression = None if compression in (None, "none") else compression
        self.config, self.config_hash, self.probe_hash = {}, config_hash, ""
        self.n_samples = int(n_samples)
        self.layer_dims = dict(layer_dims)
        self._have, self._points = set(), set()
        self.created, self.written, self._made_dir = False, 0, False
        return self

    @staticmethod
    def _moved(existing: Store, config: dict[str, Any], layers: dict[str, dict[str, Any]], diff: list[str]) -> str | None:
        """A store captured from another folder: only the model file's and the probe file's paths
        differ (same file names; the probe hash is already equal). Returns what moved, else None."""
        if not diff or not set(diff) <= {"model", "probe"}:
            return None
        def name(spec: str) -> tuple[str, str]:  # "/a/b/models.py:MLP" -> ("models.py", "MLP")
            path, colon, attr = spec.rpartition(":")
            return (Path(path).name, attr) if colon and "/" not in attr else (Path(spec).name, "")

        for k in diff:
            if name(str(existing.config.get(k) or "")) != name(str(config.get(k) or "")):
                return None
        alt = {**config, **{k: existing.config.get(k) for k in diff}}
        if sha256_bytes(canonical_json({"config": alt, "layers": layers}).encode()) != existing.config_hash:
            return None
        return ", ".join(f"{k} '{existing.config.get(k)}'" for k in diff)

    def _holds_nothing(self) -> bool:
        """True when the store has a manifest but no shard, complete or not, and no lock holder
        is writing one (the caller holds the writer lock)."""
        sd = self.dir / SHARD_DIR
        if not sd.is_dir():
            return not any(p.name not in (MANIFEST, MANIFEST + ".tmp") for p in self.dir.iterdir())
        if any(sd.iterdir()):
            return False
        return not any(p.name not in (MANIFEST, MANIFEST + ".tmp", SHARD_DIR) for p in self.dir.iterdir())

    def remove_new_store(self) -> None:
        """Remove the store this writer created while it holds no checkpoint (a capture that
        failed before its first one), so that the same command can be run again."""
        if not self.created or self.written:
            return
        try:
            (self.dir / MANIFEST).unlink(missing_ok=True)
            self._clean_tmp()
        except OSError:
            return
        self._undo_create(self._made_dir)
        log.debug("Removed the empty store '%s' left by the failed capture.", self.dir)

    def _undo_create(self, created: bool) -> None:
        """After a failed start: leave no half-made store (a manifest-less folder blocks a retry)."""
        for p in (self.dir / SHARD_DIR, self.dir):
            if p == self.dir and not created:
                break
            try:
                p.rmdir()  # only if empty: never deletes anything else
            except OSError:
                pass

    def _resume(self, config: dict[str, Any], layers: dict[str, dict[str, Any]]) -> None:
        existing = Store(self.dir, skip_bad_shards=True, warn=False)
        if existing.probe_hash != self.probe_hash:
            raise DataError(
                f"Cannot resume '{self.dir}': it was made from different probe data "
                f"(probe hash {existing.probe_hash[:12]} vs {self.probe_hash[:12]}).",
                hint="Use a new --out directory, or --overwrite to replace it.",
            )
        if existing.config_hash != self.config_hash:
            diff = sorted(k for k in set(existing.config) | set(config) if existing.config.get(k) != config.get(k))
            moved = self._moved(existing, config, layers, diff)
            if moved is None:
                shown = "; ".join(f"{k}: {existing.config.get(k)!r} then, {config.get(k)!r} now" for k in diff[:4])
                raise DataError(
                    f"Cannot resume '{self.dir}': it was made with different settings "
                    f"({shown or 'the layers differ'}).",
                    hint="Use a new --out directory, or --overwrite to replace it.",
                )
            # the same capture run from another folder: keep the store's own config (and hash)
            log.warning("Resuming '%s', captured with %s; the same files are now at other paths (same file names, "
                        "same probe data).", self.dir, moved)
            self.config, self.config_hash = dict(existing.config), existing.config_hash
        alien = [b for b in existing.skipped if b["kind"] not in REPAIRABLE]
        if alien:
            lines = "\n".join(f"  '{b['file']}': {b['reason']}." for b in alien[:_MAX_LISTED])
            raise DataError(
                f"Cannot resume '{self.dir}': {len(alien)} shard(s) do not belong to it:\n{lines}",
                hint=f"Move them out of '{self.dir / SHARD_DIR}' (they may belong to another store), then re-run "
                     "with --resume.")
        for b in existing.skipped:
            try:
                Path(b["file"]).unlink(missing_ok=True)
            except OSError as exc:
                raise io_error(exc, b["file"], "removing a corrupt shard") from None
            log.warning("Removed bad shard '%s' (%s); its checkpoint is captured again.", b["file"], b["reason"])
        self._have = {c.sha256 for c in existing.checkpoints}
        self._points = {(c.epoch_exact, c.step) for c in existing.checkpoints}
        try:
            (self.dir / SHARD_DIR).mkdir(exist_ok=True)
            self._clean_tmp()
        except OSError as exc:
            raise io_error(exc, exc.filename or self.dir / SHARD_DIR, "cleaning up the store") from None

    def _clean_tmp(self) -> None:
        sd = self.dir / SHARD_DIR
        for p in [*(sd.glob("*.tmp") if sd.exists() else ()), self.dir / (MANIFEST + ".tmp")]:
            p.unlink(missing_ok=True)

    @staticmethod
    def shard_name(epoch: int | None, step: int | None, sha256: str) -> str:
        return shard_name(epoch, step, sha256)

    def has_checkpoint(self, sha256: str) -> bool:
        """True if the store held a good shard of this checkpoint when it was opened for resuming."""
        return sha256 in self._have

    def has_point(self, epoch: float | None, step: int | None) -> bool:
        """True if the store held a good shard at this (epoch, step) when it was opened for
        resuming (``epoch`` as recorded, fractions included)."""
        return (None if epoch is None else float(epoch), step) in self._points and (epoch is not None or step is not None)

    def checkpoint(self, *, epoch: int | None, step: int | None, path: str, sha256: str,
                   metrics: dict[str, float] | None = None) -> ShardWriter:
        """A shard writer for one checkpoint. ``metrics``: scalar training metrics found in
        the checkpoint (e.g. {"accuracy": 0.93, "loss": 0.2}), kept for plots."""
        return ShardWriter(self, epoch=epoch, step=step, path=path, sha256=sha256, metrics=metrics)


class ShardWriter:
    """Context manager writing one checkpoint's shard; renamed into place only on success.

    Every write goes through :class:`~ibscope._h5io.AtomicH5`: a write the system refuses
    (disk full, I/O error) raises :class:`~ibscope.errors.IOFailure` naming the shard, and
    leaves no ``*.tmp`` behind.
    """

    def __init__(self, store: StoreWriter, *, epoch: int | None, step: int | None, path: str, sha256: str,
                 metrics: dict[str, float] | None = None):
        self.store = store
        self.final = store.dir / SHARD_DIR / StoreWriter.shard_name(epoch, step, sha256)
        self.attrs = dict(epoch=-1 if epoch is None else int(epoch), step=-1 if step is None else int(step),
                          checkpoint_path=str(path), checkpoint_sha256=sha256,
                          metrics=canonical_json({k: float(v) for k, v in (metrics or {}).items()}))
        self._rows: dict[str, int] = {}
        self._absmax: dict[str, float] = {}
        self._nonfinite: dict[str, int] = {}
        self._ds: dict[str, Any] = {}  # open dataset handles (h5py lookups are slow per batch)
        self._width: dict[str, int] = {}
        self._unsynced = 0  # bytes appended since the last sync_data()
        self._w: AtomicH5 | None = None
        self.f: Any = None  # the open h5py.File while writing (h5py is untyped)

    @property
    def w(self) -> AtomicH5:
        """The atomic file being written (inside the with-block)."""
        if self._w is None:
            raise RuntimeError("ShardWriter is used outside its with-block")
        return self._w

    @property
    def tmp(self) -> Path:
        return self.final.with_name(self.final.name + ".tmp")

    def __enter__(self) -> ShardWriter:
        self.t0 = time.perf_counter()
        self._w = AtomicH5(self.final)
        self.f = self._w.f
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
            if layer not in self.store.layer_dims:
                raise DataError(f"Layer '{layer}' is not a layer of this store ({', '.join(self.store.layer_dims)}).")
            want = self.store.layer_dims[layer]
            if want is not None and batch.shape[1] != want:
                raise DataError(f"Layer '{layer}': batch has {batch.shape[1]} features; the store's layer metadata "
                                f"says {want} (dims).")
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
        self._unsynced += batch.shape[0] * batch.shape[1] * np.dtype(dtype).itemsize
        if self._unsynced >= SYNC_BYTES:  # flush to disk as we go: the fsync at the end is short
            self._unsynced = 0
            raw = self.w.raw
            if raw is not None:  # the open shard's file (set while writing)
                raw.sync_data()
        self.w.check()

    def _create(self, layer: str, d: int, dtype: str) -> Any:
        n = self.store.n_samples
        # no chunk cache (1 byte: every chunk is larger): rows are written in whole chunks, so each
        # write goes (compressed) to the file at once, in the capture's writer thread, instead of
        # waiting in the cache until the shard is closed. fletcher32: a checksum per chunk, so that
        # a chunk damaged on disk is an error when read, with or without compression
        ds = self.f["acts"].create_dataset(layer, shape=(n, d), dtype=dtype, chunks=(self.chunk_rows(d, dtype), d),
                                           compression=self.store.compression,
                                           shuffle=self.store.compression is not None, fletcher32=True,
                                           rdcc_nbytes=1)
        self.w.check()
        return ds

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
        self.w.check()

    def mark_fallback(self, layer: str, dtype: str = "float32") -> None:
        """Record on ``layer``'s dataset that float16 overflowed and ``dtype`` was used."""
        self.f["acts"][layer].attrs["dtype_fallback"] = dtype
        self.w.check()

    def set_jacobian(self, layer: str, singular_values: np.ndarray, rows: np.ndarray) -> None:
        g = self.f.require_group("jacobian")
        ds = g.create_dataset(layer, data=np.asarray(singular_values, dtype=np.float32))
        ds.attrs["rows"] = np.asarray(rows, dtype=np.int64)
        self.w.check()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._finish()
        except BaseException:  # incl. Ctrl-C while finishing: leave no half-finished *.tmp behind
            self._discard()
            raise
        finally:
            self._ds.clear()

    def _discard(self) -> None:
        self._ds.clear()
        if self._w is not None:
            self._w.abort()

    def _finish(self) -> None:
        n = self.store.n_samples
        for layer, r in self._rows.items():
            if r != n:
                raise DataError(f"Layer '{layer}': wrote {r} rows, expected {n}; shard discarded.")
        missing = [name for name in self.store.layer_dims if name not in self._rows]
        if missing:
            raise DataError(f"No activations written for layer(s) {', '.join(missing)}; shard discarded.")
        for layer in self._rows:
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
        self._ds.clear()
        self.w.commit()
        self.store.written += 1
