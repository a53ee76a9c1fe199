"""FIT's quantization-noise model (FIT.md): uniform min/max asymmetric quantization."""

from __future__ import annotations

import numpy as np


def step(lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """Δ(b) = (max − min) / (2^b − 1)."""
    return (np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / (2.0**bits - 1.0)


def noise_power(lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """E[δ²] = Δ(b)² / 12 for rounding error uniform over one step."""
    return step(lo, hi, bits) ** 2 / 12.0


def fit(trace: float | np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray, bits: int) -> float | np.ndarray:
    """FIT_t(b) = Tr(F_t) · Δ_t(b)² / 12."""
    return np.asarray(trace, np.float64) * noise_power(lo, hi, bits)


def fake_quantize(x: np.ndarray, bits: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Round ``x`` to the 2^b-level asymmetric grid spanning [lo, hi] (default: its own min/max)."""
    lo = float(np.min(x)) if lo is None else lo
    hi = float(np.max(x)) if hi is None else hi
    delta = (hi - lo) / (2.0**bits - 1.0)
    if delta == 0.0:
        return x.copy()
    q = np.clip(np.round((x.astype(np.float64) - lo) / delta), 0, 2**bits - 1)
    return (q * delta + lo).astype(x.dtype)


def measured_fit(
    diag_fisher: np.ndarray, x: np.ndarray, bits: int, lo: float | None = None, hi: float | None = None
) -> float:
    """The refinement of FIT.md: Σ_j F_jj · (Q_b(x)_j − x_j)² with the measured rounding error."""
    err = fake_quantize(x, bits, lo, hi).astype(np.float64) - x.astype(np.float64)
    return float(np.sum(diag_fisher * err * err))
