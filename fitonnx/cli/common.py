"""Steps every subcommand shares: warnings as lines, the data source from the data options, files
or stdout (``-``) for JSON/CSV, the one rule for optional plots, and the table width."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from fitonnx import api
from fitonnx.cli.progress import QUIET, info, verbosity
from fitonnx.render.plot import MISSING_MATPLOTLIB

STDOUT = "-"


def wide_option(f):
    """--wide: full tensor names in the terminal tables, whatever the terminal's width."""
    return click.option("--wide", is_flag=True, help="Full tensor names in the table (JSON/CSV always have them).")(f)


def table_width(wide: bool) -> int | None:
    """The terminal's width for tables (COLUMNS, else the terminal, else 100), or None with ``--wide``."""
    return None if wide else shutil.get_terminal_size((100, 24)).columns


def to_stdout(*paths: str | None) -> bool:
    """True when one of the outputs is ``-`` (stdout): the table then goes to stderr."""
    return STDOUT in paths


def echo_table(text: str, *outputs: str | None) -> None:
    """The terminal table on stdout, or on stderr when stdout carries a JSON/CSV output."""
    if to_stdout(*outputs):
        if verbosity() > QUIET:
            click.echo(text, err=True)
    else:
        click.echo(text)


def write_output(path: str, write: Callable[[str | os.PathLike[str]], None], *others: str | None) -> None:
    """``write(path)``, or for ``-`` the same bytes on stdout (a writer needs a file: a temporary one);
    ``others``: the command's other outputs (a ``wrote`` line goes to stderr when one of them is ``-``)."""
    if path != STDOUT:
        write(path)
        info(f"wrote {path}", err=to_stdout(*others))
        return
    with tempfile.TemporaryDirectory(prefix="fitonnx-") as tmp:
        out = Path(tmp) / "out"
        write(out)
        click.echo(out.read_text(encoding="utf-8"), nl=False)


def note(message: str) -> None:
    """A ``note:`` line on stderr (what was not written and why), unless ``-q``."""
    if verbosity() > QUIET:
        click.secho(f"note: {message}", fg="yellow", err=True)


def write_plot(path: str, write: Callable[[str], bool]) -> None:
    """The one rule for optional figures: ``write`` returns False without matplotlib; then a note,
    and every other output is written all the same."""
    if write(path):
        info(f"wrote {path}")
    else:
        note(f"no {path}: {MISSING_MATPLOTLIB}")


@contextmanager
def echo_warnings() -> Iterator[None]:
    """Print fitonnx's warnings (random data, ...) as one yellow ``warning:`` line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", api.RandomDataWarning)
        yield
    for w in caught:
        click.secho(f"warning: {w.message}", fg="yellow", err=True)


def data_source(data: str | None, random_samples: int | None, seed: int) -> api.DataSource:
    """What ``--data`` / ``--random-data N`` ask for, as the API's data source."""
    return api.RandomData(random_samples, seed) if random_samples is not None else data
