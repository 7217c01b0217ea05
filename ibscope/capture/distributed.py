"""Capture on a Dask cluster: one task per checkpoint. This process writes the manifest and
holds the store's lock (:func:`write_store_remote`); each worker builds the model, reads the
probe and its checkpoint from their paths (a file system every worker sees) and writes that
checkpoint's shard itself, complete or absent (:func:`capture_task`).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from ibscope._dask import DaskExecutor
from ibscope._device import resolve_device
from ibscope.capture.local import CaptureBars, capture_into, check_resume_series, shard_attrs, store_jacobians
from ibscope.capture.plan import plan_layers
from ibscope.capture.probe import check_forward_accepts
from ibscope.errors import DataError

log = logging.getLogger("ibscope.capture")


def write_store_remote(engine, device, out, config, pr, meta, inputs, ckpts, task, reporter, *, resume, overwrite,
                        compression) -> Path:
    """The writing part of :func:`capture` on a Dask cluster: the manifest here, one task per
    checkpoint there (each writes its own shard), then the shards checked here."""
    from ibscope.executor import Piece, make_executor
    from ibscope.store import StoreWriter, open_store

    writer = StoreWriter(out, config=config, sample_ids=pr.ids, labels=pr.y, layers=meta, inputs=inputs,
                         input_shape=tuple(pr.x.shape[1:]), resume=resume, overwrite=overwrite, compression=compression,
                         replace_empty=True)
    try:
        if resume:
            check_resume_series(out, ckpts)
        todo = [c for c in ckpts if not (resume and writer.has_checkpoint(c.sha256))]
        if resume and len(todo) < len(ckpts):
            log.info("Resuming: %d of %d checkpoints already captured.", len(ckpts) - len(todo), len(ckpts))
        base = dict(task, store=os.path.abspath(writer.dir), config_hash=writer.config_hash,
                    probe_hash=writer.probe_hash)
        pieces = [Piece(capture_task, dict(base, ck=ck), gpu=True, label=f"capture {ck.label}") for ck in todo]
        noted: set[str] = set()
        with make_executor(engine, device) as ex:
            workers = len(ex.workers()) if isinstance(ex, DaskExecutor) else 1
            with CaptureBars(reporter, len(todo), title=f"checkpoints (Dask, {workers} worker(s))") as bars:
                for o in ex.run(pieces):
                    writer.written += 1
                    note = o.value.get("note")
                    if note and note not in noted:
                        noted.add(note)
                        log.info("Note: checkpoint keys: %s ('%s' and maybe others).", note, o.value["path"])
                    bars.checkpoint_done(str(o.value.get("path", "")))
        have = {c.sha256 for c in open_store(out).checkpoints}
        missing = [c for c in todo if c.sha256 not in have]
        if missing:
            raise DataError(f"{len(missing)} checkpoint(s) have no complete shard in '{out}' although their tasks "
                            f"finished: {', '.join(c.label for c in missing[:5])}.",
                            hint="The workers may see another copy of the store; check that they mount the same file "
                                 "system, then re-run with --resume.")
    except BaseException:
        if writer.created and not writer.written:  # nothing captured: leave no store that blocks the retry
            writer.remove_new_store()
        raise
    return writer.dir


_PROBES: dict = {}


def worker_probe(spec, max_samples, sample_seed):
    """The probe set of a capture task, read once per worker process (per file version)."""
    from ibscope.capture.probe import load_probe

    if not isinstance(spec, str):
        return load_probe(spec, max_samples=max_samples, sample_seed=sample_seed)
    try:
        st = os.stat(spec)
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = None
    key = (spec, max_samples, sample_seed, version)
    if key not in _PROBES:
        _PROBES.clear()  # one probe set at a time: they can be large
        _PROBES[key] = load_probe(spec, max_samples=max_samples, sample_seed=sample_seed)
    return _PROBES[key]


def capture_task(p: dict, device: str) -> dict:
    """One checkpoint of a capture on a cluster worker: build the model, read the probe and the
    checkpoint from their paths, write the checkpoint's shard (complete or absent)."""
    import torch

    from ibscope._dask import this_worker
    from ibscope.capture.checkpoints import describe_alignment, load_checkpoint_into, resolve_safe_globals
    from ibscope.capture.factory import resolve_factory
    from ibscope.capture.hf import is_hf_spec
    from ibscope.errors import ClusterError
    from ibscope.store import MANIFEST, StoreWriter, probe_hash

    who = this_worker()[0]
    store, ck = Path(p["store"]), p["ck"]
    if not (store / MANIFEST).is_file():
        raise ClusterError(f"{who} cannot see the activation store '{store}' ({MANIFEST} not found there).",
                           hint="Workers write their checkpoints' shards themselves: put --out on a file system every "
                                "worker mounts at the same path.")
    if not os.path.exists(ck.path):
        raise ClusterError(f"{who} cannot see the checkpoint '{ck.path}' ({ck.label}).",
                           hint="Put the checkpoints on a file system every worker mounts at the same path.")
    dev = resolve_device(device)
    pr = worker_probe(p["probe"], p["max_samples"], p["sample_seed"])
    inputs = pr.x.reshape(pr.n, -1).float().numpy() if p["with_inputs"] else None
    if probe_hash(pr.ids, pr.y, inputs) != p["probe_hash"]:
        raise ClusterError(f"{who} read other probe data from {p['probe']!r} than the capture was planned with.",
                           hint="The workers must see the same probe file as this machine (same path, same content).")
    model = p["model"]
    if isinstance(model, torch.nn.Module):  # an nn.Module given to capture(): this task's own copy
        from ibscope.capture.factory import unwrap_model

        net = copy.deepcopy(unwrap_model(model))
    elif is_hf_spec(model):
        from ibscope.capture import hf

        net = hf.factory(model, p["model_args"])(ck.path)
    else:
        net = resolve_factory(model, p["model_args"])()
    check_forward_accepts(net, pr)
    net.to(dev).eval()
    bs = int(p["batch_size"])
    targets, reducers, meta, _ = plan_layers(net, pr.batch(0, min(pr.n, bs, 8), dev), p["layers"], p["reduce"])
    dims = {n: m["dims"] for n, m in meta.items()}
    if dims != p["dims"]:
        raise ClusterError(f"{who} built a model whose layers differ from the plan: {dims} here, {p['dims']} planned.",
                           hint="The workers must import the same model code as this machine.")
    info = load_checkpoint_into(net, ck, trust_checkpoint=p["trust_checkpoint"],
                                safe_globals=resolve_safe_globals(p["safe_globals"]))
    net.eval()
    writer = StoreWriter.attach(store, config_hash=p["config_hash"], n_samples=pr.n, layer_dims=p["dims"],
                                compression=p["compression"])
    with writer.checkpoint(epoch=ck.epoch, step=ck.step, path=str(ck.path), sha256=ck.sha256,
                           metrics=ck.metrics) as shard:
        shard_attrs(shard, ck, info, dev, bs)
        shard.attrs["worker"] = who
        capture_into(shard, net, pr, targets, reducers, meta, dev=dev, batch_size=bs, dtype=p["dtype"],
                      allow_nonfinite=p["allow_nonfinite"], where=f"'{ck.path}' ({ck.label})")
        if p["jplan"] is not None:
            store_jacobians(net, targets, reducers, pr, p["jplan"], dev, shard)
    del net
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"sha256": ck.sha256, "path": str(ck.path), "shard": shard.final.name, "note": describe_alignment(info)}
