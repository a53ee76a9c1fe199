"""Run a job's tasks on local worker processes or as Ray tasks, and hand the results back in order.

A ``Job`` is a context, a ``setup`` and a ``work`` function (module-level, so they travel by name).
The context goes to each worker once (the worker process's arguments; one Ray object), ``setup``
turns it into the worker's state once per worker process (sessions are built there, not per
task), and ``work(state, task)`` runs per task. ``ordered`` keeps a bounded window of tasks in
flight and yields their results in task order, so a caller may stop early (``--tol``): leaving
the ``Pool``'s ``with`` block cancels the rest.

A worker that dies is retried: Ray retries the task on another worker (``RAY_RETRIES``); a dead
local worker is replaced once and its unfinished task resubmitted. When that is not enough the run
fails with ``WorkerError``: a partial result is never handed back as a whole one. No wait on a local
worker outlives it: each has a pipe of its own (no shared queue or lock a killed worker can leave
taken or half-written), the driver waits on those and on the processes' sentinels, and stopping a
worker ends in SIGKILL after bounded grace periods (no thread of the driver is left to join at exit).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import signal
import time
import traceback
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Any

from fitonnx.errors import FitonnxError, InternalError, WorkerError
from fitonnx.model.runtime import quiet_stderr
from fitonnx.scale.workers import Workers

RAY_RETRIES = 3  # Ray task retries after a worker or node dies
PROCESS_RESTARTS = 1  # local workers dying are replaced this many times (deaths seen together: once)
STOP_GRACE = 10.0  # seconds a local worker gets to exit after it is asked to, then after SIGTERM
TICK = 1.0  # the longest single wait for a local worker (Ctrl-C is seen between waits on Windows too)
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


def _state(token: str, load: Callable[[], tuple[Any, SetupFn]]) -> Any:
    """The worker state of job ``token``, set up on first use (an older job's state is dropped)."""
    if token not in _STATES:
        _STATES.clear()
        context, setup = load()
        _STATES[token] = setup(context)
    return _STATES[token]


def _ray_call(token: str, boxed: list[Any], setup: SetupFn, work: WorkFn, task: Any) -> Any:
    """A Ray task: ``boxed`` holds the context's object reference, fetched only on a worker's first task."""
    # Deferred: Ray is an optional dependency (fitonnx[ray]).
    import ray

    return work(_state(token, lambda: (ray.get(boxed[0]), setup)), task)


# What a local worker imports before it is forked from the fork server: the modules whose functions
# the jobs run (their imports bring numpy, onnx and onnxruntime), so a new worker starts in
# milliseconds and the imports are paid once per driver, while it is still preparing the model.
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


class _Worker:
    """One local worker process and the pipe its tasks go out and its results come back on. Only the
    worker holds the pipe's other end, so its death reads as an end of file here (no shared queue a
    death could leave locked or holding half a message)."""

    def __init__(self, context: multiprocessing.context.BaseContext, token: str, job: Job) -> None:
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, token, job), daemon=True)
        self.process.start()
        theirs.close()
        self.task: tuple[int, Any] | None = None  # the (handle, task) it runs

    def send(self, handle: int, task: Any) -> None:
        """Give it a task; a dead worker is found by ``_Processes.collect``, which resubmits the task."""
        self.task = (handle, task)
        with contextlib.suppress(OSError):
            self.conn.send((task,))


def _serve(conn: Connection, token: str, job: Job) -> None:
    """A worker's loop: run each task received and send back (True, result) or (False, error, traceback),
    until the driver sends None or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the pool
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            reply = (True, job.work(_state(token, lambda: (job.context, job.setup)), message[0]))
        except Exception as exc:
            reply = (False, exc, traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:  # the driver is gone
            return
        except Exception as exc:  # the result or the error would not pickle: say so instead
            conn.send(
                (False, InternalError(f"a worker's reply could not be sent back: {exc!r}"), traceback.format_exc())
            )


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a worker, chained to it in the driver."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class _Processes:
    """Local worker processes (see ``_context``), each fed one task at a time over its own pipe. Every
    wait is bounded or ends when a worker dies: a dead worker (its pipe at end of file, or its process
    sentinel set) is replaced and its task resubmitted, once; a second death fails the run."""

    def __init__(self, workers: Workers, job: Job) -> None:
        self.slots, self.job = workers.processes, job
        self.token = uuid.uuid4().hex
        self.mp = _context()
        self.restarts = 0
        self.handles = itertools.count()
        self.queue: deque[tuple[int, Any]] = deque()  # tasks waiting for an idle worker
        self.workers: list[_Worker] = []
        try:
            while len(self.workers) < self.slots:
                self.workers.append(_Worker(self.mp, self.token, job))
        except BaseException:
            self.close(abort=True)
            raise

    def submit(self, task: Any) -> int:
        """Queue ``task``; its handle, under which ``collect`` returns its result."""
        handle = next(self.handles)
        self.queue.append((handle, task))
        self._dispatch()
        return handle

    def _dispatch(self) -> None:
        for worker in self.workers:
            if self.queue and worker.task is None:
                worker.send(*self.queue.popleft())

    def collect(self, pending: dict[int, int], tasks: Sequence[Any]) -> dict[int, Any]:
        """Wait for at least one task (or a death); the results received, by index (popped from
        ``pending``; a task no longer pending, left by an ``ordered`` stopped early, is dropped). A
        task's error is raised here; a dead worker's task is resubmitted."""
        del tasks  # a lost task is resent from the worker's own record
        index_of = {handle: index for index, handle in pending.items()}
        waits: dict[Any, _Worker] = {w.process.sentinel: w for w in self.workers}
        waits.update({w.conn: w for w in self.workers if w.task is not None})
        ready: list[Any] = []
        while not ready:
            ready = connection.wait(list(waits), timeout=TICK)
        out: dict[int, Any] = {}
        dead: list[_Worker] = []
        for worker in dict.fromkeys(waits[r] for r in ready):
            reply = self._receive(worker)
            if reply is None:
                if worker.task is not None or not worker.process.is_alive():
                    dead.append(worker)
                continue
            handle, (ok, value, *remote) = reply
            if handle not in index_of:  # left by an ``ordered`` stopped early: nobody reads it
                continue
            if not ok:
                raise value from _RemoteTraceback(remote[0])
            out[index_of[handle]] = value
            del pending[index_of[handle]]
        if dead:
            self._replace(dead, len(pending))
        self._dispatch()
        return out

    @staticmethod
    def _receive(worker: _Worker) -> tuple[int, tuple] | None:
        """The handle of the worker's task and its reply, or None: it was idle or died instead."""
        if worker.task is None:
            return None
        try:
            reply = worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):  # died, perhaps half-way through its reply
            return None
        if reply is None:
            return None
        handle, worker.task = worker.task[0], None
        return handle, reply

    def _replace(self, dead: list[_Worker], unfinished: int) -> None:
        """Start new workers for the dead ones (whose tasks go first), or fail if they died once already."""
        if self.restarts >= PROCESS_RESTARTS:
            raise WorkerError(
                f"expected the worker processes to finish; they died again after a restart, with {unfinished} "
                "task(s) unfinished (no result was written)",
                hint="a worker may run out of memory: try fewer --workers; from Python, start workers under "
                "if __name__ == '__main__': (each worker imports the main module)",
            )
        self.restarts += 1
        lost = [w.task for w in dead if w.task is not None]
        warnings.warn(
            f"a worker process died; resubmitting {len(lost)} unfinished task(s) to new workers", stacklevel=3
        )
        self.queue.extendleft(reversed(lost))
        self.workers = [w for w in self.workers if w not in dead]
        _stop([w.process for w in dead], grace=0.0)
        for worker in dead:
            worker.conn.close()
            self.workers.append(_Worker(self.mp, self.token, self.job))

    def close(self, abort: bool = False) -> None:
        """Stop the workers: asked to (``abort``: terminated at once), killed if they have not exited
        within ``STOP_GRACE`` seconds; every wait bounded."""
        if not abort:
            for worker in self.workers:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
        _stop([w.process for w in self.workers], grace=0.0 if abort else STOP_GRACE)
        for worker in self.workers:
            worker.conn.close()
        self.workers, self.queue = [], deque()


def _stop(processes: list[multiprocessing.process.BaseProcess], grace: float) -> None:
    """Give ``processes`` ``grace`` seconds to exit, then terminate them, then kill them, each step's
    wait bounded; the dead ones are closed (so they leave ``multiprocessing.active_children``)."""
    for step, seconds in ((None, grace), ("terminate", STOP_GRACE), ("kill", STOP_GRACE)):
        alive = [p for p in processes if p.is_alive()]
        if not alive:
            break
        deadline = time.monotonic() + seconds
        for process in alive:
            if step is not None:
                getattr(process, step)()
        for process in alive:
            process.join(timeout=max(deadline - time.monotonic(), 0.0))
    for process in processes:
        if not process.is_alive():
            process.close()


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
