"""The ``superposed`` predictor: each tensor's measured output shift alone, summed over a configuration.

For every quantized tensor t and candidate choice b, the simulation runs on a few calibration
samples with t alone at b and keeps the move of the loss's tap Δz_t(b) = z(t at b) − z(float) (the
logits, or the probabilities a model outputs). A configuration's prediction is the KL of the
float outputs against z(float) + Σ_t Δz_t(b_t): exact for each tensor alone (beyond second order,
as the one-at-a-time baseline), and its tensors' moves add where they meet, in the outputs, where
the one-at-a-time sum of KLs ignores how they add up. Costs one simulation run over those
samples per (tensor, choice): the one-at-a-time baseline's runs, on the calibration samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fitonnx.analysis.choices import Choice
from fitonnx.analysis.damage import Reference, damage
from fitonnx.analysis.simulate import Config, Simulator

SAMPLES = 64  # calibration samples the shifts are measured on
MAX_BYTES = 1 << 30  # the shifts' memory at most (float32); fewer samples beyond, none below MIN_SAMPLES
MIN_SAMPLES = 8


@dataclass(frozen=True)
class Superposition:
    """The float outputs on the calibration samples and every (tensor, choice)'s output shift."""

    reference: Reference
    base: np.ndarray  # z(float), float64
    shifts: Mapping[tuple[str, Choice], np.ndarray]  # float32, shaped like ``base``

    def kl(self, config: Config) -> float:
        """KL(float ‖ z(float) + Σ_t Δz_t(b_t)), mean over the samples."""
        z = self.base.copy()
        for name, b in {**config.weight_bits, **config.activation_bits}.items():
            shift = self.shifts.get((name, b))
            if shift is not None:
                z += shift
        return damage(self.reference, z).kl


def samples_within(per_sample: int, cells: int, available: int) -> int:
    """How many samples the shifts keep: ``SAMPLES`` (or all there are), fewer within ``MAX_BYTES``."""
    fit = MAX_BYTES // max(1, 4 * per_sample * cells)
    return int(min(SAMPLES, available, fit))


def superposition(
    simulator: Simulator,
    reference: Callable[[np.ndarray], Reference],
    candidates: Mapping[str, Sequence[Choice]],
    weights: set[str],
) -> Superposition:
    """Measure every tensor's shift at each of its ``candidates`` on ``simulator``'s data
    (``reference`` makes the float reference from the float outputs; ``weights``: which names
    are weights, the rest activations)."""
    base = np.asarray(simulator.run(Config.floating()), np.float64)
    shifts: dict[tuple[str, Choice], np.ndarray] = {}
    for name, choices in candidates.items():
        for b in choices:
            config = Config({name: b}, {}) if name in weights else Config({}, {name: b})
            shifts[(name, b)] = (np.asarray(simulator.run(config), np.float64) - base).astype(np.float32)
    return Superposition(reference(base), base, shifts)
