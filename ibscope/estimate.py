"""``ibscope estimate``: activation store(s) -> results table.

For every store x checkpoint x layer T and every chosen estimator:

* kind "pair": I(X;T) with X = the sample identity (integer ids, ``x_source="identity"``:
  binning, KDE) or the stored probe inputs (``"inputs"``: KSG, gaussian, compressed, infonce,
  renyi), and I(T;Y) with Y = the stored labels (integer labels are discrete);
* kind "single": one row with the estimator's own quantity (effective rank, ...);
* kind "jacobian": one row from the layer's stored Jacobian singular values; layers without
  them are skipped, and a checkpoint with none at all is a DataError (exit code 4) saying how
  to capture them.

Training metrics stored with each checkpoint become rows with estimator "metrics" and layer
"-". Rows are written atomically to a CSV (see :mod:`ibscope.results`) with a provenance
sidecar. Incremental: cells already in ``out`` with identical parameters are kept and not
recomputed unless ``force``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from ibscope._version import __version__
from ibscope.errors import DataError, IbscopeError, PluginError, UsageError, unknown_name
from ibscope.results import Results, make_row, read_results, write_results

log = logging.getLogger(__name__)

X_SOURCES = ("identity", "inputs")


# ----------------------------------------------------------------------------- helpers
def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' if available else 'cpu'; 'cpu' / 'cuda' / 'cuda:N' validated (as a string)."""
    from ibscope._device import resolve_device as _resolve

    return str(_resolve(device))


def metric_unit(name: str) -> str:
    low = name.lower()
    if "acc" in low:
        return "ratio"
    if "loss" in low or "entropy" in low:
        return "nats"
    return "value"


def _specs(estimators: Iterable[str], params: dict | None) -> list[tuple[str, dict]]:
    from ibscope.estimators import registry

    names = list(dict.fromkeys(estimators))
    if not names:
        raise UsageError("No estimator given.", hint="Pass -e NAME (see `ibscope estimators`).")
    params = dict(params or {})
    for key in params:
        if key not in names:
            raise UsageError(
                f"Parameters were given for estimator '{key}', which is not selected (selected: {', '.join(names)}).",
                hint=f"Add -e {key}, or remove its --param / config entry.",
            )
    specs = []
    for name in names:
        p = params.get(name) or {}
        if not isinstance(p, dict):
            raise UsageError(f"Parameters of estimator '{name}' must be a mapping. Got {p!r}.")
        est = registry.create(name, **p)  # unknown names/params: UsageError with did-you-mean
        specs.append((name, est.params()))
    return specs


def _cell_key(row: dict) -> tuple:
    ckpt = (row.get("epoch"), row.get("step")) if (row.get("epoch") is not None or row.get("step") is not None) \
        else ("#", row.get("checkpoint"))
    return (row["run"], row["split"], ckpt, row["layer"], row["estimator"], row["quantity"],
            json.dumps(row.get("params") or {}, sort_keys=True, default=str))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    return v


# ----------------------------------------------------------------------------- the work of one cell
def _compute_cell(store_path: str, ckpt_index: int, layer: str, specs: list[tuple[str, dict]], device: str,
                  x_source: str | None, want: set | None, meta: dict) -> list[dict]:
    """All rows of one (store, checkpoint, layer) cell. ``want``: quantities to compute per
    (estimator, quantity) key, or None for all."""
    import numpy as np
    import torch

    from ibscope.estimators import registry
    from ibscope.store import open_store

    st = open_store(store_path)
    ck = st.checkpoints[ckpt_index]
    rows: list[dict] = []
    common = dict(run=meta["run"], split=meta["split"], checkpoint=ck.index, epoch=ck.epoch, step=ck.step,
                  layer=layer, layer_index=meta["layer_index"][layer])
    t = None

    def acts():
        nonlocal t
        if t is None:
            a = st.activations(ck, layer)
            if a.dtype == np.float16:
                a = a.astype(np.float32)
            t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return t

    where = f"checkpoint {ck.index} ({ck.label}), layer '{layer}'"
    for name, params in specs:
        cls = registry.get(name)
        est = cls(**params)
        plugin = registry.source(name) != "ibscope"

        def run(fn, what):
            try:
                return fn()
            except IbscopeError as exc:
                exc.message = f"{where}, {name} {what}: {exc.message}"
                raise
            except Exception as exc:
                if plugin:
                    raise PluginError(f"{where}: plug-in estimator '{name}' failed on {what}: "
                                      f"{type(exc).__name__}: {exc}") from None
                raise

        def add(e, quantity, extra_params=None):
            p = dict(e.params)
            if extra_params:
                p.update(extra_params)
            rows.append(make_row(**common, estimator=name, quantity=quantity, value=e.value, unit=e.unit,
                                 stderr=_jsonable(e.stderr), cap=_jsonable(e.cap), n_samples=e.n_samples,
                                 dims="x".join(str(d) for d in e.dims), params=p))

        def wanted(quantity, extra_params=None):
            if want is None:
                return True
            p = dict(params)
            if extra_params:
                p.update(extra_params)
            return (name, quantity, json.dumps(p, sort_keys=True, default=str)) in want

        if cls.kind == "pair":
            xs = x_source or cls.x_source
            if wanted("I(X;T)", {"x_source": xs}):
                if xs == "identity":
                    xv = torch.from_numpy(np.asarray(st.sample_ids, dtype=np.int64)).to(device)
                else:
                    inp = meta["inputs"]
                    if inp is None:
                        raise DataError(
                            f"Estimator '{name}' measures I(X;T) with X = the probe inputs, but the store "
                            f"'{store_path}' holds no inputs.",
                            hint="Re-capture with --store-inputs, or pass --x-source identity "
                                 "(X = sample identity).",
                        )
                    xv = inp.to(device)
                add(run(lambda: est.estimate(xv, acts()), "I(X;T)"), "I(X;T)", {"x_source": xs})
            if st.labels is not None and wanted("I(T;Y)"):
                lab = np.asarray(st.labels)
                yv = torch.from_numpy(lab.astype(np.int64) if lab.dtype.kind in "iub" else lab.astype(np.float64))
                add(run(lambda: est.estimate(acts(), yv.to(device)), "I(T;Y)"), "I(T;Y)")
        elif cls.kind == "single":
            if want is None or any(k[0] == name for k in want):
                e = run(lambda: est.estimate(acts()), "the measure")
                add(e, e.quantity)
        elif cls.kind == "jacobian":
            if want is None or any(k[0] == name for k in want):
                from ibscope.estimators.local_rank import jacobian_from_store

                # Layers captured without Jacobians are skipped when others have them; a
                # checkpoint with none at all is an error that says how to capture them.
                if st.jacobian(ck, layer) is not None or not any(st.jacobian(ck, l) is not None for l in st.layers):
                    s = jacobian_from_store(st, ck, layer).to(device)
                    e = run(lambda: est.estimate(s), "the Jacobian spectra")
                    add(e, e.quantity)
        else:
            raise PluginError(f"Estimator '{name}' has kind {cls.kind!r}; expected 'pair', 'single' or 'jacobian'.")
    return rows


_WORKER: dict = {}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _worker(args) -> list[dict]:
    store_path, ckpt_index, layer, specs, device, x_source, want, meta = args
    if meta.get("needs_inputs"):  # each worker reads the probe inputs once per store
        if store_path not in _WORKER:
            import numpy as np
            import torch

            from ibscope.store import open_store

            arr = open_store(store_path).inputs()
            _WORKER[store_path] = None if arr is None else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        meta = dict(meta, inputs=_WORKER[store_path])
    return _compute_cell(store_path, ckpt_index, layer, specs, device, x_source, want, meta)


# ----------------------------------------------------------------------------- the public entry point
def run_estimate(
    stores,
    out,
    estimators,
    params: dict | None = None,
    *,
    device: str = "auto",
    force: bool = False,
    jobs: int = 1,
    x_source: str | None = None,
    layers: list[str] | None = None,
    progress: bool = True,
) -> Results:
    """Estimate every checkpoint x layer of ``stores`` with ``estimators``; write ``out``.

    ``stores``: a store directory or a list of them. ``estimators``: registry names.
    ``params``: {estimator: {param: value}} (strings are converted to the field types).
    ``device``: "auto" | "cpu" | "cuda" | "cuda:N". ``jobs``: CPU worker processes over cells.
    ``x_source``: override what X is in I(X;T) for every pair estimator ("identity" |
    "inputs"). ``layers``: restrict to these layer names. Returns the full results table
    (kept rows from an existing ``out`` plus new ones).
    """
    import numpy as np
    import torch

    from ibscope.store import open_store

    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    stores = [Path(s) for s in stores]
    if not stores:
        raise UsageError("No activation store given.", hint="Pass the --out directory of `ibscope capture`.")
    if x_source is not None and x_source not in X_SOURCES:
        raise UsageError(f"--x-source must be one of {list(X_SOURCES)}. Got {x_source!r}.")
    if not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be an integer >= 1. Got {jobs!r}.")
    dev = resolve_device(device)
    if jobs > 1 and dev != "cpu":
        raise UsageError(f"--jobs {jobs} runs CPU worker processes; it cannot be combined with --device {dev}.",
                         hint="Use --jobs 1 on a GPU (the GPU parallelises each estimate), or --device cpu.")
    specs = _specs(estimators, params)
    from ibscope.estimators import registry

    opened = [open_store(s) for s in stores]
    for s, st in zip(stores, opened):
        if not st.checkpoints:
            raise DataError(f"Store '{s}' holds no complete checkpoint.", hint="Run (or resume) `ibscope capture`.")
        if layers:
            for name in layers:
                if name not in st.layers:
                    raise unknown_name("layer", name, st.layers)

    out = Path(out)
    existing: list[dict] = []
    if out.exists():
        existing = read_results(out).rows
    done = set() if force else {_cell_key(r) for r in existing}

    # plan the cells
    cells = []
    metric_rows: list[dict] = []
    store_prov = []
    for s, st in zip(stores, opened):
        run_name = str(st.config.get("run") or "run")
        split = str(st.config.get("split") or "probe")
        lay = [name for name in st.layers if not layers or name in layers]
        meta = {"run": run_name, "split": split, "layer_index": {n: i for i, n in enumerate(st.layers)},
                "inputs": None}
        needs_inputs = any(registry.get(n).kind == "pair" and (x_source or registry.get(n).x_source) == "inputs"
                           for n, _ in specs)
        meta["needs_inputs"] = needs_inputs and st.has_inputs
        if meta["needs_inputs"] and jobs == 1:
            meta["inputs"] = torch.from_numpy(np.ascontiguousarray(st.inputs(), dtype=np.float32))
        store_prov.append({"path": str(s), "content_hash": st.content_hash(), "config_hash": st.config_hash,
                           "probe_hash": st.probe_hash, "n_samples": st.n_samples, "run": run_name, "split": split,
                           "layers": lay, "n_checkpoints": len(st.checkpoints), "has_inputs": st.has_inputs,
                           "has_labels": st.labels is not None})
        for ck in st.checkpoints:
            for mname, mval in sorted((ck.metrics or {}).items()):
                row = make_row(run=run_name, split=split, checkpoint=ck.index, epoch=ck.epoch, step=ck.step, layer="-",
                               estimator="metrics", quantity=mname, value=float(mval), unit=metric_unit(mname),
                               n_samples=None, params={})
                if _cell_key(row) not in done:
                    metric_rows.append(row)
            for layer in lay:
                base = dict(run=run_name, split=split, checkpoint=ck.index, epoch=ck.epoch, step=ck.step, layer=layer)
                want = set()
                for name, p in specs:
                    cls = registry.get(name)
                    if cls.kind == "pair":
                        xs = x_source or cls.x_source
                        qs = [("I(X;T)", {**p, "x_source": xs})]
                        if st.labels is not None:
                            qs.append(("I(T;Y)", p))
                    else:
                        qs = [(cls.quantity, p)]
                    for q, pp in qs:
                        if _cell_key({**base, "estimator": name, "quantity": q, "params": pp}) not in done:
                            want.add((name, q, json.dumps(pp, sort_keys=True, default=str)))
                if want:
                    cells.append((str(s), ck.index, layer, specs, dev, x_source, want, meta))

    new_rows: list[dict] = list(metric_rows)
    t0 = time.perf_counter()
    interrupted = False
    try:
        _run_cells(cells, new_rows, jobs, progress)
    except KeyboardInterrupt:
        interrupted = True
    fresh = {_cell_key(r) for r in new_rows}
    rows = [r for r in existing if _cell_key(r) not in fresh] + new_rows
    order = {c: i for i, c in enumerate(["I(X;T)", "I(T;Y)"])}
    rows.sort(key=lambda r: (r["run"], r["split"], r["checkpoint"] if r["checkpoint"] is not None else -1,
                             -1 if r["layer"] == "-" else (r["layer_index"] if r["layer_index"] is not None else 0),
                             r["layer"], r["estimator"], order.get(r["quantity"], 9), r["quantity"],
                             json.dumps(r["params"], sort_keys=True, default=str)))
    provenance = {
        "ibscope_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stores": store_prov,
        "estimators": {n: {"params": p, "source": registry.source(n), "kind": registry.get(n).kind,
                           "class": f"{registry.get(n).__module__}.{registry.get(n).__qualname__}"} for n, p in specs},
        "config": {"estimators": [n for n, _ in specs], "params": {n: p for n, p in specs}, "device": dev,
                   "jobs": jobs, "x_source": x_source, "layers": layers, "force": force},
        "cells_computed": len(cells), "rows_kept_from_existing": len(rows) - len(new_rows),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "complete": not interrupted,
    }
    if rows:
        write_results(out, rows, provenance)
    if interrupted:
        raise KeyboardInterrupt
    return Results(rows, provenance, out)


def _run_cells(cells: list, sink: list, jobs: int, progress: bool) -> None:
    if not cells:
        return
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("estimate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.description}"), console=Console(stderr=True, emoji=False), transient=False)
        bar.start()
        task = bar.add_task("", total=len(cells))
    try:
        if jobs == 1:
            for c in cells:
                if bar:
                    bar.update(task, description=f"ckpt {c[1]} {c[2]}")
                sink.extend(_compute_cell(*c))
                if bar:
                    bar.advance(task)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = mp.get_context("spawn")
            light = [c[:7] + (dict(c[7], inputs=None),) for c in cells]  # inputs are read by each worker
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
                for rows in pool.map(_worker, light):
                    sink.extend(rows)
                    if bar:
                        bar.advance(task)
    finally:
        if bar:
            bar.stop()
