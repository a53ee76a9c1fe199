"""The ``superposed`` predictor: each tensor's measured output shift from a base, summed over a configuration.

The base of a family is its dearest uniform configuration (every tensor at the family's dearest
choice: where a user starts lowering widths). For every quantized tensor t and each other state s
of it (another candidate of the family, or float), the simulation runs on a few calibration
samples with the base but t at s and keeps the move of the loss's tap
Δz_t(s) = z(base, t at s) − z(base) (the logits, or the probabilities a model outputs). A
configuration's prediction is the KL of the float outputs against z(base) + Σ_t Δz_t(s_t) over the
tensors it sets apart from the base: exact at the base and for each single change from it (beyond
second order), with the changes adding where they meet, in the outputs, around the base's own
error. That matters where one tensor's error dominates (the others then act through their cross
term with it, signs included), which neither a sum of one-at-a-time KLs from float nor a Fisher
expansion at the float weights sees. Costs one simulation run over those samples per tensor and
state, per family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.analysis.choices import Choice, Family
from fitonnx.analysis.damage import Reference, damage
from fitonnx.analysis.simulate import Config, Simulator

SAMPLES = 128  # calibration samples the shifts are measured on (evenly spread over the data)
MAX_BYTES = 1 << 30  # the shifts' memory at most (float32); fewer samples beyond, none below MIN_SAMPLES
MIN_SAMPLES = 8
FLOAT = "float"  # the state of a tensor a configuration leaves in float


@dataclass(frozen=True)
class Base:
    """One family's base configuration, its outputs and every (tensor, state)'s shift from it."""

    family: str
    states: Mapping[str, Choice]  # the base's choice of each tensor
    candidates: frozenset[Choice]  # the family's choices (weights' and activations')
    z: np.ndarray  # z(base), float64
    shifts: Mapping[tuple[str, Choice], np.ndarray]  # float32, shaped like ``z``; state FLOAT for float


@dataclass(frozen=True)
class Superposition:
    """The float outputs on the calibration samples and each family's base."""

    reference: Reference
    bases: tuple[Base, ...]

    def base_of(self, config: Config) -> Base | None:
        """The first family's base whose choices hold every choice of ``config``."""
        used = {*config.weight_bits.values(), *config.activation_bits.values()}
        return next((b for b in self.bases if used <= b.candidates), None)

    def kl(self, config: Config) -> float:
        """KL(float ‖ z(base) + Σ_t Δz_t(s_t)), mean over the samples (NaN: no family holds it)."""
        base = self.base_of(config)
        if base is None:
            return float("nan")
        merged = {**config.weight_bits, **config.activation_bits}
        z = base.z.copy()
        for name, at_base in base.states.items():
            state = merged.get(name, FLOAT)
            if state != at_base:
                z += base.shifts[(name, state)]
        return damage(self.reference, z).kl


def samples_within(per_sample: int, cells: int, available: int) -> int:
    """How many samples the shifts keep: ``SAMPLES`` (or all there are), fewer within ``MAX_BYTES``."""
    fit = MAX_BYTES // max(1, 4 * per_sample * cells)
    return int(min(SAMPLES, available, fit))


def base_states(family: Family, weights: Sequence[str], activations: Sequence[str]) -> dict[str, Choice]:
    """Every tensor at the family's dearest choice (activations float when the family has none)."""
    states: dict[str, Choice] = {w: family.weights[-1] for w in weights}
    if family.activations:
        states |= {a: family.activations[-1] for a in activations}
    return states


def _config(states: Mapping[str, Choice], weights: set[str]) -> Config:
    kept = {k: v for k, v in states.items() if v != FLOAT}
    return Config({k: v for k, v in kept.items() if k in weights}, {k: v for k, v in kept.items() if k not in weights})


def measure_base(simulator: Simulator, family: Family, states: Mapping[str, Choice], weights: set[str]) -> Base:
    """The base's outputs and each tensor's shift to each of its other states (one run each)."""
    z = np.asarray(simulator.run(_config(states, weights)), np.float64)
    shifts: dict[tuple[str, Choice], np.ndarray] = {}
    for name, at_base in states.items():
        own = family.weights if name in weights else family.activations
        for state in (*own, FLOAT):
            if state != at_base:
                moved = np.asarray(simulator.run(_config({**states, name: state}, weights)), np.float64)
                shifts[(name, state)] = (moved - z).astype(np.float32)
    return Base(family.name, dict(states), frozenset({*family.weights, *family.activations}), z, shifts)


def superposition(
    simulator: Simulator,
    reference: Callable[[np.ndarray], Reference],
    families: Sequence[Family],
    tensors: tuple[Sequence[str], Sequence[str]],
) -> Superposition:
    """Every family's base measured on ``simulator``'s data (``reference`` makes the float reference
    from the float outputs; ``tensors``: the simulated weights and activations)."""
    weights, activations = tensors
    base = np.asarray(simulator.run(Config.floating()), np.float64)
    bases = tuple(
        measure_base(simulator, fam, base_states(fam, weights, activations), set(weights)) for fam in families
    )
    return Superposition(reference(base), bases)
