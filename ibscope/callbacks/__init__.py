"""Capture activations during training, straight into an ibscope activation store.

* :class:`LightningCapture` -- a Lightning ``Callback`` (``pip install "ibscope[lightning]"``);
* :class:`TrainerCapture` -- a Hugging Face ``TrainerCallback`` (``pip install "ibscope[hf]"``);
* for plain PyTorch loops, :func:`ibscope.capture.snapshot`.

Each capture point (every N epochs and/or every N steps) becomes one shard of the same store
format ``ibscope capture`` writes (crash-safe, resumable: see :mod:`ibscope.capture.live`), so
``ibscope estimate``, ``plot``, ``check`` and ``ood`` read it unchanged. Only the main process
(global rank 0) captures.

The framework is imported only when its callback is used: ``import ibscope.callbacks`` works
without either installed.
"""

from __future__ import annotations

__all__ = ["LightningCapture", "TrainerCapture"]


def __getattr__(name: str):
    if name == "LightningCapture":
        from ibscope.callbacks.lightning import LightningCapture

        return LightningCapture
    if name == "TrainerCapture":
        from ibscope.callbacks.hf import TrainerCapture

        return TrainerCapture
    raise AttributeError(f"module 'ibscope.callbacks' has no attribute {name!r}")
