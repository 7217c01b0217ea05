"""Train a tiny classifier and save checkpoints the way ``ibscope capture`` reads them.

This stands in for *your* training script in the CI example
(``examples/github-actions-ibscope-check.yml``). It trains a 12-10-7-5-2 MLP on the 12-bit
task bundled with ibscope (all 4096 binary patterns, generated in code) for a few epochs,
full batch, deterministically on CPU, and writes:

* ``OUT/checkpoints/epoch_XXXXXX.pt`` at log-spaced epochs, each
  ``{"epoch": e, "state_dict": ..., "accuracy": train_acc, "loss": train_loss}``;
* ``OUT/probe.npz`` with ``x`` (4096, 12) and ``y`` (4096,), the probe set for capture.

The model factory ``make_model`` in this file is what ``ibscope capture --model
examples/ci/train_tiny.py:make_model`` builds; ``--model-args '{"activation": "relu"}'``
selects another activation (the tests use that as a deliberate regression).

    python examples/ci/train_tiny.py --out run --epochs 200
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
WIDTHS = (12, 10, 7, 5)


def make_model(activation: str = "tanh") -> nn.Module:
    """12-10-7-5-2 MLP with layers hidden1..hidden3 (Linear + activation) and output (Linear)."""
    act = ACTIVATIONS[activation]
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]), start=1):
        layers[f"hidden{i}"] = nn.Sequential(nn.Linear(a, b), act())
    layers["output"] = nn.Linear(WIDTHS[-1], 2)
    return nn.Sequential(layers)


def checkpoint_epochs(epochs: int, n: int = 8) -> list[int]:
    """0 plus about ``n`` log-spaced epochs ending at ``epochs``."""
    pts = np.unique(np.round(np.logspace(0, np.log10(epochs), n)).astype(int))
    return [0] + sorted(set(int(p) for p in pts) | {epochs})


def train(out: str | os.PathLike, *, epochs: int = 200, activation: str = "tanh", seed: int = 0,
          lr: float = 0.01) -> list[Path]:
    from ibscope.demo.tasks import twelve_bit_task

    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    x_np, y_np = twelve_bit_task()
    np.savez(out / "probe.npz", x=x_np, y=y_np)
    torch.manual_seed(seed)
    model = make_model(activation)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    save_at = set(checkpoint_epochs(epochs))
    paths = []
    for epoch in range(epochs + 1):
        if epoch > 0:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        if epoch in save_at:
            with torch.no_grad():
                logits = model(x)
                metrics = {"accuracy": float((logits.argmax(1) == y).float().mean()),
                           "loss": float(nn.functional.cross_entropy(logits, y))}
            p = out / "checkpoints" / f"epoch_{epoch:06d}.pt"
            torch.save({"epoch": epoch, "state_dict": model.state_dict(), **metrics}, p)
            paths.append(p)
    return paths


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="run", help="output directory (checkpoints/ and probe.npz)")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.01)
    return ap


def main() -> None:
    a = build_parser().parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is faster and deterministic
    paths = train(a.out, epochs=a.epochs, activation=a.activation, seed=a.seed, lr=a.lr)
    print(f"wrote {len(paths)} checkpoints to {Path(a.out) / 'checkpoints'}")


if __name__ == "__main__":
    main()
