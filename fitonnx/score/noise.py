"""FIT's quantization-noise models: the paper's uniform noise, and the grid-aware refinement.

``uniform`` (the paper, FIT.md): every element of a tensor is perturbed by rounding noise with
E[δ²] = Δ²/12, so FIT_t(b) = Tr(F_t)·Δ_t(b)²/12.

``grid``: elements whose value is itself a level of the quantization grid are not perturbed at
all. Which values those are is a property of the grid, not of the data, and holds at every bit
width: 0 always (deployment toolchains make it a level through an integer zero point, and so do
fitonnx's grids, ``zero_point``), and the range's end points min and max when the grid lands
on them (when the other end is 0, as for every ReLU output or an image input in [0, 1]). Such
elements are common: ReLU zeros, blank and saturated pixels of an image input. So
FIT_t(b) = Tr_pert(F_t)·Δ_t(b)²/12 with Tr_pert(F_t) = Tr(F_t) − Σ_v (1/N)·Σ_i ‖g_i ⊙ 1[t_i = v]‖²
over the distinct values v ∈ {0, min, max} the grid represents exactly (gradient-graph
statistics, ``engine.PointTraces``).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np


class NoiseModel(str, Enum):
    UNIFORM = "uniform"
    GRID = "grid"


NOISE_MODELS: dict[NoiseModel, str] = {
    NoiseModel.UNIFORM: "every element perturbed, E[δ²] = Δ²/12 (the paper)",
    NoiseModel.GRID: "elements at exact grid levels (0, min, max) unperturbed, the rest Δ²/12",
}

# Rounding to a grid reproduces a level up to float64 rounding of lo + k·step; anything within
# this fraction of a step counts as represented.
EXACT_TOL = 1e-6


def represented(value: float, lo: float, step: float, levels: int) -> bool:
    """Whether rounding ``value`` to the grid lo + k·step (k = 0..levels) gives ``value`` back."""
    if step <= 0:
        return value == lo
    k = min(max(round((value - lo) / step), 0), levels)
    return abs(lo + k * step - value) <= EXACT_TOL * step


def unperturbed(
    zero: float | np.ndarray,
    at_min: float | np.ndarray,
    at_max: float | np.ndarray,
    lo: float,
    hi: float,
    on_grid: Callable[[float], bool],
) -> float | np.ndarray:
    """The Fisher mass of elements the grid represents exactly: of the values 0, ``lo`` (the
    tensor's min) and ``hi`` (its max), each distinct one inside [lo, hi] that ``on_grid`` accepts,
    counted once (0 may be the min itself)."""
    total: float | np.ndarray = 0.0
    seen: set[float] = set()
    for value, mass in ((0.0, zero), (lo, at_min), (hi, at_max)):
        if value in seen or not lo <= value <= hi or not on_grid(value):
            continue
        seen.add(value)
        total = total + mass
    return total


def step(lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """Δ(b) = (max − min) / (2^b − 1) over the range widened to hold 0.

    Deployment toolchains (ONNX QuantizeLinear's integer zero point, QNN's offset, ONNX Runtime's
    calibrator) always make 0 a level, so a range that excludes 0 is widened to reach it; for the
    usual range with min ≤ 0 ≤ max this is FIT.md's Δ unchanged.
    """
    lo64 = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi64 = np.maximum(np.asarray(hi, np.float64), 0.0)
    return (hi64 - lo64) / (2.0**bits - 1.0)


def zero_point(lo: float | np.ndarray, step_: float | np.ndarray) -> float | np.ndarray:
    """The integer zero point of the asymmetric grid with step Δ for a range starting at ``lo``.

    It is ``−round(min(lo, 0)/Δ)``, QuantizeLinear's zero point: the levels are (k − zero point)·Δ,
    0 is one of them exactly, and the grid is the min/max grid shifted by less than half a step
    (so a value at the far end may clip by at most Δ/2). Without the shift 0 falls between two
    levels and every near-zero value moves the same way, a correlated error the uniform-noise
    model cannot see.
    """
    lo64 = np.minimum(np.asarray(lo, np.float64), 0.0)
    s = np.asarray(step_, np.float64)
    return np.where(s == 0, 0.0, -np.round(lo64 / np.where(s == 0, 1.0, s)))


def on_asymmetric_grid(value: float, lo: float, hi: float, bits: int) -> bool:
    """Whether the zero-point min/max grid at ``bits`` over [lo, hi] holds ``value`` exactly."""
    s = float(step(lo, hi, bits))
    if s <= 0:
        return value == 0.0
    return represented(value, -float(zero_point(lo, s)) * s, s, 2**bits - 1)


def noise_power(lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """E[δ²] = Δ(b)² / 12 for rounding error uniform over one step."""
    return step(lo, hi, bits) ** 2 / 12.0


def fit(trace: float | np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """FIT_t(b) = Tr(F_t) · Δ_t(b)² / 12."""
    return np.asarray(trace, np.float64) * noise_power(lo, hi, bits)
