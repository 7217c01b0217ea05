"""Where the pieces of work run: in this process, a local process pool, or a Dask cluster.

``ibscope estimate`` cuts its work into cells (store x checkpoint x layer) and ``ibscope
capture`` into checkpoints. Both hand their pieces to an :class:`Executor`, chosen by
:func:`resolve_engine`:

* ``jobs == 1``: :class:`InProcess`, the pieces run one after another in this process;
* ``jobs > 1``: :class:`LocalPool`, a ``spawn`` process pool of ``jobs`` workers, each limited
  to ``cores // jobs`` torch / BLAS / OpenMP / numba threads, so that the workers do not fight
  over the cores (N x threads <= cores);
* a scheduler (``--scheduler tcp://HOST:PORT``, ``--scheduler-file FILE``, the ``scheduler``
  key of a config, or the ``DASK_SCHEDULER_ADDRESS`` environment variable that Dask itself
  reads): :class:`DaskExecutor`, the pieces are submitted to a ``dask.distributed`` cluster
  (``pip install "ibscope[dask]"``).

A piece is a plain function (importable by module and name, so that any worker can run it)
and a payload of paths, keys and parameters; workers read the data themselves (stores live on
a file system every worker sees). Results come back as values (rows, shard summaries); the
client writes the output files once.

**GPUs as resources.** A piece marked GPU-capable (the cells of the estimators in
:func:`gpu_capable`, every checkpoint of a capture) is submitted with the Dask resource
``{"GPU": 1}`` when the cluster has workers started with ``--resources GPU=1``; such a worker
runs it on ``cuda`` (when the requested device is ``auto``). The other pieces go to any worker
and run on the CPU. Without GPU workers nothing is annotated and ``auto`` means the CPU.

**Resilience.** A worker that dies costs only the pieces it held: the scheduler gives them to
another worker (Dask's ``allowed-failures``, 3 by default), so the results are complete and the
same as from a local run. An error raised by a piece (bad data, a worker that cannot see the
store) stops the run: the remaining pieces are cancelled and the error is raised here, naming
the worker.

The Dask side (:class:`DaskExecutor`, :func:`remote_call`, what runs on a worker) is in
:mod:`ibscope._dask`, imported only when a scheduler is given. Nothing here imports torch,
numpy or dask at module level.
"""

from __future__ import annotations

import abc
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from ibscope.errors import IbscopeError, UsageError

#: the environment variable Dask reads for the scheduler address (``distributed.scheduler-address``)
ENV_SCHEDULER = "DASK_SCHEDULER_ADDRESS"
#: what to install for ``--scheduler``
INSTALL_HINT = 'Install the optional extra: pip install "ibscope[dask]" (dask[distributed]).'
#: seconds to wait for the scheduler to answer, and for it to have a worker
CONNECT_TIMEOUT = 30.0
#: the Dask resource name of a GPU (``dask worker --resources GPU=1``)
GPU = "GPU"
#: built-in estimators whose work is worth a GPU (dense pairwise kernels, neural critics);
#: a plug-in says so with a class attribute ``gpu = True``
GPU_ESTIMATORS = frozenset({
    "kde", "kde-lower", "kde-upper", "adaptive-kde", "adaptive-kde-lower", "adaptive-kde-upper",
    "chelombiev-kde", "chelombiev-kde-lower", "chelombiev-kde-upper", "ksg", "compressed", "infonce", "mine",
    "smile", "renyi", "matrix-entropy",
})


# ----------------------------------------------------------------------------- threads
def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: environment variable that sets the compute threads of every worker (local pool or Dask worker)
ENV_THREADS = "IBSCOPE_WORKER_THREADS"


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Threads each of ``workers`` processes may use so that workers x threads <= cores (>= 1);
    ``IBSCOPE_WORKER_THREADS`` (a positive integer) overrides it, e.g. 1 for many tiny cells,
    where thread start-up costs more than it saves."""
    forced = os.environ.get(ENV_THREADS, "").strip()
    if forced:
        try:
            n = int(forced)
        except ValueError:
            raise UsageError(f"{ENV_THREADS} must be a positive integer. Got {forced!r}.") from None
        if n < 1:
            raise UsageError(f"{ENV_THREADS} must be a positive integer. Got {forced!r}.")
        return n
    return max(1, (cores or available_cores()) // max(1, int(workers)))


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
_limits: list = []  # threadpoolctl limiters kept alive for the life of the worker


def limit_threads(n: int) -> int:
    """Limit this process to ``n`` compute threads: torch (intra-op), the BLAS and OpenMP pools
    already loaded (threadpoolctl) and numba's pool; the environment variables are set too, for
    libraries loaded later. Returns ``n``."""
    n = max(1, int(n))
    for k in _THREAD_ENV:
        os.environ[k] = str(n)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        _limits[:] = [threadpool_limits(limits=n)]
    except ImportError:  # threadpoolctl comes with scikit-learn; without it the env vars must do
        pass
    try:
        import numba

        numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))
    except (ImportError, ValueError, AttributeError):
        pass
    return n


def _pool_init(threads: int) -> None:
    for k in _THREAD_ENV:  # before numpy / torch are imported in this fresh process
        os.environ[k] = str(threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    limit_threads(threads)


# ----------------------------------------------------------------------------- choosing the engine
def redact_address(address: str | None) -> str | None:
    """A scheduler address without credentials: user:password@, query and fragment removed."""
    if not address:
        return address
    if "://" not in str(address):
        return str(address).rsplit("@", 1)[-1].split("?", 1)[0]
    try:
        parts = urlsplit(str(address))
    except ValueError:
        return "<unparseable address>"
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass
class EngineSpec:
    """Which executor to use: ``kind`` "local" (``jobs`` processes; 1 = in this process) or
    "dask" (``scheduler`` address or ``scheduler_file``); ``source`` says where the choice came
    from (for messages and the provenance)."""

    kind: str = "local"
    jobs: int = 1
    scheduler: str | None = None
    scheduler_file: str | None = None
    source: str = "default"

    @property
    def remote(self) -> bool:
        return self.kind == "dask"


def resolve_engine(jobs: int | None = 1, scheduler: str | None = None, scheduler_file: str | os.PathLike | None = None,
                   *, env: dict | None = None, what: str = "--jobs") -> EngineSpec:
    """The executor asked for. ``scheduler``: a Dask address (``tcp://HOST:PORT``), or "local"
    to ignore ``DASK_SCHEDULER_ADDRESS``; ``scheduler_file``: a Dask scheduler file. Without
    either, ``DASK_SCHEDULER_ADDRESS`` chooses the cluster unless ``jobs`` > 1 was asked for.
    Usage errors for bad combinations; the connection itself is made by :func:`make_executor`."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if jobs is None:
        jobs = 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"{what} must be an integer >= 1. Got {jobs!r}.")
    if scheduler is not None and not isinstance(scheduler, str):
        raise UsageError(f"--scheduler must be an address such as tcp://HOST:PORT. Got {scheduler!r}.")
    sched = (scheduler or "").strip() or None
    if sched is not None and scheduler_file is not None:
        raise UsageError("--scheduler and --scheduler-file exclude each other.",
                         hint="Pass the scheduler's address or the file it wrote, not both.")
    if sched == "local":
        if scheduler_file is not None:
            raise UsageError("--scheduler local and --scheduler-file exclude each other.")
        return EngineSpec("local", jobs, source="--scheduler local")
    if (sched is not None or scheduler_file is not None) and jobs > 1:
        raise UsageError(f"{what} {jobs} and a Dask scheduler exclude each other: the cluster's workers do the work.",
                         hint="Drop --jobs (start more `dask worker`s instead), or drop --scheduler to run locally.")
    if scheduler_file is not None:
        path = os.fspath(scheduler_file)
        if not os.path.isfile(path):
            raise UsageError(f"--scheduler-file '{path}' does not exist; expected the JSON file written by "
                             f"`dask scheduler --scheduler-file {path}`.")
        return EngineSpec("dask", 1, scheduler_file=os.path.abspath(path), source="--scheduler-file")
    if sched is not None:
        if "://" not in sched and ":" not in sched:
            raise UsageError(f"--scheduler expects an address such as tcp://HOST:PORT (or 'local'). Got {sched!r}.")
        return EngineSpec("dask", 1, scheduler=sched, source="--scheduler")
    if jobs == 1 and (environ.get(ENV_SCHEDULER) or "").strip():
        return EngineSpec("dask", 1, scheduler=environ[ENV_SCHEDULER].strip(), source=ENV_SCHEDULER)
    return EngineSpec("local", jobs, source="--jobs" if jobs > 1 else "default")


def gpu_capable(estimator: str) -> bool:
    """True when the work of ``estimator`` is worth a GPU: the class attribute ``gpu`` where the
    estimator class sets one, else membership of :data:`GPU_ESTIMATORS`."""
    from ibscope.estimators import registry

    try:
        cls = registry.get(estimator)
    except IbscopeError:
        return False
    flag = getattr(cls, "gpu", None)
    return bool(flag) if flag is not None else estimator in GPU_ESTIMATORS


def task_device(requested: str, gpu_task: bool, *, cuda_available: bool) -> str:
    """The device a piece runs on at a worker. ``requested`` is what the user asked for: "auto"
    runs GPU-capable pieces on ``cuda`` where the worker has it and everything else on the CPU;
    an explicit device is used as given."""
    if requested in (None, "", "auto"):
        return "cuda" if gpu_task and cuda_available else "cpu"
    return requested


def remote_device(device: str | None) -> str:
    """A device for work that runs on cluster workers, checked for form only (the client may have
    no GPU while the workers do): "auto", "cpu", "cuda" or "cuda:N"."""
    d = str(device or "auto").strip().lower()
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise UsageError(f"--device expects auto, cpu or cuda:N. Got {device!r}.")


# ----------------------------------------------------------------------------- pieces of work
@dataclass
class Piece:
    """One piece of work: ``fn(payload, device)`` run somewhere; ``gpu``: worth a GPU;
    ``label``: how messages name it."""

    fn: Callable[[Any, str], Any]
    payload: Any
    gpu: bool = False
    label: str = ""


@dataclass
class Outcome:
    """What came back for piece ``index``: its ``value``, the ``worker`` that ran it, the
    ``device`` it ran on."""

    index: int
    value: Any
    worker: str = ""
    device: str = ""


def _portable(exc: BaseException) -> BaseException:
    """An ibscope error that survives pickling (a subclass with its own constructor becomes its
    nearest class in :mod:`ibscope.errors`, with the same message and hint)."""
    if not isinstance(exc, IbscopeError):
        return exc
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        import ibscope.errors as errors

        base = next(c for c in type(exc).__mro__ if getattr(errors, c.__name__, None) is c)
        return base(exc.message, exc.hint)


# ----------------------------------------------------------------------------- executors
class Executor(abc.ABC):
    """Runs pieces; :meth:`run` yields an :class:`Outcome` per piece as each finishes."""

    name = "executor"
    #: True when the pieces run in this process (payloads may carry open objects)
    in_process = False

    def __init__(self) -> None:
        self.tasks = 0
        self.by_worker: dict[str, int] = {}
        self.gpu_by_worker: dict[str, int] = {}

    @abc.abstractmethod
    def run(self, pieces: list[Piece]) -> Iterator[Outcome]:
        """Run ``pieces``, yielding one outcome per piece as it completes."""

    def _count(self, out: Outcome, gpu: bool) -> Outcome:
        self.tasks += 1
        if out.worker:
            self.by_worker[out.worker] = self.by_worker.get(out.worker, 0) + 1
            if gpu:
                self.gpu_by_worker[out.worker] = self.gpu_by_worker.get(out.worker, 0) + 1
        return out

    def describe(self) -> dict:
        """The provenance entry of this engine (no credentials)."""
        return {"engine": self.name, "tasks": self.tasks}

    def close(self) -> None:  # noqa: B027 - optional hook: engines without resources keep this no-op
        """Release the engine's resources (a pool, a Dask client); nothing for the in-process one."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcess(Executor):
    """Every piece in this process, one after another (``--jobs 1``)."""

    name = "in-process"
    in_process = True

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device

    def run(self, pieces: list[Piece]) -> Iterator[Outcome]:
        for i, p in enumerate(pieces):
            yield self._count(Outcome(i, p.fn(p.payload, self.device), "", self.device), p.gpu)

    def describe(self) -> dict:
        import torch

        return {"engine": self.name, "workers": 1, "threads_per_worker": torch.get_num_threads(), "tasks": self.tasks}


def _local_call(fn: Callable, payload: Any, device: str) -> Any:
    try:
        return fn(payload, device)
    except IbscopeError as exc:
        raise _portable(exc) from None


class LocalPool(Executor):
    """``jobs`` spawned worker processes on this machine, each limited to ``cores // jobs``
    compute threads (``--jobs N``)."""

    name = "process-pool"

    def __init__(self, jobs: int, device: str = "cpu", threads: int | None = None) -> None:
        super().__init__()
        self.jobs = int(jobs)
        self.device = device
        self.threads = threads or threads_per_worker(self.jobs)

    def run(self, pieces: list[Piece]) -> Iterator[Outcome]:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.jobs, max(1, len(pieces))), mp_context=ctx,
                                 initializer=_pool_init, initargs=(self.threads,)) as pool:
            futs = {pool.submit(_local_call, p.fn, p.payload, self.device): i for i, p in enumerate(pieces)}
            try:
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in sorted(done, key=lambda f: futs[f]):
                        i = futs[f]
                        yield self._count(Outcome(i, f.result(), "", self.device), pieces[i].gpu)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise

    def describe(self) -> dict:
        return {"engine": self.name, "workers": self.jobs, "threads_per_worker": self.threads,
                "cores": available_cores(), "tasks": self.tasks}


def make_executor(spec: EngineSpec, device: str = "cpu") -> Executor:
    """The executor of ``spec``: in-process, a local pool, or a connected Dask client."""
    if spec.remote:
        from ibscope._dask import DaskExecutor

        return DaskExecutor(spec, device)
    if spec.jobs > 1:
        return LocalPool(spec.jobs, device)
    return InProcess(device)


def run_pieces(executor: Executor, pieces: list[Piece], on_outcome: Callable[[Outcome], None] | None = None,
               progress=None) -> list[Outcome]:
    """Run ``pieces`` on ``executor``; call ``on_outcome`` for each as it finishes (in finishing
    order) and return all outcomes in piece order. ``progress``: a callable(label) per finished piece."""
    out: list[Outcome | None] = [None] * len(pieces)
    for o in executor.run(pieces):
        out[o.index] = o
        if on_outcome is not None:
            on_outcome(o)
        if progress is not None:
            progress(pieces[o.index].label)
    return [o for o in out if o is not None]


def __getattr__(name: str) -> Any:
    # the Dask side lives in ibscope._dask (imported only when a cluster is used)
    if name in ("DaskExecutor", "remote_call"):
        from ibscope import _dask

        return getattr(_dask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EngineSpec", "Executor", "InProcess", "LocalPool", "Piece", "Outcome", "resolve_engine",
           "make_executor", "run_pieces", "gpu_capable", "task_device", "threads_per_worker", "available_cores",
           "limit_threads", "redact_address", "ENV_SCHEDULER", "GPU", "GPU_ESTIMATORS"]
