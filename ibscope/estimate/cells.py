"""The cells of ``ibscope estimate``: content keys, code versions, null settings and the
computation of one (checkpoint, layer) cell, in-process or on a worker (see :mod:`ibscope.estimate`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from typing import Any, Iterable, cast

from ibscope._version import __version__
from ibscope.errors import ClusterError, DataError, IbscopeError, PluginError, ShardError, UsageError
from ibscope.estimators.base import SidedEstimator
from ibscope.results import make_row

log = logging.getLogger("ibscope.estimate")

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
        sest = cast(SidedEstimator, est)  # used only when sided (SidedEstimator's methods, both callable)
        skey = (name, json.dumps(params, sort_keys=True, default=str), device)

        def store_side(what, value, argname):
            shared = meta.setdefault("shared_sides", {})
            k = (*skey, what)
            if k not in shared:
                shared[k] = sest.side(value(), argname)
            return shared[k]

        def layer_side(argname):
            k = ("layer", *skey)
            if k not in cell_sides:
                cell_sides[k] = sest.side(acts(), argname)  # not kept on failure: each row says why
            return cell_sides[k]

        def sides(quantity, p, a, b):
            null = null_setting(name, quantity, p, n_perm, null_seed)
            if not null:
                return sest.estimate_sides(a(), b())
            # the permutations depend only on n, N and the seed: drawn once per store
            from ibscope.estimators.nulls import permutations

            pk = ("permutations", int(meta["n_samples"]), null["permutations"], null["seed"])
            shared = meta.setdefault("shared_sides", {})
            if pk not in shared:
                shared[pk] = permutations(*pk[1:])
            return sest.estimate_sides(a(), b(), null["permutations"], null["seed"], perms=shared[pk])

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
            from ibscope._dask import this_worker

            raise ClusterError(
                f"{this_worker()[0]} cannot see the activation store '{path}' ({MANIFEST} not found there).",
                hint="Stores are read by the workers themselves: put them on a file system every worker mounts at "
                     "the same path (or start the workers where they can see it).")
        st = _open(path, skip_bad_shards)
        if st.content_hash() != content_hash:
            from ibscope._dask import this_worker

            raise ClusterError(
                f"{this_worker()[0]} sees other content in the activation store '{path}' (content hash "
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
