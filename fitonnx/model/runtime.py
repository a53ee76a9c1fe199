"""onnxruntime plumbing shared by every stage: CPU sessions with fitonnx's settings, a quiet stderr."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import onnxruntime as ort

from fitonnx.errors import FitonnxError
from fitonnx.model import external

CPU_PROVIDERS = ("CPUExecutionProvider",)
# --device: the execution providers a gradient session runs on, in onnxruntime's order of preference.
DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": CPU_PROVIDERS,
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}
DEVICES: tuple[str, ...] = tuple(DEVICE_PROVIDERS)
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"  # onnxruntime >= 1.20
_ORT_NODE = re.compile(r"running (\S+) node\. Name:'([^']*)'(?: Status Message: (.*))?", re.S)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
ORT_HINT = (
    "check the node's attributes and input shapes; if onnxruntime runs the original model with this data, "
    "it is a fitonnx bug: please report it with the command line"
)


def is_onnxruntime_error(exc: BaseException) -> bool:
    """An exception raised by onnxruntime's C++ core (its pybind classes, not a Python bug)."""
    return type(exc).__module__.startswith("onnxruntime")


def describe_onnxruntime_error(exc: BaseException) -> str:
    """One line for an onnxruntime failure, naming the node and what it reported."""
    text = str(exc).strip()
    m = _ORT_NODE.search(text)
    if m is not None:
        op, name, status = m.groups()
        detail = (status or "").strip().splitlines()[0] if (status or "").strip() else "no details"
        return f"onnxruntime failed running node {name!r} ({op}) of the prepared model: {detail[:300]}"
    first = _ORT_PREFIX.sub("", text.splitlines()[0]) if text else type(exc).__name__
    return f"onnxruntime refused the prepared model: {first[:300]}"


def session_options(threads: int = 0, *, level: ort.GraphOptimizationLevel | None = None) -> ort.SessionOptions:
    """SessionOptions with fitonnx's settings: logs off (errors arrive as exceptions), ``threads`` intra-op threads (0: onnxruntime's
    choice) and, if given, the graph optimization ``level`` (default: onnxruntime's own)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # FATAL only: errors reach the user once, as the exception the CLI words
    if level is not None:
        options.graph_optimization_level = level
    if threads:
        options.intra_op_num_threads = threads
    return options


def check_device(device: str) -> str:
    """``device`` if it is known and this onnxruntime has its execution provider; else one line
    naming the providers it has (a user error: exit 2)."""
    if device not in DEVICE_PROVIDERS:
        raise FitonnxError(f"expected a device among {list(DEVICES)}; found {device!r}")
    wanted = DEVICE_PROVIDERS[device][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise FitonnxError(
            f"expected onnxruntime's {wanted} for --device {device}; this onnxruntime {ort.__version__} has {available}",
            hint="install onnxruntime-gpu (pip install onnxruntime-gpu) in place of onnxruntime, or use --device cpu",
        )
    return device


def make_session(
    model_bytes: bytes,
    threads: int = 0,
    *,
    optimize: bool = True,
    device: str = "cpu",
    initializers: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession with fitonnx's settings (shared by engine and benchmarks), on the CPU or
    ``device``'s execution provider; ``optimize=False`` turns onnxruntime's graph optimizations off.
    Weights kept as external data are read from their own files (``model.external``), not from a
    copy in the protobuf; ``initializers``: the values of a ``external.detached`` model's references."""
    level = None if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    original = model_bytes
    model_bytes, folder = external.session_folder(model_bytes)
    options = session_options(threads, level=level)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in (initializers or {}).values()]
    if values:
        options.add_external_initializers(list(initializers or {}), values)
    if folder is not None:
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, folder)
    if folder is not None or model_bytes is not original:
        # Weights kept external are then memory-mapped from their files and shared by every
        # session; prepacking would copy each into a packed buffer of the same size.
        options.add_session_config_entry("session.disable_prepacking", "1")
        # and its buffers are freed as the run goes (an arena grows to the sum of what it ever held).
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    session = ort.InferenceSession(model_bytes, options, providers=list(DEVICE_PROVIDERS[check_device(device)]))
    session.fitonnx_initializers = values  # onnxruntime may read them for the session's lifetime
    return session


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
