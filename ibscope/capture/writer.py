"""Writing captured batches off the forward path.

The forward loop of a capture (:func:`run_probe`) only runs the model: its hooks copy and
reduce each selected layer's output (that copy must happen inside the hook, see
:mod:`ibscope.capture.hooks`) and the loop hands the batch's ``{layer: tensor}`` to a
:class:`BatchWriter`. Everything after that happens in one writer thread, while the next
batches run through the model: the device-to-host copy, the non-finite check, the float16
range check, the gathering of rows into whole HDF5 chunks, compression and the writes through
:class:`~ibscope.store.ShardWriter` (and so through :class:`~ibscope._h5io.AtomicH5`: a shard is
complete or absent). h5py releases the GIL while HDF5 works, so compression and file writes
overlap with the model's forward pass.

The queue between the two is bounded (:data:`MAX_PENDING_BYTES` of pending batches, at least
one batch), so memory stays flat in the probe size: at most that many bytes of activations,
plus one HDF5 chunk per layer in the writer, are held at any time.

Errors keep their meaning. Whatever the writer thread raises (a :class:`~ibscope.errors.DataError`
for NaN activations, an :class:`~ibscope.errors.IOFailure` for a full disk, anything else) is
raised again, as the same exception object, in the thread that runs the forward loop, at its next
hand-over or when the writer is closed; the writer then discards the batches still queued. When
the forward loop stops with an exception (Ctrl-C included), the writer thread is stopped and
joined *before* the shard is discarded, so that no HDF5 call runs while the file is deleted.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

import numpy as np

from ibscope.errors import DataError

log = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
#: bytes of captured activations that may wait for the writer thread (at least one batch waits)
MAX_PENDING_BYTES = 8 * 1024 * 1024
#: rows of a layer are written in blocks of about this many bytes (whole HDF5 chunks): fewer,
#: larger writes keep the writer thread's Python work, and so its hold on the GIL, small
WRITE_BYTES = 2 * 1024 * 1024

_STOP = object()


def batch_stats(arr: np.ndarray) -> tuple[int, float]:
    """(non-finite count, max |finite value|): two passes (min, max) when all values are finite,
    since NaN and inf propagate to the minimum or maximum."""
    if not arr.size:
        return 0, 0.0
    lo, hi = float(arr.min()), float(arr.max())
    if np.isfinite(lo) and np.isfinite(hi):
        return 0, max(-lo, hi)
    fin = np.isfinite(arr)
    return int(arr.size - fin.sum()), float(np.abs(arr[fin]).max()) if fin.any() else 0.0


class LayerBuffer:
    """Collects one layer's rows and writes them to the shard in blocks of whole HDF5 chunks."""

    def __init__(self, shard, name: str, dtype: str, d: int):
        self.shard, self.name, self.dtype = shard, name, dtype
        chunk = shard.chunk_rows(d, dtype)
        self.rows = chunk * max(1, WRITE_BYTES // max(1, chunk * d * np.dtype(dtype).itemsize))
        self.parts: list[np.ndarray] = []
        self.stats: list[tuple[int, float]] = []
        self.count = 0
        self.promoted = False

    def add(self, arr: np.ndarray, stats: tuple[int, float]) -> None:
        self.parts.append(arr)
        self.stats.append(stats)
        self.count += arr.shape[0]
        if self.count >= self.rows:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        if not self.parts:
            return
        block = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        k = (block.shape[0] // self.rows) * self.rows if whole_chunks else block.shape[0]
        head, tail = block[:k], block[k:]
        # the stats of the parts cover head and tail together: exact when the tail is empty, an
        # upper bound otherwise (absmax is only used as a summary and for the float16 check)
        nonfinite = sum(st[0] for st in self.stats) if not tail.shape[0] else None
        absmax = max(st[1] for st in self.stats)
        if head.shape[0]:
            if self.dtype == "float16" and not self.promoted and absmax >= FLOAT16_MAX:
                log.warning("Layer '%s': values reach %.3g, beyond float16's range; storing this layer as float32 "
                            "in this checkpoint.", self.name, absmax)
                self.shard.promote(self.name, "float32")
                self.dtype, self.promoted = "float32", True
            stats = None if nonfinite is None else (nonfinite, absmax)
            self.shard.append(self.name, head, dtype=self.dtype, stats=stats)
            if self.promoted:
                self.shard.mark_fallback(self.name, "float32")
        self.parts = [tail] if tail.shape[0] else []
        self.stats = [batch_stats(tail)] if tail.shape[0] else []
        self.count = tail.shape[0]


def to_host(r) -> np.ndarray:
    """A captured (batch, d) tensor as a float32 numpy array (no copy for float32 CPU tensors)."""
    import torch

    if r.dtype == torch.float32 and r.device.type == "cpu":
        return r.numpy()
    return r.float().cpu().numpy()


class BatchWriter:
    """Writes the batches of one shard, in order, from a background thread (see the module doc).

    ``put(b0, outs)`` hands over the batch starting at probe row ``b0``; ``close()`` writes the
    last partial chunks and waits for the thread. Used as a context manager: a clean exit closes,
    an exception stops the thread without writing more and re-raises. ``background=False`` does
    all the work in the calling thread (same results, same errors).
    """

    def __init__(self, shard, layers: dict[str, int], *, dtype: str = "float32", allow_nonfinite: bool = False,
                 where: str = "", background: bool = True, max_pending_bytes: int = MAX_PENDING_BYTES):
        self.bufs = {name: LayerBuffer(shard, name, dtype, d) for name, d in layers.items()}
        self.allow_nonfinite = allow_nonfinite
        self.where = where
        self.background = background
        self.max_pending_bytes = int(max_pending_bytes)
        self.error: BaseException | None = None
        self._abort = False
        self._thread: threading.Thread | None = None
        self._q: queue.Queue[Any] = queue.Queue()
        self._sem: threading.BoundedSemaphore | None = None
        self._slots = 0

    # -- the forward loop's side ---------------------------------------------------------------
    def __enter__(self) -> BatchWriter:
        if self.background:
            self._thread = threading.Thread(target=self._run, name="ibscope-capture-writer", daemon=True)
            self._thread.start()
        return self

    def put(self, b0: int, outs: dict[str, Any]) -> None:
        """Hand over one batch (``{layer: (batch, d) tensor}``); blocks while the pending batches
        hold more than ``max_pending_bytes``. Raises the writer thread's error, if it had one."""
        self.raise_error()
        if not self.background:
            self._write(b0, outs)
            return
        thread = self._thread
        if thread is None:
            raise RuntimeError("BatchWriter.put with background=True is used inside its `with` block.")
        if self._sem is None:  # size the queue from the first batch: at least one batch may wait
            nbytes = sum(int(t.numel()) * 4 for t in outs.values())
            self._slots = max(1, self.max_pending_bytes // max(1, nbytes))
            self._sem = threading.BoundedSemaphore(self._slots)
        while not self._sem.acquire(timeout=0.1):
            self.raise_error()
            if not thread.is_alive():  # pragma: no cover - the thread only ends on _STOP
                raise RuntimeError("ibscope's capture writer thread ended unexpectedly.")
        self._q.put((b0, outs))

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is left, stop the thread and raise its error, if any."""
        if self.background and self._thread is not None:
            self._q.put(_STOP)
            self._join()
            self.raise_error()
        else:
            self.raise_error()
            self._flush()

    def abort(self) -> None:
        """Stop without writing anything more (queued batches are dropped); never raises."""
        self._abort = True
        if self.background and self._thread is not None:
            self._q.put(_STOP)
            self._join()

    def _join(self) -> None:
        # the thread must be gone before the shard is closed or deleted: a second Ctrl-C while
        # waiting is kept and raised once it has ended (it ends after at most one write)
        interrupted = False
        thread = self._thread
        while thread is not None and thread.is_alive():
            try:
                thread.join()
            except KeyboardInterrupt:
                self._abort = True
                interrupted = True
        self._thread = None
        if interrupted:
            raise KeyboardInterrupt

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.close()

    # -- the writer's side -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                break
            try:
                if self.error is None and not self._abort:
                    self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - raised again in the forward loop's thread
                self.error = exc
            finally:
                item = None
                if self._sem is not None:  # put() made it before queueing the first batch
                    self._sem.release()
        if self.error is None and not self._abort:
            try:
                self._flush()
            except BaseException as exc:  # noqa: BLE001
                self.error = exc

    def _write(self, b0: int, outs: dict[str, Any]) -> None:
        for name, r in outs.items():
            arr = to_host(r)
            st = batch_stats(arr)
            if st[0] and not self.allow_nonfinite:
                raise DataError(
                    f"Layer '{name}' has {st[0]} non-finite value(s) (NaN/inf) at checkpoint "
                    f"{self.where}, probe rows {b0}..{b0 + arr.shape[0] - 1}.",
                    hint="The run may have diverged at this checkpoint. Pass --allow-nonfinite to "
                         "store them anyway (estimators will refuse them).")
            self.bufs[name].add(arr, st)

    def _flush(self) -> None:
        for b in self.bufs.values():
            b.flush()


def run_probe(shard, net, pr, targets, reducers, meta, *, dev, batch_size: int, dtype: str, allow_nonfinite: bool,
              where: str, stop=None, advance: Callable[[], None] | None = None, background: bool = True) -> None:
    """Run the probe set through ``net`` batch by batch and write each layer's rows into ``shard``
    (the writes happen in a :class:`BatchWriter` thread, off the forward path)."""
    import torch

    from ibscope.capture.hooks import CaptureEngine

    dims = {t.name: meta[t.name]["dims"] for t in targets}
    with BatchWriter(shard, dims, dtype=dtype, allow_nonfinite=allow_nonfinite, where=where,
                     background=background) as bw:
        with torch.no_grad(), CaptureEngine(net, targets, reducers) as eng:
            for b0 in range(0, pr.n, int(batch_size)):
                if stop is not None:
                    stop.check()
                xb = pr.batch(b0, b0 + int(batch_size), dev)
                bw.put(b0, eng.run(xb))
                if advance is not None:
                    advance()
