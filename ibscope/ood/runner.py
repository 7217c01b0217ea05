"""``run_ood``: a grid of detectors x reductions x k on activation stores, with a report.

Inputs are activation stores (``ibscope capture`` output, one per split) of the same
checkpoints: the fit split (in-distribution training data), the ID test split, optionally an
ID validation split, and one or more named OOD splits. For each selected checkpoint and each
reduction, features are prepared on the fit split only; each detector is fitted on the fit
split, a threshold is taken on the ID validation split only (a separate store, or a random
``val_frac`` of the fit store held out from the fit), and every OOD set is compared with the
ID test set.

Outputs under ``out_dir``: ``ood_metrics.json`` (metrics + fitted settings + provenance),
``ood_scores.h5`` (per-sample scores), ``figures/*.png`` and ``report.md`` / ``report.html``.
They form one set: the old ``ood_metrics.json`` is removed before anything else is written and
the new one is written last, listing the SHA-256 of every other file (``output_set``). A run
killed part-way leaves no ``ood_metrics.json``, and the readers (:func:`read_scores`,
``ibscope report --ood``) refuse a folder whose files do not match it (:func:`check_output_set`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ibscope._atomic import write_text_atomic
from ibscope._version import __version__
from ibscope.errors import DataError, UsageError
from ibscope.reporting import NullReporter, Reporter, reporter_or_null
from ibscope.store._format import file_sha256

log = logging.getLogger(__name__)

JSON_NAME = "ood_metrics.json"
SCORES_NAME = "ood_scores.h5"
FORMAT = "ibscope-ood"
FORMAT_VERSION = 1
SET_KEY = "output_set"
RESERVED = ("fit", "val", "test")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


# --------------------------------------------------------------------------------------------
def _open(path, role: str, skip_bad_shards: bool = False):
    from ibscope.store import Store, open_store

    if isinstance(path, Store):
        return path
    try:
        return open_store(path, skip_bad_shards=skip_bad_shards)
    except DataError as exc:
        raise DataError(f"{role} store: {exc.message}", hint=exc.hint) from None


def _layer_shape(store, layer: str) -> tuple[int, ...] | None:
    meta = store.layer_meta(layer)
    for key in ("raw_shape", "output_shape", "raw_output_shape", "shape"):
        v = meta.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(i, int) for i in v):
            return tuple(int(i) for i in v)  # per-sample shape (capture records it without the batch axis)
    return None


def ckpt_name(epoch, step, index) -> str:
    """How OOD output names a checkpoint: "epoch 3", "step 200", "epoch 3 (step 120)", else
    "checkpoint <index>" (its position in the fit store)."""
    from ibscope.store import checkpoint_label

    if epoch is None and step is None:
        return f"checkpoint {index}"
    return checkpoint_label(epoch, step, "")


def _select_checkpoints(store, checkpoint) -> list[int]:
    n = len(store.checkpoints)
    if n == 0:
        raise DataError(f"The fit store '{store.dir}' holds no complete checkpoint.",
                        hint="Run `ibscope capture` (or --resume it) until at least one checkpoint is captured.")
    if checkpoint is None:
        checkpoint = -1
    if isinstance(checkpoint, str):
        c = checkpoint.strip().lower()
        if c == "all":
            return list(range(n))
        if c in ("last", "latest"):
            return [n - 1]
        try:
            checkpoint = [int(v) for v in c.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--checkpoint expects an index, a comma list of indices, 'last' or 'all'. Got {checkpoint!r}.") from None
    items = [checkpoint] if isinstance(checkpoint, (int, np.integer)) else list(checkpoint)
    out: list[int] = []
    for item in items:
        i = int(item)
        if not -n <= i < n:
            raise UsageError(f"Checkpoint index {i} is out of range: the fit store holds {n} checkpoint(s) (0..{n - 1}, or -1 for the last).")
        out.append(i % n)
    return sorted(set(out))


def _match(store, ref_info, role: str) -> int:
    """Index in ``store`` of the checkpoint that ``ref_info`` (from the fit store) refers to."""
    if ref_info.sha256:
        for c in store.checkpoints:
            if c.sha256 == ref_info.sha256:
                return c.index
    for c in store.checkpoints:
        if not (ref_info.sha256 and c.sha256) and (c.epoch, c.step) == (ref_info.epoch, ref_info.step):
            return c.index
    raise DataError(
        f"The {role} store '{store.dir}' has no capture of the fit store's checkpoint {ref_info.index} "
        f"({ref_info.label}, {ref_info.path or 'unknown path'}).",
        hint="Capture every split from the same checkpoints (same --checkpoints for each ibscope capture run).",
    )


def _load(store, ckpt: int, layer: str, role: str) -> np.ndarray:
    a = store.activations(ckpt, layer)
    a = np.asarray(a, dtype=np.float32 if a.dtype != np.float64 else np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise DataError(f"The {role} store '{store.dir}' holds no samples for layer '{layer}' (shape {a.shape}).")
    bad = ~np.isfinite(a)
    if bad.any():
        rows = int(bad.any(1).sum())
        raise DataError(
            f"The {role} store '{store.dir}' has {int(bad.sum())} non-finite feature value(s) (NaN or inf) in layer "
            f"'{layer}' at checkpoint {ckpt}, in {rows} of {a.shape[0]} samples.",
            hint="The model produced NaN/inf activations (diverged training or bad inputs); choose another checkpoint or layer.",
        )
    return a


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(f"OOD set names may contain letters, digits, '_', '-' and '.'. Got {name!r}.",
                         hint="Give each set as --ood NAME=STORE, e.g. --ood noise=stores/noise.")
    if name in RESERVED:
        raise UsageError(f"OOD set name {name!r} is reserved (fit, val and test name the in-distribution splits).")
    return name


def config_id(detector: str, reduction: str, k: int | None) -> str:
    return f"{detector}|{reduction}" + (f"|k={k}" if k is not None else "")


# --------------------------------------------------------------------------------------------
# the outputs as one set: ood_metrics.json is the completion marker, written last
def _check_out_dir(out: Path) -> None:
    """``out`` must be a folder, new or existing: a file there (or above it) is a usage error."""
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"lies inside '{p}', which is a file"
                raise UsageError(
                    f"--out '{out}' {where}; ibscope ood writes a folder ({JSON_NAME}, {SCORES_NAME}, figures/, "
                    "report.md, report.html).", hint="Choose a new folder name (or an existing folder).")
            return


def _begin_set(out: Path) -> None:
    """Remove the completion marker of a previous run (and our own leftovers) before writing."""
    (out / JSON_NAME).unlink(missing_ok=True)
    for name in (JSON_NAME, SCORES_NAME, "report.md", "report.html"):
        (out / (name + ".tmp")).unlink(missing_ok=True)
    figdir = out / "figures"
    if figdir.is_dir():
        for p in figdir.glob("*.tmp.png"):
            p.unlink(missing_ok=True)


def _set_record(out: Path, files: Sequence[str]) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "complete": True,
            "files": {f: {"bytes": (out / f).stat().st_size, "sha256": file_sha256(out / f)} for f in files}}


def _incomplete(folder: Path, why: str) -> DataError:
    return DataError(f"'{folder}' does not hold a complete `ibscope ood` output: {why}",
                     hint="Re-run the same `ibscope ood` command into that folder; it replaces what is there.")


def check_output_set(json_path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Check that the files ``doc`` (the parsed ``ood_metrics.json``) lists are there, unchanged.

    Raises :class:`DataError` (exit code 4) naming the first file that is missing or differs.
    A JSON without an ``output_set`` record (written by another tool or an older ibscope, which
    also wrote it last) is accepted as it is.
    """
    folder = Path(json_path).parent
    rec = doc.get(SET_KEY)
    if rec is None:
        return
    files = rec.get("files") if isinstance(rec, dict) else None
    if not isinstance(files, dict) or not rec.get("complete"):
        raise _incomplete(folder, f"the '{SET_KEY}' record of {JSON_NAME} is malformed.")
    for rel, meta in files.items():
        p = folder / rel
        if not isinstance(meta, dict) or not p.is_file():
            raise _incomplete(folder, f"{JSON_NAME} lists '{rel}', which is missing.")
        if p.stat().st_size != meta.get("bytes") or file_sha256(p) != meta.get("sha256"):
            raise _incomplete(folder, f"'{rel}' is not the file {JSON_NAME} was written with (size or SHA-256 "
                                      "differs): the folder mixes the outputs of two runs, or the file was changed.")


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``ood_metrics.json`` (or the folder holding it) and check that its output set is complete."""
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    if not p.is_file():
        folder = p.parent
        if (folder / SCORES_NAME).exists() or (folder / (SCORES_NAME + ".tmp")).exists():
            raise _incomplete(folder, f"it has {SCORES_NAME} but no {JSON_NAME}, which `ibscope ood` writes last; "
                                      "the run that wrote it did not finish.")
        raise DataError(f"OOD results file not found: '{p}'.",
                        hint="Pass the ood_metrics.json (or its folder) written by `ibscope ood ... -o DIR`.")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"OOD results file '{p}' is not valid JSON: {exc}.") from None
    if not isinstance(doc, dict):
        raise DataError(f"OOD results file '{p}' must be a JSON object with a 'results' list. Got {type(doc).__name__}.",
                        hint="Use the ood_metrics.json written by `ibscope ood`.")
    check_output_set(p, doc)
    return doc


# --------------------------------------------------------------------------------------------
def run_ood(
    fit,
    test,
    ood: Mapping[str, Any],
    layer: str,
    *,
    detectors: Sequence[str] = ("mahalanobis", "knn"),
    reductions: Sequence[str] = ("none",),
    ks: Sequence[int] = (50,),
    val=None,
    val_frac: float = 0.2,
    checkpoint: int | str | Sequence[int] = -1,
    covariance: str = "auto",
    class_conditional: bool = False,
    ridge: float = 0.0,
    normalize: bool = True,
    backend: str = "auto",
    search: str = "auto",
    tpr: float = 0.95,
    n_bootstrap: int = 200,
    ci_level: float = 0.95,
    seed: int = 0,
    device: str = "auto",
    memory_limit: int | str = "4GB",
    raw_shape: Sequence[int] | None = None,
    out_dir: str | os.PathLike = "ood",
    figures: bool = True,
    progress: bool = True,
    skip_bad_shards: bool = False,
    log_warnings: bool = True,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Score ``ood`` sets against the ID ``test`` set with a grid of detectors and reductions.

    ``fit``, ``test``, ``val``: activation store paths (or open :class:`~ibscope.store.Store`);
    ``ood``: {name: store path}; ``layer``: a layer name of the stores. ``detectors``:
    "mahalanobis" and/or "knn"; ``reductions``: specs of :mod:`ibscope.ood.features`
    (e.g. "none", "std+pca:16", "umap:2"); ``ks``: k values for knn. ``checkpoint``: fit-store
    index (-1 = last), list of indices, or "all". ``skip_bad_shards``: leave out shards that are
    truncated, corrupt or foreign (with a warning) instead of raising DataError. Returns the dict
    written to ``out_dir/ood_metrics.json``; its ``warnings`` are also logged unless
    ``log_warnings=False`` (for a caller that shows them itself: each is shown once).
    ``reporter``: an :class:`ibscope.reporting.Reporter` that shows the progress over the grid
    (``None``: silent; ``progress=False`` turns its progress off).
    """
    from ibscope._device import resolve_device
    from ibscope.ood.detectors import DETECTORS, KNNDetector, MahalanobisDetector, parse_bytes
    from ibscope.ood.features import FeaturePipeline, canonical
    from ibscope.ood.metrics import METRICS, bootstrap_ci, compute_metrics, flagged_fraction, threshold_from_validation

    t_start = time.perf_counter()
    # ---- validate options before touching data ---------------------------------------------
    detectors = list(dict.fromkeys(detectors or ()))
    if not detectors:
        raise UsageError("No OOD detector selected.", hint="Pass --detector mahalanobis and/or --detector knn.")
    for d in detectors:
        if d not in DETECTORS:
            from ibscope.errors import unknown_name

            raise unknown_name("OOD detector", d, DETECTORS)
    reductions = list(dict.fromkeys(canonical(r) for r in (reductions or ("none",))))
    ks = sorted({int(k) for k in (ks or (50,))})
    if "knn" in detectors:
        for k0 in ks:
            KNNDetector(k=k0, normalize=normalize, backend=backend, search=search)  # validates k, backend, search
    MahalanobisDetector(covariance=covariance, ridge=ridge, memory_limit=memory_limit)  # validates options
    if not ood:
        raise UsageError("No OOD set given.", hint="Pass at least one --ood NAME=STORE.")
    ood = {_check_name(str(k)): v for k, v in ood.items()}
    if val is None and not 0.0 < float(val_frac) < 1.0:
        raise UsageError(f"--val-frac must be in (0, 1) when no --val store is given. Got {val_frac!r}.")
    if not 0.0 < float(tpr) < 1.0:
        raise UsageError(f"--tpr must be in (0, 1). Got {tpr!r}.")
    dev = resolve_device(device)
    mem = parse_bytes(memory_limit)
    out = Path(out_dir)
    _check_out_dir(out)

    # ---- stores ---------------------------------------------------------------------------
    stores = {"fit": _open(fit, "fit", skip_bad_shards), "test": _open(test, "test", skip_bad_shards)}
    if val is not None:
        stores["val"] = _open(val, "val", skip_bad_shards)
    for name, p in ood.items():
        stores[name] = _open(p, f"OOD '{name}'", skip_bad_shards)
    for role, st in stores.items():
        if layer not in st.layers:
            from ibscope.errors import did_you_mean

            raise UsageError(f"Layer '{layer}' is not in the {role} store '{st.dir}'.{did_you_mean(layer, st.layers)}",
                             hint="Layers there: " + ", ".join(st.layers[:20]))
    shape = tuple(int(s) for s in raw_shape) if raw_shape else _layer_shape(stores["fit"], layer)
    ckpts = _select_checkpoints(stores["fit"], checkpoint)
    fit_store = stores["fit"]
    if class_conditional and "mahalanobis" in detectors and fit_store.labels is None:
        raise UsageError(f"Class-conditional Mahalanobis needs class labels, but the fit store '{fit_store.dir}' has none.",
                         hint="Capture the fit split with labels, or drop --class-conditional.")

    rng = np.random.default_rng(seed)
    n_fit_all = fit_store.n_samples
    if val is None:
        perm = rng.permutation(n_fit_all)
        n_val = int(round(val_frac * n_fit_all))
        if n_val < 1 or n_fit_all - n_val < 2:
            raise DataError(f"The fit store has {n_fit_all} samples: too few to hold out {val_frac:.0%} for validation.",
                            hint="Pass a separate --val store, or capture more fit samples.")
        val_rows, fit_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    else:
        fit_rows, val_rows = np.arange(n_fit_all), None
    fit_labels = None if fit_store.labels is None else np.asarray(fit_store.labels)[fit_rows]

    results: list[dict[str, Any]] = []
    fitted: list[dict[str, Any]] = []
    warnings_out: list[str] = []
    score_store: dict[str, dict[str, Any]] = {}
    plot_data: dict[str, Any] = {}
    n_configs = len(reductions) * (("mahalanobis" in detectors) + len(ks) * ("knn" in detectors))
    total = len(ckpts) * n_configs
    with (reporter_or_null(reporter) if progress else NullReporter()).task("OOD grid", total) as bar:
        for ci in ckpts:
            info = fit_store.checkpoints[ci]
            feats: dict[str, np.ndarray] = {}
            ids: dict[str, np.ndarray] = {}
            for role, st in stores.items():
                idx = ci if role == "fit" else _match(st, info, role if role in RESERVED else f"OOD '{role}'")
                feats[role] = _load(st, idx, layer, role if role in RESERVED else f"OOD '{role}'")
                ids[role] = np.asarray(st.sample_ids)
            dims = {role: f.shape[1] for role, f in feats.items()}
            if len(set(dims.values())) != 1:
                listing = ", ".join(f"{r}: {d}" for r, d in dims.items())
                raise DataError(f"Layer '{layer}' has different feature dims across the stores ({listing}).",
                                hint="Capture every split with the same layers and --reduce settings.")
            if val is None:
                feats["val"], ids["val"] = feats["fit"][val_rows], ids["fit"][val_rows]
                feats["fit"], ids["fit"] = feats["fit"][fit_rows], ids["fit"][fit_rows]
            ood_names = list(ood)
            ck_key = f"checkpoint_{ci}"
            score_store[ck_key] = {"epoch": info.epoch, "step": info.step, "sample_ids": ids, "configs": {}}
            for red in reductions:
                t0 = time.perf_counter()
                pipe = FeaturePipeline(red, raw_shape=shape, seed=seed)
                zfit = pipe.fit_transform(feats["fit"])
                z = {"fit": zfit}
                for role in ["val", "test", *ood_names]:
                    z[role] = pipe.transform(feats[role])
                t_red = time.perf_counter() - t0
                runs: list[tuple[str, int | None, Any]] = []
                if "mahalanobis" in detectors:
                    runs.append(("mahalanobis", None, MahalanobisDetector(
                        covariance=covariance, class_conditional=class_conditional, ridge=ridge, memory_limit=mem,
                        device=str(dev))))
                if "knn" in detectors:
                    for kk in ks:
                        runs.append(("knn", kk, KNNDetector(k=kk, normalize=normalize, backend=backend, search=search,
                                                              device=str(dev))))
                for det_name, k, det in runs:
                    cid = config_id(det_name, red, k)
                    t1 = time.perf_counter()
                    det.fit(zfit, fit_labels if det_name == "mahalanobis" and class_conditional else None)
                    sc = {role: det.score(z[role]) for role in ["val", "test", *ood_names]}
                    t_det = time.perf_counter() - t1
                    thr = threshold_from_validation(sc["val"], tpr)
                    id_flag = flagged_fraction(sc["test"], thr)
                    val_flag = flagged_fraction(sc["val"], thr)
                    fitted.append({"config": cid, "checkpoint": ci, "feature": pipe.settings(),
                                   "detector": det.settings(), "threshold": thr,
                                   "timing_s": {"reduce": t_red, "fit_and_score": t_det}})
                    score_store[ck_key]["configs"][cid] = sc
                    for name in ood_names:
                        m = compute_metrics(sc["test"], sc[name], tpr)
                        cis = bootstrap_ci(sc["test"], sc[name], n_boot=n_bootstrap, level=ci_level, tpr=tpr, seed=seed)
                        row = {"config": cid, "detector": det_name, "reduction": red, "k": k, "layer": layer,
                               "checkpoint": ci, "epoch": info.epoch, "step": info.step, "ood_set": name,
                               "n_fit": int(zfit.shape[0]), "n_val": int(sc["val"].size), "n_id": int(sc["test"].size),
                               "n_ood": int(sc[name].size), "dims_in": int(feats["fit"].shape[1]),
                               "dims_used": int(zfit.shape[1]), **m, "threshold": thr,
                               "flagged_fraction": flagged_fraction(sc[name], thr),
                               "id_flagged_fraction": id_flag, "val_flagged_fraction": val_flag}
                        for met in METRICS:
                            lo, hi = cis.get(met, (None, None))
                            row[f"{met}_ci_low"], row[f"{met}_ci_high"] = lo, hi
                        results.append(row)
                        if m["auroc"] < 0.5:
                            warnings_out.append(
                                f"{cid} at {ckpt_name(info.epoch, info.step, ci)}: AUROC {m['auroc']:.3f} < 0.5 on '{name}': the OOD set scores "
                                "lower (more in-distribution) than the ID test set. Check that the right layer and sets were given.")
                    bar.advance()
            if ci == ckpts[-1]:
                plot_data = {"feats": {r: feats[r] for r in ["fit", "test", *ood_names]}, "checkpoint": ci}

    # ---- outputs: one set, ood_metrics.json (the completion marker) removed first, written last
    out.mkdir(parents=True, exist_ok=True)
    _begin_set(out)
    _write_scores(out / SCORES_NAME, score_store, layer)
    fig_paths: list[str] = []
    if figures:
        from ibscope.ood.figures import make_figures

        fig_paths = make_figures(out, results, score_store, plot_data, ood_names=list(ood), tpr=tpr, seed=seed,
                                 warnings_out=warnings_out)
    provenance = {
        "ibscope_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {role: {"path": str(st.dir), "content_hash": st.content_hash(), "config_hash": st.config_hash,
                          "n_samples": st.n_samples, "config": {k: st.config.get(k) for k in ("run", "split") if k in st.config}}
                   for role, st in stores.items()},
        "settings": {"layer": layer, "detectors": detectors, "reductions": reductions, "ks": ks,
                     "checkpoints": ckpts, "covariance": covariance, "class_conditional": class_conditional,
                     "ridge": ridge, "normalize": normalize, "backend": backend, "search": search, "tpr": tpr,
                     "n_bootstrap": n_bootstrap, "ci_level": ci_level, "seed": seed, "device": str(dev),
                     "memory_limit_bytes": mem, "raw_shape": list(shape) if shape else None,
                     "validation": ("separate store" if val is not None else f"random {val_frac:g} of the fit store, held out of the fit"),
                     "val_frac": None if val is not None else val_frac},
        "score_convention": "higher = more OOD",
        "metric_definitions": {
            "auroc": "P(score_OOD > score_ID) + 0.5 P(tie); OOD positive",
            "aupr_in": "average precision, ID positive, ranking by -score",
            "aupr_out": "average precision, OOD positive, ranking by score",
            "fpr95_id_positive": "Lee/Sun: fraction of OOD accepted (score <= t) at the t accepting 95% of ID test",
            "fpr95_openood": "OpenOOD v1.5: fraction of ID test flagged (score >= t) at the t flagging 95% of OOD",
            "detection_accuracy": "Lee DTACC: max_t 0.5 (P(ID <= t) + P(OOD > t))",
            "threshold": "from the ID validation split only: flag when score > t; at most 1 - tpr of validation flagged",
            "flagged_fraction": "share of the OOD set with score > threshold",
            "id_flagged_fraction": "share of the ID test set with score > threshold",
        },
        "wall_time_s": time.perf_counter() - t_start,
    }
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": layer, "results": results,
           "figures": fig_paths, "fitted": fitted, "scores_file": SCORES_NAME, "warnings": warnings_out,
           "provenance": provenance}
    from ibscope.ood.report import write_markdown_report

    write_markdown_report(out, doc)
    doc[SET_KEY] = _set_record(out, [SCORES_NAME, *fig_paths, "report.md", "report.html"])
    write_text_atomic(out / JSON_NAME, json.dumps(_jsonable(doc), indent=1))  # last: the set is complete
    if log_warnings:
        for w in warnings_out:
            log.warning(w)
    return doc


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if np.isfinite(f) else None
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    return o


def _write_scores(path: Path, score_store: dict, layer: str) -> None:
    """Per-sample scores: /checkpoint_<i>/<config>/<set> (float64) and /checkpoint_<i>/sample_ids/<set>.

    Written as ``ood_scores.h5.tmp`` and renamed when complete; a write the system refuses (disk
    full, ...) deletes the tmp file and raises IOFailure naming the file (:class:`AtomicH5`)."""
    from ibscope._h5io import AtomicH5

    with AtomicH5(path, "writing the OOD scores") as w:
        f = w.f
        f.attrs["format"] = "ibscope-ood-scores"
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["ibscope_version"] = __version__
        f.attrs["layer"] = layer
        f.attrs["score_convention"] = "higher = more OOD"
        for ck, entry in score_store.items():
            g = f.create_group(ck)
            g.attrs["epoch"] = -1 if entry["epoch"] is None else int(entry["epoch"])
            g.attrs["step"] = -1 if entry["step"] is None else int(entry["step"])
            sg = g.create_group("sample_ids")
            for role, ids in entry["sample_ids"].items():
                sg.create_dataset(role, data=np.asarray(ids, dtype=np.int64))
            for cid, sc in entry["configs"].items():
                cg = g.create_group(cid)
                for role, s in sc.items():
                    cg.create_dataset(role, data=np.asarray(s, dtype=np.float64))
            w.check()


def read_scores(path: str | os.PathLike) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Read ``ood_scores.h5`` back: {checkpoint_key: {config_or_'sample_ids': {set: array}}}.

    ``path``: the scores file or its folder. The ``ood_metrics.json`` next to it must list it
    unchanged (a run killed before writing the JSON left an incomplete set): DataError otherwise.
    """
    import h5py

    p = Path(path)
    if p.is_dir():
        p = p / SCORES_NAME
    if not p.exists():
        raise DataError(f"OOD scores file not found: '{p}'.")
    doc = read_metrics(p.parent)
    rec = doc.get(SET_KEY)
    if isinstance(rec, dict) and p.name not in rec.get("files", {}):
        raise _incomplete(p.parent, f"{JSON_NAME} there does not list '{p.name}' as one of its outputs.")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"Cannot open '{p}' as HDF5: {exc}.") from None
    with f:
        if f.attrs.get("format") != "ibscope-ood-scores":
            raise DataError(f"'{p}' is not an ibscope OOD scores file (format {f.attrs.get('format')!r}).")
        return {ck: {cid: {role: ds[()] for role, ds in g[cid].items()} for cid in g} for ck, g in f.items()}
