"""The in-process capture: checkpoint after checkpoint in this process, each one's shard filled
batch by batch (:func:`capture_into`) and, when asked, with Jacobian spectra
(:func:`store_jacobians`); the helpers shared with the cluster path
(:mod:`ibscope.capture.distributed`): :func:`shard_attrs`, :func:`check_resume_series`.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np

from ibscope.capture.jacobian import frozen_parameters, jacobian_spectra
from ibscope.errors import DataError
from ibscope.reporting import Reporter, Task, is_silent

log = logging.getLogger("ibscope.capture")


class Interrupts:
    """Ctrl-C during a capture stops it at the next batch boundary (a KeyboardInterrupt raised
    there, where the shard being written is discarded cleanly) rather than at an arbitrary
    bytecode, where it may land in a finalizer and be swallowed. A second Ctrl-C stops at once."""

    def __enter__(self) -> Interrupts:
        import signal
        import threading

        self.hit = False
        self.prev = None
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.prev is not None:
            import signal

            signal.signal(signal.SIGINT, self.prev)


def check_resume_series(out: Path, ckpts) -> None:
    """``--resume`` must not mix two training runs in one store: a checkpoint file that changed
    since it was captured (same path, new sha256), or a new file whose epoch/step is already
    captured from other weights (a retrained run), is a DataError naming both."""
    from ibscope.store import open_store

    st = open_store(out, skip_bad_shards=True)  # bad shards are deleted and re-captured by resume
    by_path = {os.path.realpath(c.path): c for c in st.checkpoints}
    by_time = {(c.epoch, c.step): c for c in st.checkpoints if c.epoch is not None or c.step is not None}
    for ck in ckpts:
        old = by_path.get(os.path.realpath(ck.path))
        why = "the file changed since it was captured"
        if old is None or old.sha256 == ck.sha256:
            old = by_time.get((ck.epoch, ck.step)) if (ck.epoch is not None or ck.step is not None) else None
            why = f"{ck.label} is already captured from another file ('{old.path}')" if old is not None else ""
        if old is not None and old.sha256 != ck.sha256:
            raise DataError(
                f"Cannot resume '{out}': checkpoint '{ck.path}' ({ck.label}) has sha256 {ck.sha256[:12]}, but the store "
                f"holds {old.label} with sha256 {old.sha256[:12]}: {why}. Resuming would mix two training runs "
                f"in one store.",
                hint="Re-capture everything with --overwrite (or into a new --out) when the run was retrained.")


class CaptureBars:
    """The progress of a capture, as tasks of ``reporter`` (:mod:`ibscope.reporting`): the
    checkpoints, and the batches and Jacobian passes of the current one. A silent reporter
    (``None``, :class:`~ibscope.reporting.NullReporter`) shows nothing, and :meth:`batches` /
    :meth:`jacobian_passes` then give no callback."""

    def __init__(self, reporter: Reporter | None, n_checkpoints: int, *, title: str = "checkpoints",
                 batches: int | None = None, jacobian_passes: int | None = None):
        self._rep = None if is_silent(reporter) else reporter
        self._title, self._n = title, n_checkpoints
        self._n_batches, self._n_passes = batches, jacobian_passes
        self._stack = ExitStack()
        self._ck: Task | None = None
        self._b: Task | None = None
        self._j: Task | None = None

    def __enter__(self) -> CaptureBars:
        if self._rep is not None:
            self._ck = self._stack.enter_context(self._rep.task(self._title, self._n))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def batches(self, label: str) -> Callable[[], None] | None:
        """Start the batch bar of checkpoint ``label``: its one-batch-done callback."""
        b = self._restart("_b", "batches", self._n_batches, label)
        return None if b is None else (lambda: b.advance())

    def jacobian_passes(self, label: str) -> Callable[[int], None] | None:
        """Start the Jacobian bar of checkpoint ``label``: its n-passes-done callback."""
        j = self._restart("_j", "jacobian passes", self._n_passes, label)
        return None if j is None else (lambda n: j.advance(n))

    def _restart(self, attr: str, what: str, total: int | None, label: str) -> Task | None:
        # the task (opened on first use, kept for the next checkpoints) set back to 0 of total
        if self._rep is None or total is None:
            return None
        task = getattr(self, attr)
        if task is None:
            task = self._stack.enter_context(self._rep.task(what, total))
            setattr(self, attr, task)
        task.update(completed=0, total=total, note=label)
        return task

    def checkpoint_done(self, label: str = "") -> None:
        if self._ck is not None:
            self._ck.advance(note=label)


def write_store(out, config, pr, meta, inputs, ckpts, targets, reducers, net, dev, reporter, *, resume, overwrite,
                 compression, batch_size, dtype, jplan, trust_checkpoint, safe_globals, allow_nonfinite,
                 rebuild=None) -> Path:
    """The writing part of :func:`capture` (run under the store's writer lock)."""
    from ibscope.capture.checkpoints import describe_alignment, load_checkpoint_into
    from ibscope.store import StoreWriter

    writer = StoreWriter(out, config=config, sample_ids=pr.ids, labels=pr.y, layers=meta, inputs=inputs,
                         input_shape=tuple(pr.x.shape[1:]), resume=resume, overwrite=overwrite, compression=compression,
                         replace_empty=True)
    if resume:
        check_resume_series(out, ckpts)
    todo = [c for c in ckpts if not (resume and writer.has_checkpoint(c.sha256))]
    if resume and len(todo) < len(ckpts):
        log.info("Resuming: %d of %d checkpoints already captured.", len(ckpts) - len(todo), len(ckpts))

    n_batches = (pr.n + int(batch_size) - 1) // int(batch_size)
    stop = Interrupts()
    noted: set[str] = set()
    try:
        stop.__enter__()
        with CaptureBars(reporter, len(todo), batches=n_batches,
                         jacobian_passes=jplan.total_passes if jplan else None) as bars:
            for ck in todo:
                stop.check()
                if rebuild is not None:
                    net = rebuild(ck) or net
                info = load_checkpoint_into(net, ck, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals)
                note = describe_alignment(info)
                if note and note not in noted:  # one line per kind of fix, not one per checkpoint
                    noted.add(note)
                    log.info("Note: checkpoint keys: %s ('%s'%s).", note, ck.path,
                             "" if len(todo) == 1 else " and others alike")
                net.eval()
                with writer.checkpoint(epoch=ck.epoch, step=ck.step, path=str(ck.path), sha256=ck.sha256,
                                       metrics=ck.metrics) as shard:
                    shard_attrs(shard, ck, info, dev, batch_size)
                    capture_into(shard, net, pr, targets, reducers, meta, dev=dev, batch_size=int(batch_size),
                                 dtype=dtype, allow_nonfinite=allow_nonfinite, where=f"'{ck.path}' ({ck.label})",
                                 stop=stop, advance=bars.batches(ck.label))
                    if jplan is not None:
                        store_jacobians(net, targets, reducers, pr, jplan, dev, shard, bars.jacobian_passes(ck.label),
                                        stop)
                bars.checkpoint_done(ck.label)
                log.debug("Captured %s (%s).", ck.label, ck.path)
    except BaseException:
        if writer.created and not writer.written:  # nothing captured: leave no store that blocks the retry
            writer.remove_new_store()
        raise
    finally:
        stop.__exit__()
    return writer.dir


def shard_attrs(shard, ck, info: dict, dev, batch_size: int) -> None:
    """The attributes a shard records about its checkpoint and how it was captured."""
    shard.attrs.update(epoch_source=ck.epoch_source, step_source=ck.step_source, state_key=info["state_key"],
                       prefixes_stripped=",".join(info["stripped"] + ([info["prefix"]] if info["prefix"] else [])),
                       device=str(dev), batch_size=int(batch_size), torch_version=torch_version())
    if info.get("added"):
        shard.attrs["prefix_added"] = info["added"]
    if ck.epoch_exact is not None:
        shard.attrs["epoch_exact"] = float(ck.epoch_exact)


def torch_version() -> str:
    import torch

    return str(torch.__version__)


def capture_into(shard, net, pr, targets, reducers, meta, *, dev, batch_size, dtype, allow_nonfinite, where,
                  stop=None, advance=None) -> None:
    """Run the probe set through ``net`` batch by batch and write each layer's rows into ``shard``
    (the writes run off the forward path: see :mod:`ibscope.capture.writer`)."""
    from ibscope.capture.writer import run_probe

    run_probe(shard, net, pr, targets, reducers, meta, dev=dev, batch_size=batch_size, dtype=dtype,
              allow_nonfinite=allow_nonfinite, where=where, stop=stop, advance=advance)


def store_jacobians(net, targets, reducers, pr, jplan, dev, shard, tick=None, stop=None) -> None:
    """Jacobian spectra of the first ``jplan.m`` probe rows into ``shard`` (see :mod:`ibscope.capture.jacobian`)."""
    import torch

    from ibscope.capture.hooks import CaptureEngine

    rows = np.arange(jplan.m)

    def progress(n: int) -> None:
        if stop is not None:
            stop.check()  # Ctrl-C: stop between passes, the shard is discarded
        if tick is not None:
            tick(n)

    inp = pr.batch(0, jplan.m, dev)
    with frozen_parameters(net), torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
        svs = jacobian_spectra(eng.run, inp, jplan, progress, sample_ids=pr.ids[: jplan.m])
    for t in targets:
        shard.set_jacobian(t.name, svs[t.name].cpu().numpy(), rows)
