"""Gradient engines: what builds the backward graph of the augmented model.

An engine takes the augmented model (its only output the scalar loss), the loss name and the
names to differentiate, and returns an ONNX model whose outputs include ``<name>_grad`` for each
of them; ``instrument`` adds the reductions and the engine stage runs it with onnxruntime.

Two are registered: ``ort-training`` (onnxruntime-training's GradientGraphBuilder, the reference)
and ``onnx`` (fitonnx's own reverse mode in standard ONNX, ``fisher.autodiff``). To add one:
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
from fitonnx.fisher import autodiff
from fitonnx.model import external
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
    # The op types it has a rule for, when it knows them (None: probe, as for onnxruntime-training).
    gradient_ops: frozenset[str] | None = None


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
        # onnxruntime-training (1.19) reads weights kept as external data from absolute locations.
        model_bytes, _ = external.session_folder(model.SerializeToString())
        builder = GradientGraphBuilder(model_bytes, {loss_name}, set(wrt_names), loss_name)
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


def _onnx_build(model: onnx.ModelProto, loss_name: str, wrt_names: Sequence[str]) -> onnx.ModelProto:
    """fitonnx's own backward graph in standard ONNX ops, run by any onnxruntime (fisher.autodiff)."""
    return autodiff.build_gradient_graph(model, loss_name, wrt_names)


ENGINES: dict[str, GradientEngine] = {
    "ort-training": GradientEngine("ort-training", _ort_training_available, _ort_training_build, _ort_training_explain),
    "onnx": GradientEngine("onnx", lambda: True, _onnx_build, gradient_ops=autodiff.supported_ops()),
}
# What ``auto`` tries, first available wins: the reference engine where its build is installed.
PREFERENCE: tuple[str, ...] = ("ort-training", "onnx")
ENGINE_CHOICES: tuple[str, ...] = (AUTO, *ENGINES)
INSTALL_HINTS = {
    "ort-training": "the reference engine needs onnxruntime-training (Python 3.10-3.12, x86-64 Linux/Windows) in a "
    "virtual environment of its own: pip install 'fitonnx[training]'; or use --engine onnx",
}


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
            hint="install onnxruntime (pip install onnxruntime)",
        )
    engine = ENGINES[name]
    if not engine.available():
        raise UnsupportedError(
            f"expected the gradient engine {name!r} to be installed; it is not",
            hint=INSTALL_HINTS.get(name, "use --engine auto"),
        )
    return engine
