"""``fitonnx validate``: measure real quantization damage and how well FIT predicts it.

Random mixed-precision configurations (plus uniform ones) are simulated in ONNX Runtime
(``simulate``) on held-out data; the damage each one does (``damage``: KL of the outputs, change
of loss, accuracy) is ranked against FIT and against simple baselines (``predictors``), with
bootstrap confidence intervals over configurations. ``harness`` holds the stage before any
configuration; the views of the report are in ``fitonnx.render.validate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.analysis.damage import Damage, Measure, Reliability, measure_table, per_sample_measures, reliability
from fitonnx.analysis.harness import EvalSource, Harness, SimulationOptions, harness, measure_all
from fitonnx.analysis.predictors import Predictor
from fitonnx.analysis.simulate import Config, GridScheme
from fitonnx.errors import FitonnxError
from fitonnx.fisher import session as api
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.source import DataSource, ModelSource
from fitonnx.progress import Progress, as_progress
from fitonnx.scale import Workers
from fitonnx.score.ranks import Correlation, rank_correlations

DEFAULT_CONFIGS = 100
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class SamplingOptions:
    """Which configurations are simulated and how their rank correlations are bootstrapped."""

    configs: int = DEFAULT_CONFIGS  # random mixed-precision configurations
    uniform: bool = True  # add every tensor at b bits, for each b both candidate lists share
    resamples: int = DEFAULT_RESAMPLES  # bootstrap resamples of the configurations (0: no intervals)


@dataclass(frozen=True)
class ConfigResult:
    """One simulated configuration: its bit widths, what each predictor says and the measured damage."""

    weight_bits: Mapping[str, int]
    activation_bits: Mapping[str, int]
    uniform: bool
    predicted: Mapping[Predictor, float]
    kl: float
    dloss: float | None
    accuracy: float | None


@dataclass(frozen=True)
class ValidationReport:
    """The result of ``fitonnx validate``."""

    model: str
    fisher: str
    likelihood: str
    output: str
    data_source: str
    samples: int
    eval_source: str
    eval_samples: int
    scheme: GridScheme
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    seed: int
    resamples: int
    float_loss: float | None
    float_accuracy: float | None
    configs: tuple[ConfigResult, ...]
    correlations: tuple[Correlation, ...]
    reliability: tuple[Reliability, ...] = ()
    notes: tuple[str, ...] = ()  # what the simulation could not do as asked (e.g. per channel)

    def correlation(self, predictor: Predictor | str, measure: Measure | str) -> Correlation:
        for c in self.correlations:
            if c.predictor == predictor and c.measure == measure:
                return c
        raise FitonnxError(
            f"expected a predictor in {[p.value for p in Predictor]} and a measure in {list(self.measures)}"
        )

    @property
    def measures(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.measure for c in self.correlations))


def measures_of(results: Sequence[ConfigResult], float_accuracy: float | None) -> dict[Measure, np.ndarray]:
    """Each measure defined for every configuration, one value per configuration."""
    return measure_table(
        [r.kl for r in results], [r.dloss for r in results], [r.accuracy for r in results], float_accuracy
    )


def sample_configs(
    weights: Sequence[str],
    activations: Sequence[str],
    weight_bits: Sequence[int],
    activation_bits: Sequence[int],
    n: int,
    seed: int,
    uniform: bool = True,
) -> tuple[tuple[Config, bool], ...]:
    """``n`` configurations with bits drawn uniformly per tensor, then (if asked) every tensor at b
    bits for each b both candidate lists share. Returns (configuration, is uniform) pairs."""
    rng = np.random.default_rng(seed)
    wb, ab = np.array(sorted(weight_bits)), np.array(sorted(activation_bits))
    out: list[tuple[Config, bool]] = []
    for _ in range(n):
        out.append(
            (
                Config(
                    weight_bits={w: int(rng.choice(wb)) for w in weights},
                    activation_bits={a: int(rng.choice(ab)) for a in activations},
                ),
                False,
            )
        )
    if uniform:
        for b in sorted(set(weight_bits) & set(activation_bits)):
            out.append((Config({w: b for w in weights}, {a: b for a in activations}), True))
    return tuple(out)


def _run_configs(
    h: Harness, sampled: Sequence[tuple[Config, bool]], progress: Progress | None, workers: Workers | None = None
) -> tuple[list[ConfigResult], list[Damage]]:
    """Measure (on ``workers``, if parallel) and predict every sampled configuration, one progress step each."""
    bar = as_progress(progress)
    bar.start(len(sampled), "Configurations")
    damages = measure_all(h, [config for config, _ in sampled], workers, bar.advance)
    results = [
        ConfigResult(
            weight_bits=dict(config.weight_bits),
            activation_bits=dict(config.activation_bits),
            uniform=is_uniform,
            predicted=h.predict(config),
            kl=d.kl,
            dloss=d.dloss,
            accuracy=d.accuracy,
        )
        for (config, is_uniform), d in zip(sampled, damages, strict=True)
    ]
    return results, damages


def validate(
    model: ModelSource,
    data: DataSource = None,
    eval_data: EvalSource = None,
    *,
    simulation: SimulationOptions | None = None,
    sampling: SamplingOptions | None = None,
    options: FisherOptions | None = None,
    progress: Progress | None = None,
    session: api.Session | None = None,
) -> ValidationReport:
    """Simulate ``sampling.configs`` random mixed-precision configurations (plus uniform ones) on
    held-out data and rank FIT and baselines against the damage each one does (``harness``
    explains the shared arguments; ``options.seed`` also draws the configurations and the bootstrap)."""
    samp = sampling or SamplingOptions()
    if samp.configs < 0:
        raise FitonnxError(f"expected a non-negative number of configurations; found {samp.configs}")
    opts = options or FisherOptions()
    seed = opts.seed
    h = harness(model, data, eval_data, simulation=simulation, options=opts, progress=progress, session=session)
    sampled = sample_configs(
        h.weights, h.activations, h.weight_bits, h.activation_bits, samp.configs, seed, samp.uniform
    )
    results, damages = _run_configs(h, sampled, progress, opts.workers)
    s, ref = h.session, h.reference
    return ValidationReport(
        model=s.loaded.name,
        fisher=h.fisher.value,
        likelihood=h.target.likelihood.value,
        output=h.target.output,
        data_source=s.data.source,
        samples=h.samples,
        eval_source=h.held_out.source,
        eval_samples=h.held_out.num_samples,
        scheme=h.scheme,
        weight_bits=h.weight_bits,
        activation_bits=h.activation_bits,
        seed=seed,
        resamples=samp.resamples,
        float_loss=ref.loss,
        float_accuracy=ref.accuracy,
        configs=tuple(results),
        correlations=_correlations(results, ref.accuracy, samp.resamples, seed),
        reliability=reliability(per_sample_measures(ref, damages), seed=seed) if len(results) >= 3 else (),
        notes=tuple(h.simulator.notes),
    )


def _correlations(
    results: Sequence[ConfigResult], float_accuracy: float | None, resamples: int, seed: int
) -> tuple[Correlation, ...]:
    if len(results) < 2:
        return ()
    predictors = {p: np.array([r.predicted[p] for r in results]) for p in Predictor}
    return rank_correlations(predictors, measures_of(results, float_accuracy), resamples, seed)
