"""``FisherOptions``: how the Fisher is estimated, one typed value for every entry point.

``score``, ``recommend``, ``validate`` and ``compare`` (and their subcommands, through the shared
``--fisher``/``--likelihood``/... option group) all take the same choices: which Fisher, which
output and how to read it, how many samples, and the seed. They travel together as one frozen
value instead of seven keyword arguments repeated through every layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fitonnx.errors import FitonnxError
from fitonnx.fisher import engine, engines
from fitonnx.fisher.losses import FisherMode, Likelihood
from fitonnx.fisher.outputs import KindSpec, parse_output_kind
from fitonnx.model.runtime import check_device
from fitonnx.scale import Workers


def _enum(kind: type[FisherMode] | type[Likelihood], value: object, flag: str) -> FisherMode | Likelihood | None:
    if value is None or isinstance(value, kind):
        return value  # type: ignore[return-value]
    try:
        return kind(value)
    except ValueError:
        raise FitonnxError(f"expected {flag} to be one of {[m.value for m in kind]}; found {value!r}") from None


@dataclass(frozen=True)
class FisherOptions:
    """How the Fisher is estimated.

    - ``fisher``: empirical (labels), mc (labels sampled from the model) or exact (every class);
      None picks empirical when the data has labels, else mc.
    - ``likelihood``/``output``/``class_axis``: which output defines the loss and how it is read;
      None infers them (``losses.resolve_output``).
    - ``max_samples``/``tol``: at most that many calibration samples; stop once the total trace's
      relative standard error is below ``tol``.
    - ``seed``: MC labels, random data, and (in ``validate``) configurations and bootstrap.
    - ``output_kinds``: what some outputs are (``NAME=logits:AXIS|probabilities[:AXIS]|boxes|hidden``),
      for outputs whose reading would be a guess; they also put a fed-back state output in the loss.
    - ``engine``: the gradient engine (``fisher.engines.ENGINES``); ``auto`` takes the first
      available one in ``engines.PREFERENCE``.
    - ``workers``: where the per-sample loop (and ``validate``'s configurations) run: this process,
      local processes or Ray (``fitonnx.scale``); it changes the speed, never the result.
    - ``batch_size``: samples per batched run of the ``onnx`` engine (``fisher.batched``); None:
      ``batched.DEFAULT_BATCH_SIZE`` there, 1 for ``ort-training``.

    Strings are accepted for the enums (``FisherOptions(fisher="mc")``).
    """

    fisher: FisherMode | None = None
    likelihood: Likelihood | None = None
    output: str | None = None
    class_axis: int | None = None
    max_samples: int | None = None
    tol: float | None = None
    seed: int = 0
    engine: str = engines.AUTO
    output_kinds: tuple[tuple[str, KindSpec], ...] = ()  # --output-kind NAME=KIND (strings accepted)
    workers: Workers = Workers()  # noqa: RUF009  # a frozen value: one shared default is safe
    batch_size: int | None = None
    device: str = "cpu"  # where the gradient session runs: cpu or cuda (``model.runtime.DEVICES``)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fisher", _enum(FisherMode, self.fisher, "fisher"))
        object.__setattr__(self, "likelihood", _enum(Likelihood, self.likelihood, "likelihood"))
        if self.max_samples is not None and self.max_samples < 1:
            raise FitonnxError(f"expected max_samples of at least 1; found {self.max_samples}")
        if self.tol is not None and not self.tol > 0:
            raise FitonnxError(f"expected a positive tol; found {self.tol}")
        engines.check_name(self.engine)
        kinds = tuple(parse_output_kind(k) if isinstance(k, str) else k for k in self.output_kinds)
        object.__setattr__(self, "output_kinds", kinds)
        if self.batch_size is not None and self.batch_size < 1:
            raise FitonnxError(f"expected a batch size of at least 1; found {self.batch_size}")
        check_device(self.device)
        if self.seed < 0:
            raise FitonnxError(f"expected a seed of 0 or more; found {self.seed}")

    def replace(self, **changes: object) -> FisherOptions:
        """A copy with some fields changed (checked like a new value)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def run_options(self, threads: int = 0) -> engine.RunOptions:
        """The engine's sample budget and seed."""
        return engine.RunOptions(
            max_samples=self.max_samples, tol=self.tol, seed=self.seed, threads=threads, device=self.device
        )
