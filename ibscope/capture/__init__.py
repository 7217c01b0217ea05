"""``ibscope capture``: from a run's checkpoints to a crash-safe HDF5 activation store.

``capture(model, checkpoints, probe, layers, out, ...)`` builds the model from its factory,
orders the checkpoints (epoch/step stored in each file, else a number in its name), loads each
one safely (``weights_only``) and strictly, runs the fixed probe set through it with forward
hooks on the selected layers, and streams the (reduced) activations batch by batch into one
HDF5 shard per checkpoint (see :mod:`ibscope.store`), written by a thread beside the forward
pass (see :mod:`ibscope.capture.writer`). Optionally it stores, for the first N
probe samples, the singular values of each layer's Jacobian with respect to the input.

The package, one step per module: :mod:`~ibscope.capture.loading` (checkpoints and probe sets
from what the user names: :mod:`~ibscope.capture.factory`, :mod:`~ibscope.capture.checkpoints`,
:mod:`~ibscope.capture.series`, :mod:`~ibscope.capture.trainlogs`, :mod:`~ibscope.capture.hf`,
:mod:`~ibscope.capture.probe`), :mod:`~ibscope.capture.plan` (layers, reductions and the
Jacobian budget, before any work: :mod:`~ibscope.capture.selectors`,
:mod:`~ibscope.capture.hooks`, :mod:`~ibscope.capture.jacobian`), :mod:`~ibscope.capture.local`
(the shards written in this process, by :mod:`~ibscope.capture.writer`'s thread) or
:mod:`~ibscope.capture.distributed` (one Dask task per checkpoint), and
:mod:`~ibscope.capture.live` (snapshots from inside a training loop).
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from ibscope._device import resolve_device
from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, lock_path_for, writer_lock
from ibscope._paths import check_parents
from ibscope.capture.jacobian import parse_memory, parse_method
from ibscope.capture.plan import (
    check_jacobian_input,
    layers_table,
    plan_jacobian_work,
    plan_layers,
    probe_and_jacobian_config,
)
from ibscope.capture.probe import check_forward_accepts
from ibscope.capture.series import series_table
from ibscope.errors import UsageError, io_error
from ibscope.reporting import Reporter, TextReporter, is_silent, show_table

log = logging.getLogger(__name__)

__all__ = ["capture", "snapshot", "Snapshotter", "resolve_device", "plan_layers", "DEFAULT_MAX_INPUT_BYTES"]

DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024  # probe inputs above this are not copied into the store


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    from ibscope.store import MANIFEST, SHARD_DIR

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file; it must be a directory (new, or an existing activation store).")
    check_parents(out, "activation store")  # -o afile/x: a usage error, not a failed write
    # a store being created by another capture holds only these (its manifest is renamed in last)
    own = {MANIFEST, MANIFEST + ".tmp", SHARD_DIR}
    if out.is_dir() and not (out / MANIFEST).exists() and any(p.name not in own for p in out.iterdir()):
        raise UsageError(f"--out '{out}' is a non-empty directory that is not an activation store; refusing to write into it.",
                         hint="Choose a new or empty directory.")


def capture(
    model: str | Callable,
    checkpoints,
    probe,
    layers: list[str] | str,
    out: str | os.PathLike | None,
    *,
    model_args: dict | None = None,
    reduce: str | dict | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
    dtype: str = "float32",
    jacobian_samples: int = 0,
    store_inputs: bool = True,
    split: str = "probe",
    run: str = "run",
    resume: bool = False,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    safe_globals: list | None = None,
    progress: bool = True,
    reporter: Reporter | None = None,
    sample_seed: int | None = None,
    allow_nonfinite: bool = False,
    compression: str = "none",
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    jacobian_chunk: int | None = None,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    order: str = "auto",
    dry_run: bool = False,
    jacobian_method: str = "exact",
    jacobian_memory: int | str | None = "auto",
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
) -> Path | None:
    """Capture activations of ``layers`` for every checkpoint into the store at ``out``.

    ``model``: ``"pkg.module:factory"``, ``"path/file.py:factory"`` or a zero-argument callable
    returning the ``nn.Module`` (keyword arguments from ``model_args``). ``checkpoints``: a glob, a
    directory or a list of files. ``probe``: ``.npz``/``.h5``/``.pt`` file, a factory string, or
    ``(x, y)``. ``layers``: selector strings (see :mod:`ibscope.capture.selectors`). ``reduce``: one
    reduction for all layers or ``{layer_or_glob: op, "*": default}`` (see
    :mod:`ibscope.capture.hooks`). ``max_samples``: the first N probe samples, or a subset drawn
    with ``sample_seed``. ``dtype``: storage dtype, ``float32`` or ``float16`` (a layer whose values
    exceed float16's range is kept as float32 for that checkpoint, with a warning). Non-finite
    activations raise :class:`~ibscope.errors.DataError` unless ``allow_nonfinite``.
    ``safe_globals``: classes (or ``"module.Class"`` strings) allowed when loading checkpoints
    with ``weights_only=True``, besides the numpy scalar/array globals allowed by default;
    ``trust_checkpoint`` (full unpickling) is the last resort. Returns the store directory.

    ``model="hf"`` builds each checkpoint's Hugging Face model from its own folder's
    ``config.json``, ``"hf:DIR"`` from DIR's (offline; ``model_args`` override config
    attributes; see :mod:`ibscope.capture.hf`). A Trainer folder ``checkpoint-N/`` is one
    checkpoint. ``order``: "auto" (step when every checkpoint has one, else epoch, else name),
    "step", "epoch" or "name" (see :mod:`ibscope.capture.series`). ``dry_run``: print the
    checkpoint series and the layer plan, write nothing, return None.

    Probe arrays other than ``x``, ``y`` and ``ids`` are passed to the model by keyword
    (``input_ids``, ``attention_mask``, ...; see :mod:`ibscope.capture.probe`); an
    ``attention_mask`` makes last/first/mean reduce over real tokens. ``jacobian_samples``: for
    the first N probe rows, the singular values of each layer's Jacobian with respect to the
    (primary, floating) input, by ``jacobian_method`` (``"exact"`` or ``"sketch:K"``) within
    ``jacobian_memory`` (bytes, ``"2G"``, or ``"auto"``: 1 GiB or half the available memory);
    the budget is checked before any work (see :mod:`ibscope.capture.jacobian`).
    ``jacobian_chunk`` caps the samples handled in one vmap (default: as many as the budget holds).

    Progress (checkpoints, batches, Jacobian passes), the checkpoint series and the Jacobian
    plan go to ``reporter`` (:mod:`ibscope.reporting`; the CLI passes its rich one); ``None``,
    the default, is silent, as is ``progress=False``. A dry run shows its tables even without
    one (plain text on stderr, :class:`~ibscope.reporting.TextReporter`) and, like the real run,
    refuses an existing store without ``resume`` or ``overwrite``.

    A capture that fails before its first checkpoint is stored removes the store it created,
    so the same command (fixed) can simply be run again.

    The whole capture holds the store's writer lock (``.OUT.lock`` next to ``OUT``): a second
    capture into the same store waits up to ``lock_timeout`` seconds (negative or None: without
    limit), then stops with :class:`~ibscope._locks.LockTimeout` naming the lock file and its
    holder. A write the system refuses (disk full, read-only, no permission) raises
    :class:`~ibscope.errors.IOFailure` naming the path; the shard being written is deleted and
    completed checkpoints are kept, so ``resume=True`` continues once the cause is fixed.

    On a Dask cluster (``scheduler="tcp://HOST:PORT"`` or ``scheduler_file``, else
    ``DASK_SCHEDULER_ADDRESS``; see :mod:`ibscope.executor`) every checkpoint is one task: a
    worker builds the model, reads the probe and the checkpoint from their paths (a file system
    every worker sees), and writes that checkpoint's shard itself, complete or absent as here.
    This process plans the layers, writes the manifest, holds the store's lock and checks the
    shards at the end; ``resume`` works the same. Workers started with ``--resources GPU=1``
    get the tasks (on ``cuda`` when ``device`` is "auto").
    """
    from ibscope.capture.checkpoints import resolve_safe_globals
    from ibscope.capture.factory import model_spec_id, resolve_factory
    from ibscope.capture.loading import discover_checkpoints
    from ibscope.capture.probe import load_probe
    from ibscope.store import resolve_store_dir

    if dtype not in ("float32", "float16"):
        raise UsageError(f"--dtype must be float32 or float16. Got {dtype!r}.")
    if int(batch_size) < 1:
        raise UsageError(f"--batch-size must be >= 1. Got {batch_size}.")
    if int(jacobian_samples) < 0:
        raise UsageError(f"--jacobian-samples must be >= 0. Got {jacobian_samples}.")
    if compression not in ("lzf", "gzip", "none"):
        raise UsageError(f"--compression must be lzf, gzip or none. Got {compression!r}.")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other.",
                         hint="--resume keeps what was captured; --overwrite starts again from nothing.")
    allowed = resolve_safe_globals(safe_globals)  # a name that cannot be imported: usage error before any work
    check_timeout(lock_timeout)
    from ibscope.executor import remote_device, resolve_engine

    engine = resolve_engine(1, scheduler, scheduler_file)
    if out is None and not dry_run:
        raise UsageError("capture needs an output store: pass --out DIR (only --dry-run can go without it).")
    out = Path(out) if out is not None else None
    if out is not None:
        _check_out_dir(out, resume, overwrite)
    # on a cluster this process only plans (on its CPU); the workers capture on their devices
    dev = resolve_device("cpu") if engine.remote and not dry_run else resolve_device(device)
    worker_device = remote_device(device) if engine.remote else None
    rep = reporter if progress else None  # the checkpoint series and the Jacobian plan go with the progress
    if dry_run and is_silent(rep):
        rep = reporter if not is_silent(reporter) else TextReporter()  # a dry run always shows its plan

    import torch.nn as nn

    from ibscope.capture.hf import is_hf_spec

    rebuild = None
    if isinstance(model, nn.Module):
        from ibscope.capture.factory import unwrap_model

        template = unwrap_model(model)
        build = (lambda: copy.deepcopy(template))  # noqa: E731
        model_id = f"<module {type(model).__name__}>"
    elif is_hf_spec(model):
        from ibscope.capture import hf

        hf_build = hf.factory(model, model_args)
        model_id = "hf" if model == "hf" else f"hf:{Path(model[3:]).resolve()}"
        build = None
    else:
        build = resolve_factory(model, model_args)
        model_id = model_spec_id(model)
    parse_method(jacobian_method)  # bad values: usage errors before any work
    jac_budget = parse_memory(jacobian_memory, dev) if jacobian_samples else None
    if jacobian_chunk is not None and int(jacobian_chunk) < 1:
        raise UsageError(f"jacobian_chunk must be >= 1. Got {jacobian_chunk}.")
    pr = load_probe(probe, max_samples=max_samples, sample_seed=sample_seed)
    check_jacobian_input(pr, jacobian_samples)
    ckpts = discover_checkpoints(checkpoints, trust_checkpoint=trust_checkpoint, safe_globals=allowed, order=order)
    if build is None:  # Hugging Face: the first checkpoint's model plans the layers
        net = hf_build(ckpts[0].path)
        if model == "hf":
            rebuild = _hf_rebuilder(hf, ckpts[0].path, hf_build, model_args, dev)
    else:
        net = build()
    check_forward_accepts(net, pr)
    show_table(rep, series_table(ckpts))
    net.to(dev).eval()
    first = pr.batch(0, min(pr.n, int(batch_size), 8), dev)
    targets, reducers, meta, _ = plan_layers(net, first, layers, reduce)
    jplan = None
    if jacobian_samples:
        jplan = plan_jacobian_work(net, targets, reducers, meta, pr, int(jacobian_samples), dev, jacobian_method,
                                jac_budget, None if jacobian_chunk is None else int(jacobian_chunk))
        if rep is None or is_silent(rep):
            log.info("%s", jplan.summary())
        else:
            rep.info(jplan.summary())
    if dry_run:
        from ibscope.store import MANIFEST, open_store

        show_table(rep, layers_table(meta, "Layers to capture (dry run: nothing written)"))
        if out is not None and not (resume or overwrite) and (out / MANIFEST).is_file() \
                and open_store(out, skip_bad_shards=True).checkpoints:
            raise UsageError(f"Store '{out}' already exists: the capture would be refused (dry run: nothing "
                             "written).", hint="Pass --resume to capture only what is missing, or --overwrite to "
                                               "start again.")
        return None
    assert out is not None  # refused above unless dry_run

    inputs = None
    if store_inputs:
        nbytes = pr.x.numel() * 4
        if nbytes > max_input_bytes:
            log.warning("Not storing probe inputs in the store: %.1f MiB > limit %.1f MiB (sample ids are stored).",
                        nbytes / 2**20, max_input_bytes / 2**20)
        else:
            inputs = pr.x.reshape(pr.n, -1).float().numpy()
    config = {
        "model": model_id, "model_args": dict(model_args or {}), "layers": [layers] if isinstance(layers, str) else list(layers),
        "reduce": reduce if reduce is not None else "auto", "dtype": dtype, "max_samples": max_samples,
        "sample_seed": sample_seed, "jacobian_samples": int(jacobian_samples), "split": str(split), "run": str(run),
        "probe": pr.source, "n_samples": pr.n, "input_shape": [int(s) for s in pr.x.shape[1:]],
        "input_dtype": str(pr.x.dtype).replace("torch.", ""),
    }
    config.update(probe_and_jacobian_config(pr, jplan))
    store_dir = resolve_store_dir(out)
    with ExitStack() as held:
        try:
            held.enter_context(writer_lock(store_dir, what="activation store", timeout=lock_timeout))
        except OSError as exc:  # e.g. a read-only or full file system: the lock file cannot be created
            raise io_error(exc, lock_path_for(store_dir), "creating the lock file") from None
        _check_out_dir(out, resume, overwrite)  # again, now that no other capture can change it
        if engine.remote:
            task = {"model": model, "model_args": dict(model_args or {}), "probe": probe, "max_samples": max_samples,
                    "sample_seed": sample_seed, "layers": [layers] if isinstance(layers, str) else list(layers),
                    "reduce": reduce, "batch_size": int(batch_size), "dtype": dtype, "allow_nonfinite": allow_nonfinite,
                    "trust_checkpoint": trust_checkpoint, "safe_globals": list(safe_globals or []),
                    "compression": compression, "with_inputs": inputs is not None, "jplan": jplan,
                    "dims": {n: m["dims"] for n, m in meta.items()}}
            from ibscope.capture.distributed import write_store_remote

            return write_store_remote(engine, worker_device, out, config, pr, meta, inputs, ckpts, task, rep,
                                       resume=resume, overwrite=overwrite, compression=compression)
        from ibscope.capture.local import write_store

        return write_store(out, config, pr, meta, inputs, ckpts, targets, reducers, net, dev, rep, resume=resume,
                     overwrite=overwrite, compression=compression, batch_size=int(batch_size), dtype=dtype,
                     jplan=jplan, trust_checkpoint=trust_checkpoint, safe_globals=allowed,
                     allow_nonfinite=allow_nonfinite, rebuild=rebuild)


def _hf_rebuilder(hf, first_path, hf_build, overrides, dev):
    """For ``--model hf``: a new model when a checkpoint's config differs from the last one's."""
    current = {"id": hf.config_identity(hf.config_folder(Path(first_path)), overrides)}

    def rebuild(ck):
        folder = hf.config_folder(Path(ck.path))
        if folder is None:
            return hf_build(ck.path)  # raises the UsageError saying the config.json is missing
        ident = hf.config_identity(folder, overrides)
        if ident == current["id"]:
            return None
        current["id"] = ident
        log.info("Checkpoint '%s' has another config.json; building its model from it.", ck.path)
        return hf_build(ck.path).to(dev).eval()

    return rebuild


from ibscope.capture.live import Snapshotter, snapshot  # noqa: E402 - uses the helpers above
