"""Steps every subcommand shares: opening a model with its data, warnings as lines, sample counts."""

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


def open_session(model: str, data: str | None, random_samples: int | None, seed: int) -> api.Session:
    """``api.open_model`` with its warnings shown."""
    with echo_warnings():
        return api.open_model(model, data, random_samples=random_samples, seed=seed)


def samples_to_use(session: api.Session, max_samples: int | None) -> int:
    """How many calibration samples a Fisher pass will process (the progress bar's length)."""
    n = session.data.num_samples
    return n if max_samples is None else min(max_samples, n)
