"""Steps every subcommand shares: warnings as lines, the data source from the data options."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import click

from fitonnx import api


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
