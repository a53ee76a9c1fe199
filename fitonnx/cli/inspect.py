"""``fitonnx inspect``: quantizable tensors, prepare changes and unsupported ops of a model, without data."""

from __future__ import annotations

from typing import Any

import click

from fitonnx.analysis.inspection import inspect_model
from fitonnx.cli.common import echo_for, output_plan, target_path
from fitonnx.cli.options import force_option
from fitonnx.render import inspection as view


class InputShape(click.ParamType):
    """``NAME=D1,D2,...``: a static shape for one model input."""

    name = "name=dims"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, tuple[int, ...]]:
        if isinstance(value, tuple):
            return value
        name, sep, dims = str(value).partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 1 for d in shape):
            self.fail(
                f"expected NAME=D1,D2,... with positive sizes, e.g. input=1,3,224,224; found {value!r}", param, ctx
            )
        return name, shape


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the inspection as JSON here (- for stdout)."
)
@click.option(
    "--input-shape",
    "input_shapes",
    type=InputShape(),
    multiple=True,
    help="Fix an input's symbolic sizes, as scoring does from the data (repeatable), e.g. x=1,3,224,224.",
)
@force_option
def inspect_command(
    model: str, json_path: str | None, input_shapes: tuple[tuple[str, tuple[int, ...]], ...], force: bool
) -> None:
    """List MODEL's quantizable weights and activations, what fitonnx changes to differentiate it, and what it cannot."""
    plan = output_plan([model], force=force)
    json_out = target_path(plan.file("--json", json_path, stdout_ok=True))
    echo = echo_for(plan)
    result = inspect_model(model, input_shapes=dict(input_shapes) or None)
    echo(view.format_inspection(result))
    if json_out:
        view.write_json(result, json_out)
        echo(f"wrote {json_path}")
