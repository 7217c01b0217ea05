"""``LightningCapture``: a Lightning callback that captures the probe set into a store."""

from __future__ import annotations

import os
from typing import Any

from ibscope.errors import UsageError

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]  # same API, older package
    except ImportError:
        raise UsageError("ibscope.callbacks.LightningCapture needs Lightning, which is not installed.",
                         hint='Install it with: pip install "ibscope[lightning]"') from None

from ibscope.callbacks._common import check_every, logged_metrics


class LightningCapture(Callback):
    """Capture ``layers`` on the probe set every ``every_n_epochs`` epochs (at the end of the
    training epoch, after its validation) and/or every ``every_n_steps`` optimizer steps, into
    the activation store ``store``.

    Each point is recorded with Lightning's own numbers, as ``ModelCheckpoint`` records them:
    ``epoch`` = ``trainer.current_epoch`` and ``step`` = ``trainer.global_step``, plus the
    metrics logged so far (``trainer.callback_metrics`` whose names look like metrics:
    ``val_acc``, ``train_loss`` ...). ``module``: the attribute of the LightningModule to
    capture (``"net"``: layer names as in the plain model, ``net.0`` becomes ``0``); default
    the LightningModule itself. ``options``: settings of :class:`ibscope.capture.Snapshotter`
    (``reduce``, ``batch_size``, ``dtype``, ``jacobian_samples``, ``split``, ``run`` ...).
    ``every_n_epochs`` defaults to 1 when ``every_n_steps`` is not given, else to None (steps only).

    Example::

        trainer = L.Trainer(max_epochs=10, callbacks=[LightningCapture("probe.npz", "acts",
                            layers=["type:Linear"], module="net")])
    """

    def __init__(self, probe, store: str | os.PathLike, layers, *, every_n_epochs: int | None | str = "default",
                 every_n_steps: int | None = None, module: str | None = None, **options: Any):
        from ibscope.capture.live import Snapshotter

        super().__init__()
        if every_n_epochs == "default":  # steps given alone: steps only
            every_n_epochs = 1 if every_n_steps is None else None
        self.every_n_epochs, self.every_n_steps = check_every(every_n_epochs, every_n_steps)
        self.module = module
        self.snapshotter = Snapshotter(probe, store, layers, **options)

    def _target(self, pl_module):
        if self.module is None:
            return pl_module
        obj = pl_module
        for part in self.module.split("."):
            if not hasattr(obj, part):
                raise UsageError(f"LightningCapture(module={self.module!r}): {type(pl_module).__name__} has no "
                                 f"attribute {part!r}.")
            obj = getattr(obj, part)
        return obj

    def _capture(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or getattr(trainer, "sanity_checking", False):
            return
        self.snapshotter(self._target(pl_module), epoch=int(trainer.current_epoch), step=int(trainer.global_step),
                         metrics=logged_metrics(dict(trainer.callback_metrics)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0 and trainer.global_step != getattr(self, "_last", None):
            self._last = trainer.global_step
            self._capture(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._capture(trainer, pl_module)
