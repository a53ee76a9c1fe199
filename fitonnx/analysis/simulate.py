"""Simulated post-training quantization in ONNX Runtime, any bit width per tensor.

One simulation model per prepared model serves every configuration:

- each quantizable weight becomes a graph input, fed its quantized-dequantized values (computed
  here in numpy, cached per tensor and bit width);
- each quantized activation ``a`` is replaced, for all its consumers, by
  ``clip(round(a/step), kmin, kmax)·step`` (``kmin = −zero_point``, ``kmax = levels − zero_point``,
  the same values as QuantizeLinear→DequantizeLinear on ``clip(round(a/step) + zero_point, 0,
  levels)``: integers below 2^24 are exact in float32) or by the floating grid's quantizer, whose
  ``step``, ``kmin``, ``kmax`` (or scale, mantissa bits, …) are graph inputs, so a configuration is
  a feed, not a new model.

Which activations are quantized, and on which kind of grid, is the model's structure: each such
pattern (``ActMode`` per activation) gets its own session, built on first use and kept
(``MAX_SESSIONS``), with no node at all on float activations. Configurations of one family share
one pattern (weights only: none quantized), so in practice a handful of sessions serve them all,
and a float activation costs nothing (a single model with every quantizer behind ``Where`` ran all
of them every time: ~5× plain inference on a MobileNet, BENCHMARKS.md). A dynamic block format
(MX, NVFP4) is a mode of its own: the activation gets only its block quantizer (``block_sim``).

Written with plain arithmetic ops rather than QuantizeLinear/DequantizeLinear because those
only offer 4-, 8- and 16-bit integer types, and validation needs every width from 2 to 16.

A grid is ``lo + k·step`` for ``k = 0..levels`` (FIT.md's noise model): asymmetric min/max uses
``step = (max − min)/(2^b − 1)`` and ``levels = 2^b − 1``; symmetric uses ``m = max|x|``,
``step = m/(2^(b−1) − 1)`` and ``levels = 2^b − 2`` from ``lo = −m`` (zero on the grid).
Rounding is to nearest, ties to even (ONNX Round and numpy agree).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fitonnx.analysis import block_sim
from fitonnx.analysis.block_sim import BlockInputs, BlockMode, BlockPlan
from fitonnx.analysis.choices import BlockGrid, Choice, FloatGrid, float_grid, per_tensor
from fitonnx.errors import FitonnxError, InternalError, ModelError, UnsupportedError
from fitonnx.fisher.losses import PREFIX
from fitonnx.formats import Format, Granularity, QParams, params_from_range, parse_format, quantize_dequantize
from fitonnx.formats.block_nodes import is_dynamic_block
from fitonnx.formats.quantize import int_limits
from fitonnx.model import graph
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec, Kind, QuantTensor
from fitonnx.model.runtime import CPU_PROVIDERS, session_options
from fitonnx.score import noise
from fitonnx.score.formats_fit import format_axis
from fitonnx.values import TextEnum

MIN_BITS = 2
# float32 holds every integer level exactly up to 2^24; 16 bits keeps round((x − lo)/step) exact.
MAX_BITS = 16
# Sessions a simulator keeps, one per pattern of quantized activations (least recently used dropped).
MAX_SESSIONS = 4


@dataclass(frozen=True)
class GridScheme:
    """How tensors are quantized: per-tensor or per-channel weights, asymmetric or symmetric grids.

    Activations are always per tensor (what deployment toolchains do); ``symmetric`` applies to
    weights and activations alike.
    """

    per_channel: bool = False
    symmetric: bool = False

    def describe(self) -> str:
        return (
            f"{'per-channel' if self.per_channel else 'per-tensor'} weights, "
            f"{'symmetric max|x|' if self.symmetric else 'asymmetric min/max'} ranges, round to nearest"
        )


@dataclass(frozen=True)
class Grid:
    """The levels ``(k − zero_point)·step``, ``k = 0..levels``, as QuantizeLinear/DequantizeLinear
    define them: ``zero_point`` is an integer (held in float64), so 0 is a level exactly.
    ``zero_point``/``step`` broadcast against the tensor."""

    zero_point: np.ndarray
    step: np.ndarray
    levels: int

    @property
    def lo(self) -> np.ndarray:
        """The lowest level."""
        return -self.zero_point * self.step


def check_bits(bits: Sequence[int]) -> tuple[int, ...]:
    """Bit widths the simulation can represent exactly."""
    bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if not bits or bad:
        raise FitonnxError(f"expected bit widths between {MIN_BITS} and {MAX_BITS} for simulation; found {list(bits)}")
    return tuple(sorted(set(bits)))


def make_grid(lo: np.ndarray | float, hi: np.ndarray | float, bits: int, symmetric: bool) -> Grid:
    """The quantization grid at ``bits`` for a tensor (or channels) spanning [lo, hi]."""
    lo64 = np.asarray(lo, np.float64)
    hi64 = np.asarray(hi, np.float64)
    if symmetric:
        m = np.maximum(np.abs(lo64), np.abs(hi64))
        half = 2.0 ** (bits - 1) - 1.0
        step, zero_point, levels = m / half, np.full_like(m, half), 2**bits - 2
    else:
        step = np.asarray(noise.step(lo64, hi64, bits), np.float64)
        zero_point, levels = np.asarray(noise.zero_point(lo64, step), np.float64), 2**bits - 1
    # An all-zero tensor (or channel) has step 0: any positive step with zero point 0 maps it to
    # itself, and the quantizer stays the identity there.
    flat = step == 0
    return Grid(zero_point=np.where(flat, 0.0, zero_point), step=np.where(flat, 1.0, step), levels=levels)


def quantize(x: np.ndarray, grid: Grid) -> np.ndarray:
    """Round ``x`` to the nearest grid level (clipped to the grid), in float64, returned in x's dtype."""
    q = np.clip(np.round(x.astype(np.float64) / grid.step) + grid.zero_point, 0, grid.levels)
    return ((q - grid.zero_point) * grid.step).astype(x.dtype)


def channel_axis(model: onnx.ModelProto, tensor: QuantTensor, rank: int) -> int:
    """The output-channel axis of a weight read directly by its quantizable consumers."""
    axes: set[int] = set()
    for node in model.graph.node:
        if node.name not in tensor.nodes:
            continue
        slots = [k for k, name in enumerate(node.input) if name == tensor.name]
        if not slots:
            raise UnsupportedError(
                f"expected weight {tensor.name!r} to be read directly by {node.op_type} for --per-channel; "
                "it reaches the op through layout ops",
                hint="use per-tensor quantization for this model",
            )
        rule = graph.CHANNEL_AXIS.get(node.op_type)  # the one channel rule, shared with the exporters
        if rule is None:
            raise InternalError(f"no per-channel axis rule for op {node.op_type}")
        axes.update(rule(node, slot, rank) for slot in slots)
    if len(axes) != 1:
        raise UnsupportedError(
            f"expected one channel axis for weight {tensor.name!r}; its consumers disagree ({sorted(axes)})",
            hint="use per-tensor quantization for this model",
        )
    return axes.pop()


def weight_grid(w: np.ndarray, bits: int, scheme: GridScheme, axis: int | None) -> Grid:
    """Min/max grid of a weight, per tensor (``axis`` None) or per slice along ``axis``."""
    if axis is None:
        return make_grid(float(w.min()), float(w.max()), bits, scheme.symmetric)
    other = tuple(k for k in range(w.ndim) if k != axis)
    return make_grid(w.min(axis=other, keepdims=True), w.max(axis=other, keepdims=True), bits, scheme.symmetric)


@dataclass(frozen=True)
class Config:
    """A choice per tensor name (bits of the min/max grid, or a format name: ``choices``); a tensor
    that is absent (or None) stays in float."""

    weight_bits: Mapping[str, Choice]
    activation_bits: Mapping[str, Choice]

    @staticmethod
    def floating() -> Config:
        return Config(weight_bits={}, activation_bits={})


class ActMode(TextEnum):
    """How a configuration treats one activation: kept in float, on an integer grid, on a floating grid."""

    KEPT = "kept"
    INTEGER = "integer"
    FLOATING = "floating"


Mode = ActMode | BlockMode  # an activation's mode in a pattern (BlockMode: a dynamic block format)


@dataclass(frozen=True)
class ActivationInputs:
    """The names that set one activation's fake quantizer. ``Simulator.feed`` writes the settings
    (``on``/``fp`` pick the mode; zero point and levels give the integer grid); a model variant's
    graph inputs are ``step``, ``kmin``, ``kmax`` (integer grid) or ``fscale`` … ``ftop`` (floating)."""

    name: str
    prefix: str
    zero_point: str
    step: str
    levels: str
    on: str
    dtype: np.dtype
    fp: str  # the floating branch: on, scale, mantissa bits, lowest exponent, largest value
    fscale: str
    fmant: str
    femin: str
    ftop: str
    kmin: str
    kmax: str
    bout: str  # the activation as its consumers see it (``build``'s output may name it)
    blocks: tuple[BlockInputs, ...] = ()  # the dynamic block formats it may take


def _activation_inputs(i: int, act: QuantTensor, elem: int, plan: BlockPlan) -> ActivationInputs:
    p = f"{PREFIX}sim{i}_"
    fields = ("zero_point", "step", "levels", "on", "fp", "fscale", "fmant", "femin", "ftop", "kmin", "kmax", "bout")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    blocks = block_sim.block_inputs(p, act, dtype, plan)
    return ActivationInputs(name=act.name, prefix=p, dtype=dtype, blocks=blocks, **{f: p + f for f in fields})


@dataclass(frozen=True)
class SimulationModel:
    """The serialized simulation model (weights as inputs, every activation in float: ``variant``
    adds fake quantizers) and the names a configuration feeds."""

    model_bytes: bytes
    weights: Mapping[str, np.ndarray]  # float values of the weights that became inputs
    activations: tuple[ActivationInputs, ...]
    output: str


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.HasField("tensor_type")
    }


def _free_batch_axes(g: onnx.GraphProto, inputs: Mapping[str, InputSpec]) -> None:
    """Declare the graph inputs as the original model does (symbolic sizes by name) and drop the
    stored intermediate shapes, which may be fixed to one sample's shape."""
    for value in g.input:
        spec = inputs.get(value.name)
        if spec is not None and value.type.HasField("tensor_type"):
            tt = value.type.tensor_type
            tt.ClearField("shape")
            for k, d in enumerate(spec.shape):
                if d is None:
                    tt.shape.dim.add().dim_param = f"{value.name}_dim{k}"
                else:
                    tt.shape.dim.add().dim_value = d
    del g.value_info[:]


def _weights_as_inputs(g: onnx.GraphProto, weights: Sequence[QuantTensor]) -> dict[str, np.ndarray]:
    """Turn each quantizable weight's initializer into a graph input; returns its float values."""
    inits = {t.name: t for t in g.initializer}
    missing = [w.name for w in weights if w.name not in inits]
    if missing:
        raise InternalError(f"weights must be initializers after prepare; not found: {missing[:3]}")
    declared = {v.name for v in g.input}
    values: dict[str, np.ndarray] = {}
    for w in weights:
        init = inits[w.name]
        values[w.name] = numpy_helper.to_array(init)
        if w.name not in declared:
            g.input.append(helper.make_tensor_value_info(w.name, init.data_type, list(init.dims)))
    kept = [t for t in g.initializer if t.name not in values]
    del g.initializer[:]
    g.initializer.extend(kept)
    return values


def float_quantizer_nodes(x: str, p: str, fscale: str, fmant: str, femin: str, ftop: str) -> list[onnx.NodeProto]:
    """Nodes computing ``p + "fout"`` = fscale·round_float(x/fscale): the nearest value with
    ``fmant`` mantissa bits and exponent ≥ ``femin``, saturated at ±``ftop`` (``choices.float_quantize``
    in numpy). Plain arithmetic, so it runs at any opset; ``p + "two"``/``"inv_ln2"`` are initializers
    the caller adds (``float_constants``)."""
    n = helper.make_node
    return [
        n("Div", [x, fscale], [p + "fv"], name=p + "fdiv"),
        n("Abs", [p + "fv"], [p + "fabs"], name=p + "fabs"),
        n("Log", [p + "fabs"], [p + "flog"], name=p + "flog"),
        n("Mul", [p + "flog", p + "inv_ln2"], [p + "flog2"], name=p + "flog2"),
        n("Floor", [p + "flog2"], [p + "fexp"], name=p + "ffloor"),
        n("Max", [p + "fexp", femin], [p + "fexpc"], name=p + "fmax"),
        n("Sub", [p + "fexpc", fmant], [p + "fsexp"], name=p + "fsub"),
        n("Pow", [p + "two", p + "fsexp"], [p + "fstep"], name=p + "fpow"),
        n("Div", [p + "fv", p + "fstep"], [p + "fscaled"], name=p + "fdiv2"),
        n("Round", [p + "fscaled"], [p + "frounded"], name=p + "fround"),
        n("Mul", [p + "frounded", p + "fstep"], [p + "fq"], name=p + "fmul"),
        n("Neg", [ftop], [p + "fntop"], name=p + "fneg"),
        n("Clip", [p + "fq", p + "fntop", ftop], [p + "fclip"], name=p + "fclip"),
        n("Mul", [p + "fclip", fscale], [p + "fout"], name=p + "fout"),
    ]


def float_constants(p: str, dtype: np.dtype) -> list[onnx.TensorProto]:
    """The constants of ``float_quantizer_nodes``."""
    return [
        numpy_helper.from_array(np.array(2.0, dtype), p + "two"),
        numpy_helper.from_array(np.array(1.0 / np.log(2.0), dtype), p + "inv_ln2"),
    ]


def _fake_quantizer(g: onnx.GraphProto, ai: ActivationInputs, mode: Mode) -> list[onnx.NodeProto]:
    """The nodes of activation ``ai``'s fake quantizer in ``mode`` (its inputs declared in ``g``);
    the last node's output is the quantized activation."""
    p, elem = ai.prefix, helper.np_dtype_to_tensor_dtype(ai.dtype)
    if isinstance(mode, BlockMode):
        return block_sim.block_quantizer(g, ai.name, p, block_sim.mode_inputs(ai.blocks, mode))
    if mode is ActMode.FLOATING:
        names = (ai.fscale, ai.fmant, ai.femin, ai.ftop)
        g.initializer.extend(float_constants(p, ai.dtype))
        nodes = float_quantizer_nodes(ai.name, p, *names)
    elif mode is ActMode.INTEGER:
        names = (ai.step, ai.kmin, ai.kmax)
        n = helper.make_node
        nodes = [
            n("Div", [ai.name, ai.step], [p + "scaled"], name=p + "div"),
            n("Round", [p + "scaled"], [p + "rounded"], name=p + "round"),
            n("Clip", [p + "rounded", ai.kmin, ai.kmax], [p + "q"], name=p + "clip"),
            n("Mul", [p + "q", ai.step], [p + "out"], name=p + "mul"),
        ]
    else:
        raise InternalError(f"no fake quantizer for mode {mode}")
    g.input.extend(helper.make_tensor_value_info(name, elem, []) for name in names)
    return nodes


def _insert_fake_quantizers(g: onnx.GraphProto, chosen: Sequence[tuple[ActivationInputs, Mode]]) -> None:
    """Route every consumer of each chosen activation through its fake quantizer, placed right
    after the activation's producer so that the graph stays in topological order."""
    renames: dict[str, str] = {}
    groups: list[list[onnx.NodeProto]] = []
    for ai, mode in chosen:
        nodes = _fake_quantizer(g, ai, mode)
        renames[ai.name] = nodes[-1].output[0]
        groups.append(nodes)
    for node in g.node:
        for slot, name in enumerate(node.input):
            if name in renames:
                node.input[slot] = renames[name]
    position = graph.producer_positions(g.node)
    nodes = list(g.node)
    for (ai, _), group in sorted(
        zip(chosen, groups, strict=True), key=lambda pair: position.get(pair[0][0].name, -1), reverse=True
    ):
        at = position.get(ai.name, -1) + 1
        nodes[at:at] = group
    del g.node[:]
    g.node.extend(nodes)


def variant(sim: SimulationModel, modes: Sequence[Mode]) -> bytes:
    """The simulation model with a fake quantizer on each activation (order of ``sim.activations``)
    whose mode is not KEPT."""
    chosen = [(a, m) for a, m in zip(sim.activations, modes, strict=True) if m is not ActMode.KEPT]
    if not chosen:
        return sim.model_bytes
    work = onnx.load_from_string(sim.model_bytes)
    _insert_fake_quantizers(work.graph, chosen)
    return work.SerializeToString()


def build(
    model: onnx.ModelProto,
    tensors: Sequence[QuantTensor],
    output: str,
    inputs: Mapping[str, InputSpec] | None = None,
    block_formats: Sequence[Format] = (),
) -> SimulationModel:
    """The simulation model of ``model`` (a new model; ``model`` is untouched) whose only output is ``output``.

    ``inputs`` (the original model's input declarations) replace the prepared model's, which may
    be fixed to one sample's shape; stored intermediate shapes go with them, so a batch axis the
    original declares is free again (``Simulator`` checks that batching gives per-sample results).
    ``block_formats``: the dynamic block formats (MX, NVFP4) activations may take (``block_sim``).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    g = work.graph
    if inputs is not None:
        _free_batch_axes(g, inputs)
    values = _weights_as_inputs(g, [t for t in tensors if t.kind is Kind.WEIGHT])
    types, plan = _elem_types(model), BlockPlan.of(model, block_formats)
    activations = [t for t in tensors if t.kind is Kind.ACTIVATION]
    act_inputs = tuple(
        _activation_inputs(i, t, types.get(t.name, TensorProto.FLOAT), plan) for i, t in enumerate(activations)
    )
    for a in (a for a in act_inputs if a.bout == output):  # a reader like any: quantized in a variant
        g.node.append(helper.make_node("Identity", [a.name], [output], name=output))
    if output not in {o.name for o in g.output} and output not in graph.producer_positions(g.node):
        raise ModelError(f"expected {output!r} to be a tensor of the model; found no producer")
    del g.output[:]
    g.output.append(helper.make_empty_tensor_value_info(output))
    return SimulationModel(model_bytes=work.SerializeToString(), weights=values, activations=act_inputs, output=output)


@dataclass(frozen=True)
class Batches:
    """Held-out feeds cut once into batches; ``stack`` when each feed is one sample without a batch axis."""

    feeds: tuple[dict[str, np.ndarray], ...]
    stack: bool
    num_samples: int


def batches(data: Dataset, specs: Mapping[str, InputSpec], batch_size: int) -> Batches:
    """Slices of ``data`` along axis 0, ``batch_size`` samples each when the model's batch axis allows it."""
    n = data.num_samples
    per_sample = any(data.arrays[name].ndim == spec.rank + 1 for name, spec in specs.items())
    fixed_batch = any(spec.rank == 0 or spec.shape[0] is not None for spec in specs.values())
    if per_sample:
        return Batches(tuple(data.sample(i, specs) for i in range(n)), True, n)
    size = 1 if fixed_batch else max(1, batch_size)
    feeds = tuple({name: data.arrays[name][i : i + size] for name in specs} for i in range(0, n, size))
    return Batches(feeds, False, n)


def session(model_bytes: bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session at the EXTENDED optimization level.

    ORT_ENABLE_ALL adds layout transforms (NCHWc) for Conv only when weights are constants; the
    simulation feeds them as inputs, so at ALL the float configuration drifts from the model by
    ~1e-6. At EXTENDED both take the same kernels and the float configuration reproduces the
    model's outputs bit for bit (tested).
    """
    options = session_options(threads, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    return ort.InferenceSession(model_bytes, options, providers=list(CPU_PROVIDERS))


class Simulator:
    """Runs the simulation model for one configuration at a time over fixed held-out batches."""

    def __init__(
        self,
        sim: SimulationModel,
        model: onnx.ModelProto,
        tensors: Sequence[QuantTensor],
        act_ranges: Mapping[str, tuple[float, float]],
        scheme: GridScheme,
        data: Dataset,
        specs: Mapping[str, InputSpec],
        batch_size: int = 256,
    ) -> None:
        self._args = (sim, model, tensors, act_ranges, scheme, data, specs, batch_size)
        self.sim = sim
        self.scheme = scheme
        self.session = session(sim.model_bytes)  # every activation in float
        self._sessions: OrderedDict[tuple[Mode, ...], ort.InferenceSession] = OrderedDict(
            [((ActMode.KEPT,) * len(sim.activations), self.session)]
        )
        self.act_ranges = dict(act_ranges)
        # Per channel where a weight's channels are known; a weight that reaches its op through
        # layout ops (an unrolled recurrent cell's R) or whose consumers disagree stays per tensor.
        self.notes: list[str] = []
        self.axes: dict[str, int | None] = {}
        for t in tensors:
            if t.kind is not Kind.WEIGHT:
                continue
            axis = None
            if scheme.per_channel:
                try:
                    axis = channel_axis(model, t, sim.weights[t.name].ndim)
                except UnsupportedError as exc:
                    self.notes.append(f"quantized per tensor, not per channel: {exc.message}")
            self.axes[t.name] = axis
        self.model = model
        self._blocks = {a.name: a.blocks for a in sim.activations}
        self._weights: dict[tuple[str, Choice], np.ndarray] = {}
        self._formats: dict[tuple[str, str], tuple[Format, int | None]] = {}
        self.data = batches(data, specs, batch_size)
        if not self._batching_works():
            self.data = batches(data, specs, 1)

    def __reduce__(self) -> tuple:
        # Sent to a worker (validate --workers/--ray) as what built it: the worker opens its own session.
        return (Simulator, self._args)

    def on(self, data: Dataset) -> Simulator:
        """The same simulation over other samples (e.g. the calibration data), in its own session."""
        sim, model, tensors, act_ranges, scheme, _, specs, batch_size = self._args
        return Simulator(sim, model, tensors, act_ranges, scheme, data, specs, batch_size)

    def _batching_works(self) -> bool:
        """Whether a batch gives what its samples give one by one (a prepared model may have folded
        shape arithmetic for batch 1, which then fails or mixes samples)."""
        first = self.data.feeds[0]
        n = len(next(iter(first.values()))) if first else 0
        if self.data.stack or n < 2:
            return True
        settings = self.feed(Config.floating())
        inputs = self._inputs(settings, self.modes(settings))
        try:
            (batched,) = self.session.run([self.sim.output], {**first, **inputs})
            singles = [
                self.session.run([self.sim.output], {**{k: v[i : i + 1] for k, v in first.items()}, **inputs})[0]
                for i in (0, n - 1)
            ]
        except Exception:
            return False
        batched = np.asarray(batched)
        if batched.shape[:1] != (n,) or any(s.shape != (1, *batched.shape[1:]) for s in singles):
            return False
        scale = max(float(np.max(np.abs(batched))), 1e-12)
        return all(
            np.allclose(batched[i], s[0], rtol=1e-4, atol=1e-5 * scale)
            for i, s in zip((0, n - 1), singles, strict=True)
        )

    def weight_grid(self, name: str, bits: int) -> Grid:
        return weight_grid(self.sim.weights[name], bits, self.scheme, self.axes[name])

    def weight_format(self, name: str, choice: str) -> tuple[Format, int | None]:
        """The format weight ``name`` really gets for ``choice`` and the axis it groups along: a
        grouped format that does not apply (no channel axis, a block size that does not divide the
        reduction axis) falls back to the same element per tensor, with a note."""
        key = (name, choice)
        if key not in self._formats:
            fmt = parse_format(choice)
            w = self.sim.weights[name]
            axis = format_axis(self.model, name, fmt, w.ndim)
            bad_block = (
                fmt.granularity is Granularity.BLOCK and axis is not None and w.shape[axis] % (fmt.block_size or 1)
            )
            if fmt.granularity is not Granularity.TENSOR and (axis is None or bad_block):
                self.notes.append(
                    f"{name}: {choice} does not apply (shape {list(w.shape)}), simulated as {per_tensor(fmt)}"
                )
                fmt, axis = per_tensor(fmt), None
            self._formats[key] = (fmt, axis)
        return self._formats[key]

    def activation_format(self, name: str, choice: str) -> Format:
        """The format an activation gets for ``choice``: a dynamic block format (MX, NVFP4) where the
        simulation has its block quantizer for the activation, else the same element per tensor."""
        fmt = parse_format(choice)
        return fmt if block_sim.find(self._blocks.get(name, ()), fmt.name) else per_tensor(fmt)

    def activation_grid(self, name: str, choice: Choice) -> Grid:
        """The integer grid of activation ``name`` (bits of the min/max grid, or an integer format)."""
        lo, hi = self.act_ranges[name]
        if isinstance(choice, int):
            return make_grid(lo, hi, choice, self.scheme.symmetric)
        fmt = self.activation_format(name, choice)
        if not fmt.is_int:
            raise InternalError(f"{choice} is a floating format: use activation_float")
        params = params_from_range(fmt, lo, hi)
        qmin, qmax = int_limits(fmt)
        zp = float(np.asarray(params.zero_point).reshape(())) - qmin
        return Grid(
            np.asarray(zp, np.float64), np.asarray(float(np.asarray(params.scale).reshape(())), np.float64), qmax - qmin
        )

    def activation_float(self, name: str, choice: Choice) -> FloatGrid | BlockGrid | None:
        """The floating quantizer of activation ``name`` for a floating format (a per-tensor grid, or
        a dynamic block one for MX/NVFP4), None for integer choices."""
        if isinstance(choice, int):
            return None
        fmt = self.activation_format(name, choice)
        if fmt.is_int:
            return None
        if is_dynamic_block(fmt):  # NVFP4's tensor scale from the calibrated range
            return block_sim.block_grid(self._blocks.get(name, ()), fmt, self.act_ranges[name])
        lo, hi = self.act_ranges[name]
        return float_grid(fmt, float(np.asarray(params_from_range(fmt, lo, hi).scale).reshape(())))

    def quantized_weight(self, name: str, choice: Choice) -> np.ndarray:
        key = (name, choice)
        if key not in self._weights:
            w = self.sim.weights[name]
            if isinstance(choice, int):
                self._weights[key] = quantize(w, self.weight_grid(name, choice))
            else:
                fmt, axis = self.weight_format(name, choice)
                self._weights[key] = quantize_dequantize(w.astype(np.float32), fmt, axis).astype(w.dtype)
        return self._weights[key]

    def _activation_feed(self, a: ActivationInputs, choice: Choice | None) -> dict[str, np.ndarray]:
        """The fake quantizer's settings for one activation: float, integer, floating grid or blocks."""
        zero_point, step, levels, on = 0.0, 1.0, 1.0, False
        fg = None if choice is None else self.activation_float(a.name, choice)
        block, fg = (fg, None) if isinstance(fg, BlockGrid) else (None, fg)
        if choice is not None and fg is None and block is None:
            grid = self.activation_grid(a.name, choice)
            zero_point, step, levels, on = float(grid.zero_point), float(grid.step), float(grid.levels), True
        f = fg or FloatGrid(1.0, 0, 0, 1.0)
        values = {
            a.zero_point: zero_point, a.step: step, a.levels: levels,
            a.fscale: f.scale, a.fmant: float(f.mant), a.femin: float(f.emin), a.ftop: f.top,
        }  # fmt: skip
        feed = {k: np.array(v, a.dtype) for k, v in values.items()}
        feed[a.on] = np.array(on)
        feed[a.fp] = np.array(fg is not None)
        return feed | block_sim.block_settings(a.blocks, block)

    def feed(self, config: Config, weights: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Weight values and fake-quantizer settings for ``config``; ``weights`` replaces the values
        of some weights outright (for perturbations other than rounding)."""
        unknown = sorted(
            (set(config.weight_bits) - set(self.sim.weights))
            | (set(config.activation_bits) - {a.name for a in self.sim.activations})
        )
        if unknown:
            raise FitonnxError(f"expected quantizable tensor names in the configuration; found {unknown[:3]}")
        feed: dict[str, np.ndarray] = {}
        for name, value in self.sim.weights.items():
            bits = config.weight_bits.get(name)
            feed[name] = value if bits is None else self.quantized_weight(name, bits)
        for name, value in (weights or {}).items():
            if name not in self.sim.weights or np.shape(value) != self.sim.weights[name].shape:
                raise FitonnxError(f"expected replacement values for a simulated weight of its shape; found {name!r}")
            feed[name] = np.asarray(value, self.sim.weights[name].dtype)
        for a in self.sim.activations:
            feed |= self._activation_feed(a, config.activation_bits.get(a.name))
        return feed

    def run(self, config: Config, weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The output over all held-out samples, samples on axis 0 (``weights``: see ``feed``)."""
        return self.run_feed(self.feed(config, weights))

    def run_feed(self, settings: Mapping[str, np.ndarray]) -> np.ndarray:
        """The output over all held-out samples for settings made by ``feed`` (or ``format_feed``)."""
        modes = self.modes(settings)
        run, inputs = self._session(modes), self._inputs(settings, modes)
        outs = []
        for batch in self.data.feeds:
            try:
                (value,) = run.run([self.sim.output], {**batch, **inputs})
            except Exception as exc:
                raise ModelError(
                    f"onnxruntime failed on the simulation model: {str(exc).splitlines()[0][:300]}"
                ) from None
            outs.append(np.asarray(value))
        return np.stack(outs) if self.data.stack else np.concatenate(outs, axis=0)

    def modes(self, settings: Mapping[str, np.ndarray]) -> tuple[Mode, ...]:
        """Each activation's mode in ``settings`` (order of ``sim.activations``)."""
        return tuple(
            block_sim.picked(a.blocks, settings)
            or (ActMode.FLOATING if bool(settings[a.fp]) else ActMode.INTEGER if bool(settings[a.on]) else ActMode.KEPT)
            for a in self.sim.activations
        )

    def _session(self, modes: tuple[Mode, ...]) -> ort.InferenceSession:
        """The session of the model variant quantizing activations as ``modes`` says (built once, kept)."""
        if modes in self._sessions:
            self._sessions.move_to_end(modes)
        else:
            self._sessions[modes] = session(variant(self.sim, modes))
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return self._sessions[modes]

    def _inputs(self, settings: Mapping[str, np.ndarray], modes: Sequence[Mode]) -> dict[str, np.ndarray]:
        """The graph inputs of the variant for ``modes``: weights, then each quantizer's grid."""
        inputs = {name: settings[name] for name in self.sim.weights}
        for a, mode in zip(self.sim.activations, modes, strict=True):
            if mode is ActMode.INTEGER:
                zp = np.float64(settings[a.zero_point])
                inputs[a.step] = settings[a.step]
                inputs[a.kmin] = np.array(-zp, a.dtype)
                inputs[a.kmax] = np.array(np.float64(settings[a.levels]) - zp, a.dtype)
            elif mode is ActMode.FLOATING:
                inputs |= {k: settings[k] for k in (a.fscale, a.fmant, a.femin, a.ftop)}
            elif isinstance(mode, BlockMode):
                inputs |= block_sim.graph_inputs(a.blocks, mode, settings)
        return inputs


def format_feed(
    simulator: Simulator,
    weights: Mapping[str, tuple[Format, int | None]],
    activations: Mapping[str, tuple[Format, QParams]],
) -> dict[str, np.ndarray]:
    """Settings for a FORMAT configuration (``recommend --formats``): each weight's values through its
    format along its axis (``formats.quantize_dequantize``, ONNX Q/DQ arithmetic), each activation on
    its integer format's grid with the given parameters (one scale and zero point: per tensor).

    The fake quantizer's grid ``clip(round(a/step) + zp', 0, levels)`` with ``zp' = zp − qmin`` and
    ``levels = qmax − qmin`` is QuantizeLinear→DequantizeLinear of the format exactly. Floating
    activation formats (FP8) have no such grid here and are refused."""
    values = {
        name: quantize_dequantize(simulator.sim.weights[name], fmt, axis) for name, (fmt, axis) in weights.items()
    }
    feed = simulator.feed(Config.floating(), values)
    known = {a.name: a for a in simulator.sim.activations}
    for name, (fmt, params) in activations.items():
        if name not in known:
            raise FitonnxError(f"expected a simulated activation; found {name!r}")
        if not fmt.is_int or np.size(params.scale) != 1:
            raise UnsupportedError(f"the simulation has per-tensor integer activation grids only; found {fmt.name}")
        a = known[name]
        qmin, qmax = int_limits(fmt)
        feed[a.zero_point] = np.array(float(np.reshape(params.zero_point, -1)[0]) - qmin, a.dtype)
        feed[a.step] = np.array(float(np.reshape(params.scale, -1)[0]), a.dtype)
        feed[a.levels] = np.array(float(qmax - qmin), a.dtype)
        feed[a.on] = np.array(True)
    return feed
