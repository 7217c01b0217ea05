"""What ``ibscope validate`` checks: the keys of a results table, the widths and target levels
(see :mod:`ibscope.validate`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ibscope.errors import DataError, IbscopeError, UsageError, unknown_name
from ibscope.results import INFO_UNITS, Results
from ibscope.trust import (
    is_saturated,
    params_key,
)
from ibscope.units import conversion_factor

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
