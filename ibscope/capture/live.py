"""Capture during training: :func:`snapshot` for plain PyTorch loops, :class:`Snapshotter`
behind the Lightning and Hugging Face callbacks of :mod:`ibscope.callbacks`.

Each call runs the probe set through the live model (in eval mode, without gradients; its
training mode is restored afterwards) and writes one shard into the store, exactly as
``ibscope capture`` does for one checkpoint file: same store format, one shard per capture
point renamed into place only when complete (a crash leaves every point complete or absent),
the store's writer lock held while writing. ``estimate``, ``plot``, ``check`` and ``ood``
read such stores unchanged.

* **Content key.** There is no checkpoint file, so a shard's ``checkpoint_sha256`` is
  :func:`ibscope.capture.series.state_dict_sha256` of the model's state dict (keys in
  sorted order, dtype, shape and bytes of every tensor): equal weights, equal key.
  ``checkpoint_path`` is ``"<snapshot of ClassName>"``.
* **Resumable.** A point already in the store (same epoch and step, or the same weights) is
  skipped with a note, so a training run restarted from its last checkpoint does not capture
  twice what it captured before the crash.
* **Settings must not change** between calls into one store (layers, reductions, probe,
  dtype ...): a different setting is refused as ``capture --resume`` refuses it.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, lock_path_for, writer_lock
from ibscope.errors import UsageError, io_error

log = logging.getLogger(__name__)


class Snapshotter:
    """Captures a live model into one store, again and again (the probe set is loaded and the
    layers are planned once).

    ``probe``, ``layers``, ``reduce``, ``max_samples``, ``sample_seed``, ``batch_size``,
    ``dtype``, ``jacobian_samples``, ``store_inputs``, ``split``, ``run``, ``compression``,
    ``allow_nonfinite``, ``lock_timeout``, ``jacobian_method`` and ``jacobian_memory`` mean what they mean for
    :func:`ibscope.capture.capture`. ``device``: where the probe batches go (default: the
    model's own device).
    """

    def __init__(self, probe, store: str | os.PathLike, layers: list[str] | str, *, reduce=None,
                 max_samples: int | None = None, sample_seed: int | None = None, batch_size: int = 256,
                 device: str | None = None, dtype: str = "float32", jacobian_samples: int = 0,
                 store_inputs: bool = True, split: str = "probe", run: str = "run", compression: str = "none",
                 allow_nonfinite: bool = False, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                 jacobian_method: str = "exact", jacobian_memory: int | str | None = "auto"):
        from ibscope.capture import DEFAULT_MAX_INPUT_BYTES
        from ibscope.capture.probe import load_probe

        if dtype not in ("float32", "float16"):
            raise UsageError(f"dtype must be float32 or float16. Got {dtype!r}.")
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be >= 1. Got {batch_size}.")
        if int(jacobian_samples) < 0:
            raise UsageError(f"jacobian_samples must be >= 0. Got {jacobian_samples}.")
        if compression not in ("lzf", "gzip", "none"):
            raise UsageError(f"compression must be lzf, gzip or none. Got {compression!r}.")
        check_timeout(lock_timeout)
        self.store = Path(store)
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise UsageError("snapshot needs at least one layer selector (layers=[...]).")
        self.reduce, self.batch_size, self.dtype = reduce, int(batch_size), dtype
        self.jacobian_samples, self.compression = int(jacobian_samples), compression
        self.jacobian_method, self.jacobian_memory = jacobian_method, jacobian_memory
        self.allow_nonfinite, self.lock_timeout = allow_nonfinite, lock_timeout
        self.device = device
        self.pr = load_probe(probe, max_samples=max_samples, sample_seed=sample_seed)
        if self.jacobian_samples:
            from ibscope.capture.jacobian import parse_memory, parse_method
            from ibscope.capture.plan import check_jacobian_input

            check_jacobian_input(self.pr, self.jacobian_samples)
            parse_method(jacobian_method)
            parse_memory(jacobian_memory)
        self.inputs = None
        if store_inputs:
            nbytes = self.pr.x.numel() * 4
            if nbytes > DEFAULT_MAX_INPUT_BYTES:
                log.warning("Not storing probe inputs in the store: %.1f MiB > limit %.1f MiB.", nbytes / 2**20,
                            DEFAULT_MAX_INPUT_BYTES / 2**20)
            else:
                self.inputs = self.pr.x.reshape(self.pr.n, -1).float().numpy()
        self._settings = dict(max_samples=max_samples, sample_seed=sample_seed, split=str(split), run=str(run))
        self._plan: dict[str, Any] | None = None
        self.captured: list[Path] = []

    # ---------------------------------------------------------------------------------------
    def _plan_for(self, net, dev):
        from ibscope.capture import plan_layers

        key = (type(net), str(dev))
        if self._plan is None or self._plan["key"] != key:
            import torch

            from ibscope.capture.plan import plan_jacobian_work, probe_and_jacobian_config
            from ibscope.capture.probe import check_forward_accepts

            check_forward_accepts(net, self.pr)
            first = self.pr.batch(0, min(self.pr.n, self.batch_size, 8), dev)
            with torch.no_grad():
                targets, reducers, meta, _ = plan_layers(net, first, self.layers, self.reduce)
            pr = self.pr
            jplan = None
            if self.jacobian_samples:
                jplan = plan_jacobian_work(net, targets, reducers, meta, pr, self.jacobian_samples, dev,
                                        self.jacobian_method, self.jacobian_memory)
            config: dict[str, Any] = {
                "model": f"<module {type(net).__name__}>", "model_args": {}, "layers": self.layers,
                "reduce": self.reduce if self.reduce is not None else "auto", "dtype": self.dtype,
                "max_samples": self._settings["max_samples"], "sample_seed": self._settings["sample_seed"],
                "jacobian_samples": self.jacobian_samples, "split": self._settings["split"],
                "run": self._settings["run"], "probe": pr.source, "n_samples": pr.n,
                "input_shape": [int(s) for s in pr.x.shape[1:]], "input_dtype": str(pr.x.dtype).replace("torch.", ""),
            }
            config.update(probe_and_jacobian_config(pr, jplan))
            self._plan = {"key": key, "targets": targets, "reducers": reducers, "meta": meta, "config": config,
                          "jplan": jplan}
        return self._plan

    def __call__(self, model, *, step: int | None = None, epoch: int | float | None = None,
                 metrics: dict | None = None) -> Path | None:
        """Capture ``model`` now as the point (``epoch``, ``step``) of the run; ``metrics``:
        training metrics to keep with it ({"val_acc": 0.91, "loss": 0.3}). Returns the shard
        written, or None when the store already holds this point."""
        import torch.nn as nn

        from ibscope.capture.factory import unwrap_model
        from ibscope.capture.series import as_float, state_dict_sha256

        if not isinstance(model, nn.Module):
            raise UsageError(f"snapshot expects a torch.nn.Module; got {type(model).__name__}.")
        if step is not None and (isinstance(step, bool) or int(step) != step or step < 0):
            raise UsageError(f"step must be a whole number >= 0. Got {step!r}.")
        if epoch is not None and (isinstance(epoch, bool) or as_float(epoch) is None or float(epoch) < 0):
            raise UsageError(f"epoch must be a number >= 0. Got {epoch!r}.")
        clean_metrics = {}
        for k, v in (metrics or {}).items():
            f = as_float(v)
            if f is not None:
                clean_metrics[str(k)] = f
        net = unwrap_model(model)
        was_training = net.training
        try:
            net.eval()
            return self._capture(net, None if step is None else int(step), epoch, clean_metrics, state_dict_sha256)
        finally:
            net.train(was_training)

    def _capture(self, net, step, epoch, metrics, hasher) -> Path | None:
        import torch

        from ibscope._device import resolve_device
        from ibscope.capture.local import capture_into, store_jacobians
        from ibscope.store import StoreWriter, checkpoint_label, resolve_store_dir

        if self.device is not None:
            dev = resolve_device(self.device)
            net.to(dev)
        else:
            p = next(iter(net.parameters()), None)
            dev = p.device if p is not None else torch.device("cpu")
        plan = self._plan_for(net, dev)
        sha = hasher(net.state_dict())
        epoch_exact = None if epoch is None else float(epoch)
        epoch_int = int(epoch_exact) if epoch_exact is not None and epoch_exact.is_integer() else None
        label = checkpoint_label(epoch_int, step, "snapshot", epoch_exact=epoch_exact)
        store_dir = resolve_store_dir(self.store)
        with ExitStack() as held:
            try:
                held.enter_context(writer_lock(store_dir, what="activation store", timeout=self.lock_timeout))
            except OSError as exc:
                raise io_error(exc, lock_path_for(store_dir), "creating the lock file") from None
            pr = self.pr
            writer = StoreWriter(self.store, config=plan["config"], sample_ids=pr.ids, labels=pr.y, layers=plan["meta"],
                                 inputs=self.inputs, input_shape=tuple(pr.x.shape[1:]), resume=True,
                                 compression=self.compression)
            if writer.has_checkpoint(sha) or writer.has_point(epoch_exact, step):
                log.info("Store '%s' already holds %s; not captured again.", self.store, label)
                return None
            path = f"<snapshot of {type(net).__name__}>"
            try:
                with writer.checkpoint(epoch=epoch_int, step=step, path=path, sha256=sha, metrics=metrics) as shard:
                    shard.attrs.update(epoch_source="snapshot" if epoch is not None else "",
                                       step_source="snapshot" if step is not None else "", state_key="<live model>",
                                       prefixes_stripped="", device=str(dev), batch_size=self.batch_size,
                                       torch_version=str(torch.__version__))
                    if epoch_exact is not None:
                        shard.attrs["epoch_exact"] = epoch_exact
                    capture_into(shard, net, pr, plan["targets"], plan["reducers"], plan["meta"], dev=dev,
                                  batch_size=self.batch_size, dtype=self.dtype, allow_nonfinite=self.allow_nonfinite,
                                  where=f"{label} (snapshot)")
                    if plan["jplan"] is not None:
                        store_jacobians(net, plan["targets"], plan["reducers"], pr, plan["jplan"], dev, shard)
                    final = shard.final
            except BaseException:
                if writer.created and not writer.written:
                    writer.remove_new_store()
                raise
            self.captured.append(final)
            log.debug("Captured %s into %s.", label, final)
            return final


_CACHE: dict[tuple, Snapshotter] = {}


def _probe_key(probe) -> Any:
    if isinstance(probe, (str, os.PathLike)):
        p = Path(probe)
        try:
            st = p.stat()
            return ("file", str(p.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            return ("spec", str(probe))
    return ("object", id(probe))


def snapshot(model, probe, store: str | os.PathLike, *, layers: list[str] | str, step: int | None = None,
             epoch: int | float | None = None, metrics: dict | None = None, **options) -> Path | None:
    """Capture ``model`` as it is now into the activation store ``store`` (created on the first
    call), as the point (``epoch``, ``step``) of its training. For plain PyTorch loops::

        for epoch in range(10):
            train_one_epoch(model)
            ibscope.capture.snapshot(model, "probe.npz", "acts", layers=["type:Linear"], epoch=epoch,
                                     metrics={"val_acc": acc})

    ``options``: the settings of :class:`Snapshotter` (``reduce``, ``batch_size``, ``device``,
    ``dtype``, ``jacobian_samples``, ``split``, ``run`` ...), which must stay the same for one
    store. The probe set is loaded and the layers planned once per settings (cached). Returns
    the shard written, or None when the store already holds this point (same epoch and step,
    or the same weights).
    """
    key = (str(Path(store).resolve()), _probe_key(probe), tuple([layers] if isinstance(layers, str) else layers),
           repr(sorted(options.items())))
    snap = _CACHE.get(key)
    if snap is None:
        if len(_CACHE) > 16:
            _CACHE.clear()
        snap = _CACHE[key] = Snapshotter(probe, store, layers, **options)
    return snap(model, step=step, epoch=epoch, metrics=metrics)
