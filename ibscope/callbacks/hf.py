"""``TrainerCapture``: a Hugging Face ``TrainerCallback`` that captures the probe set into a store."""

from __future__ import annotations

import os
from typing import Any

from ibscope.errors import UsageError

try:
    from transformers import TrainerCallback
except ImportError:
    raise UsageError("ibscope.callbacks.TrainerCapture needs the Hugging Face 'transformers' package, which is not "
                     "installed.", hint='Install it with: pip install "ibscope[hf]"') from None

from ibscope.callbacks._common import check_every


class TrainerCapture(TrainerCallback):
    """Capture ``layers`` on the probe set every ``every_n_steps`` optimizer steps and/or every
    ``every_n_epochs`` epochs of a ``transformers.Trainer``, into the activation store ``store``.

    Each point is recorded with the Trainer's numbers: ``step`` = ``state.global_step`` and
    ``epoch`` = ``state.epoch`` (fractions included, as in ``trainer_state.json``), plus each
    metric's last value in ``state.log_history`` (``loss``, ``eval_loss``, ``eval_accuracy`` ...).
    The probe set is passed to the model as ``model(x)`` (see ``ibscope capture --probe``).
    ``options``: settings of :class:`ibscope.capture.Snapshotter`.

    Example::

        trainer = Trainer(model, args, train_dataset=ds,
                          callbacks=[TrainerCapture("probe.npz", "acts", layers=["bert.encoder.layer.*"],
                                                    reduce="cls", every_n_steps=50)])
    """

    def __init__(self, probe, store: str | os.PathLike, layers, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = 1, **options: Any):
        from ibscope.capture.live import Snapshotter

        self.every_n_epochs, self.every_n_steps = check_every(every_n_epochs, every_n_steps)
        self.snapshotter = Snapshotter(probe, store, layers, **options)
        self._last = None

    def _capture(self, state, model) -> None:
        from ibscope.capture.series import history_metrics

        if model is None or not state.is_world_process_zero or state.global_step == self._last:
            return
        self._last = state.global_step
        self.snapshotter(model, step=int(state.global_step), epoch=state.epoch,
                         metrics=history_metrics(state.log_history, state.global_step))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        n = self.every_n_steps
        if n and state.global_step > 0 and state.global_step % n == 0:
            self._capture(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        n = self.every_n_epochs
        if n and state.epoch is not None and round(state.epoch) % n == 0:
            self._capture(state, model)
