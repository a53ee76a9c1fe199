"""Shared fixtures: paths of the bundled models and a tiny model built in code."""

from __future__ import annotations

import faulthandler
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
HANG = 300.0  # seconds: a test using ``deadline`` that runs longer is hung (they take seconds to a minute)
EXIT_HANG = 120.0  # seconds: a test run still exiting this long after its last test is hung


def pytest_unconfigure() -> None:
    """Past the last test, an interpreter that does not exit within ``EXIT_HANG`` seconds (a thread
    it joins at exit is stuck) prints every thread's stack and exits 1: a failure, not a stall."""
    faulthandler.dump_traceback_later(EXIT_HANG, exit=True)


@pytest.fixture(scope="session")
def cnn_path() -> Path:
    return MODELS / "mnist_cnn.onnx"


@pytest.fixture(scope="session")
def mlp_path() -> Path:
    return MODELS / "digits_mlp.onnx"


def tiny_classifier(seed: int = 0, softmax: bool = False) -> onnx.ModelProto:
    """x[N,4] -> MatMul W1[4,6] -> Relu -> Gemm W2[3,6]^T -> logits[N,3] (optionally Softmax)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits" if not softmax else "z"], name="fc", transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["logits"], name="sm", axis=-1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [w1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), path)
    return path


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.normal(size=(20, 4)).astype(np.float32), labels=rng.integers(0, 3, 20))
    return path


@pytest.fixture()
def deadline() -> Iterator[None]:
    """Fail the test after ``HANG`` seconds, with every thread's stack on stderr: a hang becomes a
    failure instead of a stalled run. SIGALRM interrupts even a blocked wait (POSIX, main thread)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        faulthandler.dump_traceback(all_threads=True)
        raise TimeoutError(f"expected the test to end within {HANG:.0f} s; it hung (its stacks are above)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, HANG)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
