"""Steps every subcommand shares: warnings as lines, the data source from the data options."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import click

from fitonnx import api
from fitonnx.files import STDOUT, OutputPlan, Target, model_inputs
from fitonnx.model import data as data_mod
from fitonnx.score.run import DegenerateTraceWarning


@contextmanager
def echo_warnings() -> Iterator[None]:
    """Print fitonnx's warnings (random data, ...) as one yellow ``warning:`` line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", api.RandomDataWarning)
        warnings.simplefilter("always", DegenerateTraceWarning)
        yield
    for w in caught:
        click.secho(f"warning: {w.message}", fg="yellow", err=True)


def data_source(data: str | None, random_samples: int | None, seed: int) -> api.DataSource:
    """What ``--data`` / ``--random-data N`` ask for, as the API's data source."""
    return api.RandomData(random_samples, seed) if random_samples is not None else data


def output_plan(
    models: Sequence[str],
    data: Sequence[str | None] = (),
    others: Sequence[tuple[str, str | None]] = (),
    *,
    force: bool = False,
) -> OutputPlan:
    """The inputs of a command (models with their external data and bundled calibration files,
    ``--data``, and ``others``) against which every output path is checked before any work."""
    inputs: list[tuple[str, str | Path | None]] = []
    for model in models:
        inputs += model_inputs(model)
        sidecar = data_mod.sidecar_for(Path(model)) if Path(model).is_file() else None
        if sidecar is not None:
            inputs.append(("the model's bundled calibration data", sidecar))
    inputs += [("the calibration data", d) for d in data if d]
    inputs += list(others)
    return OutputPlan(inputs, force=force)


def echo_for(plan: OutputPlan) -> Callable[[str], None]:
    """``click.echo`` to standard output, or to standard error when an output is ``-`` (stdout is the data)."""
    to_err = any(t.stdout for t in plan.targets)
    return lambda text: click.echo(text, err=to_err)


def target_path(target: Target | None) -> str | None:
    """What a writer takes for a checked target: its path, ``-`` for standard output, None if not asked."""
    if target is None:
        return None
    return STDOUT if target.path is None else str(target.path)


@contextmanager
def parent_made(target: Target) -> Iterator[Path]:
    """The target's path, its folder created first when ``--out new/`` asked for one (removed again,
    if still empty, when the command fails)."""
    assert target.path is not None
    made = target.create_parent and not target.path.parent.exists()
    if made:
        target.path.parent.mkdir()
    try:
        yield target.path
    except BaseException:
        if made:
            with suppress(OSError):
                target.path.parent.rmdir()
        raise
