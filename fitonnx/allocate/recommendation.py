"""The recommendation: per-tensor bit widths chosen under a budget, and its JSON form.

Produced by ``allocate`` (``fitonnx recommend``), consumed by the exporters (``fitonnx export``),
and editable by hand in between, so the JSON form is the contract between the two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitonnx.errors import FitonnxError
from fitonnx.files.atomic import write_atomic
from fitonnx.files.outputs import json_text

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ParetoPoint:
    """One point of the FIT-against-size front (weights' bytes at the chosen bits)."""

    weight_bytes: int
    avg_weight_bits: float
    fit: float
    weight_bits: Mapping[str, int]
    weight_formats: Mapping[str, str] = field(default_factory=dict)  # a format recommendation's


@dataclass(frozen=True)
class Recommendation:
    """Bit widths per tensor for one target, with what the exporters need to write them.

    ``weight_bits``/``activation_bits`` map ONNX tensor names (weights: initializer names of the
    ORIGINAL model; activations: tensor names) to bit widths. What a bit width means for a target
    (e.g. 16 = float16 for TensorRT) is the target's business (``fitonnx.targets``).
    ``ranges`` holds the calibration min/max per tensor, so exporters need no data to write scales.
    """

    model: str
    target: str
    weight_bits: Mapping[str, int]
    activation_bits: Mapping[str, int]
    fit: float
    weight_bytes: int
    ranges: Mapping[str, tuple[float, float]]
    budget: Mapping[str, float] = field(default_factory=dict)  # e.g. {"avg_bits": 4.0}
    fit_per_tensor: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    pareto: tuple[ParetoPoint, ...] = ()
    noise_model: str = "uniform"  # fitonnx.noise.NoiseModel the FIT values were computed with
    # Tensors named here as in the original model but scored under another name (fitonnx.rename).
    scored_as: Mapping[str, str] = field(default_factory=dict)
    # ``recommend --formats``: the format of each tensor (``fitonnx.formats`` names; the bits
    # above are then their element widths) and each candidate format's FIT. Empty otherwise.
    weight_formats: Mapping[str, str] = field(default_factory=dict)
    activation_formats: Mapping[str, str] = field(default_factory=dict)
    fit_per_format: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # where each activation's FIT comes from: "in-graph" (per-sample statistics) or "range" (Tr(F)·Δ²/12)
    activation_fit_models: Mapping[str, str] = field(default_factory=dict)

    @property
    def by_format(self) -> bool:
        return bool(self.weight_formats or self.activation_formats)

    def to_dict(self) -> dict[str, Any]:
        out = self._bits_dict()
        if self.by_format:
            out["weight_formats"] = dict(self.weight_formats)
            out["activation_formats"] = dict(self.activation_formats)
            out["fit_per_format"] = {k: dict(v) for k, v in self.fit_per_format.items()}
            out["activation_fit_models"] = dict(self.activation_fit_models)
            for point, entry in zip(self.pareto, out["pareto"], strict=True):
                entry["weight_formats"] = dict(point.weight_formats)
        return out

    def _bits_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "target": self.target,
            "budget": dict(self.budget),
            "weight_bits": dict(self.weight_bits),
            "activation_bits": dict(self.activation_bits),
            "fit": self.fit,
            "weight_bytes": self.weight_bytes,
            "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ranges.items()},
            "fit_per_tensor": {k: {str(b): v for b, v in d.items()} for k, d in self.fit_per_tensor.items()},
            "noise_model": self.noise_model,
            "scored_as": dict(self.scored_as),
            "pareto": [
                {
                    "weight_bytes": p.weight_bytes,
                    "avg_weight_bits": p.avg_weight_bits,
                    "fit": p.fit,
                    "weight_bits": dict(p.weight_bits),
                }
                for p in self.pareto
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> Recommendation:
        try:
            return cls(
                model=str(d["model"]),
                target=str(d["target"]),
                weight_bits={str(k): int(v) for k, v in d["weight_bits"].items()},
                activation_bits={str(k): int(v) for k, v in d["activation_bits"].items()},
                fit=float(d["fit"]),
                weight_bytes=int(d["weight_bytes"]),
                ranges={str(k): (float(v[0]), float(v[1])) for k, v in d.get("ranges", {}).items()},
                budget={str(k): float(v) for k, v in d.get("budget", {}).items()},
                fit_per_tensor={
                    str(k): {int(b): float(x) for b, x in v.items()} for k, v in d.get("fit_per_tensor", {}).items()
                },
                pareto=tuple(
                    ParetoPoint(
                        int(p["weight_bytes"]),
                        float(p["avg_weight_bits"]),
                        float(p["fit"]),
                        {str(k): int(v) for k, v in p["weight_bits"].items()},
                        {str(k): str(v) for k, v in p.get("weight_formats", {}).items()},
                    )
                    for p in d.get("pareto", [])
                ),
                noise_model=str(d.get("noise_model", "uniform")),
                scored_as={str(k): str(v) for k, v in d.get("scored_as", {}).items()},
                weight_formats={str(k): str(v) for k, v in d.get("weight_formats", {}).items()},
                activation_formats={str(k): str(v) for k, v in d.get("activation_formats", {}).items()},
                fit_per_format={
                    str(k): {str(f): float(x) for f, x in v.items()} for k, v in d.get("fit_per_format", {}).items()
                },
                activation_fit_models={str(k): str(v) for k, v in d.get("activation_fit_models", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise FitonnxError(
                f"expected a fitonnx recommendation.json (keys weight_bits, activation_bits, fit, ...) in {source}; "
                f"found a problem: {type(exc).__name__}: {exc}"
            ) from None


def save(rec: Recommendation, path: str | os.PathLike[str]) -> None:

    text = json_text(rec.to_dict())
    write_atomic(path, lambda f: f.write(text))


def load(path: str | os.PathLike[str]) -> Recommendation:
    p = Path(path)
    if not p.is_file():
        raise FitonnxError(f"expected a recommendation.json at {str(p)!r}; no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FitonnxError(f"expected JSON in {str(p)!r}; could not parse it ({exc})") from None
    if not isinstance(data, dict):
        raise FitonnxError(f"expected a JSON object in {str(p)!r}; found {type(data).__name__}")
    return Recommendation.from_dict(data, source=repr(str(p)))
