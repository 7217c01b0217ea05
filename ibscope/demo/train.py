"""Deterministic training that writes checkpoints at log-spaced epochs.

Each checkpoint is ``torch.save``'d in the canonical format that ``ibscope capture`` reads::

    {"epoch": e, "state_dict": model.state_dict(), "accuracy": train_acc, "loss": train_loss,
     "test_accuracy": test_acc, "test_loss": test_loss}

``accuracy``/``loss`` are on the training split (losses are cross-entropy in nats). Files are
named ``epoch_000123.pt`` and written atomically (tmp file + ``os.replace``). Training is
deterministic for a given seed on a given device (fixed initialisation seed, fixed minibatch
order, no data-dependent randomness).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ibscope.errors import UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


def log_spaced_epochs(epochs: int, n: int, include_zero: bool = True) -> list[int]:
    """About ``n`` distinct epochs, log-spaced between 1 and ``epochs`` (plus 0 = initialisation).

    Small epochs are all kept (log spacing rounds them together), so the list may be shorter
    than ``n``; it always ends at ``epochs``.
    """
    if epochs < 1:
        raise UsageError(f"epochs must be >= 1. Got {epochs}.")
    if n < 1:
        raise UsageError(f"the number of checkpoints must be >= 1. Got {n}.")
    pts = np.unique(np.round(np.logspace(0.0, math.log10(epochs), num=n)).astype(int))
    out = sorted(set(int(p) for p in pts) | {int(epochs)})
    if include_zero:
        out = [0] + out
    return out


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_classifier` (the ``train:`` section of a run config)."""

    epochs: int = 3000
    checkpoints: int = 30
    lr: float = 1e-3
    batch_size: int | None = None  # None = full batch
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_epochs: list[int] | None = field(default=None)  # explicit list overrides `checkpoints`

    def validate(self) -> None:
        if int(self.epochs) < 1:
            raise UsageError(f"train.epochs must be >= 1. Got {self.epochs}.")
        if not (float(self.lr) > 0):
            raise UsageError(f"train.lr must be > 0. Got {self.lr}.")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise UsageError(f"train.batch_size must be >= 1 or null (full batch). Got {self.batch_size}.")
        if self.optimizer not in OPTIMIZERS:
            from ibscope.errors import unknown_name

            raise unknown_name("optimizer", self.optimizer, OPTIMIZERS)
        if float(self.weight_decay) < 0:
            raise UsageError(f"train.weight_decay must be >= 0. Got {self.weight_decay}.")
        if self.checkpoint_epochs is not None:
            bad = [e for e in self.checkpoint_epochs if not (0 <= int(e) <= int(self.epochs))]
            if bad:
                raise UsageError(f"train.checkpoint_epochs must lie in [0, epochs={self.epochs}]. Got {bad}.")

    def schedule(self) -> list[int]:
        if self.checkpoint_epochs is not None:
            return sorted(set(int(e) for e in self.checkpoint_epochs))
        return log_spaced_epochs(int(self.epochs), int(self.checkpoints))


def _evaluate(model, x, y) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        p = model(x)
        loss = torch.nn.functional.nll_loss(torch.log(p.clamp_min(1e-12)), y).item()
        acc = (p.argmax(1) == y).float().mean().item()
    return acc, loss


def _save(obj: dict, path: Path) -> None:
    import torch

    from ibscope._atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_classifier(
    model_factory: Callable[[], torch.nn.Module],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    single_thread: bool = True,
) -> list[Path]:
    """Train ``model_factory()`` (a network returning class probabilities) and save checkpoints.

    ``progress(epoch, epochs)`` is called after each epoch. Returns the checkpoint paths in
    epoch order. Existing files in ``out_dir`` named ``epoch_*.pt`` are deleted first.
    """
    import torch

    cfg = config or TrainConfig()
    cfg.validate()
    x_train = np.asarray(x_train)
    y_train = np.asarray(y_train)
    if x_train.shape[0] != y_train.shape[0] or x_train.shape[0] == 0:
        raise UsageError(f"x_train and y_train must have the same, non-zero number of rows. Got {x_train.shape[0]} and {y_train.shape[0]}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("epoch_*.pt"):  # a previous run's checkpoints would mix into this one
        old.unlink()
    dev = torch.device(device)
    torch.manual_seed(int(cfg.seed))
    model = model_factory().to(dev)
    xt = torch.as_tensor(x_train, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(y_train, dtype=torch.int64, device=dev)
    has_test = x_test is not None and y_test is not None and len(y_test) > 0
    if has_test:
        xv = torch.as_tensor(np.asarray(x_test), dtype=torch.float32, device=dev)
        yv = torch.as_tensor(np.asarray(y_test), dtype=torch.int64, device=dev)
    params = model.parameters()
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    else:
        opt = torch.optim.SGD(params, lr=float(cfg.lr), momentum=0.9, weight_decay=float(cfg.weight_decay))
    n = xt.shape[0]
    bs = n if cfg.batch_size is None else min(int(cfg.batch_size), n)
    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed) + 1)
    schedule = cfg.schedule()
    save_at = set(schedule)
    paths: list[Path] = []

    def checkpoint(epoch: int) -> None:
        model.eval()
        acc, loss = _evaluate(model, xt, yt)
        obj = {"epoch": epoch, "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               "accuracy": acc, "loss": loss}
        if has_test:
            tacc, tloss = _evaluate(model, xv, yv)
            obj.update(test_accuracy=tacc, test_loss=tloss)
        p = out / f"epoch_{epoch:06d}.pt"
        _save(obj, p)
        paths.append(p)
        model.train()

    epochs = int(cfg.epochs)

    def loop() -> None:
        for epoch in range(1, epochs + 1):
            batches: list[torch.Tensor | None]
            if bs == n:
                batches = [None]
            else:
                perm = torch.randperm(n, generator=gen).to(dev)
                batches = [perm[i:i + bs] for i in range(0, n, bs)]
            for idx in batches:
                xb, yb = (xt, yt) if idx is None else (xt[idx], yt[idx])
                opt.zero_grad(set_to_none=True)
                p = model(xb)
                loss = torch.nn.functional.nll_loss(torch.log(p.clamp_min(1e-12)), yb)
                loss.backward()
                opt.step()
            if epoch in save_at:
                if not math.isfinite(loss.item()):
                    from ibscope.errors import IbscopeError

                    raise IbscopeError(f"Training diverged at epoch {epoch} (loss {loss.item()}).",
                                       hint="Lower train.lr.")
                checkpoint(epoch)
            if progress is not None:
                progress(epoch, epochs)

    # Tiny networks: one CPU thread is several times faster than two (no per-op thread
    # synchronisation) and leaves the other core free. Restored afterwards.
    threads = torch.get_num_threads()
    if dev.type == "cpu" and single_thread:
        torch.set_num_threads(1)
    try:
        if 0 in save_at:
            checkpoint(0)
        model.train()
        loop()
    finally:
        torch.set_num_threads(threads)
    log.info("trained %d epochs, %d checkpoints in %s", epochs, len(paths), out)
    return paths
