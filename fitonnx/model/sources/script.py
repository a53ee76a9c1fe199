"""A user's data-loader script, Polygraphy's convention: ``file.py[:function]`` where the function
(default ``load_data``) returns or yields feed dicts {input name: array}; a ``labels`` entry is the
sample's labels. Each feed is one sample, fed to the model as the script gave it."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitonnx.errors import DataError
from fitonnx.model.data import LABELS_KEY, Dataset
from fitonnx.model.graph import InputSpec

DEFAULT_FUNCTION = "load_data"


@dataclass(frozen=True)
class LoaderScript:
    """``path`` of a Python file and the ``function`` in it that yields feed dicts."""

    path: str
    function: str = DEFAULT_FUNCTION

    @classmethod
    def parse(cls, text: str) -> LoaderScript:
        """``file.py`` or ``file.py:function`` (a Windows drive letter's colon is not a separator)."""
        head, sep, tail = text.rpartition(":")
        if sep and head.endswith(".py") and tail.isidentifier():
            return cls(head, tail)
        return cls(text)


def is_script(text: str) -> bool:
    """True for ``something.py`` or ``something.py:function``."""
    return LoaderScript.parse(text).path.endswith(".py")


def _function(script: LoaderScript):
    path = Path(script.path)
    if not path.is_file():
        raise DataError(f"expected a data-loader script at {script.path!r}; no such file")
    spec = importlib.util.spec_from_file_location(f"fitonnx_data_loader_{abs(hash(str(path.resolve())))}", path)
    if spec is None or spec.loader is None:
        raise DataError(f"expected a Python file at {script.path!r}; could not load it")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # the script may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise DataError(f"expected {script.path!r} to run; it raised {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, script.function, None)
    if not callable(fn):
        raise DataError(
            f"expected a function {script.function!r} in {script.path!r}",
            hint="name it with --data-loader-script file.py:function (Polygraphy's default name is load_data)",
        )
    return fn


def load_script(script: LoaderScript, specs: Mapping[str, InputSpec], limit: int | None = None) -> Dataset:
    """Call the script's function and stack its feeds (at most ``limit``) into a ``Dataset``."""
    fn = _function(script)
    try:
        feeds = list(itertools.islice(iter(fn()), limit))
    except Exception as exc:
        raise DataError(
            f"expected {script.path}:{script.function}() to yield feed dicts; it raised {type(exc).__name__}: {exc}"
        ) from None
    if not feeds or not all(isinstance(f, Mapping) for f in feeds):
        raise DataError(
            f"expected {script.path}:{script.function}() to yield at least one dict "
            "{input name: array}; found " + (type(feeds[0]).__name__ if feeds else "none")
        )
    keys = set(feeds[0])
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(keys):
        items = [np.asarray(f.get(name)) for f in feeds]
        shapes = {a.shape for a in items}
        if any(name not in f for f in feeds) or len(shapes) > 1:
            raise DataError(f"expected {name!r} in every feed with one shape; found shapes {sorted(shapes)}")
        spec = specs.get(name)
        arrays[name] = np.stack(items).astype(spec.dtype if spec is not None else items[0].dtype, copy=False)
    labels = arrays.pop(LABELS_KEY, None)
    return Dataset(arrays=arrays, labels=labels, source=f"{script.path}:{script.function}")
