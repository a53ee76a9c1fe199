"""Safe files: every output checked against the command's inputs and written atomically, every
input read within a declared bound. Standard library, numpy, onnx and ``fitonnx.errors`` only."""

from __future__ import annotations

from fitonnx.files.outputs import (
    MARKER,
    STDOUT,
    Interrupted,
    OutputPlan,
    StagedFolder,
    Target,
    interrupts_raise,
    json_safe,
    json_text,
    model_inputs,
    nonfinite_paths,
    safe_text,
    write_atomic,
)
from fitonnx.files.readers import (
    DEFAULT_LIMIT_MB,
    LIMIT_OPTION,
    LazyNpz,
    Limit,
    Member,
    RandomSamples,
    open_regular,
    read_regular_file,
    read_tensor_pb,
    sniff,
)

__all__ = [
    "DEFAULT_LIMIT_MB",
    "LIMIT_OPTION",
    "MARKER",
    "STDOUT",
    "Interrupted",
    "LazyNpz",
    "Limit",
    "Member",
    "OutputPlan",
    "RandomSamples",
    "StagedFolder",
    "Target",
    "interrupts_raise",
    "json_safe",
    "json_text",
    "model_inputs",
    "nonfinite_paths",
    "open_regular",
    "read_regular_file",
    "read_tensor_pb",
    "safe_text",
    "sniff",
    "write_atomic",
]
