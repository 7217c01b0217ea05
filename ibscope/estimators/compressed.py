"""Compressed k-NN MI (Butakov et al. 2024): reduce each side to a few dimensions, then KSG.

Each continuous side with more than ``latent_dim`` columns is projected on its first
``latent_dim`` principal components (fitted on the data given, i.e. per layer and
checkpoint), then I is estimated there with KSG (Ross for a discrete side). By the data
processing inequality the result estimates I(f(X); g(T)) <= I(X;T): a lower bound, tight only
if the compression keeps the dependence. The latent dimensions used are in extra.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ibscope.estimators import _mi
from ibscope.estimators.base import Estimate, Estimator, is_discrete
from ibscope.estimators.ksg import KSG
from ibscope.estimators.registry import register


def pca_project(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Scores of the ``dim`` leading principal components (float64, on t's device)."""
    t = t.to(torch.float64)
    t = t - t.mean(dim=0)
    cov = (t.T @ t) / max(1, t.shape[0] - 1)
    w, v = torch.linalg.eigh(cov)  # ascending
    keep = w > w[-1] * 1e-12
    v = v[:, keep]
    return t @ v[:, -dim:].flip(1)


@register
@dataclass(frozen=True)
class Compressed(Estimator):
    """Butakov et al.'s lossy-compression MI: PCA to ``latent_dim`` dims per side, then KSG.

    ``reducer``: "pca" (default) or "none"; ``k``, ``algorithm``, ``seed`` go to the KSG step.
    A lower bound on I by data processing; the latent dims used are in extra["latent_dims"].
    """

    latent_dim: int = 4
    reducer: str = "pca"
    k: int = 5
    algorithm: int = 1
    seed: int = 0

    name: ClassVar[str] = "compressed"
    reference: ClassVar[str] = "Butakov, Tolmachev, Malanchuk, Neopryatnaya, Frolov & Andreev 2024, ICLR, arXiv:2305.08013"
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # PCA keeps directions under one scale; the KSG step z-scores
        return "global"

    def validate(self) -> None:
        self._require(isinstance(self.latent_dim, int) and self.latent_dim >= 1, "latent_dim", "an integer >= 1",
                      self.latent_dim)
        _mi.check_choice(self, "reducer", self.reducer, ("pca", "none"))
        self._require(isinstance(self.k, int) and self.k >= 1, "k", ">= 1", self.k)
        self._require(self.algorithm in (1, 2), "algorithm", "1 or 2", self.algorithm)

    def _reduce(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if is_discrete(t) or self.reducer == "none":
            return t
        t, _ = _mi.continuous(self, t, name, standardize=False)
        if t.shape[1] <= self.latent_dim:
            return t
        return pca_project(t, self.latent_dim)

    def _reduced(self, x, y):
        tx, ty = _mi.pair(self, x, y)
        if is_discrete(tx) and is_discrete(ty):
            raise _mi.both_discrete_error(self)
        _mi.require_samples(self, tx.shape[0], self.k + 1, f"k={self.k} neighbours plus the point itself")
        return tx, ty, self._reduce(tx, "x"), self._reduce(ty, "y")

    def _inner(self) -> KSG:
        return KSG(k=self.k, algorithm=self.algorithm, seed=self.seed)

    def estimate(self, x, y) -> Estimate:
        tx, ty, a, b = self._reduced(x, y)
        with warnings.catch_warnings():  # integer-valued columns were reported by _reduce already
            warnings.simplefilter("ignore", _mi.IntegerValuedWarning)
            e = self._inner().estimate(a, b)
        return self._make(e.value, n=e.n_samples, dims=(tx.shape[1], ty.shape[1]), stderr=e.stderr, cap=e.cap,
                          extra={"latent_dims": [int(a.shape[1]), int(b.shape[1])], "inner": e.extra})

    def on_constant(self, *tensors) -> str | None:
        return "zero" if any(t.is_floating_point() for t in tensors) else None

    def null_values(self, x, y, permutations) -> list[float]:
        # PCA of permuted rows is the same projection: reduce once, then KSG's shared null
        _, _, a, b = self._reduced(x, y)
        return self._inner().null_values(a, b, permutations)
