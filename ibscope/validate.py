"""``ibscope validate``: run the estimators of a results table on tasks with a known answer.

For every (estimator, parameters, quantity, n, dims) of a results table (the information rows,
I(X;T) and I(T;Y)), synthetic tasks of the same n and dims are drawn, the same estimator is
run on them through the registry with the same parameters, and the estimates are compared
with the task's true value over several seeds: ``bias`` = mean estimate − truth, ``rmse`` over
the repeats. Output (written atomically, temporary file then rename)::

    DIR/validation.csv    one row per (key, task): see ibscope.trust.VALIDATION_COLUMNS (nats)
    DIR/validation.png    mean estimate against truth, one panel per estimator setting
    DIR/validation.json   settings, notes (what was subsampled or skipped), results hash, timing

What "truth" means depends on what the estimator estimates (column ``truth``):

* **I(T;Y), discrete Y** (class labels): Shannon I(T;Y) of class-conditional Gaussian mixtures
  (``mixture``, three levels), of a low-dimensional class mixture embedded by tanh(W z + b)
  into the layer's width (``embedding``; injective, so I(T;Y) = I(Z;Y)), and of a Gaussian
  with the layer's class means and within-class covariance (``layer``, when the store is
  reachable). Monte Carlo, error reported. For the KDE estimators the noise they model is part
  of the target: I(T + N(0, σ²I); Y) (exact for the Gaussian tasks; for ``embedding`` the
  noise-free value, an upper bound). For binning, I(T;Y) bounds its binned target from above
  (data processing), so a positive bias against it is at least as large against the binned one.
* **I(X;T), X = sample identity** (binning, KDE): for a deterministic layer I(X;T) = H(T),
  which is log n for any layer with distinct rows: not a useful truth. The tasks instead draw
  the n probe rows from a known *finite population* of activation patterns (``discrete-layer``:
  M random patterns c·tanh(G), three levels of M; ``embedding``: a 2-D latent grid embedded by
  tanh into the layer's width, Gaussian weights; ``layer``: the layer's own rows at the last
  checkpoint, drawn without replacement) and the truth is what the estimator's value stands
  for on that population: binning → the entropy of the binned population H(bin(T)) (the
  estimator's own bin rule applied to the population; exact); KDE → I(X; T + N(0, σ²I)) with X
  uniform over the population (Monte Carlo, error reported); any other estimator → H(T) of the
  population.
* **I(X;T), X = probe inputs**, and I(T;Y) with continuous Y: correlated Gaussians of full rank
  at three levels (``gaussian``, closed form), latent Gaussians embedded by tanh on both sides
  (``embedding``, closed form), and the layer linearised on its inputs (``layer``: X Gaussian
  with the inputs' covariance, T = B X + E with B and the residual covariance fitted on the
  store; closed form).

The three levels span the range of the table's own estimates of that key (see
:func:`target_levels`). Everything is seeded; ``--max-n`` caps the sample count (larger n is
validated at the cap and said so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ibscope._version import __version__
from ibscope.errors import DataError, IbscopeError, PluginError, UsageError, unknown_name
from ibscope.results import INFO_UNITS, Results, read_results
from ibscope.trust import (
    SATURATION_TOLERANCE,
    VALIDATION_COLUMNS,
    VALIDATION_CSV,
    VALIDATION_JSON,
    VALIDATION_PNG,
    is_saturated,
    params_key,
    write_csv_atomic,
)
from ibscope.units import conversion_factor

log = logging.getLogger(__name__)

FAMILIES = ("gaussian", "mixture", "discrete-layer", "embedding", "layer")
PAIR = ("I(X;T)", "I(T;Y)")
DEFAULT_REPEATS = 3
DEFAULT_MAX_N = 10_000
#: at most this many layer widths (dims) per (estimator, parameters, quantity, n); 0 = all
DEFAULT_MAX_WIDTHS = 4
#: Monte Carlo sample sizes: final truths, and the cheaper ones used to tune a task's level
MC_MIXTURE = 20_000
MC_MIXTURE_TUNE = 4_000
MC_NOISY = 1_500
MC_NOISY_TUNE = 400
#: largest population (number of distinct patterns) of a discrete-layer task
POP_MAX_BINNED = 2 ** 15
POP_MAX_NOISY = 2 ** 14
#: estimators whose I(T;Y) cap is H(Y) (so a cap there means discrete labels)
HY_CAP_ESTIMATORS = ("binning", "adaptive-binning", "kde", "kde-upper", "kde-lower", "adaptive-kde",
                     "adaptive-kde-upper", "adaptive-kde-lower", "ksg", "compressed")


# ============================================================================================ keys
@dataclass
class LayerRef:
    """Where the layer-matched task reads its statistics: a store, a checkpoint index, a layer."""

    store: str
    checkpoint: int
    layer: str
    epoch: int | None = None


@dataclass
class Key:
    """One (estimator, parameters, quantity, n, dims) of the results table."""

    estimator: str
    params: dict
    quantity: str
    n: int
    dims: tuple[int, int]
    dims_text: str
    values: list[float]
    caps: list[float]
    saturated: bool
    x_source: str | None = None
    y_discrete: bool = False
    priors: np.ndarray | None = None
    layer_ref: LayerRef | None = None
    n_used: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        p = {k: v for k, v in self.params.items() if k != "x_source" and v is not None}
        ps = ", ".join(f"{k}={v}" for k, v in p.items())
        return f"{self.estimator}{f' ({ps})' if ps else ''} {self.quantity} n={self.n} dims={self.dims_text}"


def _dims(text: str) -> tuple[int, int] | None:
    try:
        a, b = (int(v) for v in str(text).split("x"))
        return a, b
    except ValueError:
        return None


def _priors_from_entropy(h: float) -> np.ndarray:
    """Class priors with entropy ``h`` (nats): K = ceil(e^h) classes, geometric weights tuned to h."""
    k = max(2, int(math.ceil(math.exp(h) - 1e-6)))
    if abs(h - math.log(k)) < 1e-9:
        return np.full(k, 1.0 / k)

    def ent(r):
        w = r ** np.arange(k)
        w = w / w.sum()
        return float(-(w * np.log(w)).sum())

    lo, hi = 1e-6, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if ent(mid) < h:
            lo = mid
        else:
            hi = mid
    w = hi ** np.arange(k)
    return w / w.sum()


def _store_paths(prov: dict) -> dict[tuple[str, str], str]:
    out: dict = {}
    for src in [prov, *(p for p in prov.get("parts") or [] if isinstance(p, dict))]:
        for e in src.get("stores") or []:
            if isinstance(e, dict) and e.get("path") and e.get("run") is not None:
                out.setdefault((e["run"], e.get("split")), e["path"])
    return out


def plan_keys(res: Results, *, estimators: Sequence[str] | None = None,
              quantities: Sequence[str] | None = None) -> tuple[list[Key], list[str]]:
    """The keys to validate (information rows with a value) and notes on what is left out."""
    from ibscope.estimators import registry

    notes: list[str] = []
    rows = [r for r in res.rows if r["estimator"] != "metrics"]
    if estimators:
        have = {r["estimator"] for r in rows}
        checkable = sorted({r["estimator"] for r in rows if r["quantity"] in PAIR and r["unit"] in INFO_UNITS})
        for e in estimators:
            if e not in have:
                from ibscope.errors import did_you_mean

                known = e in registry.available()
                raise UsageError(
                    f"Estimator '{e}' is not in this results table"
                    + (" (it is a registered estimator, but the table has no rows of it)." if known else ".")
                    + did_you_mean(e, checkable),
                    hint="validate re-runs the information estimators of the table: "
                         + (", ".join(checkable) if checkable else "(none in this table)")
                         + ". Estimate with it first (`ibscope estimate STORE -e NAME -o RESULTS`).")
            if e not in checkable:
                raise UsageError(
                    f"Estimator '{e}' measures no information (I(X;T) or I(T;Y)) in this table; validate checks "
                    "information estimates against tasks with a known mutual information.",
                    hint="Estimators validate can check in this table: "
                         + (", ".join(checkable) if checkable else "(none)") + ".")
        rows = [r for r in rows if r["estimator"] in estimators]
    if quantities:
        for q in quantities:
            if q not in PAIR:
                raise unknown_name("quantity", q, PAIR)
        rows = [r for r in rows if r["quantity"] in quantities]
    other = sorted({f"{r['estimator']} ({r['quantity']})" for r in rows if r["quantity"] not in PAIR})
    if other:
        notes.append("Not validated (validate covers the information estimates I(X;T) and I(T;Y)): "
                     + ", ".join(other) + ".")
    info = [r for r in rows if r["quantity"] in PAIR and r["unit"] in INFO_UNITS]
    valued = [r for r in info if r["value"] is not None]
    if len(valued) < len(info):
        notes.append(f"{len(info) - len(valued)} row(s) without a value (noted cells) are left out.")
    if not valued:
        raise DataError("The results hold no I(X;T) or I(T;Y) estimates with a value; there is nothing to validate.",
                        hint="Validate a table written by `ibscope estimate` with a pair estimator "
                             "(see `ibscope estimators`).")
    # labels: discrete when an H(Y)-capped estimator has a cap on I(T;Y) rows of the same run/split
    hy: dict[tuple, float] = {}
    for r in valued:
        if r["quantity"] == "I(T;Y)" and r["estimator"] in HY_CAP_ESTIMATORS and r["cap"] is not None:
            f = conversion_factor(r["unit"], "nats")
            hy.setdefault((r["run"], r["split"]), r["cap"] * f)
    stores = _store_paths(res.provenance or {})
    groups: dict[tuple, list[dict]] = {}
    for r in valued:
        dims = _dims(r["dims"])
        if dims is None or r["n_samples"] is None:
            notes.append(f"Rows of {r['estimator']} {r['quantity']} without n_samples or dims "
                         f"(dims {r['dims']!r}) are left out.")
            continue
        groups.setdefault((r["estimator"], params_key(r["params"]), r["quantity"], int(r["n_samples"]), r["dims"]),
                          []).append(r)
    keys = []
    for (est, pk, q, n, dtext), grp in groups.items():
        try:
            registry.get(est)
        except IbscopeError as exc:
            notes.append(f"{est}: not validated ({exc.message})")
            continue
        factors = [conversion_factor(r["unit"], "nats") for r in grp]
        vals = [r["value"] * fi for r, fi in zip(grp, factors)]
        caps = [r["cap"] * fi for r, fi in zip(grp, factors) if r["cap"] is not None]
        dims = _dims(dtext)
        assert dims is not None  # rows without dims were left out above
        key = Key(est, json.loads(pk), q, n, dims, dtext, vals, caps,
                  any(bool(is_saturated(r)) for r in grp))
        key.x_source = key.params.get("x_source") if q == "I(X;T)" else None
        if q == "I(X;T)" and key.x_source is None:
            key.x_source = registry.get(est).x_source
        last = max(grp, key=lambda r: (r["checkpoint"] if r["checkpoint"] is not None else -1))
        spath = stores.get((last["run"], last["split"]))
        if spath is not None and last["checkpoint"] is not None:
            key.layer_ref = LayerRef(spath, int(last["checkpoint"]), last["layer"], last["epoch"])
        if q == "I(T;Y)":
            h = hy.get((last["run"], last["split"]))
            key.y_discrete = h is not None and key.dims[1] == 1
            if key.y_discrete and h is not None:
                key.priors = _priors_from_entropy(h)
        keys.append(key)
    keys.sort(key=lambda k: (k.estimator, params_key(k.params), PAIR.index(k.quantity), k.n, k.dims))
    return keys, notes


def thin_widths(keys: list[Key], most: int) -> tuple[list[Key], list[str]]:
    """At most ``most`` layer widths per (estimator, parameters, quantity, n): the narrowest, the
    widest and evenly spaced ones between (by the number of units); ``most`` = 0 keeps all.
    Returns the kept keys and a note naming what was left out."""
    if most == 0:
        return keys, []
    groups: dict[tuple, list[Key]] = {}
    for k in keys:
        groups.setdefault((k.estimator, params_key(k.params), k.quantity, k.n), []).append(k)
    kept, left = [], []
    for g in groups.values():
        g = sorted(g, key=lambda k: (k.dims[1] if k.quantity == "I(X;T)" else k.dims[0], k.dims))
        if len(g) <= most:
            kept += g
            continue
        idx = sorted({round(i * (len(g) - 1) / (most - 1)) for i in range(most)})
        kept += [g[i] for i in idx]
        left += [f"{g[i].estimator} {g[i].quantity} {g[i].dims_text}" for i in range(len(g)) if i not in idx]
    order = {id(k): i for i, k in enumerate(keys)}
    kept.sort(key=lambda k: order[id(k)])
    notes = [f"Subsampled to {most} layer widths per estimator, quantity and n (--max-widths; the narrowest, the "
             f"widest and evenly spaced ones between): not validated {', '.join(left)}. Their plot error bars are "
             "left out."] if left else []
    return kept, notes


def target_levels(key: Key, upper: float | None) -> list[float]:
    """Three true values spanning the key's estimates (nats).

    hi = the largest estimate (x 1.25 when an estimate is saturated: a saturated estimate may
    hide any larger truth), capped at ``upper`` (the family's largest meaningful value, e.g.
    0.95 H(Y)); lo = the smallest estimate, but at most 0.2 hi and at least 0.05 hi (a low
    truth is where the chance-level artefacts show); mid halfway.
    """
    vals = [v for v in key.values if math.isfinite(v)]
    vmax = max(vals) if vals else 1.0
    vmin = min(vals) if vals else 0.0
    hi = vmax * (1.25 if key.saturated else 1.0)
    if hi <= 1e-3:
        hi = 0.5 * upper if upper else 1.0
    if upper is not None:
        hi = min(hi, upper)
    lo = min(max(vmin, 0.05 * hi), 0.2 * hi)
    return [lo, 0.5 * (lo + hi), hi]


# ============================================================================================ truths
def _torch():
    import torch

    return torch


def mixture_mi(means: np.ndarray, cov: np.ndarray | float, priors: np.ndarray, m: int, seed: int,
               device: str = "cpu") -> tuple[float, float]:
    """I(T;Y) in nats of T | Y=k ~ N(means[k], cov), Y ~ priors: stratified Monte Carlo (value, std error).

    Whitened and reduced to the span of the mean differences (the other directions carry no
    information about Y); per class y, ``round(m * prior)`` draws z = nu_y + eps and the pointwise
    information -log sum_k p_k exp(-|D_yk|^2 / 2 - eps . D_yk), D_yk = nu_y - nu_k (the own-class
    term cancelled exactly, so far-apart classes lose no precision). A common seed makes the
    value smooth in the means (for tuning).
    """
    mu = np.atleast_2d(np.asarray(means, float))
    k, d = mu.shape
    if np.isscalar(cov) or np.ndim(cov) == 0:
        nu = mu / math.sqrt(float(cov))
    else:
        lc = np.linalg.cholesky(np.asarray(cov, float))
        nu = np.linalg.solve(lc, mu.T).T
    diff = nu[1:] - nu[0]
    if not diff.size or np.abs(diff).max() == 0:
        return 0.0, 0.0
    q, _ = np.linalg.qr(diff.T)
    r = np.linalg.matrix_rank(diff)
    nu = (nu - nu[0]) @ q[:, :r]
    rng = np.random.default_rng(seed)
    p = np.asarray(priors, float)
    logp = np.log(p)
    total, var = 0.0, 0.0
    for y in range(k):
        my = max(2, int(round(m * p[y])))
        eps = rng.standard_normal((my, r))
        delta = nu[y] - nu  # (k, r)
        a = logp - 0.5 * (delta * delta).sum(1) - eps @ delta.T  # (my, k)
        amax = a.max(1, keepdims=True)
        pmi = -(amax[:, 0] + np.log(np.exp(a - amax).sum(1)))
        total += p[y] * float(pmi.mean())
        var += p[y] ** 2 * float(pmi.var(ddof=1)) / my
    return total, math.sqrt(var)


_TUNE_CACHE: dict = {}


def _tune_separation(nu: np.ndarray, priors: np.ndarray, target: float, seed: int) -> float:
    """Scale s of the class means ``nu`` (unit noise) with I(T;Y) ~ target (cached: the same
    geometry, priors and target recur across layers and estimators)."""
    ck = (nu.round(12).tobytes(), nu.shape, np.asarray(priors).round(12).tobytes(), round(target, 5), seed)
    if ck not in _TUNE_CACHE:
        _TUNE_CACHE[ck] = round(_tune(lambda s_: mixture_mi(s_ * nu, 1.0, priors, MC_MIXTURE_TUNE, seed)[0],
                                      target, 1e-3, 60.0, steps=22), 6)
    return _TUNE_CACHE[ck]


def noisy_mi(support: np.ndarray, weights: np.ndarray, variance: float, m: int, seed: int,
             device: str = "cpu") -> tuple[float, float]:
    """I(X; T + N(0, variance I)) in nats, X ~ weights over the rows of ``support`` (T = support[X]):
    stratified Monte Carlo over X of log p(y | x) - log p(y) (value, std error). Bounded by H(X)."""
    torch = _torch()
    t = torch.tensor(np.asarray(support, float), dtype=torch.float64, device=device)
    w = np.asarray(weights, float)
    M = t.shape[0]
    rng = np.random.default_rng(seed)
    if M <= m:
        per = np.maximum(1, np.round(w * m)).astype(int)
        idx = np.repeat(np.arange(M), per)
    else:
        idx = rng.choice(M, size=m, p=w)
    idx_t = torch.tensor(idx, device=device)
    sd = math.sqrt(variance)
    eps = torch.tensor(rng.standard_normal((len(idx), t.shape[1])), dtype=torch.float64, device=device)
    y = t[idx_t] + sd * eps
    logw = torch.tensor(np.log(np.maximum(w, 1e-300)), dtype=torch.float64, device=device)
    out = torch.empty(len(idx), dtype=torch.float64, device=device)
    chunk = max(1, int(2 ** 22 // max(1, M)))
    for s in range(0, len(idx), chunk):
        d2 = torch.cdist(y[s:s + chunk], t) ** 2
        lse = torch.logsumexp(logw - d2 / (2 * variance), dim=1)
        out[s:s + chunk] = -0.5 * (eps[s:s + chunk] ** 2).sum(1) - lse
    o = out.cpu().numpy()
    if M <= m:  # strata: the mean of each x's draws, weighted by w; within-stratum variances
        s1 = np.bincount(idx, weights=o, minlength=M)
        s2 = np.bincount(idx, weights=o * o, minlength=M)
        mean = s1 / per
        var_j = np.where(per > 1, (s2 - per * mean ** 2) / np.maximum(per - 1, 1), 0.0)
        return float((w * mean).sum()), float(math.sqrt(max(0.0, (w ** 2 * np.maximum(var_j, 0) / per).sum())))
    return float(o.mean()), float(o.std(ddof=1) / math.sqrt(len(o)))


def _codes(b: np.ndarray) -> np.ndarray:
    """One symbol per row of an integer array."""
    if b.shape[1] == 1:
        return np.unique(b[:, 0], return_inverse=True)[1].reshape(-1)
    return np.unique(b, axis=0, return_inverse=True)[1].reshape(-1)


def weighted_entropy(codes: np.ndarray, weights: np.ndarray) -> float:
    p = np.bincount(codes, weights=weights)
    p = p[p > 0]
    p = p / p.sum()
    return float(-(p * np.log(p)).sum())


def binned_entropy(est, support: np.ndarray, weights: np.ndarray) -> float:
    """H(bin(T)) of the population: the estimator's own bin rule applied to the population rows."""
    torch = _torch()
    b, _ = est._bin(torch.tensor(np.asarray(support, float), dtype=torch.float64))
    return weighted_entropy(_codes(b.cpu().numpy()), weights)


def gaussian_mi(cov_x: np.ndarray, b: np.ndarray, cov_e: np.ndarray) -> float:
    """I(X;T) of X ~ N(., cov_x), T = b X + E, E ~ N(0, cov_e): 1/2 log det(b cov_x b' + cov_e) / det(cov_e)."""
    s = b @ cov_x @ b.T + cov_e
    return 0.5 * (np.linalg.slogdet(s)[1] - np.linalg.slogdet(cov_e)[1])


def _known(value: float) -> Callable[[dict], tuple[float, float]]:
    """The truth of a task that does not depend on the estimate: (value, no Monte Carlo error)."""
    return lambda extra: (value, 0.0)


# ============================================================================================ tasks
@dataclass
class Task:
    """One synthetic task: how to draw (a, b) for the estimator, and its truth.

    ``draw(rng, n) -> (a, b)`` numpy arrays in the estimator's argument order;
    ``truth(extra) -> (value, mc_error)`` where ``extra`` is the estimate's ``extra`` (the KDE
    estimators report the resolved noise variance there). ``fixed_truth`` caches a truth that
    does not depend on the estimate.
    """

    name: str
    family: str
    level: str
    truth_name: str
    draw: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    truth: Callable[[dict], tuple[float, float]]
    note: str = ""
    _cache: dict = field(default_factory=dict)

    def truth_for(self, extra: dict) -> tuple[float, float]:
        k = round(float(extra.get("noise_variance") or 0.0), 15)
        if k not in self._cache:
            self._cache[k] = self.truth(extra)
        return self._cache[k]


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _class_means(k: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """K class-mean directions in d dims with pairwise distance 1 where possible."""
    if k == 2:
        v = np.zeros((2, d))
        v[0, 0], v[1, 0] = -0.5, 0.5
        return v
    if k <= d:
        return np.eye(k, d) / math.sqrt(2)
    v = rng.standard_normal((k, d))
    dist = np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1))
    return v / dist[np.triu_indices(k, 1)].mean()


def _labels(rng: np.random.Generator, n: int, priors: np.ndarray) -> np.ndarray:
    """n labels with class counts as close to n * priors as integers allow (H(Y) as in the table)."""
    counts = np.floor(n * priors).astype(int)
    rest = n - counts.sum()
    counts[np.argsort(-(n * priors - counts))[:rest]] += 1
    y = np.repeat(np.arange(len(priors)), counts)
    rng.shuffle(y)
    return y.astype(np.int64)


def _tune(fn: Callable[[float], float], target: float, lo: float, hi: float, *, log: bool = True,
          steps: int = 30) -> float:
    """Parameter p in [lo, hi] with fn(p) ~ target for an increasing fn (bisection; clipped at the ends)."""
    if fn(hi) <= target:
        return hi
    if fn(lo) >= target:
        return lo
    a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
    for _ in range(steps):
        mid = 0.5 * (a + b)
        if fn(math.exp(mid) if log else mid) < target:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b)) if log else 0.5 * (a + b)


def _tune_count(fn: Callable[[float], float], target: float, most: int, tol: float = 0.03, steps: int = 8) -> int:
    """Population size M in [2, most] with fn(M) ~ target for fn ~ log M minus an overlap loss:
    multiplicative corrections M <- M exp(target - fn(M)) (a few evaluations near the answer)."""
    m_ = float(min(max(2.0, math.exp(target)), most))
    best = (math.inf, int(m_))
    for _ in range(steps):
        v = fn(m_)
        err = abs(v - target)
        if err < best[0]:
            best = (err, int(round(m_)))
        if err < tol:
            break
        nxt = min(max(2.0, m_ * math.exp(target - v)), float(most))
        if abs(nxt - m_) < 0.5:
            break
        m_ = nxt
    return best[1]


class _Ctx:
    """What the task builders need: the estimator instance, the key, a layer's statistics, device."""

    def __init__(self, key: Key, est, layer: dict | None, device: str, seed: int):
        self.key, self.est, self.layer, self.device, self.seed = key, est, layer, device, seed
        self.scale = float(layer["scale"]) if layer and layer.get("scale") else 1.0
        cls_names = {c.__name__ for c in type(est).__mro__}
        self.binning = "_BinningMixin" in cls_names
        self.kde = "_KDEMixin" in cls_names

    def variance(self, t: np.ndarray) -> float:
        torch = _torch()
        return float(self.est._variance(torch.tensor(np.asarray(t, float), dtype=torch.float64)))


# ---------------------------------------------------------------------------------- I(T;Y), discrete Y
def tasks_labels(ctx: _Ctx, families: Sequence[str]) -> list[Task]:
    key = ctx.key
    d = key.dims[0]
    priors = key.priors
    assert priors is not None  # keys of I(T;Y) with discrete labels carry the label priors
    k = len(priors)
    hy = float(-(priors * np.log(priors)).sum())
    rng0 = np.random.default_rng(ctx.seed + 17)
    nu = _class_means(k, d, rng0)
    c = ctx.scale
    out: list[Task] = []

    def var_of(extra: dict) -> float:
        return float(extra.get("noise_variance") or 0.0) if ctx.kde else 0.0

    truth_name = "I(T+N(0,σ²I);Y)" if ctx.kde else "I(T;Y)"
    if "mixture" in families:
        levels = target_levels(key, 0.95 * hy)
        seen = set()
        for name, target in zip(("low", "mid", "high"), levels):
            s = _tune_separation(nu, priors, target, ctx.seed)
            if s in seen:
                continue
            seen.add(s)

            def draw(rng, n, s=s):
                y = _labels(rng, n, priors)
                t = c * (s * nu[y] + rng.standard_normal((n, d)))
                return t, y

            def truth(extra, s=s):
                v = var_of(extra)
                return mixture_mi(s * nu, 1.0 + v / (c * c), priors, MC_MIXTURE, ctx.seed + 1)

            out.append(Task(f"mixture {name} (class means {s:.3g} sd apart)", "mixture", name, truth_name,
                            draw, truth))
    if "embedding" in families:
        m = min(d, 2)
        nu_m = _class_means(k, m, rng0)
        w = rng0.standard_normal((d, m))
        w = w / np.linalg.norm(w, axis=0, keepdims=True) * 1.2
        bias = 0.3 * rng0.standard_normal(d)
        target = target_levels(key, 0.95 * hy)[1]
        s = _tune_separation(nu_m, priors, target, ctx.seed)

        def draw_emb(rng, n, s=s):
            y = _labels(rng, n, priors)
            z = s * nu_m[y] + rng.standard_normal((n, m))
            return c * np.tanh(z @ w.T + bias), y

        def truth_emb(extra, s=s):
            return mixture_mi(s * nu_m, 1.0, priors, MC_MIXTURE, ctx.seed + 1)

        out.append(Task(f"embedding ({m}-D class mixture, tanh into {d} units)", "embedding", "mid", "I(T;Y)", draw_emb,
                        truth_emb, note=("truth without the KDE noise (an upper bound on the KDE target)"
                                     if ctx.kde else "")))
    if "layer" in families and ctx.layer is not None and ctx.layer.get("class_means") is not None:
        mu = ctx.layer["class_means"]
        cov = ctx.layer["within_cov"]
        lp = ctx.layer["priors"]
        lc = np.linalg.cholesky(cov)

        def draw_layer(rng, n):
            y = _labels(rng, n, lp)
            return mu[y] + rng.standard_normal((n, d)) @ lc.T, y

        def truth_layer(extra):
            v = var_of(extra)
            return mixture_mi(mu, cov + v * np.eye(d), lp, MC_MIXTURE, ctx.seed + 1)

        ref = ctx.layer["ref"]
        out.append(Task(f"layer ({ref}: class means, within-class covariance)", "layer", "-", truth_name, draw_layer,
                        truth_layer))
    return out


# ---------------------------------------------------------------------------------- I(X;T), X = identity
def tasks_identity(ctx: _Ctx, families: Sequence[str]) -> list[Task]:
    key, dev = ctx.key, ctx.device
    d = key.dims[1]
    n = key.n_used
    c = ctx.scale
    rng0 = np.random.default_rng(ctx.seed + 29)
    out: list[Task] = []
    if ctx.binning:
        truth_name = "H(bin(T))"

        def truth_of(support, weights):
            return lambda extra: (binned_entropy(ctx.est, support, weights), 0.0)
    elif ctx.kde:
        truth_name = "I(X;T+N(0,σ²I))"

        def truth_of(support, weights):
            def f(extra):
                v = float(extra.get("noise_variance") or ctx.variance(support))
                return noisy_mi(support, weights, v, MC_NOISY, ctx.seed + 3, dev)
            return f
    else:
        truth_name = "H(T)"

        def truth_of(support, weights):
            return lambda extra: (weighted_entropy(_codes(np.ascontiguousarray(support).view(
                np.dtype((np.void, support.dtype.itemsize * support.shape[1])))), weights), 0.0)

    def draw_from(support, weights, replace=True):
        def draw(rng, n_):
            if replace:
                idx = rng.choice(len(support), size=n_, p=weights)
            else:
                idx = rng.permutation(len(support))[:n_]
            return np.arange(n_, dtype=np.int64), support[idx]
        return draw

    if "discrete-layer" in families:
        mmax = POP_MAX_NOISY if ctx.kde else POP_MAX_BINNED
        pool = c * np.tanh(1.5 * rng0.standard_normal((mmax, d)))
        if ctx.kde:
            var = ctx.variance(pool)

            def value(m_):
                m_ = int(round(m_))
                return noisy_mi(pool[:m_], np.full(m_, 1.0 / m_), var, MC_NOISY_TUNE, ctx.seed, dev)[0]
            upper = 0.95 * math.log(n)
        else:
            def value(m_):
                m_ = int(round(m_))
                return truth_of(pool[:m_], np.full(m_, 1.0 / m_))({})[0]
            upper = value(mmax)
        seen = set()
        for name, target in zip(("low", "mid", "high"), target_levels(key, upper)):
            m_ = _tune_count(value, target, mmax)
            if m_ in seen:
                continue
            seen.add(m_)
            sup, wts = pool[:m_], np.full(m_, 1.0 / m_)
            out.append(Task(f"discrete-layer {name} ({m_} equally likely patterns)", "discrete-layer", name,
                            truth_name, draw_from(sup, wts), truth_of(sup, wts)))
    if "embedding" in families:
        m = min(d, 2)
        g = 64 if m == 2 else 2048
        axis = np.linspace(-2.5, 2.5, g)
        z = np.stack(np.meshgrid(*([axis] * m), indexing="ij"), -1).reshape(-1, m)
        wts = np.exp(-0.5 * (z ** 2).sum(1))
        wts /= wts.sum()
        w = rng0.standard_normal((d, m))
        w = w / np.linalg.norm(w, axis=0, keepdims=True) * 1.2
        sup = c * np.tanh(z @ w.T + 0.3 * rng0.standard_normal(d))
        out.append(Task(f"embedding ({m}-D latent grid of {len(z)} points, tanh into {d} units)", "embedding", "-",
                        truth_name, draw_from(sup, wts), truth_of(sup, wts)))
    if "layer" in families and ctx.layer is not None and ctx.layer.get("rows") is not None:
        sup = ctx.layer["rows"]
        wts = np.full(len(sup), 1.0 / len(sup))
        if ctx.binning and n >= len(sup):
            key.notes.append("layer-matched task left out: the probe set is the layer's whole population, on which "
                             "binning's plug-in value is exact by construction (bias 0)")
        else:
            note = "" if n < len(sup) else "the n probe rows are the whole population here"
            out.append(Task(f"layer ({ctx.layer['ref']}: its {len(sup)} rows as the population)", "layer", "-",
                            truth_name, draw_from(sup, wts, replace=n > len(sup)), truth_of(sup, wts), note=note))
    return out


# ---------------------------------------------------------------------------------- continuous pairs
def tasks_continuous(ctx: _Ctx, families: Sequence[str]) -> list[Task]:
    key = ctx.key
    da, db = key.dims
    rng0 = np.random.default_rng(ctx.seed + 41)
    out: list[Task] = []
    r = min(da, db)
    qa, qb = _rotation(rng0, da), _rotation(rng0, db)
    if key.quantity == "I(X;T)":
        sa, sb = (float(ctx.layer.get("x_scale", 1.0)) if ctx.layer else 1.0), ctx.scale
    else:  # (T, Y): the layer's scale on T, unit scale on a continuous Y
        sa, sb = ctx.scale, 1.0
    if "gaussian" in families:
        seen = set()
        for name, target in zip(("low", "mid", "high"), target_levels(key, None)):
            rho = math.sqrt(1 - math.exp(-2 * target / r))
            if round(rho, 9) in seen:
                continue
            seen.add(round(rho, 9))

            def draw(rng, n, rho=rho):
                u = rng.standard_normal((n, da))
                v = rng.standard_normal((n, db))
                v[:, :r] = rho * u[:, :r] + math.sqrt(1 - rho * rho) * v[:, :r]
                return sa * (u @ qa), sb * (v @ qb)

            value = -0.5 * r * math.log(1 - rho * rho)
            out.append(Task(f"gaussian {name} ({r} correlated pairs, ρ = {rho:.3g}, rotated)", "gaussian", name,
                            key.quantity, draw, _known(value)))
    if "embedding" in families:
        m = min(2, da, db)
        target = target_levels(key, None)[1]
        rho = math.sqrt(1 - math.exp(-2 * target / m))
        wa = rng0.standard_normal((da, m))
        wa = wa / np.linalg.norm(wa, axis=0, keepdims=True) * 1.2
        wb = rng0.standard_normal((db, m))
        wb = wb / np.linalg.norm(wb, axis=0, keepdims=True) * 1.2
        ba, bb = 0.3 * rng0.standard_normal(da), 0.3 * rng0.standard_normal(db)

        def draw_emb(rng, n):
            z1 = rng.standard_normal((n, m))
            z2 = rho * z1 + math.sqrt(1 - rho * rho) * rng.standard_normal((n, m))
            return sa * np.tanh(z1 @ wa.T + ba), sb * np.tanh(z2 @ wb.T + bb)

        value = -0.5 * m * math.log(1 - rho * rho)
        out.append(Task(f"embedding ({m}-D latent Gaussians, tanh into {da} and {db} units)", "embedding", "mid",
                        key.quantity, draw_emb, _known(value)))
    if ("layer" in families and key.quantity == "I(X;T)" and ctx.layer is not None
            and ctx.layer.get("lin_b") is not None):
        cx, bm, ce, mx = ctx.layer["x_cov"], ctx.layer["lin_b"], ctx.layer["lin_cov_e"], ctx.layer["x_mean"]
        lx, le = np.linalg.cholesky(cx), np.linalg.cholesky(ce)

        def draw_lin(rng, n):
            x = mx + rng.standard_normal((n, da)) @ lx.T
            return x, x @ bm.T + rng.standard_normal((n, db)) @ le.T

        value = gaussian_mi(cx, bm, ce)
        out.append(Task(f"layer ({ctx.layer['ref']} linearised on its inputs: T = B X + E)", "layer", "-",
                        "I(X;T)", draw_lin, _known(value)))
    return out


# ============================================================================================ layer stats
def layer_stats(ref: LayerRef, key: Key, cache: dict) -> tuple[dict | None, str | None]:
    """Statistics of the layer the key's rows came from (None and a reason when not reachable)."""
    ck = (ref.store, ref.checkpoint, ref.layer)
    if ck in cache:
        return cache[ck]
    from ibscope.store import open_store

    try:
        st = open_store(ref.store)
        info = st._ckpt(ref.checkpoint)
        if ref.epoch is not None and info.epoch is not None and info.epoch != ref.epoch:
            raise DataError(f"checkpoint {ref.checkpoint} of the store is epoch {info.epoch}, the results say "
                            f"{ref.epoch}")
        t = np.asarray(st.activations(info, ref.layer), float)
    except (IbscopeError, OSError) as exc:
        msg = getattr(exc, "message", str(exc))
        cache[ck] = (None, f"store '{ref.store}' not usable ({msg})")
        return cache[ck]
    where = f"{ref.layer}, epoch {info.epoch}" if info.epoch is not None else f"{ref.layer}, checkpoint {ref.checkpoint}"
    out: dict[str, Any] = {"ref": where, "rows": t, "scale": float(np.abs(t).max()) or 1.0}
    d = t.shape[1]
    ridge = 1e-6 * (float(np.trace(np.cov(t.T, ddof=1).reshape(d, d))) / d + 1e-12)
    if st.labels is not None and np.asarray(st.labels).dtype.kind in "iub":
        y = np.unique(np.asarray(st.labels).reshape(-1), return_inverse=True)[1]
        k = int(y.max()) + 1
        mu = np.stack([t[y == j].mean(0) for j in range(k)])
        resid = t - mu[y]
        cov = (resid.T @ resid) / max(1, len(t) - k) + ridge * np.eye(d)
        out.update(class_means=mu, within_cov=cov, priors=np.bincount(y, minlength=k) / len(y))
    if st.has_inputs:
        x = np.asarray(st.inputs(), float).reshape(len(t), -1)
        if x.shape[1] == key.dims[0] or key.quantity != "I(X;T)":
            mx = x.mean(0)
            cx = np.cov(x.T, ddof=1).reshape(x.shape[1], x.shape[1])
            cx = cx + 1e-6 * (np.trace(cx) / x.shape[1] + 1e-12) * np.eye(x.shape[1])
            xc = x - mx
            bm = np.linalg.lstsq(np.c_[xc, np.ones(len(x))], t, rcond=None)[0][:-1].T
            e = t - t.mean(0) - xc @ bm.T
            ce = np.cov(e.T, ddof=1).reshape(d, d)
            floor = 1e-3 * (float(np.trace(np.cov(t.T, ddof=1).reshape(d, d))) / d + 1e-12)
            wv, vv = np.linalg.eigh(ce)
            ce = (vv * np.maximum(wv, floor)) @ vv.T
            out.update(x_mean=mx, x_cov=cx, lin_b=bm, lin_cov_e=ce, x_scale=float(np.abs(x).max()) or 1.0)
    cache[ck] = (out, None)
    return cache[ck]


# ============================================================================================ running
@dataclass
class ValidationRun:
    rows: list[dict]
    notes: list[str]
    out_dir: Path
    seconds: float
    paths: list[Path]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _estimate(est, a: np.ndarray, b: np.ndarray, device: str):
    torch = _torch()
    ta = torch.from_numpy(np.ascontiguousarray(a))
    tb = torch.from_numpy(np.ascontiguousarray(b))
    return est.estimate(ta.to(device), tb.to(device))


def validate_results(results: str | os.PathLike | Results, out_dir: str | os.PathLike, *,
                     repeats: int = DEFAULT_REPEATS, seed: int = 0, max_n: int = DEFAULT_MAX_N,
                     families: Sequence[str] | None = None, estimators: Sequence[str] | None = None,
                     quantities: Sequence[str] | None = None, device: str = "cpu", use_store: bool = True,
                     plot: bool = True, unit: str = "bits", max_widths: int = DEFAULT_MAX_WIDTHS,
                     progress: Callable[[int, int, str], None] | None = None) -> ValidationRun:
    """Validate every (estimator, parameters, quantity, n, dims) of a results table; write DIR.

    Raises UsageError (bad repeats / max_n / family / device, ``out_dir`` a file), DataError (the
    results unreadable or without information estimates) and PluginError (a plug-in estimator
    raising something other than an ibscope error).
    """
    from ibscope._device import resolve_device
    from ibscope.estimators import registry

    t0 = time.perf_counter()
    if not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"--repeats must be an integer >= 1. Got {repeats!r}.")
    if not isinstance(max_n, int) or max_n < 16:
        raise UsageError(f"--max-n must be an integer >= 16. Got {max_n!r}.")
    if not isinstance(max_widths, int) or max_widths < 0 or max_widths == 1:
        raise UsageError(f"--max-widths must be 0 (all) or an integer >= 2. Got {max_widths!r}.",
                         hint="Two widths at least: the narrowest and the widest layer.")
    fams = list(dict.fromkeys(families or FAMILIES))
    for f in fams:
        if f not in FAMILIES:
            raise unknown_name("task family", f, FAMILIES)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"The output '{out}' is a file; `ibscope validate` writes a folder.",
                         hint="Pass a folder name, e.g. -o validation/.")
    dev = str(resolve_device(device))
    res = results if isinstance(results, Results) else read_results(results)
    keys, notes = plan_keys(res, estimators=estimators, quantities=quantities)
    keys, thinned = thin_widths(keys, max_widths)
    notes += thinned
    layer_cache: dict = {}
    key_notes: dict[str, list[str]] = {}
    rows: list[dict] = []
    unreachable: set[str] = set()
    total = len(keys)
    for ki, key in enumerate(keys):
        kt = time.perf_counter()
        key.n_used = min(key.n, max_n)
        if key.n_used < key.n:
            notes.append(f"{key.label}: validated at n = {key.n_used} (--max-n), not at the table's n = {key.n}; "
                         "the bias of k-NN and plug-in estimators depends on n.")
        params = {k: v for k, v in key.params.items() if k != "x_source"}
        try:
            est = registry.create(key.estimator, **params)
        except IbscopeError as exc:
            notes.append(f"{key.label}: not validated ({exc.message})")
            continue
        layer = None
        if use_store and key.layer_ref is not None:
            layer, why = layer_stats(key.layer_ref, key, layer_cache)
            if why:
                unreachable.add(why)
        elif use_store:
            unreachable.add("the results' provenance names no store for some rows")
        if (layer is not None and layer.get("priors") is not None and key.quantity == "I(T;Y)"
                and key.dims[1] == 1):  # the store's labels are integers: their exact class frequencies
            key.y_discrete, key.priors = True, np.asarray(layer["priors"], float)
        ctx = _Ctx(key, est, layer, dev, seed)
        if key.quantity == "I(T;Y)" and key.y_discrete:
            tasks = tasks_labels(ctx, fams)
        elif key.quantity == "I(X;T)" and key.x_source == "identity":
            tasks = tasks_identity(ctx, fams)
        else:
            tasks = tasks_continuous(ctx, fams)
        if not tasks:
            notes.append(f"{key.label}: no task of the families {', '.join(fams)} applies.")
        for task in tasks:
            ts = time.perf_counter()
            ests, truths, errs, fails = [], [], [], []
            for r in range(repeats):
                rng = np.random.default_rng([seed, ki, r, FAMILIES.index(task.family), len(rows)])
                a, b = task.draw(rng, key.n_used)  # in the estimator's order: (X, T) or (T, Y)
                try:
                    e = _estimate(est, a, b, dev)
                except IbscopeError as exc:
                    if isinstance(exc, PluginError):
                        raise
                    fails.append(" ".join(exc.message.split()))
                    continue
                except Exception as exc:
                    if registry.source(key.estimator) != "ibscope":
                        raise PluginError(f"plug-in estimator '{key.estimator}' failed on validation task "
                                          f"'{task.name}': {type(exc).__name__}: {exc}") from None
                    raise
                tv, te = task.truth_for(e.extra)
                ests.append(float(e.value))
                truths.append(tv)
                errs.append(te)
            row = {"estimator": key.estimator, "params": key.params, "quantity": key.quantity, "n_samples": key.n,
                   "dims": key.dims_text, "task": task.name, "family": task.family, "level": task.level,
                   "truth": task.truth_name, "repeats": len(ests), "n_used": key.n_used, "unit": "nats"}
            note = [task.note] if task.note else []
            if ests:
                e_arr, t_arr = np.asarray(ests), np.asarray(truths)
                row.update(true_value=float(t_arr.mean()), true_value_error=float(np.sqrt(np.mean(np.square(errs)))),
                           mean_estimate=float(e_arr.mean()), bias=float((e_arr - t_arr).mean()),
                           rmse=float(np.sqrt(np.mean((e_arr - t_arr) ** 2))),
                           sd=float(e_arr.std(ddof=1)) if len(e_arr) > 1 else None)
            if fails:
                note.append(f"{len(fails)} of {repeats} run(s) failed: {fails[0]}")
            row["note"] = "; ".join(note)
            row["seconds"] = round(time.perf_counter() - ts, 3)
            rows.append(row)
        for x in dict.fromkeys(key.notes):
            key_notes.setdefault(x, []).append(f"{key.estimator} {key.quantity} {key.dims_text}")
        log.debug("%s: %.2f s", key.label, time.perf_counter() - kt)
        if progress is not None:
            progress(ki + 1, total, key.label)
    for x, where in key_notes.items():
        notes.append(f"{x[0].upper()}{x[1:]} ({', '.join(where)}).")
    for why in sorted(unreachable):
        notes.append(f"Layer-matched tasks skipped where {why}." if "layer" in fams else
                     f"The store was not read where {why}: class frequencies taken from H(Y).")
    notes = list(dict.fromkeys(notes))
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    # validation.json is written last and names the sha256 of the other files: a run killed while
    # writing leaves no json describing files of another run
    (out / VALIDATION_JSON).unlink(missing_ok=True)
    paths = [write_csv_atomic(out / VALIDATION_CSV, VALIDATION_COLUMNS, rows)]
    if plot and rows:
        from ibscope.plot import save_figure
        from ibscope.plot.validation import validation_figure

        fig = validation_figure(rows, unit)
        paths.append(save_figure(fig, out / VALIDATION_PNG, "png", 130, "ibscope validate",
                                 "Mean estimate against the truth of each validation task."))
    src = Path(res.path) if res.path is not None else None
    meta = {
        "format": "ibscope-validation", "format_version": 1, "ibscope_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": str(src) if src else None,
        "results_sha256": _sha256(src) if src is not None and src.exists() else None,
        "settings": {"repeats": repeats, "seed": seed, "max_n": max_n, "families": fams, "device": dev,
                     "use_store": use_store, "mc_mixture": MC_MIXTURE, "mc_noisy": MC_NOISY,
                     "saturation_tolerance": SATURATION_TOLERANCE},
        "keys": len(keys), "tasks": len(rows), "notes": notes, "seconds": round(seconds, 2),
        "files": {p.name: _sha256(p) for p in paths},
    }
    from ibscope._atomic import write_text_atomic

    paths.append(write_text_atomic(out / VALIDATION_JSON, json.dumps(meta, indent=2, sort_keys=True, default=str)))
    return ValidationRun(rows, notes, out, seconds, paths)


def summary_lines(run: ValidationRun, unit: str = "bits") -> list[str]:
    """One line per (estimator setting, quantity): the largest |bias| and where; then the notes."""
    f = conversion_factor("nats", unit)
    worst: dict[tuple, dict] = {}
    for r in run.rows:
        if r.get("bias") is None:
            continue
        k = (r["estimator"], params_key({k: v for k, v in r["params"].items() if k != "x_source"}), r["quantity"])
        if k not in worst or abs(r["bias"]) > abs(worst[k]["bias"]):
            worst[k] = r
    lines = []
    for (est, _, q), r in worst.items():
        lines.append(f"{est} {q}: largest bias {r['bias'] * f:+.3f} {unit} (truth {r['true_value'] * f:.3f}, "
                     f"mean estimate {r['mean_estimate'] * f:.3f}) on '{r['task']}', n = {r['n_used']}, "
                     f"dims {r['dims']}")
    return lines
