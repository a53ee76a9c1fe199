"""QNN / AIMET encodings: scales and offsets from the recommendation's calibration ranges.

Layouts (AIMET's quantization encoding specification):

- 0.6.1: ``{"version", "activation_encodings": {tensor: [Encoding, ...]}, "param_encodings": {...},
  "excluded_layers": [], "quantizer_args": {...}}``, one Encoding per tensor or per channel:
  ``{"bitwidth", "dtype": "int", "is_symmetric": "True"|"False" (strings), "min", "max", "offset", "scale"}``,
  or ``{"bitwidth", "dtype": "float"}`` for a tensor kept in float.
- 1.0.0: ``activation_encodings``/``param_encodings`` are lists of ``{"name", "enc_type":
  "PER_TENSOR"|"PER_CHANNEL", "dtype": "INT", "bw", "is_sym" (bool), "scale": [...], "offset": [...]}``
  (float: ``{"name", "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw"}``), the same numbers as 0.6.1.

The grid follows AIMET's ``recompute_grid_params`` (aimet_common/quantsim.py): the range is
widened to hold 0 and to span at least 0.01; asymmetric: scale = (max − min)/(2^b − 1),
offset = round(min/scale) (≤ 0), then min = offset·scale and max = min + (2^b − 1)·scale, so 0
is exactly representable; symmetric: scale = max(|min|, |max|)/(2^(b−1) − 1), offset = −2^(b−1),
min = −2^(b−1)·scale, max = (2^(b−1) − 1)·scale. A value x maps to q = clamp(round(x/scale) − offset,
0, 2^b − 1) and back to (q + offset)·scale. Weights are symmetric when the recommendation's target
says so (qnn, ort, tensorrt), activations asymmetric unless it says otherwise (tensorrt).
Per channel (``per_channel``), a weight gets one encoding per output channel, over that channel's
own min/max read from the weight.
Tensors the recommendation leaves out get no encoding: the QNN converter keeps them in float
with ``--float_fallback``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fitonnx.allocate.recommendation import Recommendation
from fitonnx.allocate.targets import Scheme
from fitonnx.errors import FitonnxError, InternalError
from fitonnx.export.common import ExportPlan, ExportResult, Toolchain, channel_axis, plan_export, tensor_range
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text
from fitonnx.formats import Granularity, parse_format
from fitonnx.model.data import Dataset

QNN = Toolchain("QNN", weight_bits=frozenset({4, 8, 16}), activation_bits=frozenset({8, 16}))
VERSIONS = ("0.6.1", "1.0.0")
MIN_RANGE = 0.01  # AIMET's smallest encoding range
QUANT_SCHEME = "post_training_tf"  # AIMET's name for min/max calibration


@dataclass(frozen=True)
class Encoding:
    """One integer grid: float = (q + offset)·scale for q in [0, 2^bitwidth − 1]."""

    bitwidth: int
    symmetric: bool
    scale: float
    offset: int
    min: float
    max: float


def encoding_from_range(lo: float, hi: float, bits: int, *, symmetric: bool) -> Encoding:
    """AIMET's grid over [lo, hi] at ``bits`` (see the module docstring)."""
    if bits < 2:
        raise InternalError(f"an encoding needs at least 2 bits; got {bits}")
    lo = min(0.0, float(lo))
    hi = max(0.0, float(hi), lo + MIN_RANGE)
    if symmetric:
        positive_steps = 2 ** (bits - 1) - 1
        scale = max(abs(lo), abs(hi)) / positive_steps
        offset = -(positive_steps + 1)
        return Encoding(bits, True, scale, offset, scale * offset, scale * positive_steps)
    steps = 2**bits - 1
    scale = (hi - lo) / steps
    offset = round(lo / scale)
    grid_min = offset * scale
    return Encoding(bits, False, scale, int(offset), grid_min, grid_min + steps * scale)


def _entry_061(e: Encoding) -> dict[str, Any]:
    return {
        "bitwidth": e.bitwidth,
        "dtype": "int",
        "is_symmetric": str(e.symmetric),
        "max": e.max,
        "min": e.min,
        "offset": e.offset,
        "scale": e.scale,
    }


def _entry_100(name: str, encodings: Sequence[Encoding]) -> dict[str, Any]:
    return {
        "name": name,
        "enc_type": "PER_TENSOR" if len(encodings) == 1 else "PER_CHANNEL",
        "dtype": "INT",
        "bw": encodings[0].bitwidth,
        "is_sym": encodings[0].symmetric,
        "scale": [e.scale for e in encodings],
        "offset": [e.offset for e in encodings],
    }


def _weight_encodings(
    plan: ExportPlan, rec: Recommendation, name: str, bits: int, *, symmetric: bool, per_channel: bool
) -> list[Encoding]:
    axis = channel_axis(plan.model, name) if per_channel else None
    if axis is None:
        lo, hi = tensor_range(plan, rec, name)
        return [encoding_from_range(lo, hi, bits, symmetric=symmetric)]
    init = next(t for t in plan.model.graph.initializer if t.name == name)
    values = np.moveaxis(numpy_helper.to_array(init), axis, 0).reshape(init.dims[axis], -1)
    return [
        encoding_from_range(float(row.min()), float(row.max()), bits, symmetric=symmetric)
        for row in values.astype(np.float64)
    ]


def _channel_format(rec: Recommendation, name: str) -> bool:
    """Whether a format recommendation (``recommend --formats``) quantizes ``name`` per channel."""
    fmt = rec.weight_formats.get(name)
    return fmt is not None and parse_format(fmt).granularity is Granularity.CHANNEL


def _build(
    rec: Recommendation, model: onnx.ModelProto, *, version: str, per_channel: bool
) -> tuple[dict[str, Any], ExportPlan]:
    if version not in VERSIONS:
        raise FitonnxError(f"expected an encodings version among {list(VERSIONS)}; found {version!r}")
    plan = plan_export(model, rec, QNN)
    weight_sym = plan.target.weight_scheme is Scheme.SYMMETRIC
    act_sym = plan.target.activation_scheme is Scheme.SYMMETRIC
    params = {
        name: _weight_encodings(
            plan, rec, name, bits, symmetric=weight_sym, per_channel=per_channel or _channel_format(rec, name)
        )
        for name, bits in plan.weights.items()
    }
    acts = {
        name: [encoding_from_range(*tensor_range(plan, rec, name), bits, symmetric=act_sym)]
        for name, bits in plan.activations.items()
    }
    floats = {name: (rec.weight_bits.get(name) or rec.activation_bits[name]) for name in plan.kept_float}
    float_params = {n: b for n, b in floats.items() if n in rec.weight_bits}
    float_acts = {n: b for n, b in floats.items() if n not in rec.weight_bits}
    if version == "0.6.1":
        doc: dict[str, Any] = {
            "version": version,
            "activation_encodings": {
                **{n: [_entry_061(e) for e in es] for n, es in acts.items()},
                **{n: [{"bitwidth": b, "dtype": "float"}] for n, b in float_acts.items()},
            },
            "param_encodings": {
                **{n: [_entry_061(e) for e in es] for n, es in params.items()},
                **{n: [{"bitwidth": b, "dtype": "float"}] for n, b in float_params.items()},
            },
            "excluded_layers": [],
            "quantizer_args": {
                "activation_bitwidth": _most_common(plan.activations.values(), plan.target.default_activation_bits),
                "dtype": "int",
                "is_symmetric": str(weight_sym),
                "param_bitwidth": _most_common(plan.weights.values(), 8),
                "per_channel_quantization": str(per_channel),
                "quant_scheme": QUANT_SCHEME,
            },
        }
    else:
        doc = {
            "version": version,
            "activation_encodings": [_entry_100(n, es) for n, es in acts.items()]
            + [{"name": n, "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": b} for n, b in float_acts.items()],
            "param_encodings": [_entry_100(n, es) for n, es in params.items()]
            + [{"name": n, "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": b} for n, b in float_params.items()],
            "excluded_layers": [],
        }
    return doc, plan


def _most_common(values: Any, default: int) -> int:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else default


def write_encodings(
    model: onnx.ModelProto,
    rec: Recommendation,
    out: Path,
    *,
    data: Dataset | None = None,
    per_channel: bool = False,
    version: str = "0.6.1",
) -> ExportResult:
    """Write the QNN/AIMET encodings file (0.6.1 by default) from the recommendation's ranges."""
    del data  # scales come from the recommendation's ranges (and the weights themselves)
    doc, plan = _build(rec, model, version=version, per_channel=per_channel)
    text = json_text(doc)
    write_atomic(out, lambda f: f.write(text))
    notes = []
    if plan.unlisted:
        notes.append(
            f"{len(plan.unlisted)} quantizable tensors have no encoding; run the QNN converter with --float_fallback"
        )
    fmt = "qnn" if version == "0.6.1" else f"qnn-{version}"
    return ExportResult(fmt, out, dict(plan.quantized), plan.float_tensors, tuple(notes))


def write_encodings_v1(
    model: onnx.ModelProto, rec: Recommendation, out: Path, *, data: Dataset | None = None, per_channel: bool = False
) -> ExportResult:
    """Write the QNN/AIMET encodings file in layout 1.0.0."""
    return write_encodings(model, rec, out, data=data, per_channel=per_channel, version="1.0.0")
