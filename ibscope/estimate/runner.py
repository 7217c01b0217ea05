"""Running ``ibscope estimate``: the plan of a run, :func:`run_estimate` and the pieces of work
handed to the executor (see :mod:`ibscope.estimate`)."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ibscope._device import resolve_device
from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, writer_lock
from ibscope._paths import check_parents
from ibscope._version import __version__
from ibscope.errors import DataError, PluginError, UsageError, unknown_name
from ibscope.estimate.cells import (
    DEFAULT_NULL_PERMUTATIONS,
    FLOAT_LABELS_AS_INT,
    METRICS,
    SUMMARY_NOTES,
    X_SOURCES,
    _cell_key,
    _cell_task,
    _ckpt_id,
    _open,
    _quantities,
    _specs,
    cell_key,
    code_version,
    metric_unit,
    null_setting,
)
from ibscope.estimate.summary import saturation_counts
from ibscope.reporting import NullReporter, Reporter, reporter_or_null
from ibscope.results import KNOWN_UNITS, Results, make_row, read_results, write_results


@dataclass
class _Plan:
    """One store of this run: what it holds and what to compute from it."""

    path: Path
    st: Any
    run: str
    split: str
    layers: list[str]
    meta: dict
    ck_by_id: dict = field(default_factory=dict)
    jac_layers: set = field(default_factory=set)

    @property
    def content_hash(self) -> str:
        """What a worker checks that it sees the same store (:meth:`Store.content_hash`)."""
        return self.st.content_hash()


def _jacobian_layers(st) -> set[str]:
    """Layers with Jacobian spectra at one or more checkpoints of ``st``."""
    import h5py

    out: set[str] = set()
    for ck in st.checkpoints:
        with h5py.File(ck.shard, "r") as f:
            if "jacobian" in f:
                out.update(f["jacobian"].keys())
    return out


def _store_entry(p: _Plan) -> dict:
    st = p.st
    entry = {"path": str(p.path), "content_hash": st.content_hash(), "config_hash": st.config_hash,
             "probe_hash": st.probe_hash, "n_samples": st.n_samples, "run": p.run, "split": p.split,
             "layers": p.layers, "n_checkpoints": len(st.checkpoints), "has_inputs": st.has_inputs,
             "has_labels": st.labels is not None,
             "checkpoints": [{"index": c.index, "epoch": c.epoch, "step": c.step, "label": c.label, "path": c.path,
                              "sha256": c.sha256, "shard": c.shard.name} for c in st.checkpoints]}
    if hasattr(st, "skipped"):
        entry["skipped_shards"] = [dict(s) for s in (st.skipped or [])]
    return entry


def _check_out(out: Path) -> None:
    check_parents(out, "results file")  # -o afile/x: a usage error, not a failed write
    if out.is_dir():
        raise UsageError(f"The results file '{out}' is a directory; expected the path of a CSV file to write.",
                         hint=f"Pass a file name, e.g. -o {out / 'results.csv'}.")
    if out.name.endswith(".provenance.json"):
        raise UsageError(f"'{out}' is the name of a provenance sidecar; expected the path of the results CSV.",
                         hint="Pass e.g. -o results.csv (its sidecar results.provenance.json is written next to it).")


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
    strict: bool = False,
    skip_bad_shards: bool = False,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    null_permutations: int = DEFAULT_NULL_PERMUTATIONS,
    null_seed: int = 0,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
    reporter: Reporter | None = None,
) -> Results:
    """Estimate every checkpoint x layer of ``stores`` with ``estimators``; write ``out``.

    ``stores``: a store directory or a list of them. ``estimators``: registry names.
    ``params``: {estimator: {param: value}} (strings are converted to the field types).
    ``device``: "auto" | "cpu" | "cuda" | "cuda:N". ``jobs``: CPU worker processes over cells.
    ``x_source``: override what X is in I(X;T) for every pair estimator ("identity" |
    "inputs"). ``layers``: restrict to these layer names. ``force``: recompute the selected
    cells even where a matching row exists. ``strict``: raise a DataError (exit code 4) after
    writing when a cell of these stores has a note instead of a value. ``skip_bad_shards``:
    open the stores with ``open_store(path, skip_bad_shards=True)`` (skipped shards are
    listed in the provenance). ``lock_timeout``: seconds to wait for another writer of
    ``out`` (negative or None: no limit); then :class:`~ibscope._locks.LockTimeout`.
    ``null_permutations``: N permutations of the null for I(T;Y) rows and I(X;T) rows with
    X = the inputs (:func:`null_setting`; 0: none), seeded by ``null_seed``; they fill the
    columns null_mean, null_std and p_value. Every row with a cap gets ``saturated``.
    ``reporter``: an :class:`ibscope.reporting.Reporter` that shows the progress over cells
    (``None``: silent; ``progress=False`` turns its progress off).

    Where the cells run (:mod:`ibscope.executor`): in this process (``jobs=1``), in ``jobs``
    local worker processes of ``cores // jobs`` threads each, or on a Dask cluster
    (``scheduler="tcp://HOST:PORT"`` or ``scheduler_file``; ``DASK_SCHEDULER_ADDRESS`` when
    neither is given and ``jobs`` is 1; ``scheduler="local"`` ignores it). On a cluster every
    worker opens the stores itself (they must be on a file system all workers see), cells of
    GPU-capable estimators go to workers started with ``--resources GPU=1`` (on ``cuda`` when
    ``device`` is "auto"), and a worker that dies costs only its cells, which run elsewhere.
    The provenance's ``engine`` entry records the engine, the scheduler address (without
    credentials), the worker count and the tasks each worker ran.

    Returns the full results table (rows kept from an existing ``out`` plus new ones). Its
    provenance holds ``noted_cells``, ``first_notes``, ``rows_dropped_stale`` and
    ``rows_dropped_missing_checkpoint`` (see :func:`summary_lines`).
    """
    import numpy as np
    import torch

    if isinstance(stores, (str, os.PathLike)):
        stores = [stores]
    stores = list(dict.fromkeys(Path(s) for s in stores))
    if not stores:
        raise UsageError("No activation store given.", hint="Pass the --out directory of `ibscope capture`.")
    if x_source is not None and x_source not in X_SOURCES:
        raise UsageError(f"--x-source must be one of {list(X_SOURCES)}. Got {x_source!r}.")
    from ibscope.executor import make_executor, remote_device, resolve_engine

    engine_spec = resolve_engine(jobs, scheduler, scheduler_file)
    if isinstance(null_permutations, bool) or not isinstance(null_permutations, int) or null_permutations < 0:
        raise UsageError(f"--null-permutations must be an integer >= 0 (0 turns the null off). Got "
                         f"{null_permutations!r}.")
    if isinstance(null_seed, bool) or not isinstance(null_seed, int):
        raise UsageError(f"--null-seed must be an integer. Got {null_seed!r}.")
    lock_timeout = check_timeout(lock_timeout)
    out = Path(out)
    _check_out(out)
    dev = remote_device(device) if engine_spec.remote else str(resolve_device(device))
    if jobs > 1 and dev != "cpu":
        raise UsageError(f"--jobs {jobs} runs CPU worker processes; it cannot be combined with --device {dev}.",
                         hint="Use --jobs 1 on a GPU (the GPU parallelises each estimate), or --device cpu.")
    from ibscope.estimators import registry

    specs = [(n, p, (x_source or registry.get(n).x_source) if registry.get(n).kind == "pair" else None)
             for n, p in _specs(estimators, params)]
    codes = {n: code_version(n) for n, _, _ in specs}
    for n, _, _ in specs:
        unit = registry.get(n).unit
        if not isinstance(unit, str) or not unit.strip() or unit != unit.strip() or "\n" in unit:
            raise PluginError(f"Estimator '{n}' declares the unit {unit!r}; expected a short name such as 'nats'.")

    # ------------------------------------------------------------ open and check every store first
    plans: list[_Plan] = []
    seen: dict[tuple, Path] = {}
    for s in stores:
        st = _open(s, skip_bad_shards)
        if not st.checkpoints:
            raise DataError(f"Store '{s}' holds no complete checkpoint.", hint="Run (or resume) `ibscope capture`.")
        if layers:
            for name in layers:
                if name not in st.layers:
                    raise unknown_name("layer", name, st.layers)
        run_name = str(st.config.get("run") or "run")
        split = str(st.config.get("split") or "probe")
        if (run_name, split) in seen:
            raise UsageError(
                f"The stores '{seen[(run_name, split)]}' and '{s}' both hold run '{run_name}', split '{split}'; "
                "their rows could not be told apart in one results table.",
                hint="Capture them with different --run (or --split) names, or estimate them into separate files.")
        seen[(run_name, split)] = s
        lay = [name for name in st.layers if not layers or name in layers]
        needs_inputs = [n for n, _, xs in specs if xs == "inputs"]
        if needs_inputs and not st.has_inputs:
            raise DataError(
                f"Estimator '{needs_inputs[0]}' measures I(X;T) with X = the probe inputs, but the store "
                f"'{s}' holds no inputs.",
                hint="Re-capture with --store-inputs, or pass --x-source identity (X = sample identity).",
            )
        labels_read = None
        if st.labels is not None and np.asarray(st.labels).dtype.kind == "f" and any(
                registry.get(n).kind == "pair" for n, _, _ in specs):
            from ibscope.api import integral_float_labels

            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                got = integral_float_labels(torch.from_numpy(np.asarray(st.labels)), "Y (the labels)")
            if got is not None:
                labels_read = FLOAT_LABELS_AS_INT
                for w in said:
                    warnings.warn(f"Store '{s}': {w.message} Re-capture to store them as int64 (capture now does).",
                                  RuntimeWarning, stacklevel=2)
        meta = {"run": run_name, "split": split, "layer_index": {n: i for i, n in enumerate(st.layers)},
                "inputs": None, "needs_inputs": bool(needs_inputs), "config_hash": st.config_hash,
                "probe_hash": st.probe_hash, "n_samples": st.n_samples, "code": codes,
                "skip_bad_shards": bool(skip_bad_shards), "null_permutations": null_permutations,
                "null_seed": null_seed, "labels_read": labels_read}
        plan = _Plan(s, st, run_name, split, lay, meta,
                     {_ckpt_id(c.epoch, c.step, c.index): c for c in st.checkpoints})
        jac = [n for n, _, _ in specs if registry.get(n).kind == "jacobian"]
        if jac:
            plan.jac_layers = _jacobian_layers(st)
            if not plan.jac_layers & set(lay):
                which = (f"for the selected layer(s) {', '.join(lay)} (it has them for "
                         f"{', '.join(sorted(plan.jac_layers))})" if plan.jac_layers else "at any checkpoint")
                raise DataError(
                    f"The store '{s}' holds no Jacobian spectra {which}; estimator '{jac[0]}' needs them.",
                    hint="Re-capture with Jacobians, e.g. `ibscope capture ... --jacobian-samples 32` (32 probe "
                         "samples; each costs one backward pass per output dim of each layer, and --jacobian-memory "
                         "bounds the memory: docs/capture.md, 'Jacobians and memory').")
        plans.append(plan)
    ours = {(p.run, p.split): p for p in plans}

    with make_executor(engine_spec, dev) as engine, writer_lock(out, what="results file", timeout=lock_timeout):
        existing: list[dict] = []
        old_prov: dict = {}
        if out.exists() and out.stat().st_size > 0:  # an empty file (e.g. made by `touch`) is an empty table
            try:
                old = read_results(out, allow_empty=True)
            except DataError as exc:
                # estimate merges into the file: rows it cannot read (other stores' among them) would be lost
                raise DataError(
                    f"The existing results file '{out}' cannot be read, so this run cannot merge into it: "
                    f"{exc.message}",
                    hint=f"ibscope estimate keeps the rows of other stores in the file and never overwrites a table it "
                         f"cannot read (not even with --force). Move it aside (mv '{out}' '{out}.bad') or delete it "
                         "and run again, or write to another file with -o.") from None
            existing, old_prov = old.rows, old.provenance or {}

        # -------------------------------------------------------- another store under the same run/split
        prior = [e for src in [old_prov, *(x for x in old_prov.get("parts") or [] if isinstance(x, dict))]
                 for e in (src.get("stores") or []) if isinstance(e, dict)]
        had = {(r["run"], r["split"]) for r in existing}
        for p_ in plans:
            if (p_.run, p_.split) not in had:
                continue
            before = {str(e.get("path")) for e in prior if (e.get("run"), e.get("split")) == (p_.run, p_.split)
                      and e.get("path")}
            here = {str(p_.path), str(Path(p_.path).resolve())}
            moved = [b for b in before if b not in here and str(Path(b).resolve()) not in here]
            # a store moved with its run folder keeps its config and probe: not another store
            same = [e for e in prior if (e.get("run"), e.get("split")) == (p_.run, p_.split)
                    and e.get("config_hash") == p_.st.config_hash and e.get("probe_hash") == p_.st.probe_hash]
            if before and len(moved) == len(before) and not same:
                warnings.warn(
                    f"The rows of run '{p_.run}', split '{p_.split}' in '{out}' came from the store "
                    f"'{sorted(moved)[0]}'; this run's store '{p_.path}' has the same run and split, so its rows "
                    "replace them. To keep both, capture with different --run or --split names (or write to "
                    "another results file).", RuntimeWarning, stacklevel=2)

        # -------------------------------------------------------- sort the existing rows
        others: list[dict] = []          # rows of stores not given in this run: kept as they are
        valid: dict[tuple, dict] = {}    # rows of our stores whose key matches the store now
        stale: list[dict] = []           # rows of our stores computed from other content or code
        missing_ck: list[dict] = []      # rows of checkpoints no longer in our stores
        for r in existing:
            own = ours.get((r["run"], r["split"]))
            if own is None:
                others.append(r)
                continue
            plan = own
            ck = plan.ck_by_id.get(_ckpt_id(r.get("epoch"), r.get("step"), r.get("checkpoint")))
            if ck is None:
                missing_ck.append(r)
                continue
            want_key = cell_key(config_hash=plan.st.config_hash, probe_hash=plan.st.probe_hash,
                                checkpoint_sha256=ck.sha256, layer=r["layer"], estimator=r["estimator"],
                                quantity=r["quantity"], params=r.get("params") or {},
                                code=codes.get(r["estimator"]) or code_version(r["estimator"]),
                                null=null_setting(r["estimator"], r["quantity"], r.get("params"), null_permutations,
                                                  null_seed),
                                labels=plan.meta["labels_read"] if r["quantity"] == "I(T;Y)" else None)
            if r.get("key") == want_key:
                # the same content; its place in the series may have moved (a checkpoint captured in between
                # by `capture --resume`): the kept row takes the store's current index
                li = plan.meta["layer_index"].get(r["layer"]) if r["layer"] != "-" else r.get("layer_index")
                valid[_cell_key(r)] = dict(r, checkpoint=ck.index, epoch=ck.epoch, step=ck.step, layer_index=li)
            else:
                stale.append(r)

        # -------------------------------------------------------- plan the cells
        cells = []
        new_rows: list[dict] = []
        planned: set[tuple] = set()
        for plan in plans:
            st = plan.st
            if plan.meta["needs_inputs"] and engine.in_process:
                plan.meta["inputs"] = torch.from_numpy(np.ascontiguousarray(st.inputs(), dtype=np.float32))
            for ck in st.checkpoints:
                for mname, mval in sorted((ck.metrics or {}).items()):  # read from the shard: cheap, no cell
                    row = make_row(
                        run=plan.run, split=plan.split, checkpoint=ck.index, epoch=ck.epoch, step=ck.step, layer="-",
                        estimator=METRICS, quantity=mname, value=float(mval), unit=metric_unit(mname), n_samples=None,
                        params={}, key=cell_key(config_hash=st.config_hash, probe_hash=st.probe_hash,
                                                checkpoint_sha256=ck.sha256, layer="-", estimator=METRICS,
                                                quantity=mname, params={}, code=code_version(METRICS)))
                    planned.add(_cell_key(row))
                    if force or _cell_key(row) not in valid:
                        new_rows.append(row)
                for layer in plan.layers:
                    base = dict(run=plan.run, split=plan.split, checkpoint=ck.index, epoch=ck.epoch, step=ck.step,
                                layer=layer)
                    want = set()
                    for name, p, xs in specs:
                        cls = registry.get(name)
                        if cls.kind == "jacobian" and layer not in plan.jac_layers:
                            continue  # layers captured without Jacobians get no Jacobian rows
                        for q, pp in _quantities(cls, p, xs, st.labels is not None):
                            ident = _cell_key({**base, "estimator": name, "quantity": q, "params": pp})
                            planned.add(ident)
                            # a noted row (no value) is tried again: its cause may have been repaired
                            # (a re-captured shard, a fixed store) without changing the row's key
                            if force or ident not in valid or valid[ident]["value"] is None:
                                want.add((name, q))
                    if want:
                        cells.append((plan, ck, layer, want))

        t0, c0 = time.perf_counter(), time.process_time()
        interrupted = False
        try:
            _run_cells(engine, cells, specs, new_rows, reporter_or_null(reporter) if progress else None)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            for plan in plans:  # the shard each store kept open between reads
                close = getattr(plan.st, "close", None)
                if callable(close):
                    close()
        fresh = {_cell_key(r) for r in new_rows}
        # stale rows this run does not recompute (a stale metrics row: the checkpoint no longer logs it)
        dropped_stale = [r for r in stale if _cell_key(r) not in planned and r["estimator"] != METRICS]
        rows = others + [r for k, r in valid.items() if k not in fresh] + new_rows
        order = {c: i for i, c in enumerate(["I(X;T)", "I(T;Y)"])}
        rows.sort(key=lambda r: (r["run"], r["split"], r["checkpoint"] if r["checkpoint"] is not None else -1,
                                 -1 if r["layer"] == "-" else (r["layer_index"] if r["layer_index"] is not None else 0),
                                 r["layer"], r["estimator"], order.get(r["quantity"], 9), r["quantity"],
                                 json.dumps(r["params"], sort_keys=True, default=str)))

        # -------------------------------------------------------- provenance
        store_prov = [_store_entry(p) for p in plans]
        other_groups = list(dict.fromkeys((r["run"], r["split"]) for r in others))
        old_stores = [e for src in [old_prov, *(x for x in old_prov.get("parts") or [] if isinstance(x, dict))]
                      for e in (src.get("stores") or []) if isinstance(e, dict)]  # `ibscope run` writes parts
        for g in other_groups:
            got = list({json.dumps(e, sort_keys=True, default=str): e for e in old_stores
                        if (e.get("run"), e.get("split")) == g}.values())
            store_prov += got or [{"run": g[0], "split": g[1], "path": None,
                                   "note": "rows kept from an earlier results file whose provenance did not "
                                           "describe their store"}]
        used_units = {r["unit"] for r in rows} - set(KNOWN_UNITS)
        plugin_units: dict[str, list[str]] = {}
        old_units: dict = old_prov.get("plugin_units") or {}
        if not isinstance(old_units, dict):
            old_units = {}
        for u in used_units:
            names = sorted({r["estimator"] for r in rows if r["unit"] == u})
            plugin_units[u] = sorted(set(names) | set(old_units.get(u) or []))
        noted = [r for r in rows if (r["run"], r["split"]) in ours and r["value"] is None and r.get("note")]
        noted_cells = list(dict.fromkeys((r["run"], r["split"], r["checkpoint"], r["layer"], r["estimator"])
                                         for r in noted))
        noted_now = {(r["run"], r["split"], r["checkpoint"], r["layer"], r["estimator"])
                     for r in new_rows if r["value"] is None and r.get("note")}
        warned = [r for r in rows if (r["run"], r["split"]) in ours and r["value"] is not None and r.get("note")]
        first_notes = list(dict.fromkeys(r["note"] for r in noted))[:SUMMARY_NOTES]
        provenance: dict[str, Any] = {
            "ibscope_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stores": store_prov,
            "estimators": {n: {"params": p, "source": registry.source(n), "kind": registry.get(n).kind,
                               "code_version": codes[n], "x_source": xs,
                               "class": f"{registry.get(n).__module__}.{registry.get(n).__qualname__}"}
                           for n, p, xs in specs},
            "config": {"estimators": [n for n, _, _ in specs], "params": {n: p for n, p, _ in specs}, "device": dev,
                       "jobs": jobs, "x_source": x_source, "layers": layers, "force": force, "strict": strict,
                       "skip_bad_shards": skip_bad_shards, "null_permutations": null_permutations,
                       "null_seed": null_seed},
            "engine": engine.describe(),
            "null": {"permutations": null_permutations, "seed": null_seed,
                     "rows": "I(T;Y), and I(X;T) with X = the probe inputs (x_source 'inputs')",
                     "p_value": "(1 + #{null >= value}) / (N + 1)"},
            "saturation": saturation_counts([r for r in rows if (r["run"], r["split"]) in ours]),
            "labels_read": {f"{p.run}/{p.split}": p.meta["labels_read"] for p in plans if p.meta["labels_read"]},
            "rows_with_warnings": len(warned),
            "first_warnings": list(dict.fromkeys(r["note"] for r in warned))[:SUMMARY_NOTES],
            "key": "cell_key(config_hash, probe_hash, checkpoint_sha256, layer, estimator, quantity, params, "
                   "code_version): sha256 of their canonical JSON, 16 hex digits (ibscope.estimate.cell_key)",
            "cells_computed": len(cells), "rows_kept_from_existing": len(rows) - len(new_rows),
            "rows_recomputed_stale": sum(_cell_key(r) in planned for r in stale),
            "rows_dropped_stale": len(dropped_stale),
            "dropped_stale_estimators": sorted({r["estimator"] for r in dropped_stale}),
            "rows_dropped_missing_checkpoint": len(missing_ck),
            "missing_checkpoints": sorted({f"{r['run']}/{r['split']} checkpoint {r['checkpoint']}"
                                           + (f" (epoch {r['epoch']})" if r["epoch"] is not None else "")
                                           for r in missing_ck}),
            "noted_cells": len(noted_cells), "noted_cells_computed_now": len(noted_now),
            "first_notes": first_notes,
            "wall_time_s": round(time.perf_counter() - t0, 3),
            # CPU seconds of this process over the cells (all its threads; --jobs workers not included)
            "cpu_time_s": round(time.process_time() - c0, 3),
            "complete": not interrupted,
        }
        if plugin_units:
            provenance["plugin_units"] = plugin_units
        if rows or out.exists():
            write_results(out, rows, provenance)
    if interrupted:
        raise KeyboardInterrupt
    res = Results(rows, provenance, out)
    if strict and noted_cells:
        raise DataError(f"{len(noted_cells)} cell(s) could not be estimated (strict): "
                        + "; ".join(first_notes[:3])
                        + (" ..." if len(noted) > 3 else "")
                        + f" The results were written to '{out}', these cells with an empty value and a note.",
                        hint="Fix the data (see the 'note' column), or run without --strict to accept noted cells.")
    return res



def _pieces(engine, cells: list, specs: list) -> list:
    """The pieces of work of ``cells``: one per cell; on a cluster with GPU workers, a cell whose
    estimators are partly GPU-capable becomes two pieces (its GPU-capable estimators, and the
    rest), so that only GPU work waits for a GPU."""
    from ibscope.executor import Piece, gpu_capable

    gpu_of = {name: gpu_capable(name) for name, _, _ in specs}
    split = engine.name == "dask" and bool(engine.gpu_workers())
    pieces = []
    for plan, ck, layer, want in cells:
        base = {"meta": dict(plan.meta, inputs=None) if not engine.in_process else plan.meta, "ck": ck,
                "layer": layer}
        if engine.in_process:
            base["st"] = plan.st
        else:
            base.update(path=os.path.abspath(plan.path), content_hash=plan.content_hash)
        names = {n for n, _ in want}
        groups = ([[s for s in specs if s[0] in names and gpu_of[s[0]]], [s for s in specs if s[0] in names
                                                                            and not gpu_of[s[0]]]]
                  if split else [[s for s in specs if s[0] in names]])
        for group in groups:
            if not group:
                continue
            gw = {(n, q) for n, q in want if n in {g[0] for g in group}}
            label = f"{plan.run}/{plan.split} ckpt {ck.index} {layer}"
            pieces.append(Piece(_cell_task, dict(base, specs=group, want=gw),
                                gpu=any(gpu_of[g[0]] for g in group), label=label))
    if engine.name == "dask":
        pieces = _by_checkpoint(pieces)
    return pieces


def _by_checkpoint(pieces: list) -> list:
    """On a cluster, the pieces of one store and checkpoint (its layers) with the same GPU need
    become one task: fewer round trips through the scheduler (each costs milliseconds, more on a
    busy machine), while a lost worker still costs only the checkpoints it held."""
    from ibscope.executor import Piece

    groups: dict[tuple, list] = {}
    for p in pieces:
        groups.setdefault((p.payload["path"], p.payload["ck"].index, p.gpu), []).append(p)
    out = []
    for (_, _, gpu), ps in groups.items():
        if len(ps) == 1:
            out.append(ps[0])
            continue
        label = ps[0].label.rsplit(" ", 1)[0] + f" ({len(ps)} layers)"
        out.append(Piece(_cell_task, {"cells": [p.payload for p in ps]}, gpu=gpu, label=label))
    return out


def _run_cells(engine, cells: list, specs: list, sink: list, reporter: Reporter | None) -> None:
    """Run ``cells`` on ``engine`` and add their rows to ``sink`` as they come back (a Ctrl-C
    keeps what came back so far)."""
    if not cells:
        return
    pieces = _pieces(engine, cells, specs)
    with (reporter or NullReporter()).task("estimate", len(pieces)) as bar:
        for outcome in engine.run(pieces):
            sink.extend(outcome.value)
            bar.advance(note=pieces[outcome.index].label)
