"""Models of the bundled examples (model factories for ``ibscope capture``).

* :func:`ib_net` — the classic 12-10-7-5-4-3-2 network of Shwartz-Ziv & Tishby (2017) and
  Saxe et al. (2018): ``ibscope.demo.models:ib_net`` with ``activation="tanh"|"relu"``.
* :func:`digits_mlp` — a small MLP for scikit-learn's bundled 8x8 digits (64-64-32-16-10).

Both are :class:`LayeredNet`: hidden layers ``hidden1 ... hiddenK`` (each ``Linear`` followed
by the activation, so a forward hook on ``hiddenK`` sees the post-activation representation
``T``) and ``output`` (``Linear`` followed by ``Softmax``, as in the papers, whose information
planes include the softmax layer). The forward pass returns class probabilities; training uses
``log`` of them (see :mod:`ibscope.demo.train`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ibscope.errors import UsageError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "elu": nn.ELU}
IB_WIDTHS = (12, 10, 7, 5, 4, 3, 2)
DIGITS_WIDTHS = (64, 64, 32, 16, 10)


class LayeredNet(nn.Module):
    """Fully connected classifier with named layers ``hidden1..hiddenK`` and ``output``."""

    def __init__(self, widths: Sequence[int], activation: str = "tanh"):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise UsageError(f"widths must be at least two positive integers (input ... classes). Got {list(widths)}.")
        act = activation.lower()
        if act not in ACTIVATIONS:
            from ibscope.errors import unknown_name

            raise unknown_name("activation", activation, ACTIVATIONS)
        self.widths = tuple(widths)
        self.activation = act
        self.hidden_names: list[str] = []
        for i, (a, b) in enumerate(zip(widths[:-2], widths[1:-1]), start=1):
            name = f"hidden{i}"
            self.add_module(name, nn.Sequential(nn.Linear(a, b), ACTIVATIONS[act]()))
            self.hidden_names.append(name)
        self.output = nn.Sequential(nn.Linear(widths[-2], widths[-1]), nn.Softmax(dim=1))

    @property
    def layer_names(self) -> list[str]:
        """Representation layers in forward order (the information-plane layers)."""
        return [*self.hidden_names, "output"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        for name in self.hidden_names:
            h = getattr(self, name)(h)
        return self.output(h)


def ib_net(activation: str = "tanh", widths: Sequence[int] = IB_WIDTHS) -> LayeredNet:
    """The 12-10-7-5-4-3-2 network (hidden1..hidden5 of widths 10, 7, 5, 4, 3; softmax output of 2)."""
    return LayeredNet(widths, activation)


def digits_mlp(activation: str = "relu", widths: Sequence[int] = DIGITS_WIDTHS) -> LayeredNet:
    """An MLP for 8x8 digits: 64 inputs, hidden 64-32-16, softmax over ``widths[-1]`` classes."""
    return LayeredNet(widths, activation)
