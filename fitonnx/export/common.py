"""What every exporter shares: checking a recommendation against the model, the export plan,
atomic writes of ONNX files, and the check that a written model loads in onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.targets import Target, get_target
from fitonnx.errors import DataError, FitonnxError, InternalError, ModelError
from fitonnx.files.atomic import write_atomic
from fitonnx.formats import Granularity, parse_format
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.graph import Kind
from fitonnx.model.graph import channel_axis as channel_axis  # the one rule; exporters import it from here
from fitonnx.model.runtime import make_session
from fitonnx.prepare.passes.constants import constants_to_initializers

MAX_LISTED = 5


@dataclass(frozen=True)
class ExportResult:
    """What an exporter wrote: the file, the tensors it quantized (name → bits) and those left in float."""

    format: str
    path: Path
    quantized: Mapping[str, int]
    kept_float: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.path,)

    def __iter__(self) -> Iterator[Path]:
        """The files written (so ``list(exporter(...))`` lists them)."""
        return iter(self.paths)


@dataclass(frozen=True)
class Toolchain:
    """What a deployment toolchain can store: integer bit widths per kind, and widths that mean float."""

    name: str
    weight_bits: frozenset[int]
    activation_bits: frozenset[int]
    float_bits: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ExportPlan:
    """The recommendation resolved against one model and one toolchain.

    ``weights``/``activations`` are the tensors to quantize (name → integer bits); ``kept_float``
    the recommended tensors whose width means float (TensorRT's 16); ``unlisted`` the model's
    quantizable tensors the recommendation does not mention (they stay float too).
    """

    model: onnx.ModelProto
    target: Target
    weights: Mapping[str, int]
    activations: Mapping[str, int]
    kept_float: tuple[str, ...]
    unlisted: tuple[str, ...]

    @property
    def quantized(self) -> dict[str, int]:
        return {**self.weights, **self.activations}

    @property
    def float_tensors(self) -> tuple[str, ...]:
        return self.kept_float + self.unlisted


def working_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with float Constant weights as initializers and every node named.

    Toolchains quantize initializers, and onnxruntime's ``nodes_to_exclude`` and our own
    bookkeeping match nodes by name, so unnamed nodes get their stable stand-in name.
    """
    out, _ = constants_to_initializers(model)
    used = {n.name for n in out.graph.node if n.name}
    for i, node in enumerate(out.graph.node):
        if not node.name:
            name = graph.node_name(node, i)
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return out


def _listed(names: Collection[str]) -> str:
    shown = sorted(names)[:MAX_LISTED]
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(repr(n) for n in shown) + more


def check_names(model: onnx.ModelProto, rec: Recommendation) -> None:
    """Raise unless every recommended weight is an initializer and every activation a tensor of ``model``."""
    inits = {t.name for t in model.graph.initializer}
    tensors = {v.name for v in model.graph.input} | {o for n in model.graph.node for o in n.output if o}
    missing = [n for n in rec.weight_bits if n not in inits and n not in tensors]
    missing += [n for n in rec.activation_bits if n not in tensors and n not in inits]
    if missing:
        raise FitonnxError(
            f"expected the recommendation's tensors in the model; found {len(missing)} it does not have: "
            f"{_listed(missing)}",
            hint=f"was the recommendation made for {rec.model!r}? Edit its names or pass the right model",
        )
    not_weights = [n for n in rec.weight_bits if n not in inits]
    if not_weights:
        raise FitonnxError(
            f"expected weight_bits to name initializers (weights); found activations: {_listed(not_weights)}",
            hint="move them to activation_bits",
        )
    not_acts = [n for n in rec.activation_bits if n in inits]
    if not_acts:
        raise FitonnxError(
            f"expected activation_bits to name activations; found initializers: {_listed(not_acts)}",
            hint="move them to weight_bits",
        )


def check_integer_activations(rec: Recommendation, writer: str) -> None:
    """A writer of bit widths expresses a format recommendation's activations only on per-tensor integer
    grids: any other activation format (FP8, MX, NVFP4, fp16) is a one-line error naming it."""
    for name, fmt_name in rec.activation_formats.items():
        fmt = parse_format(fmt_name)
        if not fmt.is_int or fmt.granularity is not Granularity.TENSOR:
            raise FitonnxError(
                f"expected per-tensor integer activation formats for the {writer} export; found {fmt.name} for {name!r}",
                hint="write it with --format tensorrt or qdq (formats as scored), or recommend another --act-format",
            )


def plan_export(model: onnx.ModelProto, rec: Recommendation, toolchain: Toolchain) -> ExportPlan:
    """Check ``rec`` against ``model`` and what ``toolchain`` can store, and resolve what stays float."""
    work = working_copy(model)
    check_names(work, rec)
    check_integer_activations(rec, toolchain.name)
    target = get_target(rec.target)
    weights: dict[str, int] = {}
    activations: dict[str, int] = {}
    kept: list[str] = []
    for kind, bits_by_name, allowed, out in (
        (Kind.WEIGHT, rec.weight_bits, toolchain.weight_bits, weights),
        (Kind.ACTIVATION, rec.activation_bits, toolchain.activation_bits, activations),
    ):
        for name, bits in bits_by_name.items():
            if target.is_float(bits) or bits in toolchain.float_bits:
                kept.append(name)
            elif bits in allowed:
                out[name] = bits
            else:
                choices = sorted(allowed | toolchain.float_bits)
                raise FitonnxError(
                    f"expected {kind.value} bit widths in {choices} for {toolchain.name}; found {bits} for {name!r}",
                    hint="recommend with --target matching the toolchain, or edit the bits in the recommendation "
                    "(a tensor left out of it stays in float)",
                )
    listed = set(rec.weight_bits) | set(rec.activation_bits)
    unlisted = tuple(t.name for t in graph.find_quantizable(work) if t.name not in listed)
    return ExportPlan(
        model=work,
        target=target,
        weights=weights,
        activations=activations,
        kept_float=tuple(kept),
        unlisted=unlisted,
    )


def tensor_range(plan: ExportPlan, rec: Recommendation, name: str) -> tuple[float, float]:
    """The calibration range of ``name`` from the recommendation; weights fall back to their values."""
    if name in rec.ranges:
        lo, hi = rec.ranges[name]
    else:
        init = next((t for t in plan.model.graph.initializer if t.name == name), None)
        if init is None:
            raise FitonnxError(
                f"expected a calibration range for activation {name!r} in the recommendation's 'ranges'; found none",
                hint='re-run fitonnx recommend, or add "ranges": {name: [min, max]}',
            )
        values = onnx.numpy_helper.to_array(init)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise FitonnxError(f"expected a finite range with min <= max for {name!r}; found [{lo}, {hi}]")
    return float(lo), float(hi)


def resolve_out(out: str | os.PathLike[str], model_path: Path | None) -> Path:
    """The output path, refusing to overwrite the input model."""
    path = Path(out)
    if model_path is not None and path.resolve() == model_path.resolve():
        raise FitonnxError(
            f"expected an output path other than the input model; found --out {str(path)!r}, which is the model",
            hint="write the exported file beside it, e.g. model.qdq.onnx",
        )
    return path


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` atomically: a temporary file in the same folder, then ``os.replace``."""
    if model.ByteSize() >= 2**31:
        raise ModelError(
            f"expected an exported model under 2 GB for {str(path)!r}; found {model.ByteSize()} bytes",
            hint="fitonnx does not write external-data models yet",
        )
    write_atomic(path, model.SerializeToString())


def check_runs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray] | None, *, optimize: bool = True) -> None:
    """Raise ``InternalError`` unless onnxruntime loads ``model`` (and runs ``feed`` when given);
    ``optimize=False`` checks it with onnxruntime's graph optimizations off (for files another
    runtime reads)."""

    try:
        session = make_session(model.SerializeToString(), optimize=optimize)
        if feed is not None:
            session.run(None, dict(feed))
    except Exception as exc:
        raise InternalError(f"the exported model does not run in onnxruntime: {exc}") from exc


def quantizable_sites(model: onnx.ModelProto) -> list[tuple[str, int, str]]:
    """(node name, input slot, tensor) for every weight or activation input of a quantizable op (Conv, Gemm, ...)."""
    sites: list[tuple[str, int, str]] = []
    for node in model.graph.node:
        if node.op_type not in graph.WEIGHT_INPUTS or node.domain not in ("", "ai.onnx"):
            continue
        slots = set(graph.WEIGHT_INPUTS[node.op_type]) | set(graph.ACTIVATION_INPUTS[node.op_type])
        sites.extend((node.name, slot, name) for slot, name in enumerate(node.input) if slot in slots and name)
    return sites


def first_feed(data: Dataset, specs: Mapping[str, graph.InputSpec]) -> dict[str, np.ndarray]:
    """The first sample, restricted to the model's inputs (for a smoke run of an exported model)."""
    return {name: value for name, value in data.sample(0, specs).items() if name in specs}


def require_data(data: Dataset | None, fmt: str) -> Dataset:
    """The calibration data a format needs, or a one-line error saying how to give it."""
    if data is None:
        raise DataError(
            f"expected calibration data for --format {fmt} (quantize_static calibrates on it); found none",
            hint="pass --data calib.npz",
        )
    return data
