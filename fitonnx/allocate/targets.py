"""Deployment targets: which bit widths and formats a toolchain offers and how it quantizes with them.

A target decides the candidate bit widths of weights and activations, whether its grid is
symmetric or asymmetric (which changes the quantization step, hence FIT), which widths mean an
IEEE float rather than an integer grid (TensorRT's 16 = float16), and which exporter formats
``fitonnx recommend`` writes for it. A new toolchain is one more ``Target`` in ``TARGETS``.

``Target.menu`` lists the same toolchain's quantization FORMATS (``fitonnx.formats`` registry
names: ``int8/ch``, ``fp8e4m3``, ``uint4/b32``, ...) as it really stores them, per tensor role;
``recommend --formats`` allocates over those with each format's exact storage cost. The facts
and their sources are in the README ("Targets").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fitonnx.errors import FitonnxError
from fitonnx.formats import FORMATS, Format, Granularity, get_format, params_from_range
from fitonnx.formats.block_nodes import is_dynamic_block
from fitonnx.model.graph import Kind
from fitonnx.score import noise
from fitonnx.score.fit import PointMass

FLOAT16_MANTISSA_BITS = 10


class Scheme(str, Enum):
    """How a toolchain places its integer grid over a tensor's range."""

    ASYMMETRIC = "asymmetric"  # 2^b levels over [min, max] with a zero point (FIT.md's noise model)
    SYMMETRIC = "symmetric"  # 2^b − 1 levels over [−max|x|, max|x|], zero point 0 (narrow range)


@dataclass(frozen=True)
class DynamicBlocks:
    """Activation block formats a toolchain quantizes at run time (scales from each block's own
    max|a|), and where: inputs of ``readers`` ops only, of ``ranks`` (with the batch axis; empty:
    any), blocked along the reader's reduction axis, that axis a whole number of blocks if ``whole``."""

    formats: tuple[str, ...]
    readers: frozenset[str]
    ranks: frozenset[int] = frozenset()
    whole: bool = True

    def admits(self, op_types: frozenset[str], shape: tuple[int, ...], axis: int | None, block: int) -> bool:
        """Whether an activation read by ``op_types``, of ``shape``, blocked along ``axis`` qualifies."""
        if axis is None or not shape or not op_types or not op_types <= self.readers:
            return False
        if self.ranks and len(shape) not in self.ranks:
            return False
        return not (self.whole and shape[axis] % block)


@dataclass(frozen=True)
class FormatMenu:
    """A toolchain's candidate formats (registry names) per tensor role.

    ``weights`` apply to every quantizable weight (a per-channel/per-block one only where the
    weight's op gives it an axis); ``by_op`` adds formats for the weights of one op type only
    (TensorRT's INT4 blocks and NVFP4 for GEMMs, ONNX Runtime's MatMulNBits for MatMul).
    ``activations`` are per tensor, ``default_activation`` the one used when none is chosen;
    ``dynamic`` adds run-time block formats for the activations it admits (TensorRT's MXFP8/NVFP4).
    """

    weights: tuple[str, ...]
    activations: tuple[str, ...]
    default_activation: str
    by_op: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dynamic: DynamicBlocks | None = None

    def __post_init__(self) -> None:
        for name in (*self.weights, *self.all_activations(), self.default_activation, *self.op_formats()):
            get_format(name)  # unknown names fail loudly, at import
        if self.default_activation not in self.activations:
            raise FitonnxError(f"default activation format {self.default_activation!r} is not among {self.activations}")
        bad = [n for n in self.activations if get_format(n).granularity is not Granularity.TENSOR]
        bad += [n for n in self.dynamic.formats if not is_dynamic_block(get_format(n))] if self.dynamic else []
        if bad:
            raise FitonnxError(f"activation formats must be per tensor, or dynamic blocks; found {bad}")

    def op_formats(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.by_op for name in names)

    def weight_formats(self, op_types: frozenset[str]) -> tuple[Format, ...]:
        """The candidates for a weight read by ops of ``op_types`` (extra ones only when all agree)."""
        extra = [names for op, names in self.by_op if op_types == {op}]
        names = dict.fromkeys([*self.weights, *(n for group in extra for n in group)])
        return tuple(get_format(n) for n in names)

    def all_weight_formats(self) -> tuple[Format, ...]:
        return tuple(get_format(n) for n in dict.fromkeys([*self.weights, *self.op_formats()]))

    def activation_formats(self) -> tuple[Format, ...]:
        """The per-tensor activation formats."""
        return tuple(get_format(n) for n in self.activations)

    def all_activations(self) -> tuple[str, ...]:
        """Every activation format name: per tensor, then the dynamic block ones."""
        return (*self.activations, *(self.dynamic.formats if self.dynamic else ()))


def activation_format_fit(fmt: Format, trace: float, lo: float, hi: float) -> float:
    """FIT of an activation under a per-tensor INTEGER format from its Fisher trace and calibrated
    range (the range model): Tr(F)·Δ²/12 with the format's own Δ (``params_from_range``), the paper's
    FIT. Floating formats have no such model here: their noise depends on each element's binade,
    which the score sums per sample inside the gradient graph (``score.formats_fit``)."""
    if fmt.granularity is not Granularity.TENSOR or not fmt.is_int:
        raise FitonnxError(f"the range model is for per-tensor integer activation formats; found {fmt.name}")
    scale = float(np.asarray(params_from_range(fmt, lo, hi).scale).reshape(-1)[0])
    return trace * scale**2 / 12.0


@dataclass(frozen=True)
class Target:
    """One toolchain's quantization menu; ``formats`` are ``fitonnx.export.EXPORTERS`` keys."""

    name: str
    summary: str
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    default_activation_bits: int
    weight_scheme: Scheme
    activation_scheme: Scheme
    float_bits: frozenset[int] = frozenset()
    formats: tuple[str, ...] = ()
    menu: FormatMenu | None = None  # the formats it stores (``recommend --formats``)
    format_exports: tuple[str, ...] = ()  # exporters for a format recommendation (default: ``formats``)

    def format_menu(self) -> FormatMenu:
        if self.menu is None:
            raise FitonnxError(f"target {self.name!r} has no format menu")
        return self.menu

    def candidates(self, kind: Kind) -> tuple[int, ...]:
        return self.weight_bits if kind is Kind.WEIGHT else self.activation_bits

    def scheme(self, kind: Kind) -> Scheme:
        return self.weight_scheme if kind is Kind.WEIGHT else self.activation_scheme

    def is_float(self, bits: int) -> bool:
        return bits in self.float_bits

    def step(self, kind: Kind, lo: float, hi: float, bits: int) -> float:
        """The rounding step Δ of this target's grid at ``bits`` for a tensor spanning [lo, hi].

        Asymmetric: (max − min)/(2^b − 1) over the range widened to hold 0 (``noise.step``), FIT.md's
        model. Symmetric: max|x|/(2^(b−1) − 1).
        Float16: the spacing of float16 numbers at the tensor's largest magnitude (an upper
        bound on the rounding step anywhere in the tensor).
        """
        if self.is_float(bits):
            m = max(abs(lo), abs(hi))
            return 0.0 if m == 0.0 else 2.0 ** (math.floor(math.log2(m)) - FLOAT16_MANTISSA_BITS)
        if self.scheme(kind) is Scheme.SYMMETRIC:
            return max(abs(lo), abs(hi)) / (2.0 ** (bits - 1) - 1.0)
        return float(noise.step(lo, hi, bits))

    def represents(self, kind: Kind, value: float, lo: float, hi: float, bits: int) -> bool:
        """Whether this target's grid at ``bits`` for a tensor spanning [lo, hi] holds ``value``
        exactly (the grid noise model leaves such elements unperturbed)."""
        if self.is_float(bits):
            return bool(np.isfinite(np.float16(value)) and float(np.float16(value)) == value)
        step = self.step(kind, lo, hi, bits)
        if step <= 0:
            return value == 0.0
        if self.scheme(kind) is Scheme.SYMMETRIC:
            half = 2 ** (bits - 1) - 1
            return noise.represented(value, -half * step, step, 2 * half)
        return noise.on_asymmetric_grid(value, lo, hi, bits)

    def fit(
        self, kind: Kind, trace: float, lo: float, hi: float, bits: int, point_mass: PointMass | None = None
    ) -> float:
        """FIT_t(b) = Tr(F_t) · Δ_t(b)² / 12 with this target's step; with ``point_mass`` (the grid
        noise model) the Fisher mass of the values 0, min and max that this grid holds exactly is
        left out of the trace."""
        held = 0.0
        if point_mass is not None:
            held = float(
                noise.unperturbed(
                    point_mass.zero,
                    point_mass.at_min,
                    point_mass.at_max,
                    lo,
                    hi,
                    lambda v: self.represents(kind, v, lo, hi, bits),
                )
            )
        return max(trace - held, 0.0) * self.step(kind, lo, hi, bits) ** 2 / 12.0

    def finn_datatype(self, kind: Kind, bits: int, lo: float) -> str:
        """The QONNX/FINN DataType name of the quantized tensor (``INT4``, ``UINT8``, ``FLOAT16``)."""
        if self.is_float(bits):
            return "FLOAT16" if bits == 16 else f"FLOAT{bits}"
        unsigned = self.scheme(kind) is Scheme.ASYMMETRIC and lo >= 0.0
        return f"{'UINT' if unsigned else 'INT'}{bits}"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="generic",
            summary="any integer toolchain: 2-8 and 16 bits, asymmetric min/max grids (FIT's own noise model)",
            weight_bits=(2, 3, 4, 5, 6, 7, 8, 16),
            activation_bits=(2, 3, 4, 5, 6, 7, 8, 16),
            default_activation_bits=8,
            weight_scheme=Scheme.ASYMMETRIC,
            activation_scheme=Scheme.ASYMMETRIC,
            menu=FormatMenu(
                weights=tuple(FORMATS),
                activations=tuple(n for n, f in FORMATS.items() if f.granularity is Granularity.TENSOR),
                default_activation="uint8",
                dynamic=DynamicBlocks(
                    tuple(n for n, f in FORMATS.items() if is_dynamic_block(f)),
                    frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"}),
                    whole=False,
                ),
            ),
        ),
        Target(
            name="ort",
            summary="ONNX Runtime Q/DQ: int4/int8/int16 weights (symmetric), int8/int16 activations (asymmetric)",
            weight_bits=(4, 8, 16),
            activation_bits=(8, 16),
            default_activation_bits=8,
            weight_scheme=Scheme.SYMMETRIC,
            activation_scheme=Scheme.ASYMMETRIC,
            formats=("overrides", "qdq"),
            menu=FormatMenu(
                weights=("int8", "int8/ch", "int4", "int4/ch", "int16", "int16/ch"),
                activations=("uint8", "uint16"),
                default_activation="uint8",
                by_op=(("MatMul", ("uint4/b32", "uint4/b64", "uint4/b128", "uint8/b32", "uint8/b64", "uint8/b128")),),
            ),
            format_exports=("qdq",),
        ),
        Target(
            name="qnn",
            summary="Qualcomm QNN/AIMET: 4/8/16-bit weights (symmetric), 8/16-bit activations (asymmetric)",
            weight_bits=(4, 8, 16),
            activation_bits=(8, 16),
            default_activation_bits=8,
            weight_scheme=Scheme.SYMMETRIC,
            activation_scheme=Scheme.ASYMMETRIC,
            formats=("qnn",),
            menu=FormatMenu(
                weights=("int4/ch", "int8/ch", "int16/ch", "int4", "int8", "int16"),
                activations=("uint8", "uint16"),
                default_activation="uint8",
            ),
        ),
        Target(
            name="tensorrt",
            summary="TensorRT explicit Q/DQ: symmetric int8 (int4 for weights only), 16 = left in float16",
            weight_bits=(4, 8, 16),
            activation_bits=(8, 16),
            default_activation_bits=8,
            weight_scheme=Scheme.SYMMETRIC,
            activation_scheme=Scheme.SYMMETRIC,
            float_bits=frozenset({16}),
            formats=("tensorrt",),
            menu=FormatMenu(
                weights=("int8", "int8/ch", "fp8e4m3", "fp16"),
                activations=("int8", "fp8e4m3", "fp16"),
                default_activation="int8",
                by_op=tuple((op, ("int4/b64", "int4/b128", "nvfp4/16")) for op in ("MatMul", "Gemm")),
                # DynamicQuantize: GEMM inputs of rank 2-3, along the last or second-to-last axis,
                # which must divide into blocks (README "Targets")
                dynamic=DynamicBlocks(("mxfp8/32", "nvfp4/16"), frozenset({"MatMul", "Gemm"}), frozenset({2, 3})),
            ),
        ),
    )
}

DEFAULT_TARGET = "generic"  # the target when none is named (``recommend --target``)


def get_target(name: str) -> Target:
    """The registered target ``name``; unknown names fail with the list of known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise FitonnxError(f"expected a target among {sorted(TARGETS)}; found {name!r}") from None
