"""Running ``ibscope validate``: estimators on the tasks, validation.csv/json/png and the summary
(see :mod:`ibscope.validate`)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ibscope._version import __version__
from ibscope.errors import DataError, IbscopeError, PluginError, UsageError, unknown_name
from ibscope.results import Results, read_results
from ibscope.store._format import file_sha256
from ibscope.trust import (
    SATURATION_TOLERANCE,
    VALIDATION_COLUMNS,
    VALIDATION_CSV,
    VALIDATION_JSON,
    VALIDATION_PNG,
    params_key,
    write_csv_atomic,
)
from ibscope.units import conversion_factor
from ibscope.validate.plan import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_WIDTHS,
    DEFAULT_REPEATS,
    FAMILIES,
    MC_MIXTURE,
    MC_NOISY,
    Key,
    LayerRef,
    plan_keys,
    thin_widths,
)
from ibscope.validate.tasks import _Ctx, _torch, tasks_continuous, tasks_identity, tasks_labels

log = logging.getLogger("ibscope.validate")


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
        "results_sha256": file_sha256(src) if src is not None and src.exists() else None,
        "settings": {"repeats": repeats, "seed": seed, "max_n": max_n, "families": fams, "device": dev,
                     "use_store": use_store, "mc_mixture": MC_MIXTURE, "mc_noisy": MC_NOISY,
                     "saturation_tolerance": SATURATION_TOLERANCE},
        "keys": len(keys), "tasks": len(rows), "notes": notes, "seconds": round(seconds, 2),
        "files": {p.name: file_sha256(p) for p in paths},
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
