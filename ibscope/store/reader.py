"""Reading a store: :class:`Store`, :func:`open_store` and the checks of manifest and shards
(see :mod:`ibscope.store`)."""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ibscope._h5io import Attrs, check_storage, describe, h5_message, is_system_error, os_error_of
from ibscope._version import __version__
from ibscope.errors import DataError, ShardError, UsageError, io_error
from ibscope.store._format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_DIR,
    CheckpointInfo,
    _h5py,
    resolve_store_dir,
    sha256_bytes,
    shard_name,
)

log = logging.getLogger("ibscope.store")


class BadShard(DataError):
    """A shard under its final name that is unreadable, incomplete, malformed or foreign."""

    def __init__(self, kind: str, reason: str):
        if kind == "malformed" and not reason.startswith("malformed"):
            reason = "malformed: " + reason
        super().__init__(reason)
        self.kind = kind


#: kinds of bad shards that ``capture --resume`` deletes and captures again; the others
#: ("foreign": another capture configuration, "misnamed": a copy under another name) are
#: not ibscope's to delete
REPAIRABLE = ("unreadable", "incomplete", "malformed")

_WARNED: set[tuple[str, str]] = set()
# Shards checked in this process: path -> (file identity, store identity, what the check found);
# open_store runs once per estimate cell. A shard is never changed in place (capture renames a
# new file over it), so a file with the same device, inode, size and times is the file that was
# checked. As git does for its index ("racy clean"), a file modified less than _RACY_NS before
# its check is not remembered: file times are coarser than the time between two writes.
# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of a shard file
_FileKey = tuple[int, int, int, int, int]
# what a shard's check depends on in the store: config hash, n_samples, (layer, dims) pairs and
# jacobian_samples (values from the manifest's JSON; only compared for equality)
_StoreIdent = tuple[object, ...]
_CHECKED: dict[str, tuple[_FileKey, _StoreIdent, dict[str, Any]]] = {}
_CHECKED_MAX = 200_000
_RACY_NS = 2_000_000_000
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_LISTED = 10


def _open_h5(path: Path, *, label: str, kind: str = "unreadable") -> Any:
    """Open an HDF5 file for reading; content errors become :class:`BadShard` (``kind``), system
    errors (permissions, I/O) an :class:`~ibscope.errors.IOFailure`."""
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, and others for odd files
        err = os_error_of(exc)
        if err is not None and err.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
        if err is not None and is_system_error(exc):
            raise io_error(err, path, "reading") from None
        raise BadShard(kind, f"{label + ' ' if label else ''}truncated, corrupt or not HDF5 "
                             f"({h5_message(exc)})") from None


class Store:
    """Read-only view of an activation store (``open_store(path)``).

    Opening reads the manifest and checks every shard under its final name (``*.h5``) without
    reading activations: it must open as HDF5, carry ``complete``, belong to this store's config
    (``config_hash``), have well-formed attributes and one ``(n_samples, dims)`` dataset per
    layer. A bad shard is a :class:`~ibscope.errors.DataError` naming it, unless
    ``skip_bad_shards``: then it is left out and described in :attr:`skipped`
    (``{"file", "reason", "kind"}``), with one logged warning per shard and process (``warn=False``:
    none, for callers that report the skipped shards themselves).
    """

    def __init__(self, path: str | os.PathLike[str], *, skip_bad_shards: bool = False, warn: bool = True):
        self._held: tuple[Path, Any] | None = None  # (path, open h5py.File) of the shard read last; see _shard
        self._held_lock = threading.RLock()
        self.dir = resolve_store_dir(path)
        self.skip_bad_shards = bool(skip_bad_shards)
        self._warn = warn
        self.skipped: list[dict[str, str]] = []
        man = self.dir / MANIFEST
        if not self.dir.exists():
            raise DataError(f"Activation store not found: '{path}'.", hint="Create one with `ibscope capture ... --out DIR`.")
        if not man.exists():
            raise DataError(
                f"'{path}' is not an ibscope activation store: expected a directory with {MANIFEST}, found none.",
                hint="Pass the --out directory of `ibscope capture`.",
            )
        f, label = self._open_manifest()
        with f:
            try:
                self._read_manifest(f, Attrs(f, label), label)
            except DataError as exc:
                if exc.hint is None:
                    exc.hint = _MANIFEST_HINT
                raise
        self.checkpoints = self._scan()

    # ---------------------------------------------------------------------------------
    def _read_manifest(self, f: Any, at: Attrs, label: str) -> None:
        fmt = at.str("format", None)
        if fmt != FORMAT:
            raise DataError(f"{label} is not an ibscope activation store (format attribute {fmt!r}, expected {FORMAT!r}).",
                            hint="Pass the --out directory of `ibscope capture`.")
        ver = at.int("format_version", -1)
        if ver != FORMAT_VERSION:
            raise DataError(
                f"{label} has store format version {ver}; this ibscope ({__version__}) reads version {FORMAT_VERSION}.",
                hint="Re-capture with this ibscope version, or install the ibscope version that wrote it.",
            )
        self.format_version = ver
        self.config = at.json("config")
        self.config_hash = at.str("config_hash")
        self.probe_hash = at.str("probe_hash")
        self.attrs = {"format": fmt, "format_version": ver, "config": at.str("config"), "config_hash": self.config_hash,
                      "probe_hash": self.probe_hash, "ibscope_version": at.str("ibscope_version", None),
                      "created": at.str("created", None)}
        cfg = self.config
        where = f"{label}: attribute 'config'"
        for key, kinds, what in (("n_samples", int, "an integer"), ("jacobian_samples", int, "an integer"),
                                 ("run", str, "a string"), ("split", str, "a string")):
            v = cfg.get(key)
            if v is not None and (not isinstance(v, kinds) or isinstance(v, bool)):
                raise DataError(f"{where}: '{key}' must be {what}; got {describe(v)}.")
        for key in ("layer_order", "input_shape"):
            v = cfg.get(key)
            elem = str if key == "layer_order" else int
            if v is not None and (not isinstance(v, list) or not all(isinstance(e, elem) and not isinstance(e, bool)
                                                                      for e in v)):
                raise DataError(f"{where}: '{key}' must be a list of {'names' if elem is str else 'integers'}; "
                                f"got {describe(v)}.")

        ids = self._dataset(f, "probe/sample_ids", label)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise DataError(f"{label}: dataset 'probe/sample_ids' must be a 1-D integer array; "
                            f"got shape {ids.shape} ({ids.dtype}).")
        n = int(ids.shape[0])
        if cfg.get("n_samples") is not None and cfg["n_samples"] != n:
            raise DataError(f"{label}: dataset 'probe/sample_ids' has {n} rows but the config says n_samples = "
                            f"{cfg['n_samples']}.")
        self.sample_ids = self._read(ids, f"{label}, dataset 'probe/sample_ids'", hint=_MANIFEST_HINT)
        self.labels = None
        if "probe/labels" in f:
            lab = self._dataset(f, "probe/labels", label)
            if lab.ndim not in (1, 2) or lab.shape[0] != n or lab.dtype.kind not in "iubf":
                raise DataError(f"{label}: dataset 'probe/labels' has shape {lab.shape} ({lab.dtype}); expected "
                                f"({n},) numbers, one label per probe sample.")
            self.labels = self._read(lab, f"{label}, dataset 'probe/labels'", hint=_MANIFEST_HINT)
        self.has_inputs = "probe/inputs" in f
        self.input_shape = None
        if self.has_inputs:
            inp = self._dataset(f, "probe/inputs", label)
            shape = tuple(int(s) for s in Attrs(inp, f"{label}, dataset 'probe/inputs'").int_array("input_shape", max_len=16))
            if any(s < 0 for s in shape):
                raise DataError(f"{label}, dataset 'probe/inputs': attribute 'input_shape' has negative sizes {shape}.")
            width = math.prod(shape)
            if inp.shape != (n, width) or inp.dtype.kind != "f":
                raise DataError(f"{label}: dataset 'probe/inputs' has shape {inp.shape} ({inp.dtype}); expected "
                                f"({n}, {width}) floats (n_samples x prod(input_shape {shape})).")
            self.input_shape = shape
        if "layers" not in f or not isinstance(f["layers"], _h5py().Group):
            raise DataError(f"{label} has no group 'layers'.")
        self._layer_meta: dict[str, dict[str, Any]] = {}
        for name in f["layers"]:
            g = f["layers"][name]
            meta = Attrs(g, f"{label}, group 'layers/{name}'").json("meta")
            d = meta.get("dims")  # written by capture; optional for stores written through StoreWriter
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
                raise DataError(f"{label}, group 'layers/{name}': attribute 'meta': 'dims' must be an integer >= 1; "
                                f"got {describe(d)}.")
            rs = meta.get("raw_shape")
            if rs is not None and (not isinstance(rs, list) or not all(isinstance(e, int) and not isinstance(e, bool)
                                                                       for e in rs)):
                raise DataError(f"{label}, group 'layers/{name}': attribute 'meta': 'raw_shape' must be a list of "
                                f"integers; got {describe(rs)}.")
            self._layer_meta[name] = meta
        order = cfg.get("layer_order") or list(self._layer_meta)
        self.layers = [n for n in order if n in self._layer_meta] + [n for n in self._layer_meta if n not in order]

    @staticmethod
    def _dataset(f: Any, key: str, label: str) -> Any:
        try:
            obj = f.get(key)
        except Exception as exc:  # noqa: BLE001
            err = os_error_of(exc)
            if err is not None and is_system_error(exc):
                raise io_error(err, f.filename, "reading") from None
            raise DataError(f"{label}: '{key}' cannot be read ({h5_message(exc)}).") from None
        if obj is None:
            raise DataError(f"{label} has no dataset '{key}'.")
        if not isinstance(obj, _h5py().Dataset):
            raise DataError(f"{label}: '{key}' must be a dataset; got {type(obj).__name__}.")
        return obj

    @staticmethod
    def _read(ds: Any, label: str, sel: tuple[slice | int, ...] | slice | int = (), hint: str | None = None) -> np.ndarray:
        """Read a dataset whose shape was checked, after checking that the file holds its bytes."""
        check_storage(ds, label)
        try:
            data: np.ndarray = ds[sel]
            return data
        except Exception as exc:  # noqa: BLE001
            err = os_error_of(exc)
            if err is not None and is_system_error(exc):
                raise io_error(err, ds.file.filename, "reading") from None
            raise DataError(f"{label} cannot be read ({h5_message(exc)}); the file is corrupt.",
                            hint=hint or _SHARD_HINT) from None

    # ---------------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.sample_ids.shape[0])

    def layer_meta(self, name: str) -> dict[str, Any]:
        if name not in self._layer_meta:
            from ibscope.errors import unknown_name

            raise unknown_name("layer", name, self._layer_meta)
        return self._layer_meta[name]

    def _open_manifest(self) -> tuple[Any, str]:
        """The opened manifest (h5py File) and how messages name it; a damaged file is a DataError."""
        label = f"'{self.dir / MANIFEST}'"
        try:
            return _open_h5(self.dir / MANIFEST, label=f"{label} is"), label
        except BadShard as exc:
            raise DataError(f"{exc.message}.", hint=_MANIFEST_HINT) from None

    def inputs(self) -> np.ndarray | None:
        if not self.has_inputs:
            return None
        f, label = self._open_manifest()
        with f:
            ds = self._dataset(f, "probe/inputs", label)
            width = math.prod(self.input_shape or ())  # has_inputs: the manifest gives the shape
            if ds.shape != (self.n_samples, width):
                raise DataError(f"{label}: dataset 'probe/inputs' has shape {ds.shape}; expected "
                                f"({self.n_samples}, {width}).", hint=_MANIFEST_HINT)
            return self._read(ds, f"{label}, dataset 'probe/inputs'", hint=_MANIFEST_HINT)

    def _scan(self) -> list[CheckpointInfo]:
        sd = self.dir / SHARD_DIR
        if not sd.exists():
            return []
        infos, bad = [], []
        ident = (self.config_hash, self.n_samples, tuple((n, self._layer_meta[n].get("dims")) for n in self.layers),
                 self.config.get("jacobian_samples"))
        for p in sorted(sd.glob("*.h5")):
            try:
                st = os.stat(p)
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                hit = _CHECKED.get(str(p))
                if hit is not None and hit[0] == key and hit[1] == ident:
                    infos.append(dict(hit[2], shard=p, metrics=dict(hit[2]["metrics"]), dtypes=dict(hit[2]["dtypes"])))
                    continue
                info = self._check_shard(p)
                if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
                    if len(_CHECKED) >= _CHECKED_MAX:
                        _CHECKED.clear()
                    _CHECKED[str(p)] = (key, ident, dict(info, metrics=dict(info["metrics"]), dtypes=dict(info["dtypes"])))
                infos.append(info)
            except BadShard as exc:
                bad.append({"file": str(p), "reason": exc.message, "kind": exc.kind})
            except FileNotFoundError:
                continue  # removed since the listing (a --resume repairing it): absent
        if bad and not self.skip_bad_shards:
            raise self._bad_shards_error(bad, len(infos))
        self.skipped = bad
        for b in bad if self._warn else ():
            seen = (b["file"], b["reason"])
            if seen not in _WARNED:
                _WARNED.add(seen)
                log.warning("Skipping bad shard '%s': %s.", b["file"], b["reason"])
        from ibscope._order import sort_series

        # the order capture uses: by step when every checkpoint has one, else epoch, else name
        infos = sort_series(infos, lambda t: t["epoch_exact"], lambda t: t["step"], lambda t: t["path"])
        return [CheckpointInfo(index=i, **t) for i, t in enumerate(infos)]

    def _bad_shards_error(self, bad: list[dict[str, str]], n_good: int) -> DataError:
        lines = [f"  '{b['file']}': {b['reason']}." for b in bad[:_MAX_LISTED]]
        if len(bad) > _MAX_LISTED:
            lines.append(f"  ... and {len(bad) - _MAX_LISTED} more.")
        n = len(bad)
        msg = (f"Activation store '{self.dir}' has {n} bad shard{'s' if n > 1 else ''} "
               f"({n_good} good):\n" + "\n".join(lines))
        kinds = {b["kind"] for b in bad}
        hints = []
        if kinds & set(REPAIRABLE):
            hints.append("re-run `ibscope capture ... --resume` with the options of the original capture: it deletes "
                         "truncated, corrupt or incomplete shards and captures those checkpoints again")
        if kinds - set(REPAIRABLE):
            hints.append("move a shard of another capture (or a copy under another name) out of "
                         f"'{self.dir / SHARD_DIR}'")
        hints.append(f"or pass --skip-bad-shards to go on with the {n_good} good checkpoint{'s' if n_good != 1 else ''} "
                     "(the skipped shards are listed)")
        hint = "; ".join(hints)
        return DataError(msg, hint=hint[0].upper() + hint[1:] + ".")

    def _check_shard(self, p: Path) -> dict[str, Any]:
        """Attributes and dataset shapes of one shard (no activations are read)."""
        h5py = _h5py()
        with _open_h5(p, label="") as f:
            at = Attrs(f, "it")
            try:
                complete = at.bool("complete", False)
            except DataError as exc:
                raise BadShard("malformed", _strip(exc.message)) from None
            if not complete:
                raise BadShard("incomplete", "incomplete: it has no 'complete' mark (its capture did not finish)")
            try:
                fmt = at.str("format", None)
                if fmt is not None and fmt != FORMAT:
                    raise BadShard("foreign", f"not an ibscope shard (format attribute {fmt!r})")
                ch = at.str("config_hash")
                if ch != self.config_hash:
                    raise BadShard("foreign", f"of another capture configuration (config hash {ch[:12]!r}; "
                                              f"this store's is {self.config_hash[:12]!r})")
                n = at.int("n_samples")
                if n != self.n_samples:
                    raise BadShard("malformed", f"attribute 'n_samples' is {n}; the store's probe set has "
                                                f"{self.n_samples} samples")
                epoch = at.int("epoch", minimum=-1)
                step = at.int("step", minimum=-1)
                sha = at.str("checkpoint_sha256")
                if not _SHA_RE.match(sha):
                    raise BadShard("malformed", f"attribute 'checkpoint_sha256' is not a SHA-256 hex digest: {sha[:80]!r}")
                ck_path = at.str("checkpoint_path")
                metrics = at.json("metrics", "{}")
                for k, v in metrics.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        raise BadShard("malformed", f"attribute 'metrics': {k!r} must be a number; got {describe(v)}")
                src = at.str("epoch_source", "")
                step_src = at.str("step_source", "")
                epoch_exact = at.float("epoch_exact", None)
                if epoch_exact is not None and not math.isfinite(epoch_exact):
                    raise BadShard("malformed", f"attribute 'epoch_exact' is {epoch_exact}; expected a finite number")
            except BadShard:
                raise
            except DataError as exc:
                raise BadShard("malformed", _strip(exc.message)) from None
            expected = shard_name(None if epoch < 0 else epoch, None if step < 0 else step, sha)
            if p.name != expected:
                raise BadShard("misnamed", f"misnamed: its attributes (epoch {epoch}, step {step}, checkpoint {sha[:12]}) "
                                           f"give the name '{expected}'; a copy or a renamed file")
            dtypes, dtypes_width = {}, {}
            acts = f.get("acts")
            if not isinstance(acts, h5py.Group):
                raise BadShard("malformed", "it has no group 'acts'")
            for layer in self.layers:
                ds = acts.get(layer)
                if not isinstance(ds, h5py.Dataset):
                    raise BadShard("malformed", f"it has no dataset 'acts/{layer}'")
                dims = self._layer_meta[layer].get("dims")
                if ds.ndim != 2 or ds.shape[0] != self.n_samples or (dims is not None and ds.shape[1] != dims):
                    want = f"({self.n_samples}, {dims if dims is not None else 'd'})"
                    raise BadShard("malformed", f"dataset 'acts/{layer}' has shape {ds.shape}; expected {want} "
                                                "(n_samples x the layer's dims)")
                if ds.dtype not in (np.float16, np.float32):
                    raise BadShard("malformed", f"dataset 'acts/{layer}' has dtype {ds.dtype}; expected float16 or float32")
                dtypes[layer] = str(ds.dtype)
                dtypes_width[layer] = int(ds.shape[1])
            jac = []
            if "jacobian" in f:
                g = f["jacobian"]
                if not isinstance(g, h5py.Group):
                    raise BadShard("malformed", "'jacobian' is not a group")
                m_max = min(self.n_samples, int(self.config.get("jacobian_samples") or self.n_samples))
                for layer in g:
                    ds = g[layer]
                    if layer not in self._layer_meta or not isinstance(ds, h5py.Dataset):
                        raise BadShard("malformed", f"'jacobian/{layer}' is not a Jacobian dataset of a layer of this store")
                    dims = self._layer_meta[layer].get("dims") or dtypes_width.get(layer, 0)
                    if ds.ndim != 2 or ds.shape[0] > m_max or ds.shape[1] > dims or ds.dtype.kind != "f":
                        raise BadShard("malformed", f"dataset 'jacobian/{layer}' has shape {ds.shape} ({ds.dtype}); "
                                                    f"expected (m <= {m_max}, r <= {dims}) floats")
                    try:
                        rows = Attrs(ds, f"dataset 'jacobian/{layer}'").int_array("rows", max_len=m_max)
                    except DataError as exc:
                        raise BadShard("malformed", _strip(exc.message)) from None
                    if rows.shape != (ds.shape[0],) or (rows.size and (rows.min() < 0 or rows.max() >= self.n_samples)):
                        raise BadShard("malformed", f"dataset 'jacobian/{layer}': attribute 'rows' must hold "
                                                    f"{ds.shape[0]} probe rows in [0, {self.n_samples})")
                    jac.append(layer)
        return {"epoch": epoch if epoch >= 0 else None, "step": step if step >= 0 else None, "path": ck_path,
                "sha256": sha, "shard": p, "metrics": {k: float(v) for k, v in metrics.items()}, "dtypes": dtypes,
                "jacobian_layers": tuple(sorted(jac)), "epoch_source": src, "step_source": step_src,
                "epoch_exact": epoch_exact if epoch_exact is not None else (float(epoch) if epoch >= 0 else None)}

    def _ckpt(self, ckpt: CheckpointInfo | int) -> CheckpointInfo:
        if isinstance(ckpt, CheckpointInfo):
            return ckpt
        try:
            return self.checkpoints[ckpt]
        except IndexError:
            raise UsageError(f"Checkpoint index {ckpt} out of range: the store holds {len(self.checkpoints)}.") from None

    def _open_shard(self, c: CheckpointInfo) -> Any:
        try:
            return _open_h5(c.shard, label=f"Shard '{c.shard}' is")
        except BadShard as exc:
            raise DataError(f"{exc.message}.", hint=_SHARD_HINT) from None

    # One shard is kept open between reads: reading every layer of a checkpoint (as
    # ``ibscope estimate`` does, layer after layer) opens its shard once, not once per layer.
    # It is closed when another shard is read, on a failed read, by close() and on leaving a
    # ``with store:`` block. Shards are never modified once under their final name.
    @contextmanager
    def _shard(self, c: CheckpointInfo) -> Iterator[Any]:
        with self._held_lock:
            held = self._held
            if held is not None and held[0] == c.shard:
                f = held[1]
            else:
                self.close()
                f = self._open_shard(c)
                self._held = (c.shard, f)
            try:
                yield f
            except BaseException:
                self.close()  # a read failed: the next one opens the shard afresh
                raise

    def close(self) -> None:
        """Close the shard kept open between reads (if any). The store stays usable."""
        held, self._held = self._held, None
        if held is not None:
            try:
                held[1].close()
            except Exception:  # noqa: BLE001 - closing a file that is already unusable
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_held"] = None  # open files and locks do not travel
        state.pop("_held_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._held_lock = threading.RLock()

    def activations(self, ckpt: CheckpointInfo | int, layer: str) -> np.ndarray:
        """The (n_samples, n_features) activations of ``layer`` at ``ckpt``. A shard found damaged
        on reading raises :class:`~ibscope.errors.ShardError` (exit code 4) naming it."""
        with _as_shard_error():
            return self._activations(ckpt, layer)

    def _activations(self, ckpt: CheckpointInfo | int, layer: str) -> np.ndarray:
        c = self._ckpt(ckpt)
        dims = self.layer_meta(layer).get("dims")
        with self._shard(c) as f:
            key = f"acts/{layer}"
            label = f"Shard '{c.shard}', dataset '{key}'"
            if key not in f:
                raise DataError(f"Shard {c.shard.name} holds no activations for layer '{layer}'.", hint=_SHARD_HINT)
            ds = f[key]
            if (not isinstance(ds, _h5py().Dataset) or ds.ndim != 2 or ds.shape[0] != self.n_samples
                    or (dims is not None and ds.shape[1] != dims)):
                raise DataError(f"{label} has shape {getattr(ds, 'shape', None)}; expected ({self.n_samples}, "
                                f"{dims if dims is not None else 'd'}).", hint=_SHARD_HINT)
            return self._read(ds, label, hint=_data_hint(c.shard))

    def jacobian(self, ckpt: CheckpointInfo | int, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(singular values (m, r), probe rows (m,)) of d layer / d input, or None if not captured.
        A damaged shard raises :class:`~ibscope.errors.ShardError`."""
        with _as_shard_error():
            return self._jacobian(ckpt, layer)

    def _jacobian(self, ckpt: CheckpointInfo | int, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
        c = self._ckpt(ckpt)
        with self._shard(c) as f:
            key = f"jacobian/{layer}"
            if key not in f:
                return None
            ds = f[key]
            label = f"Shard '{c.shard}', dataset '{key}'"
            dims = self.layer_meta(layer).get("dims")
            if (not isinstance(ds, _h5py().Dataset) or ds.ndim != 2 or ds.shape[0] > self.n_samples
                    or (dims is not None and ds.shape[1] > dims)):
                raise DataError(f"{label} has shape {getattr(ds, 'shape', None)}; expected (m <= {self.n_samples}, "
                                f"r <= {dims if dims is not None else 'the layer width'}).", hint=_SHARD_HINT)
            rows = Attrs(ds, label).int_array("rows", max_len=self.n_samples)
            if rows.shape != (ds.shape[0],):
                raise DataError(f"{label}: attribute 'rows' has {rows.size} entries; expected {ds.shape[0]}.",
                                hint=_SHARD_HINT)
            return self._read(ds, label, hint=_data_hint(c.shard)), rows[()]

    def content_hash(self) -> str:
        """Hash of what the store holds: config, probe, and the list of captured checkpoints."""
        parts = [self.config_hash.encode(), self.probe_hash.encode()]
        parts += [c.sha256.encode() for c in self.checkpoints]
        return sha256_bytes(*parts)

    def summary(self) -> dict[str, Any]:
        """What the store holds, as plain JSON-able data (``ibscope info``): format, probe set,
        labels, inputs, capture config, layers with their metadata, complete checkpoints (epoch,
        step and where they came from, metrics, stored dtypes, Jacobian layers) and the shards
        skipped as bad. Reads attributes only, no activations."""
        ckpts = [{"index": c.index, "epoch": c.epoch, "step": c.step, "epoch_exact": c.epoch_exact, "label": c.label,
                  "path": c.path, "sha256": c.sha256[:12], "order_from": c.epoch_source or c.step_source,
                  "epoch_source": c.epoch_source, "step_source": c.step_source, "metrics": c.metrics,
                  "dtypes": sorted(set(c.dtypes.values())), "jacobian_layers": len(c.jacobian_layers)}
                 for c in self.checkpoints]
        labels = None
        if self.labels is not None:
            classes = len(set(self.labels.reshape(len(self.labels), -1)[:, 0].tolist()))
            labels = {"dtype": str(self.labels.dtype), "classes": int(classes)}
        return {
            "store": str(self.dir), "format_version": self.format_version,
            "ibscope_version": self.attrs.get("ibscope_version"), "created": self.attrs.get("created"),
            "n_samples": self.n_samples, "labels": labels,
            "inputs": [int(s) for s in self.input_shape or ()] if self.has_inputs else None, "config": self.config,
            "layers": {n: self.layer_meta(n) for n in self.layers}, "checkpoints": ckpts,
            "skipped": [{"file": b["file"], "reason": b["reason"]} for b in self.skipped],
        }


_MANIFEST_HINT = ("The store's manifest is damaged or was not written by ibscope; re-capture the store "
                  "(`ibscope capture ... --overwrite`).")
@contextmanager
def _as_shard_error() -> Iterator[None]:
    """Data errors met while reading a shard's datasets are :class:`ShardError` (the shard is
    damaged); usage errors (unknown layer, checkpoint index) and I/O failures pass unchanged."""
    try:
        yield
    except ShardError:
        raise
    except DataError as exc:
        raise ShardError(exc.message, hint=exc.hint) from None


_SHARD_HINT = ("Re-run `ibscope capture ... --resume` with the options of the original capture: it deletes corrupt "
               "shards and captures them again; or pass --skip-bad-shards.")


def _data_hint(shard: Path) -> str:
    # the store's check reads no data, so --resume alone keeps a shard whose data is damaged
    return (f"Delete '{shard}' and re-run `ibscope capture ... --resume` with the options of the original capture "
            "to capture that checkpoint again.")


def _strip(msg: str) -> str:
    """A shard-check message without the leading "it: " and the final period."""
    if msg.startswith("it: "):
        msg = msg[len("it: "):]
    elif msg.startswith("it "):
        msg = msg[len("it "):]
    return msg.rstrip(".")


def open_store(path: str | os.PathLike[str], *, skip_bad_shards: bool = False) -> Store:
    """Open an activation store for reading.

    A shard under its final name that cannot be read, is truncated, lacks ``complete``, is
    malformed or belongs to another capture configuration raises
    :class:`~ibscope.errors.DataError` (exit code 4) naming it and how to repair it. With
    ``skip_bad_shards=True`` such shards are left out and listed in ``Store.skipped``
    (dicts with ``file``, ``reason`` and ``kind``), with one warning per shard and process.
    ``*.tmp`` files (leftovers of an interrupted capture) are ignored.
    """
    return Store(path, skip_bad_shards=skip_bad_shards)

