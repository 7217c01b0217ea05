"""Compressed k-NN MI (Butakov et al. 2024): compress each side to a few dimensions, then estimate.

Butakov, Tolmachev, Malanchuk, Neopryatnaya, Frolov & Andreev (ICLR 2024) estimate I(X;T) of a
network by compressing the input X with an autoencoder and each layer T with PCA to a few
dimensions (4 in their experiments), then estimating the MI of the compressed pair from
Kozachenko-Leonenko entropies: I = H(X') + H(T') - H(X', T') (for class labels Y:
H(T') - sum_y p(y) H(T' | y)), each entropy computed on whitened data (covariance
log-determinant added back), with the weighted estimator of Berrett, Samworth & Yuan (2019)
above 4 dimensions (k = 5 neighbours) and the 1-nearest-neighbour estimator up to 4.

What ibscope follows and where it deviates (docs/estimators.md has the table):
* compressors: ``compressor_x`` (default "autoencoder", as their X) and ``compressor_y``
  (default "pca", as their layers), each "autoencoder", "pca" or "none". The autoencoder is a
  small MLP (``ae_hidden`` units, two hidden layers per side, ReLU), trained per call with Adam
  on the mean-squared reconstruction error (``ae_steps``, ``ae_lr``, batches of 256), seeded,
  on the input's device, and trained once per distinct input (cached: X is the same probe set
  for every checkpoint and layer). Their X autoencoder is convolutional (images); this one is
  an MLP for any flattened input. Each side is centred and divided by one factor (the RMS of
  its centred entries), which keeps the relative variances that both compressors work with, as
  their raw inputs do; ``standardize=True`` z-scores every column instead, so that informative
  low-variance directions are not dropped for being small.
* estimation step: ``mi_step="ksg"`` (default, a deviation) runs KSG (``k``) on the compressed
  pair; ``"kl"`` is theirs (H(X') + H(T') - H(X', T'), whitened Kozachenko-Leonenko entropies,
  weights as in their code). Measured on their kind of task (2-dim latents rendered as 16 x 16
  images, I = 1 nat, autoencoders to 2 dims): KSG 0.88, their KL step 0.20; on a 2 + 2 Gaussian
  with increasing maps of the coordinates: KSG 0.75, KL 0.57 (docs/estimators.md).
* The result estimates I(f(X); g(T)) <= I(X;T) by data processing: a lower bound, tight only if
  the compressors keep the dependence (a PCA drops low-variance directions even when they carry
  the dependence; an autoencoder keeps what reconstructs X, not what predicts T).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ibscope.errors import DataError
from ibscope.estimators import _mi
from ibscope.estimators._knn import kth_neighbor_distances
from ibscope.estimators._train import training_threads
from ibscope.estimators.base import ArrayLike, Estimate, PairEstimator, is_discrete
from ibscope.estimators.ksg import KSG
from ibscope.estimators.params import Boolean, Integer, OneOf, Real, param
from ibscope.estimators.registry import register

COMPRESSORS = ("autoencoder", "pca", "none")

#: trained autoencoder codes by (input fingerprint, settings): in ``ibscope estimate`` X is the same
#: probe set for every checkpoint x layer, so its autoencoder is trained once (as Butakov et al. do)
#: (fingerprint of the input, latent_dim, ae_hidden, ae_steps, ae_lr, training seed)
_AEKey = tuple[str, int, int, int, float, int]
_AE_CACHE: OrderedDict[_AEKey, tuple[torch.Tensor, float]] = OrderedDict()
_AE_CACHE_SIZE = 4


def _fingerprint(t: torch.Tensor) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(t.shape), str(t.dtype), str(t.device))).encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def pca_project(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Scores of the ``dim`` leading principal components (float64, on t's device)."""
    t = t.to(torch.float64)
    t = t - t.mean(dim=0)
    cov = (t.T @ t) / max(1, t.shape[0] - 1)
    w: torch.Tensor  # torch.linalg's functions are untyped (Any)
    v: torch.Tensor
    w, v = torch.linalg.eigh(cov)  # ascending
    keep = w > w[-1] * 1e-12
    v = v[:, keep]
    return t @ v[:, -dim:].flip(1)


def autoencoder_project(t: torch.Tensor, dim: int, *, hidden: int = 128, steps: int = 2000, lr: float = 3e-3,
                        batch: int = 256, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Train an MLP autoencoder d -> hidden -> hidden -> dim -> hidden -> hidden -> d on ``t``
    (MSE, Adam, seeded, on t's device) and return (the codes of all rows (float64), the final
    mean-squared reconstruction error per column)."""
    x = t.to(torch.float32)
    n, d = x.shape
    dev = x.device
    nn = torch.nn
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), training_threads(dev):
        torch.manual_seed(int(seed))
        enc = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, dim)).to(dev)
        dec = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                            nn.Linear(hidden, d)).to(dev)
        opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=float(lr))
        g = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
        b = min(batch, n)
        with torch.enable_grad():
            for _ in range(int(steps)):
                idx = torch.randint(0, n, (b,), generator=g).to(dev)
                loss = ((dec(enc(x[idx])) - x[idx]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            codes = torch.cat([enc(x[s:s + 4096]) for s in range(0, n, 4096)]).to(torch.float64)
            err = float(torch.cat([((dec(enc(x[s:s + 4096])) - x[s:s + 4096]) ** 2).mean(1)
                                   for s in range(0, n, 4096)]).mean())
    return codes, err


def kl_weights(k: int, d: int, rcond: float = 1e-6) -> torch.Tensor:
    """Weights of the weighted Kozachenko-Leonenko estimator (Berrett, Samworth & Yuan 2019).

    Up to 4 dimensions: the plain 1-nearest-neighbour estimator (w = e_1). Above: the
    minimum-norm w with sum w_j = 1 and sum_j w_j Gamma(j + 2l/d) / Gamma(j) = 0 for
    l = 1..floor(d/4) (the bias terms of order n^(-2l/d) cancel), rows normalised and solved
    by least squares with cut-off ``rcond``, and w_j = 0 outside {i k // d - 1 : i = 1..d}
    (Butakov et al.'s choice of support)."""
    w = torch.zeros(k, dtype=torch.float64)
    if d <= 4:
        w[0] = 1.0
        return w
    j = torch.arange(1, k + 1, dtype=torch.float64)
    rows = [torch.ones(k, dtype=torch.float64) / k]
    for ell in range(1, d // 4 + 1):
        r = torch.exp(torch.lgamma(j + 2.0 * ell / d) - torch.lgamma(j))
        rows.append(r / torch.linalg.norm(r))
    support = {i * k // d - 1 for i in range(1, d + 1)}
    for col in range(k):
        if col not in support:
            e = torch.zeros(k, dtype=torch.float64)
            e[col] = 1.0
            rows.append(e)
    a = torch.stack(rows)
    rhs = torch.zeros(a.shape[0], dtype=torch.float64)
    rhs[0] = 1.0 / k
    # minimum-norm least squares with a relative singular-value cut-off (numpy lstsq's rcond)
    u: torch.Tensor  # torch.linalg's functions are untyped (Any)
    s: torch.Tensor
    vh: torch.Tensor
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = s > rcond * s[0]
    return vh[keep].T @ ((u[:, keep].T @ rhs) / s[keep])


def kl_entropy(t: torch.Tensor, k: int = 5, *, jitter: float = 1e-10, seed: int = 0) -> float:
    """Differential entropy (nats) by the (weighted) Kozachenko-Leonenko estimator on whitened data.

    The rows are whitened with the sample covariance and log det(cov) / 2 is added back
    (the entropy of the affine map); the density at each point from its j-th neighbour (distance
    rho_j, Euclidean) is exp(psi(j)) / (V_d rho_j^d (n - 1)); H = -sum_j w_j mean log density_j,
    w = :func:`kl_weights`. A seeded jitter of relative size ``jitter`` separates duplicates."""
    t = t.to(torch.float64)
    n, d = t.shape
    z = t - t.mean(0)
    cov = (z.T @ z) / (n - 1)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise DataError(f"compressed: the covariance of a compressed side ({d} x {d}) is singular: the "
                        "compressed coordinates are linearly dependent.",
                        hint="Lower latent_dim, or use mi_step='ksg'.")
    logdet_half = float(torch.log(torch.diagonal(chol)).sum())
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T  # identity covariance
    if jitter > 0:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        z = z + jitter * torch.randn(z.shape, generator=g, dtype=torch.float64).to(z.device)
    kk = k if d > 4 else 1
    w = kl_weights(kk, d).to(z.device)
    rho = kth_neighbor_distances(z, kk, metric="l2", return_all=True)  # (n, kk), ascending
    log_vd = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    psi = torch.special.digamma(torch.arange(1, kk + 1, dtype=torch.float64, device=z.device))
    log_dens = psi[None, :] - log_vd - d * torch.log(rho) - math.log(n - 1)
    h = -float((log_dens @ w).mean())
    return h + logdet_half


@register
@dataclass(frozen=True)
class Compressed(PairEstimator):
    """Butakov et al.'s lossy-compression MI: compress each side (autoencoder / PCA), then estimate.

    ``compressor_x`` (default "autoencoder") and ``compressor_y`` (default "pca") to
    ``latent_dim`` dims, each "autoencoder", "pca" or "none" (a side with at most latent_dim
    columns is not compressed); ``mi_step`` "ksg" (KSG with ``k``; default, a deviation) or "kl"
    (theirs: whitened Kozachenko-Leonenko entropies, weighted above 4 dims, ``k`` neighbours);
    ``standardize`` z-scores columns before compressing (default: one scale factor per side,
    keeping relative variances as the paper's raw inputs). Autoencoder: ``ae_hidden``,
    ``ae_steps``, ``ae_lr``; ``seed`` for training, jitter and KSG. A lower bound on I by data
    processing; extra has the latent dims and reconstruction errors.
    """

    latent_dim: int = param(4, Integer(ge=1))
    compressor_x: str = param("autoencoder", OneOf(*COMPRESSORS))
    compressor_y: str = param("pca", OneOf(*COMPRESSORS))
    mi_step: str = param("ksg", OneOf("kl", "ksg"))
    k: int = param(5, Integer(ge=1))
    standardize: bool = param(False, Boolean())
    ae_hidden: int = param(128, Integer(ge=1))
    ae_steps: int = param(2000, Integer(ge=1))
    ae_lr: float = param(3e-3, Real(gt=0))
    seed: int = param(0, Integer())

    name: ClassVar[str] = "compressed"
    reference: ClassVar[str] = ("Butakov, Tolmachev, Malanchuk, Neopryatnaya, Frolov & Andreev 2024, Information "
                                "bottleneck analysis of deep neural networks via lossy compression, ICLR "
                                "(arXiv:2305.08013); Berrett, Samworth & Yuan 2019, Ann. Stat. 47:288")
    x_source: ClassVar[str] = "inputs"

    def scale_invariant(self, arg: str) -> str | None:
        # each side is divided by one factor (its RMS), or z-scored per column with standardize
        return "column" if self.standardize else "global"

    def _reduce(self, t: torch.Tensor, name: str, how: str, salt: int, extra: dict[str, Any]) -> torch.Tensor:
        if is_discrete(t):
            return t
        t, _ = _mi.continuous(self, t, name, standardize=self.standardize)
        if not self.standardize:
            t = t - t.mean(0)
            t = t / t.pow(2).mean().sqrt()  # one factor: relative variances kept
        if how == "none" or t.shape[1] <= self.latent_dim:
            extra[f"compressor_{name}"] = "none"
            return t
        extra[f"compressor_{name}"] = how
        if how == "pca":
            return pca_project(t, self.latent_dim)
        key: _AEKey = (_fingerprint(t), self.latent_dim, self.ae_hidden, self.ae_steps, float(self.ae_lr),
               int(self.seed) * 1000003 + salt)
        if key in _AE_CACHE:
            _AE_CACHE.move_to_end(key)
            codes, err = _AE_CACHE[key]
        else:
            codes, err = autoencoder_project(t, self.latent_dim, hidden=self.ae_hidden, steps=self.ae_steps,
                                             lr=self.ae_lr, seed=key[-1])
            _AE_CACHE[key] = (codes, err)
            while len(_AE_CACHE) > _AE_CACHE_SIZE:
                _AE_CACHE.popitem(last=False)
        extra[f"reconstruction_mse_{name}"] = err  # relative to the (scaled) input's mean square of 1
        if not bool(torch.isfinite(codes).all()):
            raise DataError(f"{self.name}: the autoencoder of '{name}' diverged (non-finite codes).",
                            hint=f"Lower --param {self.name}.ae_lr.")
        # codes that are constant (dead ReLU paths) carry nothing: drop them
        keep = codes.std(0) > 0
        if not bool(keep.any()):
            raise DataError(f"{self.name}: the autoencoder of '{name}' maps every sample to the same code.",
                            hint=f"Change --param {self.name}.seed or use compressor_{name}=pca.")
        return codes[:, keep]

    def _kl_mi(self, a: torch.Tensor, b: torch.Tensor) -> float:
        if is_discrete(b) or is_discrete(a):
            t, lab = (a, b) if is_discrete(b) else (b, a)
            codes = _mi.codes(lab)
            counts = torch.bincount(codes)
            d = t.shape[1]
            small = torch.nonzero(counts <= max(d, self.k) + 1).reshape(-1).tolist()
            if small:
                raise DataError(
                    f"{self.name}: every class needs more than {max(d, self.k) + 1} samples for its entropy in "
                    f"{d} compressed dims; class {small[0]} has {int(counts[small[0]])}.",
                    hint="Merge rare classes, or use 'ksg' (Ross estimator).")
            h = kl_entropy(t, self.k, seed=self.seed)
            for c in range(counts.numel()):
                h -= float(counts[c]) / t.shape[0] * kl_entropy(t[codes == c], self.k, seed=self.seed + c + 1)
            return h
        return (kl_entropy(a, self.k, seed=self.seed) + kl_entropy(b, self.k, seed=self.seed + 1)
                - kl_entropy(torch.cat([a, b], 1), self.k, seed=self.seed + 2))

    def _reduced(self, x: ArrayLike,
                 y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Both sides compressed (a compression does not depend on the pairing of the rows)."""
        tx, ty = _mi.pair(self, x, y)
        if is_discrete(tx) and is_discrete(ty):
            raise _mi.both_discrete_error(self)
        n = tx.shape[0]
        _mi.require_samples(self, n, max(self.k, 2 * self.latent_dim) + 2,
                            f"k={self.k} neighbours and a covariance of the compressed pair")
        extra: dict[str, Any] = {}
        a = self._reduce(tx, "x", self.compressor_x, 1, extra)
        b = self._reduce(ty, "y", self.compressor_y, 2, extra)
        extra["latent_dims"] = [int(a.shape[1]), int(b.shape[1])]
        extra["mi_step"] = self.mi_step
        return tx, ty, a, b, extra

    def _inner(self) -> KSG:
        return KSG(k=self.k, seed=self.seed)

    def _estimate(self, tx: torch.Tensor, ty: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  extra: dict[str, Any]) -> Estimate:
        if self.mi_step == "ksg":
            with warnings.catch_warnings():  # integer-valued columns were reported by _reduce already
                warnings.simplefilter("ignore", _mi.IntegerValuedWarning)
                e = self._inner().estimate(a, b)
            value, stderr, cap = e.value, e.stderr, e.cap
        else:
            value, stderr = self._kl_mi(a, b), None
            cap = _mi.entropy_codes(_mi.codes(ty if is_discrete(ty) else tx)) if (is_discrete(tx) or
                                                                                 is_discrete(ty)) else None
        return self._make(value, n=tx.shape[0], dims=(tx.shape[1], ty.shape[1]), stderr=stderr, cap=cap, extra=extra)

    def _null(self, a: torch.Tensor, b: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        if self.mi_step == "ksg":
            return self._inner().null_values(a, b, permutations)
        return [self._kl_mi(a, b[p.to(b.device)]) for p in permutations]

    def estimate(self, x: ArrayLike, y: ArrayLike) -> Estimate:
        return self._estimate(*self._reduced(x, y))

    def on_constant(self, *tensors: torch.Tensor) -> str | None:
        # I = 0 for a constant side; two discrete sides stay a usage error
        return "zero" if any(t.is_floating_point() for t in tensors) else None

    def null_values(self, x: torch.Tensor, y: torch.Tensor, permutations: list[torch.Tensor]) -> list[float]:
        # the compressions (PCA or autoencoder) of permuted rows are the same codes, permuted:
        # compress once, then the MI step's null (KSG's shares the distances of one side)
        _, _, a, b, _ = self._reduced(x, y)
        return self._null(a, b, permutations)

    def estimate_and_null(self, x: torch.Tensor, y: torch.Tensor,
                          permutations: list[torch.Tensor]) -> tuple[Estimate, list[float]]:
        tx, ty, a, b, extra = self._reduced(x, y)
        e = self._estimate(tx, ty, a, b, extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return e, self._null(a, b, permutations)
