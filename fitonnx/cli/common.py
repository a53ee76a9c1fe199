"""Steps every subcommand shares: warnings as lines, the data source from the data options, the
checked outputs, the one rule for optional plots, and the table width."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import click

from fitonnx import api
from fitonnx.cli.progress import QUIET, info, verbosity
from fitonnx.files import STDOUT, OutputPlan, Target, model_inputs
from fitonnx.model import data as data_mod
from fitonnx.model.sources.script import LoaderScript
from fitonnx.render.plot import MISSING_MATPLOTLIB
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
    inputs += [("the calibration data", d.path if isinstance(d, LoaderScript) else d) for d in data if d]
    inputs += list(others)
    return OutputPlan(inputs, force=force)


def echo_for(plan: OutputPlan) -> Callable[[str], None]:
    """``click.echo`` to standard output, or to standard error when an output is ``-`` (stdout is the data)."""
    to_err = any(t.stdout for t in plan.targets)

    def echo(text: str) -> None:
        if text.startswith("wrote ") and verbosity() <= QUIET:
            return  # -q: the results, not the file list
        click.echo(text, err=to_err)

    return echo


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


def wide_option(f):
    """--wide: full tensor names in the terminal tables, whatever the terminal's width."""
    return click.option("--wide", is_flag=True, help="Full tensor names in the table (JSON/CSV always have them).")(f)


def table_width(wide: bool) -> int | None:
    """The terminal's width for tables (COLUMNS, else the terminal, else 100), or None with ``--wide``."""
    return None if wide else shutil.get_terminal_size((100, 24)).columns


def note(message: str) -> None:
    """A ``note:`` line on stderr (what was not written and why), unless ``-q``."""
    if verbosity() > QUIET:
        click.secho(f"note: {message}", fg="yellow", err=True)


def write_plot(path: str, write: Callable[[str], bool], echo: Callable[[str], None] = info) -> None:
    """The one rule for optional figures: ``write`` returns False without matplotlib; then a note,
    and every other output is written all the same."""
    if write(path):
        echo(f"wrote {path}")
    else:
        note(f"no {path}: {MISSING_MATPLOTLIB}")
