"""The Dask side of :mod:`ibscope.executor`: :class:`DaskExecutor` (the client: connects, sends
each piece to a worker, GPU pieces to workers with the ``GPU`` resource) and :func:`remote_call`
(what a worker runs for a piece: its thread share, its device, errors that name it).

Imported only when a scheduler is given; dask itself only inside the functions.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from ibscope.errors import ClusterError, IbscopeError, UsageError
from ibscope.executor import (
    GPU,
    INSTALL_HINT,
    EngineSpec,
    Executor,
    Outcome,
    Piece,
    _portable,
    limit_threads,
    redact_address,
    task_device,
    threads_per_worker,
)

_worker_threads: dict = {}


def this_worker() -> tuple[str, int | None]:
    """(a name for the worker running this code, its thread count or None outside Dask)."""
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return f"local process {os.getpid()} on {socket.gethostname()}", None
    state = getattr(w, "state", None)
    nthreads = getattr(state, "nthreads", None) or getattr(w, "nthreads", None)
    name = w.name if w.name is not None and str(w.name) != w.address else ""
    return f"Dask worker {w.address}" + (f" ('{name}')" if name else "") + f" on {socket.gethostname()}", nthreads


def remote_call(fn: Callable, payload: Any, requested_device: str, gpu: bool,
                host_threads: dict | None = None) -> tuple[Any, str, str]:
    """What a Dask worker runs for one piece: limit the compute threads of this worker process
    to its share of the host's cores (cores // the task threads of all workers on this host,
    ``host_threads`` as the client saw the cluster; else cores // this worker's threads), choose
    the device, run ``fn``, and return (value, worker, device). ibscope errors come back with
    the worker's name in their message."""
    who, nthreads = this_worker()
    if nthreads:
        share = (host_threads or {}).get(_host_of_this_worker()) or nthreads
        want = threads_per_worker(share)
        if _worker_threads.get("threads") != want:
            with _lock:
                if _worker_threads.get("threads") != want:
                    _worker_threads["threads"] = limit_threads(want)
    cuda = False
    if requested_device in (None, "", "auto") and gpu:
        import torch

        cuda = torch.cuda.is_available()
    device = task_device(requested_device, gpu, cuda_available=cuda)
    try:
        return fn(payload, device), who, device
    except IbscopeError as exc:
        if who not in exc.message:
            exc.message = f"On {who}: {exc.message}"
        raise _portable(exc) from None


_lock = threading.Lock()


def _host_of_this_worker() -> str | None:
    try:
        from distributed import get_worker

        return urlsplit(get_worker().address).hostname
    except (ImportError, ValueError):
        return None


class DaskExecutor(Executor):
    """Pieces submitted to a ``dask.distributed`` scheduler; see the module docstring."""

    name = "dask"

    def __init__(self, spec: EngineSpec, device: str = "auto", *, timeout: float | None = None) -> None:
        super().__init__()
        from ibscope import executor  # read when called: settings and tests change it there

        timeout = executor.CONNECT_TIMEOUT if timeout is None else timeout
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise UsageError(f"A Dask scheduler was given ({spec.source}), but dask.distributed is not installed.",
                             hint=INSTALL_HINT) from None
        from distributed import Client

        self.spec = spec
        self.device = device or "auto"
        self.address = None
        _probe_tcp(spec, timeout)  # a refused connection: a clear error at once, before any Client exists
        try:
            if spec.scheduler_file:
                self.client = Client(scheduler_file=spec.scheduler_file, timeout=timeout, set_as_default=False)
            else:
                self.client = Client(spec.scheduler, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise _unreachable(spec, timeout, exc) from None
        self.address = str(getattr(self.client.scheduler, "address", "") or "")
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError):
            self.client.close()
            raise ClusterError(f"The Dask scheduler at '{redact_address(self.address)}' has no worker: none "
                               f"connected within {timeout:g} s.",
                               hint="Start workers with `dask worker ADDRESS` (--resources GPU=1 on GPU machines).") \
                from None
        self._workers_at_start = self.workers()

    def workers(self) -> dict[str, dict]:
        """{address: {"resources": {...}, "nthreads": n, "name": ...}} of the cluster now."""
        info = self.client.scheduler_info(n_workers=-1) if _accepts_n_workers(self.client) else \
            self.client.scheduler_info()
        return {a: {"resources": dict(w.get("resources") or {}), "nthreads": w.get("nthreads"), "name": w.get("name"),
                    "host": urlsplit(a).hostname}
                for a, w in (info.get("workers") or {}).items()}

    def host_threads(self) -> dict[str, int]:
        """{host: task threads of all workers on it}: each worker limits its compute threads to
        its share of the host's cores."""
        out: dict[str, int] = {}
        for w in self.workers().values():
            out[w["host"]] = out.get(w["host"], 0) + int(w["nthreads"] or 1)
        return out

    def gpu_workers(self) -> list[str]:
        return [a for a, w in self.workers().items() if float(w["resources"].get(GPU, 0) or 0) >= 1]

    def run(self, pieces: list[Piece]) -> Iterator[Outcome]:
        from distributed import as_completed

        gpus = self.gpu_workers()
        if self.device.startswith("cuda") and not gpus:
            raise UsageError(f"--device {self.device} with a Dask scheduler needs workers with a GPU, but no worker "
                             f"of '{redact_address(self.address)}' declares one.",
                             hint="Start GPU workers with `dask worker ADDRESS --resources GPU=1`, or use --device "
                                  "auto (GPU-capable work goes to GPU workers when there are any).")
        run_id = uuid.uuid4().hex[:8]
        shares = self.host_threads()
        futs = {}
        for i, p in enumerate(pieces):
            want_gpu = p.gpu and (bool(gpus) or self.device.startswith("cuda"))
            if self.device.startswith("cuda"):
                want_gpu = True  # an explicit cuda device: every piece needs a GPU worker
            key = f"ibscope-{_slug(p.label) or 'piece'}-{run_id}-{i}"
            fut = self.client.submit(remote_call, p.fn, p.payload, self.device, want_gpu, shares, key=key, pure=False,
                                     resources={GPU: 1} if want_gpu else None)
            futs[fut] = (i, want_gpu)
        try:
            for fut in as_completed(list(futs), loop=self.client.loop):
                i, g = futs[fut]
                value, who, dev = fut.result()
                yield self._count(Outcome(i, value, who, dev), g)
        except BaseException:
            self.client.cancel(list(futs), force=True)
            raise
        finally:
            futs.clear()

    def describe(self) -> dict:
        now = self.workers() if self.client.status == "running" else self._workers_at_start
        start = self._workers_at_start
        out = {"engine": self.name, "scheduler": redact_address(self.address), "source": self.spec.source,
               "workers": len(start), "workers_at_end": len(now),
               "gpu_workers": sum(float(w["resources"].get(GPU, 0) or 0) >= 1 for w in start.values()),
               "threads": sum(int(w["nthreads"] or 0) for w in start.values()), "tasks": self.tasks,
               "tasks_by_worker": dict(sorted(self.by_worker.items()))}
        if self.gpu_by_worker:
            out["gpu_tasks_by_worker"] = dict(sorted(self.gpu_by_worker.items()))
        if self.spec.scheduler_file:
            out["scheduler_file"] = self.spec.scheduler_file
        return out

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client whose scheduler is gone: nothing left to do
            pass


def _scrub(text: str) -> str:
    """``text`` without credentials of the form user:password@ (in addresses quoted by errors)."""
    import re

    return re.sub(r"[^\s/'\"@]+@", "", str(text))


def _unreachable(spec: EngineSpec, timeout: float, exc: BaseException) -> ClusterError:
    where = spec.scheduler_file or spec.scheduler
    return ClusterError(
        f"Could not reach the Dask scheduler {'named in ' if spec.scheduler_file else 'at '}"
        f"'{redact_address(where)}' ({spec.source}) (waiting up to {timeout:g} s): {type(exc).__name__}: "
        f"{_scrub(str(exc))}",
        hint="Start it with `dask scheduler` (and workers with `dask worker ADDRESS`), check the address, "
             "or run locally without --scheduler.")


def _probe_tcp(spec: EngineSpec, timeout: float) -> None:
    """Open and close a TCP connection to a tcp:// scheduler (from the address or the scheduler
    file): a scheduler that is not there is a :class:`ClusterError` at once."""
    import json

    addr = spec.scheduler
    if spec.scheduler_file:
        try:
            with open(spec.scheduler_file) as f:
                addr = json.load(f).get("address")
        except (OSError, ValueError, AttributeError) as exc:
            raise ClusterError(f"Could not read the Dask scheduler file '{spec.scheduler_file}': {exc}",
                               hint="Pass the JSON file written by `dask scheduler --scheduler-file FILE`.") from None
    addr = redact_address(str(addr or "")) or ""
    if addr.startswith("tcp://"):
        addr = addr[len("tcp://"):]
    elif "://" in addr:
        return  # tls://, ucx://, inproc://: left to Dask
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10.0)).close()
    except OSError as exc:
        raise _unreachable(spec, timeout, exc) from None


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in str(text))[:60].strip("-")
