"""Run a job's tasks on local worker processes or as Ray tasks, and hand the results back in order.

A ``Job`` is a context, a ``setup`` and a ``work`` function (module-level, so they travel by name).
The context goes to each worker once (process initializer arguments; one Ray object), ``setup``
turns it into the worker's state once per worker process (sessions are built there, not per
task), and ``work(state, task)`` runs per task. ``ordered`` keeps a bounded window of tasks in
flight and yields their results in task order, so a caller may stop early (``--tol``): leaving
the ``Pool``'s ``with`` block cancels the rest.

A worker that dies is retried: Ray retries the task on another worker (``RAY_RETRIES``); a broken
process pool is started again once and its unfinished tasks resubmitted. When that is not enough
the run fails with ``WorkerError``: a partial result is never handed back as a whole one.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import signal
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from fitonnx.errors import FitonnxError, WorkerError
from fitonnx.model.runtime import quiet_stderr
from fitonnx.scale.workers import Workers

RAY_RETRIES = 3  # Ray task retries after a worker or node dies
PROCESS_RESTARTS = 1  # a broken local pool is started again this many times
RAY_HINT = "install it with pip install 'fitonnx[ray]'"

SetupFn = Callable[[Any], Any]
WorkFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class Job:
    """What every worker runs: ``setup(context)`` once per worker process, then ``work(state, task)``."""

    context: Any
    setup: SetupFn
    work: WorkFn


_STATES: dict[str, Any] = {}  # this worker process's state, by job token (one job at a time)
_CONTEXTS: dict[str, tuple[Any, SetupFn]] = {}  # a local worker's context, from its initializer


def _state(token: str, load: Callable[[], tuple[Any, SetupFn]]) -> Any:
    """The worker state of job ``token``, set up on first use (an older job's state is dropped)."""
    if token not in _STATES:
        _STATES.clear()
        context, setup = load()
        _STATES[token] = setup(context)
    return _STATES[token]


def _process_init(token: str, context: Any, setup: SetupFn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the pool
    _CONTEXTS.clear()
    _CONTEXTS[token] = (context, setup)


def _process_call(token: str, work: WorkFn, task: Any) -> Any:
    return work(_state(token, lambda: _CONTEXTS[token]), task)


def _ray_call(token: str, boxed: list[Any], setup: SetupFn, work: WorkFn, task: Any) -> Any:
    """A Ray task: ``boxed`` holds the context's object reference, fetched only on a worker's first task."""
    # Deferred: Ray is an optional dependency (fitonnx[ray]).
    import ray

    return work(_state(token, lambda: (ray.get(boxed[0]), setup)), task)


# What a local worker imports before it is forked from the fork server: the modules whose functions
# the jobs run (their imports bring numpy, onnx and onnxruntime), so a new worker starts in
# milliseconds and the imports are paid once per driver, while it is still preparing the model.
ABORT_GRACE = 30.0  # seconds a worker may take to finish its shard when a run is aborted
PRELOAD = ("fitonnx.fisher.parallel", "fitonnx.analysis.harness")


def _context() -> multiprocessing.context.BaseContext:
    """Fork-server workers where the platform has them, else spawned ones; never a plain fork of the
    driver, whose onnxruntime threads do not survive one."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def warm_up(workers: Workers) -> None:
    """Start the fork server (and its imports) now, so it is ready when the pool is: call before the
    driver's own set-up. For Ray, fail now if it is not installed (not after the model is prepared)."""
    if workers.ray:
        _import_ray()
    elif workers.parallel and "forkserver" in multiprocessing.get_all_start_methods():
        _context()
        multiprocessing.forkserver.ensure_running()


class _Processes:
    """A pool of local worker processes (see ``_context``)."""

    def __init__(self, workers: Workers, job: Job) -> None:
        self.slots, self.job = workers.processes, job
        self.token = uuid.uuid4().hex
        self.restarts = 0
        self.pool = self._start()

    def _start(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            self.slots,
            mp_context=_context(),
            initializer=_process_init,
            initargs=(self.token, self.job.context, self.job.setup),
        )

    def submit(self, task: Any) -> cf.Future:
        """The task's future; on a pool a dead worker has broken, a future holding that error, so that
        ``collect`` restarts the pool (once) as for any other task the death took."""
        try:
            return self.pool.submit(_process_call, self.token, self.job.work, task)
        except BrokenProcessPool as exc:
            failed: cf.Future = cf.Future()
            failed.set_exception(exc)
            return failed

    def collect(self, pending: dict[int, cf.Future], tasks: Sequence[Any]) -> dict[int, Any]:
        """Wait for at least one task; its result (or those of several). A dead worker breaks the
        whole pool: it is started again once and every unfinished task resubmitted."""
        finished = cf.wait(list(pending.values()), return_when=cf.FIRST_COMPLETED).done
        out: dict[int, Any] = {}
        broken = False
        for index, future in list(pending.items()):
            if future not in finished:
                continue
            try:
                out[index] = future.result()
            except BrokenProcessPool:
                broken = True
                continue
            del pending[index]
        if broken:
            self._restart(len(pending))
            for index in pending:
                pending[index] = self.submit(tasks[index])
        return out

    def _restart(self, lost: int) -> None:
        if self.restarts >= PROCESS_RESTARTS:
            raise WorkerError(
                f"expected the worker processes to finish; they died again after a restart, with {lost} "
                "task(s) unfinished (no result was written)",
                hint="a worker may run out of memory: try fewer --workers; from Python, start workers under "
                "if __name__ == '__main__': (each worker imports the main module)",
            )
        self.restarts += 1
        warnings.warn(f"a worker process died; resubmitting {lost} unfinished task(s) to new workers", stacklevel=2)
        self.close(abort=True)
        self.pool = self._start()

    def close(self, abort: bool = False) -> None:
        """Stop the pool; ``abort``: drop the tasks not yet started and stop the workers. A worker is
        given ``ABORT_GRACE`` seconds to finish its shard before it is terminated: one killed while it
        writes its result leaves a partial message that the pool's manager thread then waits on for
        ever (the interpreter hangs at exit)."""
        if not abort:
            self.pool.shutdown(wait=True)
            return
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + ABORT_GRACE
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.0))
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)


class _Ray:
    """Ray tasks on the cluster ``ray.init`` connects to (started here, and stopped, without one)."""

    def __init__(self, workers: Workers, job: Job) -> None:
        self.ray = _import_ray()
        self.started = not self.ray.is_initialized()
        if self.started:
            _init_ray(self.ray, workers.address)
        self.job = job
        self.token = uuid.uuid4().hex
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        self.slots = workers.processes if workers.processes > 1 else max(cpus, 1)
        self.remote = self.ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(_ray_call)
        self.context = self.ray.put(job.context)
        self.outstanding: set[Any] = set()

    def submit(self, task: Any) -> Any:
        ref = self.remote.remote(self.token, [self.context], self.job.setup, self.job.work, task)
        self.outstanding.add(ref)
        return ref

    def collect(self, pending: dict[int, Any], tasks: Sequence[Any]) -> dict[int, Any]:
        del tasks  # Ray resubmits a lost task itself
        ready, _ = self.ray.wait(list(pending.values()), num_returns=1)
        out: dict[int, Any] = {}
        for index, ref in list(pending.items()):
            if ref in ready:
                self.outstanding.discard(ref)
                out[index] = self._get(ref)
                del pending[index]
        return out

    def _get(self, ref: Any) -> Any:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:  # the task itself raised: the cause is fitonnx's error
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None
        except exceptions.RayError as exc:
            raise WorkerError(
                f"expected the Ray tasks to finish; one failed after {RAY_RETRIES} retries: "
                f"{str(exc).strip().splitlines()[0][:200]} (no result was written)",
                hint="check the cluster's workers (ray status) or run without --ray",
            ) from None

    def close(self, abort: bool = False) -> None:
        if abort:  # tasks nobody will read (a --tol stop, an error): cancelled on the cluster
            for ref in self.outstanding:
                self.ray.cancel(ref)
        if self.started:
            self.ray.shutdown()


def _import_ray() -> Any:
    try:
        # Deferred: Ray is an optional dependency (fitonnx[ray]) and slow to import.
        import ray
    except ImportError:
        raise FitonnxError("expected Ray to be installed for --ray; it is not", hint=RAY_HINT) from None
    return ray


def _init_ray(ray: Any, address: str | None) -> None:
    """Connect to the cluster at ``address``, or start a local one (without its dashboard)."""
    local = {"include_dashboard": False} if address is None else {}
    try:
        with quiet_stderr():  # Ray's C++ client logs every failed connection attempt there
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **local)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"at {address!r}" if address else "started on this machine"
        raise FitonnxError(
            f"expected a Ray cluster {where}; ray.init failed: {str(exc).strip().splitlines()[0][:200]}",
            hint="give --ray HOST:PORT of a running cluster (ray start --head), or --ray alone for a local one",
        ) from None


class Pool:
    """Workers that run one ``Job``: started on entering the ``with`` block, stopped on leaving it
    (unfinished tasks cancelled, a Ray started here shut down)."""

    def __init__(self, workers: Workers, job: Job) -> None:
        self.workers, self.job = workers, job
        self._backend: _Processes | _Ray | None = None
        self._abandoned = False

    def __enter__(self) -> Pool:
        self._backend = _Ray(self.workers, self.job) if self.workers.ray else _Processes(self.workers, self.job)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._backend is not None:
            self._backend.close(abort=exc[0] is not None or self._abandoned)
            self._backend = None

    @property
    def slots(self) -> int:
        """How many tasks run at once: the local processes, or (Ray) the cap given or the cluster's CPUs."""
        return self._running().slots

    def _running(self) -> _Processes | _Ray:
        if self._backend is None:
            raise RuntimeError("a Pool runs tasks only inside its with block")
        return self._backend

    def ordered(
        self, tasks: Sequence[Any], *, window: int | None = None, on_done: Callable[[int], None] | None = None
    ) -> Iterator[Any]:
        """``job.work(state, task)`` of every task, yielded in task order. At most ``window`` tasks
        (default: twice the slots) are in flight or waiting to be yielded; ``on_done(index)`` is told
        as each one finishes, in whatever order (progress). Stopping early cancels the rest on exit."""
        backend = self._running()
        limit = window or 2 * backend.slots
        pending: dict[int, Any] = {}
        finished: dict[int, Any] = {}
        submitted = yielded = 0
        try:
            while yielded < len(tasks):
                while submitted < len(tasks) and len(pending) + len(finished) < limit:
                    pending[submitted] = backend.submit(tasks[submitted])
                    submitted += 1
                if yielded in finished:
                    yield finished.pop(yielded)
                    yielded += 1
                    continue
                for index, result in backend.collect(pending, tasks).items():
                    finished[index] = result
                    if on_done is not None:
                        on_done(index)
        finally:
            self._abandoned = self._abandoned or bool(pending)  # left running: stopped on exit
