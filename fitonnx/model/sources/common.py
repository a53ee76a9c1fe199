"""What every builder shares: the result, the inputs it fills with constants, the preview."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fitonnx.errors import DataError
from fitonnx.files.atomic import write_atomic
from fitonnx.model.data import LABELS_KEY, Dataset
from fitonnx.model.graph import InputSpec


@dataclass(frozen=True)
class Built:
    """A built ``dataset``, the files read and skipped (with why), and notes for the preview."""

    dataset: Dataset
    kind: str
    files: int
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())


def collect_files(root: str | Path, suffixes: Sequence[str], what: str) -> list[Path]:
    """``root`` itself (a file) or every file under it (recursively) with one of ``suffixes``, sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"expected a folder or a file of {what} at {str(root)!r}; no such path")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"expected {what} ({', '.join(suffixes)}) under {str(root)!r}; found none")
    return files


def pick_input(specs: Mapping[str, InputSpec], name: str | None, wanted: str, accept) -> InputSpec:
    """The input named ``name``, else the only input ``accept`` takes; an error naming the choices else."""
    if name is not None:
        if name not in specs:
            raise DataError(f"expected an input named {name!r}; the model has {sorted(specs)}")
        return specs[name]
    fits = [s for s in specs.values() if accept(s)]
    if len(fits) != 1:
        raise DataError(
            f"expected one model input for {wanted}; found {[s.name for s in fits] or 'none'} among "
            f"{[f'{s.name} {s.display()} {s.dtype}' for s in specs.values()]}",
            hint="name it with --input NAME",
        )
    return fits[0]


def parse_fill(items: Sequence[str]) -> dict[str, float]:
    """``NAME=VALUE`` pairs (``--fill sr=16000``) as a dict."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise DataError(f"expected --fill NAME=NUMBER (e.g. sr=16000); found {item!r}")
    return out


def complete(
    arrays: dict[str, np.ndarray], specs: Mapping[str, InputSpec], fill: Mapping[str, float]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The other model inputs as constants (0 or ``fill``), one per sample, when their shape is fixed."""
    n = next(iter(arrays.values())).shape[0]
    notes = []
    unknown = sorted(set(fill) - set(specs))
    if unknown:
        raise DataError(f"expected --fill names among the model inputs {sorted(specs)}; found {unknown}")
    for name, spec in specs.items():
        if name in arrays:
            continue
        if any(d is None for d in spec.shape):
            raise DataError(
                f"expected a fixed shape for input {name!r} to fill it with a constant; it is {spec.display()}",
                hint="write a data-loader script (--data-loader-script file.py) for models with such inputs",
            )
        value = fill.get(name, 0.0)
        arrays[name] = np.full((n, *spec.shape), value, dtype=spec.dtype)
        notes.append(f"input {name!r} {spec.display()} filled with {value:g} (--fill {name}=VALUE to change)")
    return arrays, tuple(notes)


def preview(built: Built) -> str:
    """What was built: counts, and per array its shape, dtype and value range."""
    ds = built.dataset
    lines = [f"{built.kind}: {ds.num_samples} samples from {built.files} files ({ds.source})"]
    items = dict(ds.arrays)
    if ds.labels is not None:
        items[LABELS_KEY] = ds.labels
    for name, a in items.items():
        rng = f"min {a.min():.4g}, max {a.max():.4g}, mean {a.astype(np.float64).mean():.4g}" if a.size else "empty"
        lines.append(f"  {name}: shape {list(a.shape)} {a.dtype}; {rng}")
    lines.extend(f"  skipped {path}: {why}" for path, why in built.skipped[:10])
    if len(built.skipped) > 10:
        lines.append(f"  ... {len(built.skipped) - 10} more skipped")
    lines.extend(f"  note: {n}" for n in built.notes)
    return "\n".join(lines)


def write_npz(dataset: Dataset, path: str | Path) -> None:
    """The dataset as an .npz ``--data`` reads back (keys = input names, optional ``labels``)."""
    arrays = dict(dataset.arrays)
    if dataset.labels is not None:
        arrays[LABELS_KEY] = dataset.labels
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
