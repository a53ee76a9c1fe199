"""--workers and --ray: the same samples, in the same order, with the same values as one process.

On the bundled CNN with the Monte-Carlo Fisher (so the workers must replay the label noise of the
samples before their shards), full gradients kept (the diagonal Fisher) and the grid model's point
statistics: every per-sample statistic of a 2-process run and of a Ray run equals the single-process
run's. Also: --tol stops at the same sample, a killed worker is retried, a second death is an error,
validate's configurations measure the same, and the CLI's errors are one line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fitonnx import api
from fitonnx.analysis.harness import harness, measure_all
from fitonnx.analysis.simulate import Config
from fitonnx.analysis.validate import sample_configs
from fitonnx.cli.main import cli
from fitonnx.errors import DataError, FitonnxError, WorkerError
from fitonnx.fisher import engine, parallel
from fitonnx.fisher.options import FisherOptions
from fitonnx.progress import Ticks
from fitonnx.scale import Job, Pool, Workers

pytestmark = pytest.mark.usefixtures("deadline")  # a hung pool fails its test (conftest.HANG) instead of the run

SAMPLES = 40
TWO = Workers(processes=2)
# One onnxruntime thread in every run: kernels sum in a thread-dependent order (5e-6 relative on
# onnxruntime-training 1.19's tiny values), which is not what these tests are about.
THREADS = 1


@pytest.fixture(scope="module")
def cnn(cnn_path: Path) -> tuple[api.Session, object]:
    """The CNN's session and its gradient model (MC Fisher, gradients and point statistics kept)."""
    s = api.open_model(cnn_path, max_samples=SAMPLES)
    gm, _, _ = api.gradient_model(s, FisherOptions(fisher="mc"), keep_gradients=True, exact_points=True)
    return s, gm


@pytest.fixture(scope="module")
def single(cnn) -> engine.FisherTraces:
    s, gm = cnn
    return engine.run(gm, s.data, s.specs, engine.RunOptions(threads=THREADS, max_samples=SAMPLES, seed=3))


def assert_same(a: engine.FisherTraces, b: engine.FisherTraces) -> None:
    """Same samples, same order, every statistic within 1e-6 (relative)."""
    assert b.samples == a.samples and b.stop_reason == a.stop_reason
    np.testing.assert_allclose(b.per_sample, a.per_sample, rtol=1e-6, atol=0)
    for name in ("zero", "at_min", "at_max"):
        np.testing.assert_allclose(getattr(b.points, name), getattr(a.points, name), rtol=1e-6, atol=0)
    assert b.act_min == a.act_min and b.act_max == a.act_max and b.act_shapes == a.act_shapes
    assert a.diag is not None and b.diag is not None and b.diag.keys() == a.diag.keys()
    for name, d in a.diag.items():
        np.testing.assert_allclose(b.diag[name], d, rtol=1e-6, atol=1e-12 * float(np.abs(d).max()))


def test_two_workers_equal_one_process(cnn, single) -> None:
    s, gm = cnn
    assert single.samples == SAMPLES and single.per_sample.min() >= 0 and single.per_sample.max() > 0
    seen: list[int] = []
    traces = parallel.run(
        gm, s.data, s.specs, engine.RunOptions(threads=THREADS, max_samples=SAMPLES, seed=3), TWO, Ticks(seen.append)
    )
    assert_same(single, traces)
    assert sum(seen) == SAMPLES and len(seen) > 2  # progress counts every worker's samples, shard by shard
    # The label noise matters: another seed draws other labels, other per-sample norms.
    other = engine.run(gm, s.data, s.specs, engine.RunOptions(threads=THREADS, max_samples=SAMPLES, seed=4))
    assert not np.allclose(other.per_sample, single.per_sample)


def test_tol_stops_the_whole_run_at_the_same_sample(cnn) -> None:
    s, gm = cnn
    options = engine.RunOptions(threads=THREADS, max_samples=SAMPLES, tol=0.9, min_samples=23, seed=0)
    one = engine.run(gm, s.data, s.specs, options)
    assert one.stop_reason is engine.StopReason.TOL and 23 <= one.samples < SAMPLES
    shard = parallel._shards(s.data, s.specs, SAMPLES, 2)[0].data.num_samples
    assert one.samples % shard, "the stop should fall inside a shard (the gradient sums are cut there)"
    assert_same(one, parallel.run(gm, s.data, s.specs, options, TWO))


_KILLED: set[int] = set()  # workers already sent SIGKILL (one still exiting is not killed "again")


def _kill_a_worker(n: int) -> None:
    del n
    children = [child for child in multiprocessing.active_children() if child.pid not in _KILLED]
    assert children or _KILLED, "expected worker processes to kill"
    if children:
        _KILLED.add(children[0].pid)
        os.kill(children[0].pid, signal.SIGKILL)


def test_a_killed_worker_is_retried(cnn, single) -> None:
    s, gm = cnn
    killed: list[int] = []

    def once(n: int) -> None:
        if not killed:
            killed.append(n)
            _kill_a_worker(n)

    with pytest.warns(UserWarning, match="a worker process died; resubmitting"):
        traces = parallel.run(
            gm, s.data, s.specs, engine.RunOptions(threads=THREADS, max_samples=SAMPLES, seed=3), TWO, Ticks(once)
        )
    assert killed
    assert_same(single, traces)


def test_workers_dying_twice_fail_the_run(cnn) -> None:
    s, gm = cnn
    with pytest.warns(UserWarning, match="a worker process died"), pytest.raises(WorkerError, match="died again"):
        parallel.run(
            gm, s.data, s.specs, engine.RunOptions(threads=THREADS, max_samples=SAMPLES), TWO, Ticks(_kill_a_worker)
        )
    assert not multiprocessing.active_children()  # the pool is gone


class _DiesReplying:
    """A result that, once pickled in a worker, has the worker SIGKILLed while it sends the 32 MB."""

    def __reduce__(self) -> tuple:
        threading.Thread(target=_kill_me_while_sending, daemon=True).start()
        return bytes, (bytes(32 << 20),)


def _kill_me_while_sending() -> None:
    """SIGKILL this process once its main thread is writing a message's body (``Connection._send``)."""
    main = threading.main_thread().ident
    while True:
        frame = sys._current_frames().get(main)
        while frame is not None and frame.f_code.co_name != "_send":
            frame = frame.f_back
        if frame is not None and len(frame.f_locals.get("buf", b"")) > 1 << 20:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0002)


def _identity(context: object) -> object:
    return context


def _dying_work(marker: Path, task: int) -> object:
    """``task`` squared, except task 1, which dies halfway through its reply while ``marker`` is
    missing (``marker`` None: always); the marker file is made first, so the retry lives."""
    if task != 1 or (marker is not None and marker.exists()):
        return task * task
    if marker is not None:
        marker.touch()
    return _DiesReplying()


def test_a_worker_killed_halfway_through_its_reply_is_retried(tmp_path: Path) -> None:
    job = Job(tmp_path / "died", _identity, _dying_work)
    with pytest.warns(UserWarning, match="resubmitting 1 unfinished task"), Pool(TWO, job) as pool:
        assert list(pool.ordered(range(4))) == [0, 1, 4, 9]
    assert (tmp_path / "died").exists() and not multiprocessing.active_children()


def test_a_worker_killed_halfway_through_its_reply_twice_fails_the_run() -> None:
    job = Job(None, _identity, _dying_work)
    died = pytest.warns(UserWarning, match="a worker process died")
    with died, pytest.raises(WorkerError, match="died again"), Pool(TWO, job) as pool:
        list(pool.ordered(range(4)))
    assert not multiprocessing.active_children()


def _slow_work(context: object, task: int) -> int:
    """Task 0 at once; the others take ten minutes."""
    del context
    time.sleep(600 if task else 0)
    return task


def test_leaving_a_pool_early_stops_its_busy_workers() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="stopped"), Pool(TWO, Job(None, _identity, _slow_work)) as pool:
        for _ in pool.ordered(range(4)):  # task 0's result, while task 1 runs on the other worker
            assert len(multiprocessing.active_children()) == 2
            raise RuntimeError("stopped")
    assert not multiprocessing.active_children()
    assert time.monotonic() - start < 60  # terminated, not awaited (the task sleeps 600 s)


@pytest.fixture(scope="module")
def harness_and_configs(cnn_path: Path):
    h = harness(cnn_path, options=FisherOptions(max_samples=16))
    sampled = sample_configs(h.weights, h.activations, h.weight_bits, h.activation_bits, 5, seed=1)
    return h, [config for config, _ in sampled] + [Config.floating()]


def test_validate_configurations_on_two_workers(harness_and_configs) -> None:
    h, configs = harness_and_configs
    serial = [h.measure(c) for c in configs]
    assert serial[0].kl > 0 and serial[-1].kl == 0
    done: list[int] = []
    for a, b in zip(serial, measure_all(h, configs, TWO, done.append), strict=True):
        np.testing.assert_allclose(b.sample_kl, a.sample_kl, rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(b.sample_correct, a.sample_correct)
    assert sum(done) == len(configs)


def test_score_cli_with_two_workers_writes_the_same_report(cnn_path: Path, tmp_path: Path) -> None:
    reports = []
    for extra in ([], ["--workers", "2"]):
        out = tmp_path / f"r{len(reports)}.json"
        result = CliRunner().invoke(cli, ["score", str(cnn_path), "--max-samples", "24", "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(out.read_text()))
    one, two = reports
    assert two["samples"] == one["samples"] == 24
    for a, b in zip(one["tensors"], two["tensors"], strict=True):
        assert a["name"] == b["name"]
        assert b["ef_trace"] == pytest.approx(a["ef_trace"], rel=1e-6)
        assert b["ef_trace_se"] == pytest.approx(a["ef_trace_se"], rel=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", ""], "error: expected a Ray address like HOST:PORT"),
        (["--workers", "2", "--ray=local", "--random-data", "2"], None),  # checked below, without Ray
    ],
)
def test_cli_errors_are_one_line(cnn_path: Path, args: list[str], message: str | None, monkeypatch) -> None:
    if message is None:  # Ray not installed: say so and how to get it
        monkeypatch.setitem(sys.modules, "ray", None)
        message = "error: expected Ray to be installed for --ray; it is not"
    result = CliRunner().invoke(cli, ["score", str(cnn_path), "--max-samples", "4", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_worker_errors_cross_back_whole() -> None:
    err = pickle.loads(pickle.dumps(DataError("expected x; found y", hint="do z")))
    assert type(err) is DataError and err.message == "expected x; found y" and err.hint == "do z"
    with pytest.raises(FitonnxError, match="expected --workers of at least 1"):
        Workers(processes=0)


# Ray: one local cluster for the module (starting one costs seconds).
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fitonnx[ray]'): Ray runs not tested")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_run_equals_one_process(local_ray, cnn, single) -> None:
    s, gm = cnn
    seen: list[int] = []
    options = engine.RunOptions(threads=THREADS, max_samples=SAMPLES, seed=3)
    assert_same(single, parallel.run(gm, s.data, s.specs, options, Workers(ray=True), Ticks(seen.append)))
    assert sum(seen) == SAMPLES
    assert local_ray.is_initialized()  # a Ray the caller started is left running


def _ray_task_pids() -> list[int]:
    """Processes running one of fitonnx's Ray tasks (Ray titles them ``ray::_ray_call``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::_ray_call"):
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's workers through /proc (Linux)")
def test_ray_retries_a_killed_worker(local_ray, cnn, single) -> None:
    s, gm = cnn
    killed: list[int] = []

    def once(n: int) -> None:
        del n
        if not killed and (pids := _ray_task_pids()):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    options = engine.RunOptions(threads=THREADS, max_samples=SAMPLES, seed=3)
    traces = parallel.run(gm, s.data, s.specs, options, Workers(ray=True), Ticks(once))
    assert killed, "expected a Ray worker busy on a task to kill"
    assert_same(single, traces)


def test_ray_validate_configurations(local_ray, harness_and_configs) -> None:
    h, configs = harness_and_configs
    for a, b in zip([h.measure(c) for c in configs], measure_all(h, configs, Workers(ray=True)), strict=True):
        np.testing.assert_allclose(b.sample_kl, a.sample_kl, rtol=1e-6, atol=1e-12)


def test_ray_tol_stop_and_cli(local_ray, cnn, cnn_path: Path, tmp_path: Path) -> None:
    s, gm = cnn
    options = engine.RunOptions(threads=THREADS, max_samples=SAMPLES, tol=0.9, min_samples=23, seed=0)
    assert_same(engine.run(gm, s.data, s.specs, options), parallel.run(gm, s.data, s.specs, options, Workers(ray=True)))
    # The CLI's --ray alone uses the Ray already running here (and leaves it running).
    reports = []
    for extra in ([], ["--ray"]):
        out = tmp_path / f"r{len(reports)}.json"
        result = CliRunner().invoke(cli, ["score", str(cnn_path), "--max-samples", "24", "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        reports.append({t["name"]: t["ef_trace"] for t in json.loads(out.read_text())["tensors"]})
    assert reports[1].keys() == reports[0].keys()
    assert all(reports[1][k] == pytest.approx(v, rel=1e-6) for k, v in reports[0].items())
    assert local_ray.is_initialized()
