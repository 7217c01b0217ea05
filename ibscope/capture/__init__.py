"""``ibscope capture``: from a run's checkpoints to a crash-safe HDF5 activation store.

``capture(model, checkpoints, probe, layers, out, ...)`` builds the model from its factory,
orders the checkpoints (epoch/step stored in each file, else a number in its name), loads each
one safely (``weights_only``) and strictly, runs the fixed probe set through it with forward
hooks on the selected layers, and streams the (reduced) activations batch by batch into one
HDF5 shard per checkpoint (see :mod:`ibscope.store`), written by a thread beside the forward
pass (see :mod:`ibscope.capture.writer`). Optionally it stores, for the first N
probe samples, the singular values of each layer's Jacobian with respect to the input.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ibscope._device import resolve_device
from ibscope._locks import DEFAULT_LOCK_TIMEOUT, check_timeout, lock_path_for, writer_lock
from ibscope._paths import check_parents
from ibscope.capture.jacobian import frozen_parameters, jacobian_spectra, parse_memory, parse_method, plan_jacobians
from ibscope.capture.probe import check_forward_accepts
from ibscope.errors import DataError, UsageError, io_error

log = logging.getLogger(__name__)

__all__ = ["capture", "snapshot", "Snapshotter", "resolve_device", "plan_layers", "DEFAULT_MAX_INPUT_BYTES"]

DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024  # probe inputs above this are not copied into the store


def _reduce_for(name: str, module: str, reduce: Any) -> str:
    """The reduction asked for a layer: exact name/path, then glob patterns, then the default."""
    from ibscope.capture.selectors import glob_match

    if reduce is None:
        return "auto"
    if isinstance(reduce, str):
        return reduce
    if not isinstance(reduce, dict):
        raise UsageError(f"reduce must be a string or a mapping {{layer: op}}. Got {type(reduce).__name__}.")
    for key in (name, module):
        if key in reduce:
            return str(reduce[key])
    for pat, op in reduce.items():
        if pat not in ("*", "default") and (glob_match(pat, name) or glob_match(pat, module)):
            return str(op)
    return str(reduce.get("*", reduce.get("default", "auto")))


def _check_reduce_keys(reduce: Any, targets) -> None:
    from ibscope.capture.selectors import glob_match

    if not isinstance(reduce, dict):
        return
    names = [t.name for t in targets] + [t.module for t in targets]
    for pat in reduce:
        if pat in ("*", "default"):
            continue
        if not any(pat == n or glob_match(pat, n) for n in names):
            from ibscope.errors import unknown_name

            raise unknown_name("layer in --reduce", pat, [t.name for t in targets])


def plan_layers(model, x, layers, reduce=None):
    """Dry-run ``model`` on batch ``x`` (a tensor, or a :class:`~ibscope.capture.probe.ModelInput`
    for keyword inputs): (targets, reducers, per-layer metadata, traces).

    Every reduction is checked against its layer's layout (channels-first map, sequence, features
    last); all layers whose reduction does not fit are named in one UsageError. With an
    ``attention_mask`` in ``x``, last/first/mean reduce over real tokens.
    """
    from ibscope.capture.hooks import (
        CaptureEngine,
        Problem,
        Reducer,
        check_reduction,
        layout_of,
        raw_shape_of,
        reduction_error,
    )
    from ibscope.capture.probe import ModelInput
    from ibscope.capture.selectors import resolve_layers, trace_modules

    inp = ModelInput.of(x)
    traces = trace_modules(model, inp)
    targets = resolve_layers(layers, traces)
    _check_reduce_keys(reduce, targets)
    raw = {t.name: (lambda v, mask=None, length=None: v) for t in targets}
    with CaptureEngine(model, targets, raw) as eng:
        raw_out = eng.run(inp)
    mask = inp.mask
    length = None if mask is None else int(mask.shape[1])
    reducers, meta, problems = {}, {}, []
    for t in targets:
        r = raw_out[t.name]
        shape = raw_shape_of(r, length)
        layout, why = layout_of(t, shape, traces)
        asked = _reduce_for(t.name, t.module, reduce)
        op, problem = check_reduction(asked, shape, layout)
        if problem is None and op in ("last", "first", "mean") and len(shape) == 2 and mask is not None \
                and not getattr(r, "is_nested", False) and shape[0] != length:
            problem, why = "mask-length", str(length)
        if problem:
            problems.append(Problem(problem, t, shape, layout, asked, why))
            continue
        red = Reducer(op, t.name)
        red.masked = op in ("last", "first", "mean") and len(shape) == 2 and (mask is not None or
                                                                              getattr(r, "is_nested", False))
        reducers[t.name] = red
    if problems:
        raise reduction_error(problems, targets)
    with CaptureEngine(model, targets, reducers) as eng:
        red = eng.run(inp)
    for i, t in enumerate(targets):
        r = raw_out[t.name]
        meta[t.name] = {
            "module": t.module, "type": traces[t.module].type, "call": t.call, "select": list(t.select),
            "io": t.io, "spec": t.spec, "reduction": reducers[t.name].spec,
            "raw_shape": list(raw_shape_of(r, length)), "dims": int(red[t.name].shape[1]),
            "raw_dtype": str(r.dtype).replace("torch.", ""), "order": i,
        }
        if reducers[t.name].masked:  # reduced over real tokens only (attention_mask or nested tensors)
            meta[t.name]["masked"] = True
        if getattr(r, "is_nested", False):
            meta[t.name]["nested"] = True
    return targets, reducers, meta, traces


class _Interrupts:
    """Ctrl-C during a capture stops it at the next batch boundary (a KeyboardInterrupt raised
    there, where the shard being written is discarded cleanly) rather than at an arbitrary
    bytecode, where it may land in a finalizer and be swallowed. A second Ctrl-C stops at once."""

    def __enter__(self) -> _Interrupts:
        import signal
        import threading

        self.hit = False
        self.prev = None
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.prev is not None:
            import signal

            signal.signal(signal.SIGINT, self.prev)


def _console():
    from ibscope._console import console

    return console()  # the process's one Console (the CLI's too)


def show_plan(ckpts, console=None) -> None:
    """Print the resolved checkpoint series (rich table on stderr)."""
    from ibscope.capture.series import series_table

    (console or _console()).print(series_table(ckpts))


def _check_resume_series(out: Path, ckpts) -> None:
    """``--resume`` must not mix two training runs in one store: a checkpoint file that changed
    since it was captured (same path, new sha256), or a new file whose epoch/step is already
    captured from other weights (a retrained run), is a DataError naming both."""
    from ibscope.store import open_store

    st = open_store(out, skip_bad_shards=True)  # bad shards are deleted and re-captured by resume
    by_path = {os.path.realpath(c.path): c for c in st.checkpoints}
    by_time = {(c.epoch, c.step): c for c in st.checkpoints if c.epoch is not None or c.step is not None}
    for ck in ckpts:
        old = by_path.get(os.path.realpath(ck.path))
        why = "the file changed since it was captured"
        if old is None or old.sha256 == ck.sha256:
            old = by_time.get((ck.epoch, ck.step)) if (ck.epoch is not None or ck.step is not None) else None
            why = f"{ck.label} is already captured from another file ('{old.path}')" if old is not None else ""
        if old is not None and old.sha256 != ck.sha256:
            raise DataError(
                f"Cannot resume '{out}': checkpoint '{ck.path}' ({ck.label}) has sha256 {ck.sha256[:12]}, but the store "
                f"holds {old.label} with sha256 {old.sha256[:12]}: {why}. Resuming would mix two training runs "
                f"in one store.",
                hint="Re-capture everything with --overwrite (or into a new --out) when the run was retrained.")


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
    sample_seed: int | None = None,
    allow_nonfinite: bool = False,
    compression: str = "none",
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    jacobian_chunk: int = 16,
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
    ``jacobian_chunk`` caps the samples handled in one vmap.

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
    console = _console() if progress else None

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
    if int(jacobian_chunk) < 1:
        raise UsageError(f"jacobian_chunk must be >= 1. Got {jacobian_chunk}.")
    pr = load_probe(probe, max_samples=max_samples, sample_seed=sample_seed)
    _check_jacobian_input(pr, jacobian_samples)
    ckpts = discover_checkpoints(checkpoints, trust_checkpoint=trust_checkpoint, safe_globals=allowed, order=order)
    if build is None:  # Hugging Face: the first checkpoint's model plans the layers
        net = hf_build(ckpts[0].path)
        if model == "hf":
            rebuild = _hf_rebuilder(hf, ckpts[0].path, hf_build, model_args, dev)
    else:
        net = build()
    check_forward_accepts(net, pr)
    if console is not None or dry_run:
        show_plan(ckpts, console)
    net.to(dev).eval()
    first = pr.batch(0, min(pr.n, int(batch_size), 8), dev)
    targets, reducers, meta, _ = plan_layers(net, first, layers, reduce)
    jplan = None
    if jacobian_samples:
        jplan = _plan_jacobians(net, targets, reducers, meta, pr, int(jacobian_samples), dev, jacobian_method,
                                jac_budget, int(jacobian_chunk))
        if console is not None or dry_run:  # shown once; plain text ('[fc1 10, act 10]' is no rich markup)
            (console or _console()).print(jplan.summary(), markup=False, highlight=False)
        else:
            log.info("%s", jplan.summary())
    if dry_run:
        _show_layers(meta, console or _console())
        return None

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
    config.update(_probe_and_jacobian_config(pr, jplan))
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
            return _write_store_remote(engine, worker_device, out, config, pr, meta, inputs, ckpts, task, console,
                                       resume=resume, overwrite=overwrite, compression=compression)
        return _write_store(out, config, pr, meta, inputs, ckpts, targets, reducers, net, dev, console, resume=resume,
                     overwrite=overwrite, compression=compression, batch_size=int(batch_size), dtype=dtype,
                     jplan=jplan, trust_checkpoint=trust_checkpoint, safe_globals=allowed,
                     allow_nonfinite=allow_nonfinite, rebuild=rebuild)


def _check_jacobian_input(pr, jacobian_samples: int) -> None:
    if jacobian_samples and not pr.x.is_floating_point():
        raise UsageError(f"--jacobian-samples needs a floating-point probe input; '{pr.primary}' is "
                         f"{str(pr.x.dtype).replace('torch.', '')}.",
                         hint="Jacobians with respect to integer inputs (e.g. token ids) are not defined; capture "
                              "without --jacobian-samples.")


def _plan_jacobians(net, targets, reducers, meta, pr, m, dev, method, budget, chunk):
    """Size the Jacobian computation to the budget before any work (UsageError if it cannot fit)."""
    from ibscope.capture.hooks import CaptureEngine

    with frozen_parameters(net), CaptureEngine(net, targets, reducers, grad=True) as eng:
        return plan_jacobians(eng.run, pr.batch(0, 1, dev), {t.name: meta[t.name]["dims"] for t in targets},
                              min(int(m), pr.n), method=method, budget=budget, device=dev,
                              max_samples_per_pass=int(chunk))


def _probe_and_jacobian_config(pr, jplan) -> dict:
    """Store config entries for keyword probe inputs and a non-exact Jacobian method (absent
    otherwise, so that stores of plain captures keep their identity)."""
    extra: dict = {}
    if pr.keyword:  # keyword inputs: their names, shapes and content take part in the store's identity
        from ibscope.store import sha256_bytes

        extra["input_key"] = pr.primary
        extra["probe_inputs"] = [dict(e, sha256=sha256_bytes(np.ascontiguousarray(pr.inputs[e["name"]].numpy()).tobytes()))
                                 for e in pr.describe_inputs()]
    if jplan is not None and jplan.method != "exact":
        extra["jacobian_method"] = f"{jplan.method}:{jplan.sketch_k}"
    return extra


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


def _show_layers(meta: dict, console) -> None:
    from rich.table import Table

    sel = Table(title="Layers to capture (dry run: nothing written)", title_justify="left")
    for col in ("layer", "module", "reduction", "raw shape", "stored dims"):
        sel.add_column(col)
    for name, m in meta.items():
        how = m["reduction"] + (" (real tokens)" if m.get("masked") else "")
        sel.add_row(name, m["module"] or "(model)", how, "x".join(map(str, m["raw_shape"])), str(m["dims"]))
    console.print(sel)


def _write_store(out, config, pr, meta, inputs, ckpts, targets, reducers, net, dev, console, *, resume, overwrite,
                 compression, batch_size, dtype, jplan, trust_checkpoint, safe_globals, allow_nonfinite,
                 rebuild=None) -> Path:
    """The writing part of :func:`capture` (run under the store's writer lock)."""
    from ibscope.capture.checkpoints import describe_alignment, load_checkpoint_into
    from ibscope.store import StoreWriter

    writer = StoreWriter(out, config=config, sample_ids=pr.ids, labels=pr.y, layers=meta, inputs=inputs,
                         input_shape=tuple(pr.x.shape[1:]), resume=resume, overwrite=overwrite, compression=compression,
                         replace_empty=True)
    if resume:
        _check_resume_series(out, ckpts)
    todo = [c for c in ckpts if not (resume and writer.has_checkpoint(c.sha256))]
    if resume and len(todo) < len(ckpts):
        log.info("Resuming: %d of %d checkpoints already captured.", len(ckpts) - len(todo), len(ckpts))

    prog = None
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    n_batches = (pr.n + int(batch_size) - 1) // int(batch_size)
    stop = _Interrupts()
    noted: set[str] = set()
    t_b = None
    try:
        stop.__enter__()
        if prog is not None:
            prog.start()
            t_ck = prog.add_task("checkpoints", total=len(todo))
            t_b = prog.add_task("batches", total=n_batches)
            t_j = prog.add_task("jacobian passes", total=jplan.total_passes, visible=False) if jplan else None
        for ck in todo:
            stop.check()
            if rebuild is not None:
                net = rebuild(ck) or net
            info = load_checkpoint_into(net, ck, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals)
            note = describe_alignment(info)
            if note and note not in noted:  # one line per kind of fix, not one per checkpoint
                noted.add(note)
                log.info("Note: checkpoint keys: %s ('%s'%s).", note, ck.path, "" if len(todo) == 1 else " and others alike")
            net.eval()
            with writer.checkpoint(epoch=ck.epoch, step=ck.step, path=str(ck.path), sha256=ck.sha256,
                                   metrics=ck.metrics) as shard:
                _shard_attrs(shard, ck, info, dev, batch_size)
                if prog is not None:
                    prog.reset(t_b, total=n_batches, description=f"batches ({ck.label})")
                _capture_into(shard, net, pr, targets, reducers, meta, dev=dev, batch_size=int(batch_size), dtype=dtype,
                              allow_nonfinite=allow_nonfinite, where=f"'{ck.path}' ({ck.label})", stop=stop,
                              advance=(lambda: prog.advance(t_b)) if prog is not None else None)
                if jplan is not None:
                    tick = None
                    if prog is not None:
                        prog.reset(t_j, total=jplan.total_passes, description=f"jacobian passes ({ck.label})",
                                   visible=True)
                        tick = (lambda n: prog.advance(t_j, n))  # noqa: E731
                    _store_jacobians(net, targets, reducers, pr, jplan, dev, shard, tick, stop)
            if prog is not None:
                prog.advance(t_ck)
            log.debug("Captured %s (%s).", ck.label, ck.path)
    except BaseException:
        if writer.created and not writer.written:  # nothing captured: leave no store that blocks the retry
            writer.remove_new_store()
        raise
    finally:
        stop.__exit__()
        if prog is not None:
            prog.stop()
    return writer.dir


def _shard_attrs(shard, ck, info: dict, dev, batch_size: int) -> None:
    """The attributes a shard records about its checkpoint and how it was captured."""
    shard.attrs.update(epoch_source=ck.epoch_source, step_source=ck.step_source, state_key=info["state_key"],
                       prefixes_stripped=",".join(info["stripped"] + ([info["prefix"]] if info["prefix"] else [])),
                       device=str(dev), batch_size=int(batch_size), torch_version=_torch_version())
    if info.get("added"):
        shard.attrs["prefix_added"] = info["added"]
    if ck.epoch_exact is not None:
        shard.attrs["epoch_exact"] = float(ck.epoch_exact)


def _write_store_remote(engine, device, out, config, pr, meta, inputs, ckpts, task, console, *, resume, overwrite,
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
            _check_resume_series(out, ckpts)
        todo = [c for c in ckpts if not (resume and writer.has_checkpoint(c.sha256))]
        if resume and len(todo) < len(ckpts):
            log.info("Resuming: %d of %d checkpoints already captured.", len(ckpts) - len(todo), len(ckpts))
        base = dict(task, store=os.path.abspath(writer.dir), config_hash=writer.config_hash,
                    probe_hash=writer.probe_hash)
        pieces = [Piece(_capture_task, dict(base, ck=ck), gpu=True, label=f"capture {ck.label}") for ck in todo]
        prog = None
        noted: set[str] = set()
        with make_executor(engine, device) as ex:
            if console is not None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console, transient=False)
                prog.start()
                t_ck = prog.add_task(f"checkpoints (Dask, {len(ex.workers())} worker(s))", total=len(todo))
            try:
                for o in ex.run(pieces):
                    writer.written += 1
                    note = o.value.get("note")
                    if note and note not in noted:
                        noted.add(note)
                        log.info("Note: checkpoint keys: %s ('%s' and maybe others).", note, o.value["path"])
                    if prog is not None:
                        prog.advance(t_ck)
            finally:
                if prog is not None:
                    prog.stop()
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


def _worker_probe(spec, max_samples, sample_seed):
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


def _capture_task(p: dict, device: str) -> dict:
    """One checkpoint of a capture on a cluster worker: build the model, read the probe and the
    checkpoint from their paths, write the checkpoint's shard (complete or absent)."""
    import torch

    from ibscope.capture.checkpoints import describe_alignment, load_checkpoint_into, resolve_safe_globals
    from ibscope.capture.factory import resolve_factory
    from ibscope.capture.hf import is_hf_spec
    from ibscope.errors import ClusterError
    from ibscope.executor import _this_worker
    from ibscope.store import MANIFEST, StoreWriter, probe_hash

    who = _this_worker()[0]
    store, ck = Path(p["store"]), p["ck"]
    if not (store / MANIFEST).is_file():
        raise ClusterError(f"{who} cannot see the activation store '{store}' ({MANIFEST} not found there).",
                           hint="Workers write their checkpoints' shards themselves: put --out on a file system every "
                                "worker mounts at the same path.")
    if not os.path.exists(ck.path):
        raise ClusterError(f"{who} cannot see the checkpoint '{ck.path}' ({ck.label}).",
                           hint="Put the checkpoints on a file system every worker mounts at the same path.")
    dev = resolve_device(device)
    pr = _worker_probe(p["probe"], p["max_samples"], p["sample_seed"])
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
        _shard_attrs(shard, ck, info, dev, bs)
        shard.attrs["worker"] = who
        _capture_into(shard, net, pr, targets, reducers, meta, dev=dev, batch_size=bs, dtype=p["dtype"],
                      allow_nonfinite=p["allow_nonfinite"], where=f"'{ck.path}' ({ck.label})")
        if p["jplan"] is not None:
            _store_jacobians(net, targets, reducers, pr, p["jplan"], dev, shard)
    del net
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"sha256": ck.sha256, "path": str(ck.path), "shard": shard.final.name, "note": describe_alignment(info)}


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _capture_into(shard, net, pr, targets, reducers, meta, *, dev, batch_size, dtype, allow_nonfinite, where,
                  stop=None, advance=None) -> None:
    """Run the probe set through ``net`` batch by batch and write each layer's rows into ``shard``
    (the writes run off the forward path: see :mod:`ibscope.capture.writer`)."""
    from ibscope.capture.writer import run_probe

    run_probe(shard, net, pr, targets, reducers, meta, dev=dev, batch_size=batch_size, dtype=dtype,
              allow_nonfinite=allow_nonfinite, where=where, stop=stop, advance=advance)


def _store_jacobians(net, targets, reducers, pr, jplan, dev, shard, tick=None, stop=None) -> None:
    """Jacobian spectra of the first ``jplan.m`` probe rows into ``shard`` (see :mod:`ibscope.capture.jacobian`)."""
    import torch

    from ibscope.capture.hooks import CaptureEngine

    rows = np.arange(jplan.m)

    def progress(n: int) -> None:
        if stop is not None:
            stop.check()  # Ctrl-C: stop between passes, the shard is discarded
        if tick is not None:
            tick(n)

    inp = pr.batch(0, jplan.m, dev)
    with frozen_parameters(net), torch.enable_grad(), CaptureEngine(net, targets, reducers, grad=True) as eng:
        svs = jacobian_spectra(eng.run, inp, jplan, progress, sample_ids=pr.ids[: jplan.m])
    for t in targets:
        shard.set_jacobian(t.name, svs[t.name].cpu().numpy(), rows)


from ibscope.capture.live import Snapshotter, snapshot  # noqa: E402 - uses the helpers above
