"""Gradient engines: what builds the backward graph of the augmented model.

An engine takes the augmented model (its only output the scalar loss), the loss name and the
names to differentiate, and returns an ONNX model whose outputs include ``<name>_grad`` for each
of them; ``instrument`` adds the reductions and the engine stage runs it with onnxruntime.

Today there is one, ``ort-training`` (onnxruntime-training's GradientGraphBuilder). To add one:
write its ``build`` (and ``available``), register ``GradientEngine(name, available, build)`` in
``ENGINES``, and put its name in ``PREFERENCE`` where ``auto`` should try it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from fitonnx.errors import FitonnxError, UnsupportedError
from fitonnx.model.runtime import quiet_stderr

AUTO = "auto"

BuildFn = Callable[[onnx.ModelProto, str, Sequence[str]], onnx.ModelProto]
ExplainFn = Callable[[Exception, onnx.ModelProto], FitonnxError]


def _explain_generic(exc: Exception, model: onnx.ModelProto) -> FitonnxError:
    """A build failure as an UnsupportedError carrying the first line of the engine's message."""
    del model
    text = str(exc).strip() or type(exc).__name__
    return UnsupportedError(f"could not build the gradient graph: {text.splitlines()[0][:300]}")


@dataclass(frozen=True)
class GradientEngine:
    """A named way to build gradient graphs.

    ``available()``: whether it can run here (its dependencies are installed);
    ``build(augmented_model, loss_name, wrt_names)``: the gradient model, outputs ``<name>_grad``;
    ``explain(exc, source)``: a build failure as a fitonnx error naming the culprit op of ``source``
    (the model before augmentation).
    """

    name: str
    available: Callable[[], bool]
    build: BuildFn
    explain: ExplainFn = _explain_generic


@functools.cache
def _ort_training_available() -> bool:
    try:
        # Deferred: the onnxruntime-training binding is optional and slow to import.
        from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401
    except ImportError:
        return False
    return True


def _ort_training_build(model: onnx.ModelProto, loss_name: str, wrt_names: Sequence[str]) -> onnx.ModelProto:
    """GradientGraphBuilder's gradient graph of ``model`` (its C++ log silenced)."""
    # Deferred: the onnxruntime-training binding is optional and slow to import.
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    with quiet_stderr():
        builder = GradientGraphBuilder(model.SerializeToString(), {loss_name}, set(wrt_names), loss_name)
        builder.build()
    return onnx.load_from_string(builder.get_model())


def _ort_training_explain(exc: Exception, model: onnx.ModelProto) -> FitonnxError:
    """Name the op GradientGraphBuilder could not differentiate, from its C++ message."""
    text = str(exc)
    named = re.search(r"has not been registered: (\S+) for node (\S*)", text)
    if named:
        return UnsupportedError(
            f"onnxruntime-training cannot differentiate op {named.group(1)} (node {named.group(2) or '?'}); "
            "expected only ops with registered gradients",
            hint="run `fitonnx inspect` to see which ops need a rewrite",
        )
    for node in model.graph.node:
        if f"op_type {node.op_type}" in text or f"'{node.op_type}'" in text or f" {node.op_type} " in text:
            return UnsupportedError(
                f"onnxruntime-training cannot differentiate op {node.op_type} (node {node.name or '?'}); "
                "expected only ops with registered gradients",
                hint="run `fitonnx inspect` to see which ops need a rewrite",
            )
    # The binding's first line is a C++ source location; the message follows the last "] : ".
    message = text.rsplit("] : ", 1)[-1].strip() if text.strip() else type(exc).__name__
    return UnsupportedError(f"could not build the gradient graph: {message.splitlines()[0][:300]}")


ENGINES: dict[str, GradientEngine] = {
    "ort-training": GradientEngine("ort-training", _ort_training_available, _ort_training_build, _ort_training_explain),
}
PREFERENCE: tuple[str, ...] = ("ort-training",)  # what ``auto`` tries, first available wins
ENGINE_CHOICES: tuple[str, ...] = (AUTO, *ENGINES)


def check_name(name: str) -> str:
    """``name`` if it is ``auto`` or a registered engine; else an error listing the known names."""
    if name != AUTO and name not in ENGINES:
        raise FitonnxError(f"expected a gradient engine among {list(ENGINE_CHOICES)}; found {name!r}")
    return name


def get_engine(name: str = AUTO) -> GradientEngine:
    """The engine called ``name`` (``auto``: the first available one in ``PREFERENCE``), failing loudly."""
    if check_name(name) == AUTO:
        for candidate in PREFERENCE:
            if ENGINES[candidate].available():
                return ENGINES[candidate]
        raise UnsupportedError(
            f"expected an available gradient engine among {list(PREFERENCE)}; none is installed",
            hint="install onnxruntime-training-cpu (a requirement of fitonnx)",
        )
    engine = ENGINES[name]
    if not engine.available():
        raise UnsupportedError(f"expected the gradient engine {name!r} to be installed; it is not")
    return engine
