"""Entry point: the ``fitonnx`` group. User errors are caught here, once, and printed as one line."""

from __future__ import annotations

import sys

import click

from fitonnx import __version__
from fitonnx.cli.score import score_command
from fitonnx.errors import FitonnxError

EXIT_USER_ERROR = 2


class FitonnxGroup(click.Group):
    """Turns ``FitonnxError`` into ``error: ...`` plus a hint on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FitonnxError as exc:
            click.secho(f"error: {exc.message}", fg="red", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(EXIT_USER_ERROR)


@click.group(cls=FitonnxGroup)
@click.version_option(__version__, prog_name="fitonnx")
def cli() -> None:
    """fitonnx: which tensors of an ONNX model can live in 2, 4 or 8 bits (FIT, ICLR 2023)."""


cli.add_command(score_command)


def main() -> None:
    cli()
