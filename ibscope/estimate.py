"""``ibscope estimate``: activation store(s) -> results table.

For every store x checkpoint x layer T and every chosen estimator:

* kind "pair": I(X;T) with X = the sample identity (integer ids, ``x_source="identity"``:
  binning, KDE) or the stored probe inputs (``"inputs"``: KSG, gaussian, compressed, infonce,
  renyi), and I(T;Y) with Y = the stored labels (integer labels are discrete);
* kind "single": one row with the estimator's own quantity (effective rank, ...);
* kind "jacobian": one row from the layer's stored Jacobian spectra, for the layers that have
  them at some checkpoint.

Training metrics stored with each checkpoint become rows with estimator "metrics" and layer
"-". Rows are written atomically to a CSV (see :mod:`ibscope.results`) with a provenance
sidecar, under the results file's writer lock (:func:`ibscope._locks.writer_lock`): a second
writer waits, then merges its cells into what the first wrote.

**Content keys.** Every row carries a ``key``: :func:`cell_key` of the store's config hash and
probe hash, the checkpoint's sha256, the layer, the estimator, quantity and parameters
(``x_source`` included) and the estimator's code version. An incremental run keeps a row of a
store it is given only while that key still matches the store as it is now; a selected cell
whose row does not match is recomputed. Rows of a given store that no longer match and that
this run does not recompute (other estimators or layers) are dropped, as are rows of its
checkpoints that are no longer in it; rows of stores not given in this run are kept as they
are, with their provenance entries.

**One cell, one failure.** A cell that cannot be estimated for a data reason (the estimator
raises :class:`~ibscope.errors.DataError`: a constant layer, too few samples per class, a
checkpoint without Jacobian spectra ...) gets rows with an empty value and a ``note`` naming
the estimator, quantity, layer and checkpoint and the reason; every other cell is still
computed. ``strict=True`` raises a DataError (exit code 4) after the table is written.
Problems of a whole store (no inputs where X = inputs is needed, no Jacobian spectra at all
for a Jacobian measure, an unknown layer) are errors before anything is computed or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ibscope._device import resolve_device
from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, writer_lock
from ibscope._paths import check_parents
from ibscope._version import __version__
from ibscope.errors import ClusterError, DataError, IbscopeError, PluginError, ShardError, UsageError, unknown_name
from ibscope.reporting import NullReporter, Reporter, reporter_or_null
from ibscope.results import KNOWN_UNITS, Results, make_row, read_results, write_results

log = logging.getLogger(__name__)

X_SOURCES = ("identity", "inputs")
METRICS = "metrics"
#: notes shown in the summary of a run (the rest are in the table's ``note`` column)
SUMMARY_NOTES = 5


# ----------------------------------------------------------------------------- helpers
def metric_unit(name: str) -> str:
    """The unit of a training metric's rows: "ratio" for accuracies (and F1, AUC, precision,
    recall), "loss" for losses (numbers as logged: the base of the logarithm is the training
    code's, so plot and check never convert them), "value" for anything else."""
    low = name.lower()
    if re.search(r"acc|f1|auroc|auc|precision|recall|top1|top5", low):
        return "ratio"
    if re.search(r"loss|entropy|nll|perplexity|ppl|mse|mae", low):
        return "loss"
    return "value"


def code_version(estimator: str) -> str:
    """The code version a row of ``estimator`` is keyed on: the ibscope version, plus for a
    plug-in its entry point and the version of the distribution that provides it. An
    estimator that is not registered (any more) gets "unregistered", which matches no key."""
    from ibscope.estimators import registry

    if estimator == METRICS:
        return f"ibscope {__version__}"
    try:
        cls = registry.get(estimator)
    except IbscopeError:
        return "unregistered"
    src = registry.source(estimator)
    if src == "ibscope":
        return f"ibscope {__version__}"
    dist = ""
    try:
        from importlib.metadata import packages_distributions, version

        top = cls.__module__.split(".")[0]
        names = packages_distributions().get(top) or []
        dist = ", ".join(f"{n} {version(n)}" for n in names)
    except Exception:  # metadata is a courtesy: the entry point still keys the row
        dist = ""
    return f"ibscope {__version__}; {src}" + (f"; {dist}" if dist else "")


def cell_key(*, config_hash: str, probe_hash: str, checkpoint_sha256: str, layer: str, estimator: str,
             quantity: str, params: dict, code: str, null: dict | None = None, labels: str | None = None) -> str:
    """The content key of one row: 16 hex digits of the sha256 of the canonical JSON of its parts.

    ``params`` are the row's parameters (for I(X;T) rows including ``x_source``); ``code`` is
    :func:`code_version` of the estimator. ``null``: the permutation null's settings
    ``{"permutations": N, "seed": S}`` for a row that has one (:func:`null_setting`), so that
    another N or seed recomputes it. ``labels``: how float labels were read, for I(T;Y) rows
    of a store whose labels are floats with integer values. Two rows have the same key exactly
    when they were (or would be) computed from the same store content with the same estimator
    settings, null settings and code.
    """
    doc = {"config_hash": config_hash, "probe_hash": probe_hash, "checkpoint_sha256": checkpoint_sha256,
           "layer": layer, "estimator": estimator, "quantity": quantity, "params": params or {}, "code": code}
    if null:  # only rows with a null: the keys of all other rows are as before nulls existed
        doc["null"] = null
    if labels:
        doc["labels"] = labels
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: permutations of the null computed by default for I(T;Y) rows and I(X;T) rows with X = the inputs
DEFAULT_NULL_PERMUTATIONS = 10
#: labels that are floats with integer values are read as int64 class labels (see integral_float_labels)
FLOAT_LABELS_AS_INT = "float labels with integer values read as int64 class labels"


def null_setting(estimator: str, quantity: str, params: dict | None, permutations: int, seed: int) -> dict | None:
    """The null settings of a row, or None when the row gets no null.

    A permutation null is computed for the information rows of pair estimators whose pairing
    carries information: I(T;Y), and I(X;T) with X = the probe inputs. I(X;T) with X = the
    sample identity gets none (permuting the ids of distinct samples changes nothing), nor do
    single-representation measures and training metrics.
    """
    from ibscope.estimators import registry

    if not permutations or estimator == METRICS:
        return None
    try:
        cls = registry.get(estimator)
    except IbscopeError:
        return None
    if cls.kind != "pair":
        return None
    if quantity == "I(T;Y)" or (quantity == "I(X;T)" and (params or {}).get("x_source") == "inputs"):
        return {"permutations": int(permutations), "seed": int(seed)}
    return None


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


def _ckpt_id(epoch, step, index) -> tuple:
    return (epoch, step) if (epoch is not None or step is not None) else ("#", index)


def _cell_key(row: dict) -> tuple:
    """The identity of a row in the table (not its content): run, split, checkpoint, layer,
    estimator, quantity, parameters."""
    return (row["run"], row["split"], _ckpt_id(row.get("epoch"), row.get("step"), row.get("checkpoint")),
            row["layer"], row["estimator"], row["quantity"],
            json.dumps(row.get("params") or {}, sort_keys=True, default=str))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    return v


def _quantities(cls, params: dict, xs: str | None, has_labels: bool) -> list[tuple[str, dict]]:
    """(quantity, row params) of the rows an estimator writes for one (checkpoint, layer)."""
    if cls.kind == "pair":
        qs = [("I(X;T)", {**params, "x_source": xs})]
        if has_labels:
            qs.append(("I(T;Y)", dict(params)))
        return qs
    return [(cls.quantity, dict(params))]


_ARG = re.compile(r"'([xy])'")


def _reason(exc: IbscopeError, name: str, names: dict[str, str]) -> str:
    """The estimator's message in the words of a results table: its leading "name: " removed
    and its argument names 'x' / 'y' replaced by what they are here (X, T or Y)."""
    msg = exc.message.strip()
    if msg.startswith(f"{name}: "):
        msg = msg[len(name) + 2:]
    msg = _ARG.sub(lambda m: names.get(m.group(1), m.group(0)), msg)
    return " ".join(msg.split())


# ----------------------------------------------------------------------------- the work of one cell
def _compute_cell(st, ck, layer: str, specs: list[tuple[str, dict, str | None]], device: str, want: set | None,
                  meta: dict) -> list[dict]:
    """All rows of one (store, checkpoint, layer) cell. ``specs``: (estimator, params, x_source)
    with x_source None for non-pair estimators. ``want``: the (estimator, quantity) pairs to
    compute, or None for all. A DataError of one estimator and quantity becomes a noted row."""
    import numpy as np
    import torch

    from ibscope.estimators import registry
    from ibscope.estimators._fast import few_threads

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

    cell_sides: dict = {}  # the layer's prepared side per estimator setting (see `sided` below)
    where = f"layer '{layer}', checkpoint {ck.index} ({ck.label})"
    T = "T"
    n_perm, null_seed = meta.get("null_permutations", 0), meta.get("null_seed", 0)
    for name, params, xs in specs:
        cls = registry.get(name)
        est = registry.create(name, **params)  # an alias (kde-upper) keeps its name on the instance
        plugin = registry.source(name) != "ibscope"
        code = meta["code"][name]

        def key(quantity, p):
            return cell_key(config_hash=meta["config_hash"], probe_hash=meta["probe_hash"],
                            checkpoint_sha256=ck.sha256, layer=layer, estimator=name, quantity=quantity, params=p,
                            code=code, null=null_setting(name, quantity, p, n_perm, null_seed),
                            labels=meta.get("labels_read") if quantity == "I(T;Y)" else None)

        def emit(quantity, p, fn, argnames):
            """Run ``fn`` and add its row; a DataError becomes a row with a note instead, and the
            estimator's warnings go into the note of the row with its value."""
            caught: list = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    e = fn()
            except ShardError as exc:
                if not meta.get("skip_bad_shards"):
                    raise  # a damaged shard is not a property of this estimate: stop, naming the shard
                # --skip-bad-shards: the cell is noted, as for shards found bad when the store was opened
                note = f"{name} {quantity} not estimated at {where}: {exc.message} (--skip-bad-shards)"
                rows.append(make_row(**common, estimator=name, quantity=quantity, value=None, unit=cls.unit,
                                     n_samples=meta["n_samples"], params=p, key=key(quantity, p), note=note))
                return
            except DataError as exc:
                note = f"{name} {quantity} not estimated at {where}: {_reason(exc, name, argnames)}"
                if exc.hint:
                    note += " Hint: " + " ".join(exc.hint.split())
                rows.append(make_row(**common, estimator=name, quantity=quantity, value=None, unit=cls.unit,
                                     n_samples=meta["n_samples"], params=p, key=key(quantity, p), note=note))
                return
            except IbscopeError as exc:
                exc.message = f"{where}, {name} {quantity}: {_reason(exc, name, argnames)}"
                raise
            except Exception as exc:
                if plugin:
                    raise PluginError(f"{where}: plug-in estimator '{name}' failed on {quantity}: "
                                      f"{type(exc).__name__}: {exc}") from None
                raise
            said = list(dict.fromkeys(_reason(IbscopeError(str(w.message)), name, argnames) for w in caught))
            note = f"{name} {quantity} at {where}: " + " ".join(said) if said else ""
            rows.append(make_row(**common, estimator=name, quantity=quantity,
                                 value=e.value, unit=e.unit, stderr=_jsonable(e.stderr), cap=_jsonable(e.cap),
                                 n_samples=e.n_samples, dims="x".join(str(d) for d in e.dims),
                                 params=p, null_mean=_jsonable(e.null_mean), null_std=_jsonable(e.null_std),
                                 p_value=_jsonable(e.p_value), saturated=e.saturated, key=key(quantity, p),
                                 note=note))

        def pair(quantity, p, a, b):
            """The estimate of (a(), b()), with its permutation null where the row has one."""
            null = null_setting(name, quantity, p, n_perm, null_seed)
            if null is None:
                return est.estimate(a(), b())
            from ibscope.estimators.nulls import with_null

            return with_null(est, a(), b(), null["permutations"], null["seed"])

        # Estimators that prepare each side apart (the binning family: ``side`` and
        # ``estimate_sides``) share work: the side that is the same in every cell of the store
        # (the sample ids, the labels) is prepared once per store (kept in ``meta``), the
        # layer's side once per cell for both of its rows. Same rows as ``pair``.
        sided = callable(getattr(est, "estimate_sides", None)) and callable(getattr(est, "side", None))
        skey = (name, json.dumps(params, sort_keys=True, default=str), device)

        def store_side(what, value, argname):
            shared = meta.setdefault("shared_sides", {})
            k = (*skey, what)
            if k not in shared:
                shared[k] = est.side(value(), argname)
            return shared[k]

        def layer_side(argname):
            k = ("layer", *skey)
            if k not in cell_sides:
                cell_sides[k] = est.side(acts(), argname)  # not kept on failure: each row says why
            return cell_sides[k]

        def sides(quantity, p, a, b):
            null = null_setting(name, quantity, p, n_perm, null_seed)
            if not null:
                return est.estimate_sides(a(), b())
            # the permutations depend only on n, N and the seed: drawn once per store
            from ibscope.estimators.nulls import permutations

            pk = ("permutations", int(meta["n_samples"]), null["permutations"], null["seed"])
            shared = meta.setdefault("shared_sides", {})
            if pk not in shared:
                shared[pk] = permutations(*pk[1:])
            return est.estimate_sides(a(), b(), null["permutations"], null["seed"], perms=shared[pk])

        # a small problem of an estimator whose work is linear in its input runs on one torch
        # thread (waking the thread pool for each small operation costs more than it saves)
        with few_threads(_cell_elements(st, layer, xs, meta), getattr(cls, "serial_below", 0)):
            for quantity, p in _quantities(cls, params, xs, st.labels is not None):
                if want is not None and (name, quantity) not in want:
                    continue
                if cls.kind == "pair" and quantity == "I(X;T)":
                    if xs == "identity":
                        xv = lambda: torch.from_numpy(np.asarray(st.sample_ids, dtype=np.int64)).to(device)  # noqa: E731
                        xname = "X (the sample ids)"
                    else:
                        xv = lambda: meta["inputs"].to(device)  # noqa: E731
                        xname = "X (the probe inputs)"
                    if sided:
                        fn = lambda: sides(quantity, p, lambda: store_side(xs, xv, "x"),  # noqa: E731
                                           lambda: layer_side("y"))
                    else:
                        fn = lambda: pair(quantity, p, xv, acts)  # noqa: E731
                    emit(quantity, p, fn, {"x": xname, "y": T})
                elif cls.kind == "pair":
                    def yv():
                        lab = np.asarray(st.labels)
                        as_int = lab.dtype.kind in "iub" or meta.get("labels_read") == FLOAT_LABELS_AS_INT
                        return torch.from_numpy(lab.astype(np.int64) if as_int else lab.astype(np.float64)).to(device)
                    if sided:
                        fn = lambda: sides(quantity, p, lambda: layer_side("x"),  # noqa: E731
                                           lambda: store_side("labels", yv, "y"))
                    else:
                        fn = lambda: pair(quantity, p, acts, yv)  # noqa: E731
                    emit(quantity, p, fn, {"x": T, "y": "Y (the labels)"})
                elif cls.kind == "single":
                    emit(quantity, p, lambda: est.estimate(acts()), {"x": T})
                elif cls.kind == "jacobian":
                    from ibscope.estimators.local_rank import jacobian_from_store

                    emit(quantity, p, lambda: est.estimate(jacobian_from_store(st, ck, layer).to(device)),
                         {"x": "the Jacobian spectra"})
                else:
                    raise PluginError(f"Estimator '{name}' has kind {cls.kind!r}; expected 'pair', 'single' or 'jacobian'.")
    return rows


def _cell_elements(st, layer: str, xs: str | None, meta: dict) -> int:
    """How many numbers one estimate of the cell reads: the layer's and the other side's
    (the ids or labels: one column; the probe inputs: their width); unknown: "many"."""
    dims = st.layer_meta(layer).get("dims")
    if not isinstance(dims, int):
        return 1 << 62
    other = 1
    if xs == "inputs" and meta.get("inputs") is not None:
        other = max(1, int(meta["inputs"].shape[1]))
    return int(meta["n_samples"]) * (dims + other)


def _open(path, skip_bad_shards: bool):
    from ibscope.store import open_store

    if skip_bad_shards:  # the keyword exists once ibscope.store has --skip-bad-shards; only passed when asked for
        return open_store(path, skip_bad_shards=True)
    return open_store(path)


#: stores opened by this worker process: (path, skip_bad_shards, content hash) -> (store, probe inputs)
_OPEN: OrderedDict[tuple, tuple] = OrderedDict()
_OPEN_MAX = 8
_open_lock = threading.Lock()


def _worker_store(path: str, content_hash: str, skip_bad_shards: bool, needs_inputs: bool):
    """The store at ``path`` as this worker sees it, opened once per worker process (and per
    store content: a store changed since is opened again). A worker that cannot see the path,
    or sees other content there, is a :class:`~ibscope.errors.ClusterError` naming both."""
    import numpy as np
    import torch

    key = (path, bool(skip_bad_shards), content_hash)
    with _open_lock:
        got = _OPEN.get(key)
        if got is not None:
            _OPEN.move_to_end(key)
            if needs_inputs and got[1] is None:
                got = _OPEN[key] = (got[0], torch.from_numpy(np.ascontiguousarray(got[0].inputs(), dtype=np.float32)))
            return got
        from ibscope.store import MANIFEST

        if not os.path.isfile(os.path.join(path, MANIFEST)):
            from ibscope.executor import _this_worker

            raise ClusterError(
                f"{_this_worker()[0]} cannot see the activation store '{path}' ({MANIFEST} not found there).",
                hint="Stores are read by the workers themselves: put them on a file system every worker mounts at "
                     "the same path (or start the workers where they can see it).")
        st = _open(path, skip_bad_shards)
        if st.content_hash() != content_hash:
            from ibscope.executor import _this_worker

            raise ClusterError(
                f"{_this_worker()[0]} sees other content in the activation store '{path}' (content hash "
                f"{st.content_hash()[:12]}, expected {content_hash[:12]}).",
                hint="The store changed while the run was planned, or the workers see another copy of it: re-run, "
                     "and make sure every worker mounts the same file system.")
        inputs = torch.from_numpy(np.ascontiguousarray(st.inputs(), dtype=np.float32)) if needs_inputs else None
        _OPEN[key] = (st, inputs)
        while len(_OPEN) > _OPEN_MAX:
            _OPEN.popitem(last=False)
        return st, inputs


def _cell_task(payload: dict, device: str) -> list[dict]:
    """One piece of an estimate: the rows of one (store, checkpoint, layer) cell, or of the
    estimators of it in ``payload["specs"]``; or of several such cells (``payload["cells"]``,
    the layers of one checkpoint sent to a cluster as one task). In this process the payload
    carries the open store; elsewhere its path, which the worker opens itself (once per store)."""
    if "cells" in payload:
        return [row for cell in payload["cells"] for row in _cell_task(cell, device)]
    meta = payload["meta"]
    st, inputs = payload.get("st"), meta.get("inputs")
    if st is None:
        st, inputs = _worker_store(payload["path"], payload["content_hash"], meta.get("skip_bad_shards", False),
                                   meta.get("needs_inputs", False))
    return _compute_cell(st, payload["ck"], payload["layer"], payload["specs"], device, payload["want"],
                         dict(meta, inputs=inputs))


# ----------------------------------------------------------------------------- planning
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
            plan = ours.get((r["run"], r["split"]))
            if plan is None:
                others.append(r)
                continue
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
        old_units = old_prov.get("plugin_units") if isinstance(old_prov.get("plugin_units"), dict) else {}
        for u in used_units:
            names = sorted({r["estimator"] for r in rows if r["unit"] == u})
            plugin_units[u] = sorted(set(names) | set(old_units.get(u) or []))
        noted = [r for r in rows if (r["run"], r["split"]) in ours and r["value"] is None and r.get("note")]
        noted_cells = list(dict.fromkeys((r["run"], r["split"], r["checkpoint"], r["layer"], r["estimator"])
                                         for r in noted))
        noted_now = {(r["run"], r["split"], r["checkpoint"], r["layer"], r["estimator"])
                     for r in new_rows if r["value"] is None and r.get("note")}
        warned = [r for r in rows if (r["run"], r["split"]) in ours and r["value"] is not None and r.get("note")]
        provenance = {
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
            "first_notes": list(dict.fromkeys(r["note"] for r in noted))[:SUMMARY_NOTES],
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
                        + "; ".join(provenance["first_notes"][:3])
                        + (" ..." if len(noted) > 3 else "")
                        + f" The results were written to '{out}', these cells with an empty value and a note.",
                        hint="Fix the data (see the 'note' column), or run without --strict to accept noted cells.")
    return res


#: where caps, saturation and nulls are explained
TRUST_DOC = "docs/trust.md"


def _cap_name(estimator: str, quantity: str, params: dict | None) -> str:
    from ibscope.estimators import registry

    try:
        est = registry.create(estimator, **{k: v for k, v in (params or {}).items() if k != "x_source"})
        return est.cap_name(quantity)
    except Exception:  # an estimator no longer registered, or a plug-in's own trouble: a plain name
        return "its cap"


def saturation_counts(rows: Iterable[dict]) -> dict:
    """{estimator: {quantity: {"saturated": k, "cells": m, "cap": name}}} over rows with a value and a cap."""
    out: dict = {}
    for r in rows:
        if r.get("value") is None or r.get("saturated") is None or r["estimator"] == METRICS:
            continue
        q = out.setdefault(r["estimator"], {}).setdefault(r["quantity"], {"saturated": 0, "cells": 0, "cap": None})
        q["cells"] += 1
        q["saturated"] += bool(r["saturated"])
        if q["cap"] is None:
            q["cap"] = _cap_name(r["estimator"], r["quantity"], r.get("params"))
    return out


def saturation_lines(counts: dict) -> list[str]:
    """One line per information estimator with saturated cells, e.g. "binning: 24 of 24 I(T;Y)
    cells at the cap H(Y): at this n and width the estimator cannot see compression; see
    docs/trust.md". (Ranks carry no flag: a full-rank layer is no artefact.)"""
    from ibscope.estimators import registry

    out = []
    for name, qs in sorted(counts.items()):
        parts = [f"{c['saturated']} of {c['cells']} {q} cells at the cap {c['cap']}"
                 for q, c in qs.items() if c["saturated"]]
        try:
            info = registry.get(name).unit in ("nats", "bits")
        except IbscopeError:
            info = True
        if parts and info:
            out.append(f"{name}: {', '.join(parts)}: at this n and width the estimator cannot see compression; "
                       f"see {TRUST_DOC}")
    return out


def summary_lines(res: Results, *, strict: bool = False) -> list[str]:
    """Warnings about a finished :func:`run_estimate` for people: noted cells (the first few
    reasons), rows whose value comes with a warning (in their note), one line per estimator
    with cells at their cap (:func:`saturation_lines`), rows dropped because their store
    changed or their checkpoint is gone. Empty when there is nothing to say. ``ibscope
    estimate`` prints them on stderr."""
    prov = res.provenance or {}
    out: list[str] = []
    n = prov.get("noted_cells", 0)
    if n:
        notes = prov.get("first_notes") or []
        now = prov.get("noted_cells_computed_now", n)
        out.append(f"{n} cell(s) could not be estimated" + (f" ({now} of them in this run, the others kept from "
                                                               f"before)" if now != n else "")
                   + f"; their rows have an empty value and a note (column 'note' of {res.path}). First reasons:")
        out += [f"  - {t}" for t in notes]
        if n > len(notes):
            out.append(f"  ... and more: {n} noted cell(s) in all.")
        if not strict:
            out.append("  Pass --strict to make noted cells an error (exit code 4).")
    w = prov.get("rows_with_warnings", 0)
    if w:
        first = prov.get("first_warnings") or []
        out.append(f"{w} row(s) have a value and a warning in their note (column 'note' of {res.path}). First:")
        out += [f"  - {t}" for t in first]
        if w > len(first):
            out.append(f"  ... and more: {w} row(s) with a warning in all.")
    out += saturation_lines(prov.get("saturation") or {})
    d = prov.get("rows_dropped_stale", 0)
    if d:
        ests = prov.get("dropped_stale_estimators") or []
        out.append(f"Dropped {d} row(s) of estimator(s) {', '.join(ests)} that were computed from other store "
                   f"content or by another ibscope version, and that this run did not select: re-run with "
                   f"{' '.join('-e ' + e for e in ests)} to compute them from the store as it is now.")
    m = prov.get("rows_dropped_missing_checkpoint", 0)
    if m:
        gone = prov.get("missing_checkpoints") or []
        out.append(f"Dropped {m} row(s) of checkpoint(s) no longer in the store: {', '.join(gone[:5])}"
                   + (" ..." if len(gone) > 5 else "") + ".")
    return out


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
