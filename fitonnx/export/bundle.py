"""Everything ``fitonnx recommend`` writes into its ``--out`` folder, each file atomically.

recommendation.json, pareto.json, pareto.csv, pareto.png (with matplotlib), the annotated model
``<model>.annotated.onnx``, and the files of the exporters the target implies (``Target.formats``,
looked up in ``fitonnx.export.EXPORTERS``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from fitonnx.allocate import recommendation as rec_mod
from fitonnx.allocate.knapsack import Allocation
from fitonnx.errors import FitonnxError
from fitonnx.export.annotate import annotated_path, write_annotated
from fitonnx.export.registry import get_exporter
from fitonnx.export.rename import OriginFn, for_original
from fitonnx.model.data import Dataset

RECOMMENDATION_JSON = "recommendation.json"
PARETO_JSON = "pareto.json"
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"

# Writes the front's views (pareto.json, .csv, .png) into the folder: the files written and notes.
# The render stage has them; ``api`` passes its writer in, since export sits below render.
FrontWriter = Callable[[Allocation, Path], tuple[list[Path], list[str]]]


@dataclass(frozen=True)
class Written:
    """The files written, and what was not written and why."""

    paths: tuple[Path, ...]
    notes: tuple[str, ...]
    recommendation: rec_mod.Recommendation | None = None  # as written: in the original model's names


def planned_paths(out_dir: Path, model_name: str) -> tuple[Path, ...]:
    """The files ``write_outputs`` writes itself (exporters check their own)."""
    fixed = (RECOMMENDATION_JSON, PARETO_JSON, PARETO_CSV, PARETO_PNG)
    return (*(out_dir / name for name in fixed), annotated_path(out_dir, model_name))


def prepare_out_dir(out_dir: str | os.PathLike[str], source: Path | None, model_name: str) -> Path:
    """Create ``out_dir`` if missing, refusing a folder where an output would replace the input model.

    Called before scoring, so a bad ``--out`` fails at once.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FitonnxError(f"expected --out to be a folder; found the file {str(out)!r}")
    if source is not None:
        for path in planned_paths(out, model_name):
            if path.exists() and path.resolve() == source.resolve():
                raise FitonnxError(
                    f"expected outputs that leave the input model alone; {str(path)!r} would overwrite it",
                    hint="choose another --out folder",
                )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_outputs(
    alloc: Allocation,
    model: onnx.ModelProto,
    out_dir: str | os.PathLike[str],
    *,
    source: Path | None = None,
    data: Dataset | None = None,
    formats: tuple[str, ...] | None = None,
    origin_of: OriginFn | None = None,
    front: FrontWriter | None = None,
) -> Written:
    """Write the recommendation, its front and its exports into ``out_dir`` (which must exist).

    ``model`` is the ORIGINAL model (the exports annotate and quantize it, not fitonnx's prepared
    twin); ``origin_of`` (``PreparedModel.origin_of``) maps the scored tensors back to its names
    (``fitonnx.rename``); ``data`` is the calibration data exporters calibrate on; ``formats``
    defaults to the target's; ``front`` writes the Pareto front's files (none without it).
    """
    out = Path(out_dir)
    rec = alloc.recommendation
    paths: list[Path] = []
    notes: list[str] = []
    if origin_of is not None:
        rec, renames = for_original(rec, model, origin_of)
        notes += renames
    rec_mod.save(rec, out / RECOMMENDATION_JSON)
    paths.append(out / RECOMMENDATION_JSON)
    if front is not None:
        paths_front, notes_front = front(alloc, out)
        paths += paths_front
        notes += notes_front
    paths.append(write_annotated(model, rec, out, source=source))
    for fmt in alloc.target.formats if formats is None else formats:
        paths_fmt, notes_fmt = _export(fmt, model, rec, out, source=source, data=data)
        paths += paths_fmt
        notes += notes_fmt
    return Written(tuple(paths), tuple(notes), rec)


def _export(
    fmt: str,
    model: onnx.ModelProto,
    rec: rec_mod.Recommendation,
    out: Path,
    *,
    source: Path | None,
    data: Dataset | None,
) -> tuple[list[Path], list[str]]:
    """Run one exporter of ``fitonnx.export.EXPORTERS`` into ``out`` under its default file name."""
    result = get_exporter(fmt)(model, rec, out, data=data, source=source)
    return [result.path], [f"{fmt}: {note}" for note in result.notes]
