"""OOD detectors: ``fit`` on in-distribution features, ``score`` new ones (higher = more OOD).

* :class:`MahalanobisDetector` -- single Gaussian (Woodland et al.) or class-conditional
  means with one shared (tied) covariance (Lee et al. 2018); empirical (MLE, 1/N) or
  Ledoit-Wolf shrinkage covariance; score = Mahalanobis *distance* sqrt(d^2) (the minimum
  over classes when class-conditional). Computed in float64 via a Cholesky factor, on the
  input tensor's device. A memory guard refuses a d x d covariance that would not fit.
* :class:`KNNDetector` -- Sun et al. 2022: L2-normalised features (optional), score = the
  Euclidean distance to the k-th nearest fit sample. Exact brute force, chunked in torch
  (``ibscope.estimators._knn.kth_neighbor_distances``) on the input's device, or faiss
  (exact ``knn`` search) when installed and requested.

Both accept numpy arrays or torch tensors ``(n_samples, n_features)`` and return numpy
float64 scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ibscope._device import resolve_device
from ibscope.errors import DataError, UsageError

log = logging.getLogger(__name__)

DETECTORS = ("mahalanobis", "knn")
COVARIANCES = ("auto", "empirical", "ledoit-wolf")
KNN_BACKENDS = ("auto", "torch", "faiss")
DEFAULT_MEMORY_LIMIT = 4 * 2**30


def parse_bytes(text: str | int | float) -> int:
    """'4GB', '512MB', '2GiB' or a number of bytes -> int."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * f)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise UsageError(f"Cannot read memory size {text!r}. Expected e.g. '4GB', '512MB' or a number of bytes.") from None


def _features(x, *, name: str, device=None, dtype=None):
    """Validated 2-D floating torch tensor on ``device`` (default: its own / cpu)."""
    import torch

    from ibscope.estimators.base import as_tensor

    t = as_tensor(x, name=name, allow_discrete=False)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if device is not None:
        t = t.to(device)
    if dtype is not None:
        t = t.to(dtype)
    return t


def ledoit_wolf(xc):
    """Ledoit-Wolf shrunk covariance of centred ``xc`` (n, d) (torch, float64).

    Returns (covariance, shrinkage): (1 - a) S + a mu I with S the MLE covariance and
    mu = tr(S) / d; a from Ledoit & Wolf (2004), the same formula as
    ``sklearn.covariance.ledoit_wolf_shrinkage``.
    """
    import torch

    n, d = xc.shape
    s = xc.T @ xc / n
    x2 = xc * xc
    emp_trace = x2.sum(0) / n
    mu = emp_trace.sum() / d
    beta_ = (x2.T @ x2).sum()
    delta_ = (s * s).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * emp_trace.sum() + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    a = 0.0 if float(beta) == 0.0 else float(beta / delta)
    cov = (1.0 - a) * s
    cov.diagonal().add_(a * float(mu))
    return cov, a


@dataclass
class MahalanobisDetector:
    """Mahalanobis-distance detector. Fit on ID features, score = distance (higher = OOD).

    Parameters
    ----------
    covariance: "empirical" (MLE), "ledoit-wolf" (shrinkage) or "auto" (Ledoit-Wolf when
        n_fit < 10 d, else empirical; the choice is recorded in :meth:`settings`).
    class_conditional: one mean per class and a tied covariance (Lee et al.); ``fit``
        then needs labels and the score is the minimum distance over classes.
    ridge: optional eps added to the covariance diagonal as eps * tr(S) / d (explicit; 0 = off).
    memory_limit: bytes allowed for the d x d covariance work (three float64 d x d arrays).
    device: "auto", "cpu", "cuda:N" or None (None: the input tensor's device).
    chunk: rows scored at once.
    """

    covariance: str = "auto"
    class_conditional: bool = False
    ridge: float = 0.0
    memory_limit: int | str = DEFAULT_MEMORY_LIMIT
    device: str | None = None
    chunk: int = 4096
    fitted_: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    name = "mahalanobis"

    def __post_init__(self) -> None:
        if self.covariance not in COVARIANCES:
            from ibscope.errors import unknown_name

            raise unknown_name("covariance estimator", str(self.covariance), COVARIANCES)
        if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0 and math.isfinite(self.ridge)):
            raise UsageError(f"The 'ridge' parameter of mahalanobis must be a finite number >= 0. Got {self.ridge!r}.")
        self.memory_limit = parse_bytes(self.memory_limit)
        if int(self.chunk) < 1:
            raise UsageError(f"The 'chunk' parameter of mahalanobis must be >= 1. Got {self.chunk!r}.")

    # ------------------------------------------------------------------------------------
    def check_memory(self, d: int) -> None:
        """Refuse before allocating a covariance that would not fit in ``memory_limit``."""
        need = 3 * d * d * 8
        limit = int(self.memory_limit)  # bytes: parsed in __post_init__
        if need > limit:
            raise UsageError(
                f"Mahalanobis on {d} features needs about {need / 2**30:.1f} GiB for the {d} x {d} covariance "
                f"(float64, with its Cholesky factor and workspace); the memory limit is {limit / 2**30:.1f} GiB.",
                hint="Reduce the features first (e.g. --reduce pca:64, --reduce avgpool for conv maps), use the knn "
                     "detector, or raise --memory-limit if the machine really has the memory.",
            )

    def fit(self, x, y=None) -> MahalanobisDetector:
        import torch

        dev = resolve_device(self.device) if self.device is not None else None
        t = _features(x, name="fit features", device=dev, dtype=torch.float64)
        n, d = t.shape
        self.check_memory(d)
        if self.class_conditional:
            if y is None:
                raise UsageError("Class-conditional Mahalanobis needs class labels for the fit samples; none were given.",
                                 hint="Capture the fit split with labels, or drop --class-conditional.")
            yl = np.asarray(y.cpu() if hasattr(y, "cpu") else y).reshape(-1)
            if yl.shape[0] != n:
                raise DataError(f"Got {yl.shape[0]} labels for {n} fit samples; they must match.")
            classes, inv = np.unique(yl, return_inverse=True)
            inv_t = torch.as_tensor(inv, device=t.device)
            counts = torch.bincount(inv_t, minlength=len(classes)).to(t.dtype)
            means = torch.zeros(len(classes), d, dtype=t.dtype, device=t.device).index_add_(0, inv_t, t) / counts[:, None]
            xc = t - means[inv_t]
            dof = n - len(classes)
        else:
            classes = None
            means = t.mean(0, keepdim=True)
            xc = t - means
            dof = n - 1
        method = self.covariance
        reason = "requested"
        if method == "auto":
            method = "ledoit-wolf" if n < 10 * d else "empirical"
            reason = f"auto: n_fit={n} {'<' if method == 'ledoit-wolf' else '>='} 10 x dims={d}"
        if method == "empirical" and dof < d:
            raise DataError(
                f"Too few in-distribution samples for an empirical covariance: {n} fit samples"
                f"{f' in {len(classes)} classes' if classes is not None else ''} for {d} features; "
                f"need at least {d + (len(classes) if classes is not None else 1)} (the covariance would be singular).",
                hint="Use --covariance ledoit-wolf (shrinkage), reduce the features (--reduce pca:N with N < n), "
                     "or capture more fit samples.",
            )
        if n < 2 or dof < 1:
            raise DataError(f"Too few in-distribution samples for a covariance: got {n} fit samples; need at least "
                            f"{2 if classes is None else len(classes) + 1}.")
        chol, shrink, ok = self._factor(xc, method)
        if not ok and self.covariance == "auto" and method == "empirical":
            # 'auto' is a documented policy: a singular empirical covariance (dead ReLU units,
            # duplicated features) switches to Ledoit-Wolf; the switch is recorded and logged.
            log.warning("Mahalanobis: the empirical covariance of %d features is singular; using Ledoit-Wolf "
                        "shrinkage (covariance='auto').", d)
            method, reason = "ledoit-wolf", "auto: empirical covariance singular"
            chol, shrink, ok = self._factor(xc, method)
        if not ok:
            raise DataError(
                f"The {method} covariance of the {d} fit features is singular or numerically singular: "
                "some features are constant or linear combinations of others.",
                hint="Use --covariance ledoit-wolf (or auto), reduce with --reduce pca:N, or pass an explicit --ridge.",
            )
        self._chol = chol
        self._means = means
        self._classes = classes
        # whitened class means: L^-1 mu_c
        self._wmeans = torch.linalg.solve_triangular(chol, means.T, upper=False).T
        self.fitted_ = {
            "detector": "mahalanobis", "covariance": method, "covariance_requested": self.covariance,
            "covariance_reason": reason,
            "shrinkage": float(shrink), "ridge": float(self.ridge), "class_conditional": bool(self.class_conditional),
            "n_classes": None if classes is None else int(len(classes)), "n_fit": int(n), "dims": int(d),
            "covariance_normalisation": "1/N (maximum likelihood)", "device": str(t.device),
            "log_det_covariance": float(2.0 * torch.log(chol.diagonal()).sum()),
        }
        return self

    def _factor(self, xc, method: str):
        """(Cholesky factor, shrinkage, ok) of the covariance of centred ``xc``."""
        import torch

        n = xc.shape[0]
        if method == "ledoit-wolf":
            cov, shrink = ledoit_wolf(xc)
        else:
            cov, shrink = xc.T @ xc / n, 0.0
        if self.ridge > 0:
            cov.diagonal().add_(self.ridge * float(cov.diagonal().mean()))
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            return None, shrink, False
        piv = chol.diagonal()
        # squared pivot ratio ~ condition number proxy: beyond 1e12 distances are round-off noise
        if not bool(torch.isfinite(piv).all()) or float((piv.min() / piv.max()) ** 2) < 1e-12:
            return None, shrink, False
        return chol, shrink, True

    def score(self, x):
        """Mahalanobis distance to the (nearest class) mean, numpy float64 (n,)."""
        import torch

        from ibscope.estimators._knn import pairwise

        if not hasattr(self, "_chol"):
            raise UsageError("This Mahalanobis detector is not fitted yet; call fit() first.")
        t = _features(x, name="features to score", device=self._chol.device, dtype=torch.float64)
        if t.shape[1] != self._chol.shape[0]:
            raise DataError(f"Features to score have {t.shape[1]} dims; the detector was fitted on {self._chol.shape[0]}.")
        out = torch.empty(t.shape[0], dtype=torch.float64, device=t.device)
        for s in range(0, t.shape[0], int(self.chunk)):
            w = torch.linalg.solve_triangular(self._chol, t[s:s + int(self.chunk)].T, upper=False).T
            if self._classes is None:
                d2 = ((w - self._wmeans) ** 2).sum(1)
            else:
                d2 = pairwise(w, self._wmeans, "sqeuclidean").min(1).values
            out[s:s + w.shape[0]] = d2.clamp_min(0).sqrt()
        return out.cpu().numpy()

    def settings(self) -> dict[str, Any]:
        return dict(self.fitted_)


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


@dataclass
class KNNDetector:
    """k-th nearest-neighbour distance detector (Sun et al. 2022).

    Parameters
    ----------
    k: which neighbour (1 = nearest). Sun et al. use 50 (CIFAR) and 1000 (ImageNet).
    normalize: L2-normalise fit and scored features first (x / max(||x||, 1e-12)), as Sun et al.
    backend: "torch" (exact, chunked, on the input's device), "faiss" (exact flat search,
        CPU; needs faiss installed) or "auto" (torch; the choice is recorded).
    device: "auto", "cpu", "cuda:N" or None (None: the input tensor's device).
    dtype: "float32" (default, GEMM precision ~1e-6 relative) or "float64".
    search: "brute" (exact brute force: torch GEMM + selection, or faiss), "tree" (scipy's
        cKDTree on the CPU, float64 distances of the features) or "auto" (the tree on CPU for at
        most 8 feature dims, e.g. after --reduce pca:4, with the torch backend; brute otherwise).
    """

    k: int = 50
    normalize: bool = True
    backend: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    chunk: int | None = None
    search: str = "auto"
    fitted_: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    name = "knn"

    def __post_init__(self) -> None:
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise UsageError(f"The 'k' parameter of knn must be an integer >= 1. Got {self.k!r} instead.")
        if self.backend not in KNN_BACKENDS:
            from ibscope.errors import unknown_name

            raise unknown_name("k-NN backend", str(self.backend), KNN_BACKENDS)
        if self.dtype not in ("float32", "float64"):
            raise UsageError(f"The 'dtype' parameter of knn must be 'float32' or 'float64'. Got {self.dtype!r}.")
        from ibscope.estimators._knn import check_search

        check_search("knn", self.search)
        if self.search == "tree" and self.backend == "faiss":
            raise UsageError("search='tree' and backend='faiss' exclude each other (faiss searches by brute force).",
                             hint="Use --search tree with --backend auto/torch, or --search brute with faiss.")
        if self.backend == "faiss" and _faiss() is None:
            raise UsageError("The faiss k-NN backend was requested but faiss is not installed.",
                             hint="pip install faiss-cpu, or use --backend torch (exact, same results).")

    def _prep(self, x, name: str, device):
        import torch

        t = _features(x, name=name, device=device, dtype=getattr(torch, self.dtype))
        if self.normalize:
            t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return t

    def fit(self, x, y=None) -> KNNDetector:
        dev = resolve_device(self.device) if self.device is not None else None
        ref = self._prep(x, "fit features", dev)
        if self.k > ref.shape[0]:
            raise DataError(f"k={self.k} nearest neighbours need at least {self.k} fit samples; got {ref.shape[0]}.",
                            hint="Lower --k or capture more fit samples.")
        backend = "torch" if self.backend == "auto" else self.backend
        if backend == "faiss" and ref.device.type != "cpu":
            raise UsageError("The faiss backend runs on CPU here; the features are on " + str(ref.device) + ".",
                             hint="Use --backend torch on GPU (same exact results).")
        from ibscope.estimators import _knn

        search = _knn.resolve_search("knn", self.search, device=ref.device, n=int(ref.shape[0]), dims=int(ref.shape[1]),
                                     max_tree_dims=_knn.KNN_TREE_MAX_DIMS, tree_ok=backend != "faiss",
                                     why_not="backend 'faiss' searches by brute force")
        self._tree = None
        if search == "tree":
            from scipy.spatial import cKDTree

            self._tree = cKDTree(ref.cpu().numpy().astype(np.float64))
        self._ref = ref
        self._backend = backend
        self.fitted_ = {"detector": "knn", "k": int(self.k), "normalize": bool(self.normalize), "backend": backend,
                        "search": search,
                        "n_fit": int(ref.shape[0]), "dims": int(ref.shape[1]), "device": str(ref.device),
                        "dtype": self.dtype, "distance": "euclidean (k-th neighbour, not squared)"}
        return self

    def score(self, x):
        """Distance to the k-th nearest fit sample, numpy float64 (n,)."""
        if not hasattr(self, "_ref"):
            raise UsageError("This k-NN detector is not fitted yet; call fit() first.")
        q = self._prep(x, "features to score", self._ref.device)
        if q.shape[1] != self._ref.shape[1]:
            raise DataError(f"Features to score have {q.shape[1]} dims; the detector was fitted on {self._ref.shape[1]}.")
        if self._tree is not None:
            from ibscope.estimators._knn import _workers

            d, _ = self._tree.query(q.cpu().numpy().astype(np.float64), int(self.k), workers=_workers(q.shape[0]))
            return np.asarray(d, dtype=np.float64).reshape(q.shape[0], -1)[:, -1].copy()
        if self._backend == "faiss":
            faiss = _faiss()
            d2, _ = faiss.knn(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32),
                              np.ascontiguousarray(self._ref.cpu().numpy(), dtype=np.float32), int(self.k))
            return np.sqrt(np.maximum(d2[:, -1].astype(np.float64), 0.0))
        from ibscope.estimators._knn import kth_neighbor_distances

        # squared distances for the search (no sqrt over the whole block), sqrt of the k-th only
        d2 = kth_neighbor_distances(q, int(self.k), ref=self._ref, metric="sqeuclidean_mm", exclude_self=False,
                                    chunk=self.chunk)
        return d2.double().sqrt().cpu().numpy()

    def settings(self) -> dict[str, Any]:
        return dict(self.fitted_)


def make_detector(name: str, **params: Any):
    """Build a detector by name ('mahalanobis' or 'knn') with its parameters."""
    if name == "mahalanobis":
        return MahalanobisDetector(**params)
    if name == "knn":
        return KNNDetector(**params)
    from ibscope.errors import unknown_name

    raise unknown_name("OOD detector", name, DETECTORS)
