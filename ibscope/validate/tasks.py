"""The tasks of ``ibscope validate`` and their ground truth (closed forms and Monte Carlo)
(see :mod:`ibscope.validate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ibscope.validate.plan import (
    MC_MIXTURE,
    MC_MIXTURE_TUNE,
    MC_NOISY,
    MC_NOISY_TUNE,
    POP_MAX_BINNED,
    POP_MAX_NOISY,
    Key,
    target_levels,
)


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
