"""InfoNCE: an opt-in neural lower bound on I(X;Y) (van den Oord et al. 2018; Poole et al. 2019).

A separable critic f(x, y) = g(x) . h(y) (two small MLPs) is trained on a training split to
maximise  log B + mean_i [F_ii - log sum_j exp F_ij]  over batches of B pairs, and the bound is
then evaluated on the held-out split (batches of B, the last partial batch dropped). The value
can never exceed log B: that cap is reported in ``Estimate.cap`` and MI above it is invisible
to this estimator (raise ``batch_size``). Seeded (initialisation, split and batches); runs on
the input's device. Expensive compared to k-NN: use it on a few checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ibscope.estimators import _mi
from ibscope.estimators.base import Estimate, Estimator, is_discrete
from ibscope.estimators.registry import register


def _mlp(d_in: int, hidden: int, embed: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, embed))


def infonce_bound(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """InfoNCE bound of one batch of embeddings (B, e): log B + mean(diag - logsumexp rows)."""
    scores = fx @ fy.T
    b = scores.shape[0]
    return math.log(b) + (scores.diagonal() - torch.logsumexp(scores, dim=1)).mean()


@register
@dataclass(frozen=True)
class InfoNCE(Estimator):
    """InfoNCE neural lower bound, trained on one split and evaluated on a held-out split.

    ``steps`` Adam steps (lr ``lr``) on batches of ``batch_size`` pairs; critic = two MLPs
    (``hidden`` units, ``embed``-dim output); ``test_fraction`` of samples held out; ``seed``.
    The value is capped at log(batch_size) (Estimate.cap).
    """

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 64
    embed: int = 32
    test_fraction: float = 0.5
    seed: int = 0

    name: ClassVar[str] = "infonce"
    reference: ClassVar[str] = "van den Oord, Li & Vinyals 2018, arXiv:1807.03748; Poole et al. 2019, ICML"
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # continuous inputs are z-scored per column before the critic sees them
        return "column"

    def validate(self) -> None:
        for p in ("steps", "batch_size", "hidden", "embed"):
            v = getattr(self, p)
            self._require(isinstance(v, int) and v >= 1, p, "an integer >= 1", v)
        self._require(self.batch_size >= 2, "batch_size", ">= 2", self.batch_size)
        self._require(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "a number > 0", self.lr)
        self._require(isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1,
                      "test_fraction", "strictly between 0 and 1", self.test_fraction)

    def on_constant(self, *tensors) -> str | None:
        return "zero" if any(t.is_floating_point() for t in tensors) else None

    def _constant_cap(self, *tensors) -> float | None:
        return math.log(self.batch_size)

    def cap_name(self, quantity: str) -> str:
        return "log batch"

    def _features(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if is_discrete(t):
            c = _mi.codes(t)
            return torch.nn.functional.one_hot(c, int(c.max()) + 1).to(torch.float32)
        t, _ = _mi.continuous(self, t, name, standardize=True)
        return t.to(torch.float32)

    def estimate(self, x, y) -> Estimate:
        tx, ty = _mi.pair(self, x, y)
        if is_discrete(tx) and is_discrete(ty):
            raise _mi.both_discrete_error(self)
        n = tx.shape[0]
        n_test = int(round(n * self.test_fraction))
        n_train = n - n_test
        b = self.batch_size
        _mi.require_samples(self, n, 2 * b, f"batch_size={b} pairs in both the training and the held-out split")
        if n_test < b or n_train < b:
            _mi.require_samples(self, min(n_test, n_train), b, f"held-out and training splits of at least batch_size={b}")
        a, c = self._features(tx, "x"), self._features(ty, "y")
        dev = a.device
        g = torch.Generator(device="cpu").manual_seed(int(self.seed))
        perm = torch.randperm(n, generator=g)
        tr, te = perm[:n_train].to(dev), perm[n_train:].to(dev)
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.seed))
            fx, fy = _mlp(a.shape[1], self.hidden, self.embed).to(dev), _mlp(c.shape[1], self.hidden, self.embed).to(dev)
            opt = torch.optim.Adam(list(fx.parameters()) + list(fy.parameters()), lr=float(self.lr))
            with torch.enable_grad():
                for _ in range(self.steps):
                    idx = tr[torch.randint(0, n_train, (b,), generator=g).to(dev)]
                    loss = -infonce_bound(fx(a[idx]), fy(c[idx]))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            vals = [float(infonce_bound(fx(a[te[s:s + b]]), fy(c[te[s:s + b]])))
                    for s in range(0, n_test - b + 1, b)]
        v = torch.tensor(vals, dtype=torch.float64)
        stderr = float(v.std() / math.sqrt(len(vals))) if len(vals) > 1 else None
        return self._make(float(v.mean()), n=n, dims=(tx.shape[1], ty.shape[1]), stderr=stderr, cap=math.log(b),
                          extra={"n_train": n_train, "n_test": n_test, "test_batches": len(vals),
                                 "final_train_bound": float(-loss.detach())})
