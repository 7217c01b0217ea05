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
ignore and ``--resume`` deletes. A checkpoint's data is therefore complete or absent. A write
the system refuses (disk full, read-only, I/O error) discards the file being written and raises
:class:`~ibscope.errors.IOFailure` naming it (see :mod:`ibscope._h5io`).

Reading is defensive: every attribute is parsed with type checks and every dataset's declared
shape is compared with what the manifest says (``n_samples``, each layer's ``dims``) before
anything is read; a damaged manifest is a :class:`~ibscope.errors.DataError`. A shard under its
final name that cannot be read, is truncated, lacks ``complete``, is malformed or belongs to
another configuration is one too (naming the file), unless the store is opened with
``skip_bad_shards=True``; ``capture --resume`` deletes such shards (except foreign ones) and
captures them again.

Layout: :mod:`ibscope.store._format` (names, constants, hashes, checkpoint labels),
:mod:`ibscope.store.reader` (:class:`Store`, :func:`open_store`, the integrity checks) and
:mod:`ibscope.store.writer` (:class:`StoreWriter`, :class:`ShardWriter`). Everything is
importable from ``ibscope.store``; code inside ibscope imports from here, so patching
``ibscope.store.open_store`` reaches its callers.
"""

from ibscope.store._format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_DIR,
    SYNC_BYTES,
    CheckpointInfo,
    _h5py,
    _num,
    canonical_json,
    check_layer_name,
    checkpoint_label,
    file_sha256,
    probe_hash,
    resolve_store_dir,
    sha256_bytes,
    shard_name,
)
from ibscope.store.reader import (
    _CHECKED,
    _CHECKED_MAX,
    _MANIFEST_HINT,
    _MAX_LISTED,
    _RACY_NS,
    _SHA_RE,
    _SHARD_HINT,
    _WARNED,
    REPAIRABLE,
    BadShard,
    Store,
    _as_shard_error,
    _data_hint,
    _open_h5,
    _strip,
    log,
    open_store,
)
from ibscope.store.writer import ShardWriter, StoreWriter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHARD_DIR",
    "SYNC_BYTES",
    "_h5py",
    "canonical_json",
    "sha256_bytes",
    "file_sha256",
    "probe_hash",
    "check_layer_name",
    "_num",
    "checkpoint_label",
    "CheckpointInfo",
    "resolve_store_dir",
    "shard_name",
    "log",
    "BadShard",
    "REPAIRABLE",
    "_WARNED",
    "_CHECKED",
    "_CHECKED_MAX",
    "_RACY_NS",
    "_SHA_RE",
    "_MAX_LISTED",
    "_open_h5",
    "Store",
    "_MANIFEST_HINT",
    "_as_shard_error",
    "_SHARD_HINT",
    "_data_hint",
    "_strip",
    "open_store",
    "StoreWriter",
    "ShardWriter",
]
