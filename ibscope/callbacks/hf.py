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
    metric's last value in ``state.log_history`` (``loss``, ``eval_loss``, ``eval_accuracy`` ...)
    logged at or before that step. The Trainer logs (and evaluates) a step after its
    ``on_step_end``, so the capture waits until that step's logging is done (the next step's start,
    or the end of training): the weights are the same, and the metrics are that step's own, as a
    checkpoint folder saved at that step would give. ``every_n_epochs`` defaults to 1 when
    ``every_n_steps`` is not given, else to None (steps only).
    The probe set is passed to the model as ``model(x)`` (see ``ibscope capture --probe``).
    ``options``: settings of :class:`ibscope.capture.Snapshotter`.

    Example::

        trainer = Trainer(model, args, train_dataset=ds,
                          callbacks=[TrainerCapture("probe.npz", "acts", layers=["bert.encoder.layer.*"],
                                                    reduce="cls", every_n_steps=50)])
    """

    def __init__(self, probe, store: str | os.PathLike, layers, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None | str = "default", **options: Any):
        from ibscope.capture.live import Snapshotter

        if every_n_epochs == "default":
            every_n_epochs = 1 if every_n_steps is None else None
        self.every_n_epochs, self.every_n_steps = check_every(every_n_epochs, every_n_steps)
        self.snapshotter = Snapshotter(probe, store, layers, **options)
        self._last = None
        self._pending: tuple | None = None  # (step, epoch) waiting for that step's logs

    def _mark(self, state) -> None:
        if state.global_step != self._last and (self._pending is None or self._pending[0] != state.global_step):
            self._pending = (int(state.global_step), state.epoch)

    def _flush(self, state, model) -> None:
        from ibscope.capture.series import history_metrics

        pending, self._pending = self._pending, None
        if pending is None or model is None or not state.is_world_process_zero or pending[0] == self._last:
            return
        step, epoch = pending
        self._last = step
        self.snapshotter(model, step=step, epoch=epoch, metrics=history_metrics(state.log_history, step))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._flush(state, model)  # the previous step's logging and evaluation are done; weights unchanged

    def on_step_end(self, args, state, control, model=None, **kwargs):
        n = self.every_n_steps
        if n and state.global_step > 0 and state.global_step % n == 0:
            self._mark(state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        n = self.every_n_epochs
        if n and state.epoch is not None and round(state.epoch) % n == 0:
            self._mark(state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._flush(state, model)
