"""Shared fp64 spectrum kernel for the spectral and entropy estimators.

Every spectral measure in ibscope (effective rank, participation ratio, stable rank,
numerical rank, PCA dimension, alpha-ReQ, effective encoding dimension, the linear-kernel
matrix entropy and the coding rate) is a function of the eigenvalues of ``Z^T Z`` where
``Z`` is the prepared representation (optionally centred, optionally with unit-norm rows).
``Z^T Z`` (d x d) and ``Z Z^T`` (n x n) share their non-zero eigenvalues, so the kernel
forms the smaller of the two, in float64, on the input tensor's device, accumulating over
blocks so that the float64 copy of the input is never held at once.

Why float64: activation covariances are nearly low-rank, and float32 ``eigh`` on such
matrices loses the small eigenvalues (and can fail on CUDA, pytorch issues #94772, #105359).

Singular values themselves (RankMe's convention, numerical rank) are *not* taken as square
roots of Gram eigenvalues: an eigenvalue computed as 0 +- eps * lam_max becomes a singular
value of ~1e-8 * sigma_max. They come from a blocked QR of the prepared matrix (TSQR: the
R factor of the stacked blocks, then the SVD of that min(n, d) x min(n, d) factor), which
keeps the accuracy of a direct SVD (absolute error ~eps * sigma_max) with O(min(n, d)^2 +
block) memory.

What counts as "non-zero": one rule everywhere (:func:`rank_tolerance`): a spectral value v
(eigenvalue or singular value) is non-zero when v > v_max * max(n, d) * eps, eps the machine
epsilon of the computation (float64: 2.2e-16). This is numpy's and torch's default
``matrix_rank`` tolerance; below it a value is indistinguishable from round-off of the zero
it stands for (e.g. the eigenvalue that centring removes from n x n Gram matrices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: bytes of float64 input held per block while accumulating the second-moment matrix
BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of ``Z^T Z`` for a prepared representation ``Z`` (n x d).

    ``eigenvalues`` are the squared singular values of ``Z``, float64, descending, clamped
    at 0, on the input's device; their count is ``min(n, d)``.
    """

    eigenvalues: torch.Tensor
    n: int
    d: int
    centered: bool
    row_normalized: bool
    #: singular values computed directly (method 'svd'); None: only eigenvalues are known
    svals: torch.Tensor | None = None

    @property
    def singular_values(self) -> torch.Tensor:
        """Singular values of Z: the direct ones when computed (method 'svd'), else sqrt(eigenvalues).

        sqrt of an eigenvalue that is 0 up to round-off is ~1e-8 * sigma_max: use method
        'svd' when small singular values matter (RankMe's convention, numerical rank)."""
        return self.svals if self.svals is not None else self.eigenvalues.sqrt()

    @property
    def nonzero_eigenvalues(self) -> torch.Tensor:
        """The eigenvalues above the numerical-rank tolerance (:func:`rank_tolerance`)."""
        return nonzero(self.eigenvalues, self.n, self.d)

    @property
    def rank(self) -> int:
        """Numerical rank of Z: the count of eigenvalues above :func:`rank_tolerance`."""
        return int(self.nonzero_eigenvalues.numel())

    @property
    def covariance_eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the covariance ``Z^T Z / (n - 1)`` (centred) or ``/ n`` (not)."""
        return self.eigenvalues / max(1, self.n - 1 if self.centered else self.n)

    @property
    def max_rank(self) -> int:
        """The largest rank the prepared matrix can have: min(n - 1, d) if centred."""
        return min(self.n - 1 if self.centered else self.n, self.d)


def _rows_per_block(width: int) -> int:
    return max(1, BLOCK_BYTES // (8 * max(1, width)))


def _prepare_stats(x: torch.Tensor, center: bool, row_normalize: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Column means and inverse row norms (of the centred rows) in float64, by row blocks."""
    n, d = x.shape
    mean = None
    if center:
        acc = torch.zeros(d, dtype=torch.float64, device=x.device)
        step = _rows_per_block(d)
        for s in range(0, n, step):
            acc += x[s:s + step].to(torch.float64).sum(0)
        mean = acc / n
    inv_norm = None
    if row_normalize:
        sq = torch.empty(n, dtype=torch.float64, device=x.device)
        step = _rows_per_block(d)
        for s in range(0, n, step):
            z = x[s:s + step].to(torch.float64)
            if mean is not None:
                z = z - mean
            sq[s:s + step] = (z * z).sum(1)
        norm = sq.sqrt()
        # an all-zero (centred) row stays zero rather than becoming NaN
        inv_norm = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return mean, inv_norm


def prepared(x: torch.Tensor, *, center: bool = True, row_normalize: bool = False) -> torch.Tensor:
    """The prepared matrix Z itself (float64, full copy): centred and/or row-normalised ``x``."""
    mean, inv_norm = _prepare_stats(x, center, row_normalize)
    z = x.to(torch.float64)
    if mean is not None:
        z = z - mean
    if inv_norm is not None:
        z = z * inv_norm[:, None]
    return z


def second_moment(x: torch.Tensor, *, center: bool = True, row_normalize: bool = False) -> tuple[torch.Tensor, str]:
    """The smaller of ``Z^T Z`` (side 'features', d x d) and ``Z Z^T`` (side 'samples', n x n).

    Float64, on ``x.device``; accumulated over row blocks (feature side) or column blocks
    (sample side), so memory is O(min(n, d)^2 + block).
    """
    n, d = x.shape
    mean, inv_norm = _prepare_stats(x, center, row_normalize)
    if d <= n:
        m = torch.zeros((d, d), dtype=torch.float64, device=x.device)
        step = _rows_per_block(d)
        for s in range(0, n, step):
            z = x[s:s + step].to(torch.float64)
            if mean is not None:
                z = z - mean
            if inv_norm is not None:
                z = z * inv_norm[s:s + step, None]
            m.addmm_(z.T, z)
        return m, "features"
    m = torch.zeros((n, n), dtype=torch.float64, device=x.device)
    step = _rows_per_block(n)
    for s in range(0, d, step):
        z = x[:, s:s + step].to(torch.float64)
        if mean is not None:
            z = z - mean[s:s + step]
        if inv_norm is not None:
            z = z * inv_norm[:, None]
        m.addmm_(z, z.T)
    return m, "samples"


def rank_tolerance(top: float, n: int, d: int, dtype: torch.dtype = torch.float64) -> float:
    """The numerical-rank tolerance: ``top * max(n, d) * eps(dtype)``.

    ``top`` is the largest eigenvalue (or singular value) of an n x d problem; values at or
    below the tolerance are zero up to round-off (numpy/torch ``matrix_rank`` default). Used
    wherever ibscope counts ranks or drops "zero" eigenvalues."""
    return float(top) * max(int(n), int(d), 1) * torch.finfo(dtype).eps


def nonzero(values: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """The entries of a spectrum (eigenvalues or singular values, >= 0) above :func:`rank_tolerance`."""
    if values.numel() == 0:
        return values
    top = float(values.max())
    if not top > 0:
        return values[:0]
    dtype = values.dtype if values.is_floating_point() else torch.float64
    return values[values > rank_tolerance(top, n, d, dtype)]


def numerical_rank(values: torch.Tensor, n: int, d: int) -> int:
    """Count of the entries of a spectrum above :func:`rank_tolerance` (eigenvalues or singular values)."""
    return int(nonzero(values, n, d).numel())


def singular_values(x: torch.Tensor, *, center: bool = True, row_normalize: bool = False) -> torch.Tensor:
    """Singular values of the prepared ``x`` (float64, descending, on ``x.device``) by blocked QR.

    The smaller side is reduced: for n >= d the R factor of the row blocks of Z (TSQR:
    R <- qr([R; Z_block]).R), for n < d that of the column blocks of Z^T; then the singular
    values of R (min(n, d) square). Householder QR and the SVD are backward stable, so each
    singular value has an absolute error of a few eps * sigma_max, like numpy's SVD of Z,
    and memory is O(min(n, d)^2 + block)."""
    n, d = x.shape
    mean, inv_norm = _prepare_stats(x, center, row_normalize)
    k = min(n, d)
    r = torch.zeros((0, k), dtype=torch.float64, device=x.device)
    if d <= n:
        step = max(k, _rows_per_block(d))
        for s in range(0, n, step):
            z = x[s:s + step].to(torch.float64)
            if mean is not None:
                z = z - mean
            if inv_norm is not None:
                z = z * inv_norm[s:s + step, None]
            r = torch.linalg.qr(torch.cat([r, z], 0), mode="r").R
    else:
        step = max(k, _rows_per_block(n))
        for s in range(0, d, step):
            z = x[:, s:s + step].to(torch.float64)
            if mean is not None:
                z = z - mean[s:s + step]
            if inv_norm is not None:
                z = z * inv_norm[:, None]
            r = torch.linalg.qr(torch.cat([r, z.T], 0), mode="r").R
    sv: torch.Tensor = torch.linalg.svdvals(r)  # torch.linalg's functions are untyped (Any)
    return sv


def spectrum(x: torch.Tensor, *, center: bool = True, row_normalize: bool = False, method: str = "eigh") -> Spectrum:
    """Squared singular values of the prepared ``x``, float64, descending, on ``x.device``.

    ``method='eigh'`` (default): eigenvalues of the smaller second-moment matrix; cost
    O(n d min(n, d)) for the product and O(min(n, d)^3) for the eigensolver. Eigenvalues are
    accurate to ~1e-16 * lambda_max, i.e. singular values to ~1e-8 * sigma_max.
    ``method='svd'``: singular values of Z directly (:func:`singular_values`, blocked QR then
    SVD); slower, but accurate to ~1e-16 * sigma_max, which RankMe's singular-value
    convention and numerical rank with tiny tolerances need.
    """
    n, d = x.shape
    svals = None
    if method == "svd":
        svals = singular_values(x, center=center, row_normalize=row_normalize)
        lam = svals * svals
    elif method == "eigh":
        m, _ = second_moment(x, center=center, row_normalize=row_normalize)
        lam = torch.linalg.eigvalsh(m).flip(0).clamp_min(0.0)
    else:
        raise ValueError(f"Unknown spectrum method '{method}'. Expected 'eigh' or 'svd'.")
    return Spectrum(eigenvalues=lam, n=n, d=d, centered=center, row_normalized=row_normalize, svals=svals)


def renyi_entropy(p: torch.Tensor, alpha: float, size: int | None = None) -> float:
    """Renyi entropy (nats) of a normalised spectrum ``p`` (zeros are dropped: 0 log 0 = 0).

    "Zero" means at or below :func:`rank_tolerance` for a ``size`` x ``size`` problem
    (``size`` = max(n, d) of the matrix the spectrum came from; default ``len(p)``).
    alpha = 1 is the Shannon entropy, alpha = inf is -log max p, alpha = 0 is log #{p > 0}.
    """
    m = int(p.numel()) if size is None else int(size)
    p = nonzero(p.clamp_min(0.0), m, m)
    if p.numel() == 0:
        return 0.0
    p = p / p.sum()
    if alpha == 1.0:
        return float(-(p * p.log()).sum())
    if math.isinf(alpha):
        return float(-p.max().log())
    if alpha == 0.0:
        return math.log(p.numel())
    return float(torch.log((p ** alpha).sum()) / (1.0 - alpha))
