"""FIT's quantization-noise models: the paper's uniform noise, and the grid-aware refinement.

``uniform`` (the paper, FIT.md): every element of a tensor is perturbed by rounding noise with
E[δ²] = Δ²/12, so FIT_t(b) = Tr(F_t)·Δ_t(b)²/12.

``grid``: elements whose value is itself a level of the quantization grid are not perturbed at
all. Which values those are is a property of the grid, not of the data, and holds at every bit
width: the grid's end points min and max (min/max calibration puts them there) and 0 wherever the
grid has it (deployment toolchains make 0 a level; with a min/max grid it is one when it is the
min or the max, as for every ReLU output). Such elements are common: ReLU zeros, blank and
saturated pixels of an image input. So FIT_t(b) = Tr_pert(F_t)·Δ_t(b)²/12 with
Tr_pert(F_t) = Tr(F_t) − Σ_v (1/N)·Σ_i ‖g_i ⊙ 1[t_i = v]‖² over the distinct values v ∈ {0, min,
max} the grid represents exactly (gradient-graph statistics, ``engine.PointTraces``).
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
    """Δ(b) = (max − min) / (2^b − 1)."""
    return (np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / (2.0**bits - 1.0)


def noise_power(lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """E[δ²] = Δ(b)² / 12 for rounding error uniform over one step."""
    return step(lo, hi, bits) ** 2 / 12.0


def fit(trace: float | np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """FIT_t(b) = Tr(F_t) · Δ_t(b)² / 12."""
    return np.asarray(trace, np.float64) * noise_power(lo, hi, bits)
