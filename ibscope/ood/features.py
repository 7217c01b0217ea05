"""Feature preparation for OOD scoring, fitted on the fit split only.

A *reduction spec* is a chain of steps joined by ``+``, applied left to right:

=============  =========================================================================
``none``       use the stored features as they are
``avgpool``    average over the spatial axes of a conv map (needs the raw output shape
               (C, H, W, ...) of a layer captured without reduction): (n, C*H*W) -> (n, C)
``maxpool``    the same with the maximum
``std``        standardise each feature with the fit split's mean and standard deviation
               (constant features get scale 1)
``pca:N``      principal components: centre with the fit mean, project on the top N
               components of the fit split (scikit-learn PCA, full SVD)
``umap:N``     UMAP to N dimensions (umap-learn; fit on the fit split, ``transform`` for the
               others; fixed random_state = the seed, so runs are reproducible)
=============  =========================================================================

Woodland et al.'s "PCA" is ``std+pca:N``. Nothing is ever fitted on test or OOD data: the
pipeline's :meth:`FeaturePipeline.fit` sees the fit split only; :meth:`transform` applies the
frozen transform to any other split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibscope.errors import DataError, UsageError

log = logging.getLogger(__name__)

STEPS = ("none", "avgpool", "maxpool", "std", "pca", "umap")


@dataclass(frozen=True)
class Step:
    op: str
    n: int | None = None

    def __str__(self) -> str:
        return self.op if self.n is None else f"{self.op}:{self.n}"


def parse_reduction(spec: str) -> tuple[Step, ...]:
    """Parse e.g. ``"std+pca:16"`` into steps; ``"none"`` gives ``()``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"A reduction must be a non-empty string such as 'none', 'std+pca:16' or 'umap:2'. Got {spec!r}.")
    steps: list[Step] = []
    for raw in spec.strip().lower().split("+"):
        tok = raw.strip()
        op, _, arg = tok.partition(":")
        if op not in STEPS:
            from ibscope.errors import did_you_mean

            raise UsageError(f"Unknown reduction step '{op}' in {spec!r}.{did_you_mean(op, STEPS)}",
                             hint="Steps: none, avgpool, maxpool, std, pca:N, umap:N, joined with '+', e.g. 'std+pca:16'.")
        if op in ("pca", "umap"):
            try:
                n = int(arg)
            except ValueError:
                raise UsageError(f"Reduction step '{tok}' in {spec!r} needs a number of components, e.g. '{op}:16'.") from None
            if n < 1:
                raise UsageError(f"Reduction step '{tok}' in {spec!r}: the number of components must be >= 1. Got {n}.")
            steps.append(Step(op, n))
        else:
            if arg:
                raise UsageError(f"Reduction step '{op}' in {spec!r} takes no argument. Got '{tok}'.")
            if op != "none":
                steps.append(Step(op))
    pools = [i for i, s in enumerate(steps) if s.op in ("avgpool", "maxpool")]
    if pools and (len(pools) > 1 or pools[0] != 0):
        raise UsageError(f"Pooling must be the first step of a reduction and appear once. Got {spec!r}.")
    return tuple(steps)


def canonical(spec: str) -> str:
    steps = parse_reduction(spec)
    return "+".join(str(s) for s in steps) or "none"


@dataclass
class FeaturePipeline:
    """Fit-on-fit-split feature preparation (pooling, standardisation, PCA, UMAP).

    ``raw_shape``: the per-sample shape (C, *spatial) of the layer output, needed by pooling.
    ``seed``: random_state for UMAP (and the PCA solver).
    """

    reduction: str = "none"
    raw_shape: tuple[int, ...] | None = None
    seed: int = 0
    steps: tuple[Step, ...] = field(init=False)
    fitted_: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.steps = parse_reduction(self.reduction)
        self.reduction = "+".join(str(s) for s in self.steps) or "none"
        self._state: list[Any] = []

    # ------------------------------------------------------------------------------------
    def _pool(self, x: np.ndarray, op: str) -> np.ndarray:
        shape = tuple(int(s) for s in (self.raw_shape or ()))
        if len(shape) < 2:
            raise UsageError(
                f"'{op}' needs the layer's raw output shape (channels, spatial...), but it is "
                f"{'unknown' if not shape else shape}: the layer was stored already reduced or is not a feature map.",
                hint="Capture the layer without reduction (--reduce none), or drop the pooling step.",
            )
        if int(np.prod(shape)) != x.shape[1]:
            raise DataError(f"'{op}': the raw output shape {shape} has {int(np.prod(shape))} values, "
                            f"but the stored features have {x.shape[1]} dims.",
                            hint="The layer was stored reduced; pooling needs the unreduced map.")
        v = x.reshape(x.shape[0], shape[0], -1)
        return v.mean(2) if op == "avgpool" else v.max(2)

    def fit(self, x) -> FeaturePipeline:
        """Fit every step on the fit split ``x`` (n, d) only."""
        x = _as_array(x, "fit features")
        self._state = []
        info: list[dict[str, Any]] = []
        d_in = x.shape[1]
        for st in self.steps:
            n, d = x.shape
            if st.op in ("avgpool", "maxpool"):
                x = self._pool(x, st.op)
                self._state.append(None)
                info.append({"step": str(st), "dims_out": x.shape[1]})
            elif st.op == "std":
                mean = x.mean(0)
                sd = x.std(0)
                const = sd <= 1e-12 * np.maximum(1.0, np.abs(mean))
                sd = np.where(const, 1.0, sd)
                self._state.append((mean, sd))
                x = (x - mean) / sd
                info.append({"step": "std", "constant_features": int(const.sum()), "dims_out": d})
            elif st.op == "pca":
                if st.n > min(n, d):
                    raise UsageError(f"'pca:{st.n}' asks for more components than the fit split allows: "
                                     f"min(n_fit={n}, dims={d}) = {min(n, d)}.", hint=f"Use pca:N with N <= {min(n, d)}.")
                from sklearn.decomposition import PCA

                pca = PCA(n_components=st.n, svd_solver="full", random_state=self.seed).fit(x)
                self._state.append(pca)
                x = pca.transform(x)
                info.append({"step": str(st), "explained_variance_ratio": float(pca.explained_variance_ratio_.sum()),
                             "dims_out": st.n})
            elif st.op == "umap":
                if n < 4 or st.n >= n - 1:
                    raise UsageError(f"'umap:{st.n}' needs more fit samples than components + 2; got n_fit={n}.")
                import warnings

                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*n_jobs value.*")
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    import umap

                    nn = int(min(15, n - 1))
                    red = umap.UMAP(n_components=st.n, n_neighbors=nn, random_state=self.seed).fit(x)
                    x = np.asarray(red.embedding_, dtype=np.float64)
                self._state.append(red)
                info.append({"step": str(st), "n_neighbors": nn, "min_dist": 0.1, "random_state": self.seed,
                             "dims_out": st.n})
        self.fitted_ = {"reduction": self.reduction, "dims_in": int(d_in), "dims_out": int(x.shape[1]),
                        "n_fit": int(x.shape[0]), "fitted_on": "fit split only", "steps": info}
        self._fit_out = x
        return self

    def transform(self, x) -> np.ndarray:
        """Apply the frozen steps to another split."""
        if len(self._state) != len(self.steps) or not self.fitted_:
            raise UsageError("The feature pipeline is not fitted yet; call fit() on the fit split first.")
        x = _as_array(x, "features")
        if x.shape[1] != self.fitted_["dims_in"]:
            raise DataError(f"Features have {x.shape[1]} dims; the pipeline was fitted on {self.fitted_['dims_in']}.")
        for st, state in zip(self.steps, self._state):
            if st.op in ("avgpool", "maxpool"):
                x = self._pool(x, st.op)
            elif st.op == "std":
                mean, sd = state
                x = (x - mean) / sd
            elif st.op == "pca":
                x = state.transform(x)
            elif st.op == "umap":
                import warnings

                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=UserWarning)
                    x = np.asarray(state.transform(x), dtype=np.float64)
        return x

    def fit_transform(self, x) -> np.ndarray:
        """Fit on ``x`` and return its transform (UMAP: the fitted embedding itself)."""
        self.fit(x)
        return self._fit_out

    def settings(self) -> dict[str, Any]:
        return dict(self.fitted_)


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise DataError(f"{name} must have shape (n_samples, n_features). Got shape {a.shape}.")
    if a.shape[0] == 0:
        raise DataError(f"{name} have no samples.")
    a = a.astype(np.float64, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        raise DataError(f"{name} contain {int(bad.sum())} non-finite value(s) (NaN or inf) out of {a.size}.")
    return a
