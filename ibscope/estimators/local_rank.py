"""Local rank: the expected rank of a layer's input-output Jacobian (kind "jacobian").

The estimator reads per-sample Jacobian singular values ``s`` of shape (n_samples, r), as
stored by ``ibscope capture --jacobian-samples N`` (``Store.jacobian(ckpt, layer)``); the
model is not needed at estimate time. :func:`jacobian_from_store` is the reader that
``ibscope estimate`` uses; it fails with a message saying how to capture the spectra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ibscope.errors import DataError
from ibscope.estimators.base import ArrayLike, Estimate, JacobianEstimator, as_tensor
from ibscope.estimators.params import Real, param
from ibscope.estimators.registry import register

if TYPE_CHECKING:
    import os

    import torch

    from ibscope.store import CheckpointInfo, Store

#: quantiles of the per-sample rank distribution reported in ``Estimate.extra``
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def jacobian_from_store(store: Store | str | os.PathLike[str], ckpt: CheckpointInfo | int, layer: str) -> torch.Tensor:
    """Per-sample Jacobian singular values of ``layer`` at ``ckpt`` as a float tensor (m, r).

    ``store`` is an open :class:`ibscope.store.Store` (or a path to one). Raises
    :class:`DataError` (exit code 4) when the store holds no Jacobian spectra for that
    layer and checkpoint, saying how to capture them.
    """
    import torch

    from ibscope.store import Store, open_store

    st = store if isinstance(store, Store) else open_store(store)
    st.layer_meta(layer)  # unknown layer: UsageError with did-you-mean
    got = st.jacobian(ckpt, layer)
    if got is None:
        c = st._ckpt(ckpt)
        raise DataError(
            f"The store '{st.dir}' holds no Jacobian spectra for layer '{layer}' at checkpoint {c.index} ({c.label}); "
            "local rank needs them.",
            hint="Re-capture with Jacobians, e.g. `ibscope capture ... --jacobian-samples 32` (32 probe samples; "
                 "each costs one backward pass per output dim of each layer, and --jacobian-memory bounds the "
                 "memory: docs/capture.md, 'Jacobians and memory').",
        )
    sv, _rows = got
    return torch.from_numpy(sv)


def jacobian_spectra(jacobians: ArrayLike) -> torch.Tensor:
    """Singular values (n, min(m, d)) of a batch of Jacobians (n, m, d), float64, descending.

    Computed on the input's device. A helper for users who compute their own Jacobians
    (e.g. with ``torch.func.vmap(torch.func.jacrev(f))``).
    """
    import torch

    j = jacobians if isinstance(jacobians, torch.Tensor) else torch.as_tensor(jacobians)
    if j.ndim != 3:
        raise DataError(f"Expected a batch of Jacobians of shape (n, m, d). Got shape {tuple(j.shape)}.")
    sv: torch.Tensor = torch.linalg.svdvals(j.detach().to(torch.float64))  # torch.linalg is untyped (Any)
    return sv


@register
@dataclass(frozen=True)
class LocalRank(JacobianEstimator):
    """Local rank: mean over samples of the numerical rank of the layer's Jacobian.

    Definition: LR = E_x[ rank J(x) ], J(x) = d z / d x the Jacobian of the layer output z
    (pre-activation in Patel & Shwartz-Ziv) with respect to the input, and
    rank J = #{k : s_k > max(atol, rtol * s_1(x))} for the singular values s of J(x).
    Convention: the threshold is *relative* to each sample's largest singular value by
    default (rtol = 1e-3), so LR does not change when the layer is rescaled (weight decay,
    norm growth). The reference code (Patel's localcomplexity) uses an absolute atol = 0.01:
    reproduce it with rtol=0, atol=0.01 (then W -> 1e-3 W drops LR to 0).
    Value: the mean rank; ``extra`` has the distribution (quantiles, histogram of ranks,
    std, mean rank / r). Unit: dimensions, 0 <= LR <= r = min(d_layer, d_input).
    Input: s of shape (n_samples, r) per-sample singular values (any order, >= 0).
    """

    rtol: float = param(1e-3, Real(ge=0, lt=1))
    atol: float = param(0.0, Real(ge=0))

    name: ClassVar[str] = "local-rank"
    quantity: ClassVar[str] = "local_rank"
    unit: ClassVar[str] = "dimensions"
    reference: ClassVar[str] = ("Patel & Shwartz-Ziv 2024, Learning to Compress: Local Rank and Information "
                                "Compression in Deep Neural Networks (arXiv:2410.07687)")

    def cap_name(self, quantity: str) -> str:
        return "r (the rank of a full-rank Jacobian)"

    def scale_invariant(self, arg: str) -> str | None:
        # a relative threshold rtol * s_1 scales with s
        return "global" if self.atol == 0 else None

    def validate(self) -> None:
        self._require(self.rtol > 0.0 or self.atol > 0.0, "rtol", "> 0 when atol is 0 (no threshold at all)",
                      self.rtol)

    def ranks(self, s: ArrayLike) -> torch.Tensor:
        """Per-sample ranks (int64 tensor (n,)) of singular values ``s`` (n, r)."""
        return self._ranks(*self._validated(s))

    def _validated(self, s: ArrayLike) -> tuple[torch.Tensor, float]:
        import torch

        s = as_tensor(s, name="s", estimator=self, allow_discrete=False, allow_bool=False)
        eps = torch.finfo(s.dtype).eps if s.is_floating_point() else torch.finfo(torch.float64).eps
        s = s.to(torch.float64)
        if bool((s < 0).any()):
            raise DataError(f"{self.name}: singular values must be >= 0; got {int((s < 0).sum())} negative value(s).",
                            hint="Pass singular values of the Jacobians (jacobian_spectra), not the Jacobians.")
        return s, eps

    def _ranks(self, s: torch.Tensor, eps: float) -> torch.Tensor:
        import torch

        smax = s.max(dim=1, keepdim=True).values
        # never below the numerical-rank floor s_1 * r * eps (as _linalg.rank_tolerance)
        floor = smax * s.shape[1] * eps
        thr = torch.maximum(torch.clamp(self.rtol * smax, min=self.atol), floor)
        return (s > thr).sum(dim=1)

    def estimate(self, s: ArrayLike) -> Estimate:
        import torch

        s, eps = self._validated(s)
        r_all = self._ranks(s, eps)
        n, r = int(s.shape[0]), int(s.shape[1])
        rf = r_all.to(torch.float64)
        mean = float(rf.mean())
        std = float(rf.std(unbiased=True)) if n > 1 else 0.0
        q = torch.quantile(rf, torch.tensor(QUANTILES, dtype=torch.float64, device=rf.device)).tolist()
        hist = torch.bincount(r_all, minlength=r + 1).tolist()
        extra = {
            "quantiles": dict(zip([str(v) for v in QUANTILES], q)),
            "histogram": hist,  # histogram[k] = number of samples with rank k
            "std": std,
            "fraction": mean / r if r else 0.0,
            "threshold": "relative" if self.atol == 0 else ("absolute" if self.rtol == 0 else "max(abs, rel)"),
        }
        return self._make(mean, n=n, dims=(r,), cap=float(r), stderr=(std / n ** 0.5 if n > 1 else None),
                          extra=extra)
