"""Which installed distributions provide the ``onnxruntime`` module, and refusing two at once.

onnxruntime, onnxruntime-gpu, onnxruntime-training(-cpu) and the vendor builds (DirectML,
OpenVINO, QNN) all install the same ``onnxruntime/`` package. With two of them installed the files
of one overwrite the other's, and ``import onnxruntime`` gives a mix of both (seen: a 1.19 module
without ``SessionOptions`` after uninstalling the other). fitonnx checks this once, on import.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass

from fitonnx.errors import FitonnxError

MODULE = "onnxruntime"


@dataclass(frozen=True)
class Provider:
    """One installed distribution that provides the ``onnxruntime`` module."""

    name: str
    version: str


def _provides_module(dist: metadata.Distribution) -> bool:
    top = (dist.read_text("top_level.txt") or "").split()
    if MODULE in top:
        return True
    return any(str(f).startswith(f"{MODULE}/") for f in (dist.files or ()))


def runtime_providers() -> tuple[Provider, ...]:
    """Every installed distribution whose files include the ``onnxruntime`` package, by name."""
    seen: dict[str, Provider] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().startswith(MODULE) and _provides_module(dist):
            seen.setdefault(name.lower(), Provider(name, dist.version))
    return tuple(sorted(seen.values(), key=lambda p: p.name.lower()))


def check_single_runtime(providers: tuple[Provider, ...] | None = None) -> None:
    """Refuse an environment where two distributions both provide ``onnxruntime``."""
    found = runtime_providers() if providers is None else providers
    if len(found) > 1:
        names = ", ".join(f"{p.name} {p.version}" for p in found)
        keep = found[0].name
        raise FitonnxError(
            f"expected one distribution providing the onnxruntime module; found {len(found)}: {names}",
            hint=f"uninstall them all, then install one (e.g. pip uninstall -y {' '.join(p.name for p in found)} "
            f"&& pip install {keep})",
        )
