"""onnxruntime plumbing shared by every stage: CPU sessions with fitonnx's settings, a quiet stderr."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import onnxruntime as ort

CPU_PROVIDERS = ("CPUExecutionProvider",)


def session_options(threads: int = 0, *, level: ort.GraphOptimizationLevel | None = None) -> ort.SessionOptions:
    """SessionOptions with fitonnx's settings: warnings off, ``threads`` intra-op threads (0: onnxruntime's
    choice) and, if given, the graph optimization ``level`` (default: onnxruntime's own)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model_bytes: bytes, threads: int = 0, *, optimize: bool = True) -> ort.InferenceSession:
    """An InferenceSession on the CPU with fitonnx's settings (shared by engine and benchmarks);
    ``optimize=False`` turns onnxruntime's graph optimizations off."""
    level = None if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, session_options(threads, level=level), providers=list(CPU_PROVIDERS))


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the duration.

    The builder logs each graph transformer at INFO level through a logger that ignores
    ``onnxruntime.set_default_logger_severity``; only the file descriptor can be quieted.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
