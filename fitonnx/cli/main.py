"""Entry point: the ``fitonnx`` group. User errors are caught here, once, and printed as one line."""

from __future__ import annotations

import signal
import sys

import click

from fitonnx import __version__
from fitonnx.cli.compare import compare_command
from fitonnx.cli.data import data_command
from fitonnx.cli.export import export_command
from fitonnx.cli.inspect import inspect_command
from fitonnx.cli.progress import NORMAL, QUIET, VERBOSE
from fitonnx.cli.recommend import recommend_command
from fitonnx.cli.score import score_command
from fitonnx.cli.validate import validate_command
from fitonnx.errors import FitonnxError
from fitonnx.files import Interrupted, interrupts_raise
from fitonnx.model.runtime import ORT_HINT, describe_onnxruntime_error, is_onnxruntime_error

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def _fail(message: str, hint: str | None, code: int) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(code)


class FitonnxGroup(click.Group):
    """Turns ``FitonnxError`` (and onnxruntime's failures) into ``error: ...`` plus a hint on stderr
    and exit code 2; SIGINT/SIGTERM into exit 130/143 after the outputs in progress are removed."""

    def invoke(self, ctx: click.Context):
        try:
            with interrupts_raise():
                return super().invoke(ctx)
        except FitonnxError as exc:
            _fail(exc.message, exc.hint, EXIT_USER_ERROR)
        except Interrupted as exc:
            _fail(f"interrupted by {exc}; no partial output was left", None, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; no partial output was left", None, EXIT_INTERRUPTED)
        except Exception as exc:
            interrupted = _interruption(exc)
            if interrupted is not None:
                _fail(f"interrupted by {interrupted}; no partial output was left", None, interrupted.exit_code)
            if not is_onnxruntime_error(exc):
                raise
            _fail(describe_onnxruntime_error(exc), ORT_HINT, EXIT_USER_ERROR)


def _interruption(exc: BaseException) -> Interrupted | None:
    """The ``Interrupted`` behind ``exc``, if a signal raised it inside code that wraps exceptions
    (Python 3.11 turns one raised during a class's ``__set_name__``, e.g. mid-import, into a RuntimeError)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, Interrupted):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@click.group(cls=FitonnxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="fitonnx")
@click.option("-v", "--verbose", count=True, help="Say more: a timed line per stage even without a terminal.")
@click.option("-q", "--quiet", is_flag=True, help="Say less: no progress, no 'wrote' lines or notes (errors stay).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """fitonnx: which tensors of an ONNX model can live in 2, 4 or 8 bits (FIT, ICLR 2023).

    Start with `fitonnx data MODEL my_images/ -o calib.npz`, then `fitonnx score MODEL --data calib.npz`."""
    if verbose and quiet:
        raise click.UsageError("give -v or -q, not both")
    ctx.obj = {"verbosity": QUIET if quiet else VERBOSE if verbose else NORMAL}


cli.add_command(data_command)
cli.add_command(score_command)
cli.add_command(inspect_command)
cli.add_command(validate_command)
cli.add_command(recommend_command)
cli.add_command(export_command)
cli.add_command(compare_command)


def main() -> None:
    """The console entry point. A signal arriving while the interpreter shuts down, after the
    command has finished (and its outputs are in place), is ignored rather than aborting it."""
    try:
        cli()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
