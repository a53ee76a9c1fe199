"""Fisher statistics beyond the per-tensor trace, reduced inside the gradient graph (issue 11).

Scoring per-channel, per-block and floating-point formats needs more of the Fisher diagonal than
its trace: each statistic here is a reduction of the per-sample squared gradient g_ij² that the
gradient graph computes, so the engine fetches a few numbers per tensor (the diagonal itself only
for a weight with floating formats, ``WeightedStat``). The engine sums them in float64 over samples
(``FisherTraces.sums``, the mean over samples, like the traces).

- ``GroupStat``: per-group Fisher mass Σ_{j∈g} g_ij² of a weight, one group per index along an
  axis (per channel) or per run of B elements along it (per block), in the flat C order of
  ``formats.groups.group_shape`` (``groups.group_sums`` is the numpy twin).
- ``WeightedStat``: Σ_j g_ij² · c_j for a constant c of the weight's shape, e.g. a format's
  measured error (Q(w) − w)² or its expected noise power; it holds √c in float32 (half the
  memory of c in float64; ``WeightedStat.of`` takes c). Summed over samples it is Σ_j c_j·Σ_i g_ij²,
  so the graph never holds c: it outputs g² once per weight (``diag_key``), the engine sums it over
  samples (``engine.RunningSum``), and ``finish_weighted`` takes the dot product with c afterwards.
  One pass over g per sample serves every floating format of the weight, and the gradient model
  carries no constant of the weight's size (serializing and loading those was most of the fixed
  cost of FP8 statistics).
- ``NoiseStat``: Σ_j g_ij² · E[δ²](a_ij) of an activation under a floating format with a fixed
  float32 scale s (calibrated beforehand): the spacing of the binade of |a/s|, squared, over 12,
  times s² (``formats.fit.noise_power``), with the saturation error beyond the largest element.
- ``BlockStat``: the same noise, and the measured Σ_j g_ij²·(Q(a_ij) − a_ij)², of an activation under
  a dynamic block format (MX, NVFP4) whose scales each sample's own block maxima set in the graph
  (``formats.block_nodes``).

Sums run in float32 over runs of at most ``CHUNK`` consecutive elements, then in float64 (the
precision rule of ``instrument.MIN_BLOCK``); where no run length divides, the gradient is cast to
float64 first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from fitonnx.errors import InternalError
from fitonnx.formats import Format, ScaleType, block_nodes
from fitonnx.model import external
from fitonnx.model.runtime import make_session

CHUNK = 32  # longest float32 run summed before float64 (≤ 32·2⁻²⁴ relative)
Nodes = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


@dataclass(frozen=True)
class GroupStat:
    """Per-group Fisher mass of ``tensor``: per index along ``axis`` (``block`` None) or per block."""

    tensor: str
    axis: int
    block: int | None = None

    @property
    def key(self) -> str:
        return f"{self.tensor}|groups:{self.axis}:{self.block or 'ch'}"


@dataclass(frozen=True)
class WeightedStat:
    """Σ_j g_j² · c_j with c ≥ 0 finite, a constant of ``tensor``'s shape named by ``label``;
    ``root`` is √c in float32."""

    tensor: str
    label: str
    root: np.ndarray = field(compare=False, repr=False)

    @classmethod
    def of(cls, tensor: str, label: str, weights: np.ndarray) -> WeightedStat:
        """The statistic of the constant ``weights`` = c (finite and non-negative)."""
        c = np.asarray(weights, np.float64)
        if not (np.all(np.isfinite(c)) and np.all(c >= 0)):
            raise InternalError(f"weights of statistic {tensor}|{label} must be finite and non-negative")
        return cls(tensor, label, np.sqrt(c).astype(np.float32))

    @property
    def key(self) -> str:
        return f"{self.tensor}|{self.label}"


@dataclass(frozen=True)
class NoiseStat:
    """Σ_j g_j² · E[δ_j²] of activation ``tensor`` under floating ``fmt`` with float32 scale ``scale``."""

    tensor: str
    fmt: Format
    scale: float

    @property
    def key(self) -> str:
        return f"{self.tensor}|{self.fmt.name}:noise"


@dataclass(frozen=True)
class BlockStat:
    """Σ_j g_j² · E[δ_j²] and Σ_j g_j² · (Q(a_j) − a_j)² of activation ``tensor`` under a dynamic block
    format ``fmt`` (MX, NVFP4: ``formats.block_nodes``), blocks along ``axis`` of its per-sample shape,
    each block's scale from the sample's own block max; ``tensor_scale`` is NVFP4's float32 per-tensor
    scale (from the calibrated max|a|; 1 for MX, which has none)."""

    tensor: str
    fmt: Format
    axis: int
    tensor_scale: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.tensor}|{self.fmt.name}:noise"

    @property
    def measured_key(self) -> str:
        return f"{self.tensor}|{self.fmt.name}:measured"


@dataclass(frozen=True)
class Statistics:
    """Every statistic one gradient model computes."""

    groups: tuple[GroupStat, ...] = ()
    weighted: tuple[WeightedStat, ...] = ()
    noise: tuple[NoiseStat, ...] = ()
    blocks: tuple[BlockStat, ...] = ()

    @property
    def tensors(self) -> set[str]:
        return {s.tensor for s in (*self.groups, *self.weighted, *self.noise, *self.blocks)}

    def __bool__(self) -> bool:
        return bool(self.groups or self.weighted or self.noise or self.blocks)


NO_STATISTICS = Statistics()


@dataclass(frozen=True)
class Deferred:
    """Statistics of which the activations' need each activation in ``names``' max|a| over the
    samples the Fisher reads first (``activation_absmax``): ``fixed`` holds the weights' (none of
    them needs it), ``plan`` makes the activations' from it. ``fisher_traces`` calibrates on the
    model it runs, at its batch size, so the calibration forward is batched as the loop is."""

    names: tuple[str, ...]
    fixed: Statistics = field(repr=False)
    plan: Callable[[Mapping[str, float]], Statistics] = field(compare=False, repr=False)

    def complete(self, absmax: Mapping[str, float]) -> Statistics:
        """Every statistic, the activations' planned with ``absmax``."""
        acts = self.plan(absmax)
        return Statistics(self.fixed.groups, self.fixed.weighted, acts.noise, acts.blocks)

    def placeholder(self) -> Statistics:
        """The statistics at max|a| = 1 for every activation: the same keys, in the same order, for a
        gradient model that is never run with them."""
        return self.complete(dict.fromkeys(self.names, 1.0))


def _chunk(n: int) -> int | None:
    """The largest divisor of ``n`` in [2, CHUNK], or None."""
    return next((k for k in range(CHUNK, 1, -1) if n % k == 0), None)


def _const(name: str, values: Sequence[int] | np.ndarray, dtype: int = TensorProto.INT64) -> onnx.TensorProto:
    arr = np.asarray(values)
    return helper.make_tensor(name, dtype, list(arr.shape), arr.ravel().tolist())


def _reduce(op: str, x: str, axes: Sequence[int], out: str, opset: int) -> Nodes:
    """``op`` (ReduceSum/ReduceSumSquare) over ``axes`` without keepdims, in either opset's spelling."""
    if (op == "ReduceSum" and opset >= 13) or opset >= 18:
        axes_init = _const(out + "_axes", list(axes))
        return [helper.make_node(op, [x, axes_init.name], [out], keepdims=0)], [axes_init]
    return [helper.make_node(op, [x], [out], axes=list(axes), keepdims=0)], []


def _chunked_square_sum(x: str, dims: Sequence[int], keep: Sequence[int], out: str, opset: int) -> Nodes:
    """Σ x² over every axis of ``x`` viewed as ``dims`` except ``keep``, as float64 (shape of the kept axes).

    One summed axis is cut into runs of ≤ CHUNK summed in float32; the rest is summed in float64."""
    summed = [k for k in range(len(dims)) if k not in keep]
    cut = next((k for k in reversed(summed) if _chunk(dims[k])), None)
    nodes, inits = [], []
    if cut is None:
        shape = _const(out + "_shape", list(dims))
        nodes += [
            helper.make_node("Cast", [x], [out + "_f64"], to=TensorProto.DOUBLE),
            helper.make_node("Reshape", [out + "_f64", shape.name], [out + "_view"]),
        ]
        more, extra = _reduce("ReduceSumSquare", out + "_view", summed, out, opset)
        return nodes + more, [shape, *inits, *extra]
    k = _chunk(dims[cut])
    assert k is not None
    view = [*dims[:cut], dims[cut] // k, k, *dims[cut + 1 :]]
    shape = _const(out + "_shape", view)
    nodes.append(helper.make_node("Reshape", [x, shape.name], [out + "_view"]))
    part, part_inits = _reduce("ReduceSumSquare", out + "_view", [cut + 1], out + "_f32", opset)
    nodes += [*part, helper.make_node("Cast", [out + "_f32"], [out + "_f64"], to=TensorProto.DOUBLE)]
    rest, rest_inits = _reduce("ReduceSum", out + "_f64", summed, out, opset)
    return nodes + rest, [shape, *part_inits, *rest_inits]


def _lead(batch: int | None) -> list[int]:
    """The leading batch axis of per-sample gradients [batch, ...] (none for one sample's gradient)."""
    return [] if batch is None else [batch]


def group_nodes(
    stat: GroupStat, grad: str, shape: Sequence[int], out: str, opset: int, batch: int | None = None
) -> Nodes:
    """Nodes computing ``out``: the flat float64 per-group Σ g² of ``stat`` over a gradient of ``shape``
    (with ``batch``: of per-sample gradients [batch, *shape], one flat row [batch, groups] each)."""
    shape = [int(d) for d in shape]
    axis = stat.axis % len(shape)
    pre, size, post = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    lead = _lead(batch)
    k = len(lead)
    if stat.block is None:
        nodes, inits = _chunked_square_sum(grad, [*lead, pre, size, post], [*range(k), k + 1], out + "_g", opset)
    else:
        if size % stat.block:
            raise InternalError(f"block {stat.block} does not divide axis {axis} of {stat.tensor!r} {shape}")
        dims = [*lead, pre, size // stat.block, stat.block, post]
        nodes, inits = _chunked_square_sum(grad, dims, [*range(k), k, k + 1, k + 3], out + "_g", opset)
    flat = _const(out + "_flat", [*lead, -1])
    return [*nodes, helper.make_node("Reshape", [out + "_g", flat.name], [out])], [*inits, flat]


@dataclass(frozen=True)
class ChunkBase:
    """Float64 sums of g² over runs of ``chunk`` elements along ``axis`` (shape ``dims``): every
    grouping of one weight derives from it in float64, so the gradient is read once for all of them."""

    name: str
    axis: int
    chunk: int
    dims: tuple[int, ...]  # the weight's shape with the axis's length divided by ``chunk``
    batch: int | None = None  # per-sample sums [batch, *dims] (``group_nodes``' batch)


def shared_base(stats: Sequence[GroupStat], shape: Sequence[int]) -> tuple[int, int] | None:
    """(axis, chunk) of a ``ChunkBase`` serving every grouping in ``stats`` of one weight, or None
    when there are not several of them, or no run length ≤ CHUNK divides every block (and the axis)."""
    blocks = [x for x in stats if x.block is not None]
    if len(stats) < 2 or not blocks or len({x.axis % len(shape) for x in blocks}) != 1:
        return None
    axis = blocks[0].axis % len(shape)
    if any(x.block is None and x.axis % len(shape) == axis for x in stats):
        return None
    k = _chunk(math.gcd(*(x.block for x in blocks if x.block is not None)))
    return None if k is None or shape[axis] % k else (axis, k)


def base_nodes(
    grad: str, shape: Sequence[int], axis: int, chunk: int, out: str, opset: int, batch: int | None = None
) -> tuple[ChunkBase, Nodes]:
    """The ``ChunkBase`` of a gradient: one float32 pass of runs of ``chunk``, then float64."""
    shape = [int(d) for d in shape]
    pre, size, post = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    lead = _lead(batch)
    view = _const(out + "_shape", [*lead, pre, size // chunk, chunk, post])
    nodes = [helper.make_node("Reshape", [grad, view.name], [out + "_view"])]
    part, inits = _reduce("ReduceSumSquare", out + "_view", [len(lead) + 2], out + "_f32", opset)
    nodes += [*part, helper.make_node("Cast", [out + "_f32"], [out], to=TensorProto.DOUBLE)]
    dims = tuple(d // chunk if k == axis else d for k, d in enumerate(shape))
    return ChunkBase(out, axis, chunk, dims, batch), (nodes, [view, *inits])


def derived_group_nodes(stat: GroupStat, base: ChunkBase, out: str, opset: int) -> Nodes:
    """``group_nodes``' result for ``stat`` summed in float64 from ``base`` (no second pass over g)."""
    dims, lead = list(base.dims), _lead(base.batch)
    k = len(lead)
    pre, post = math.prod(dims[: base.axis]), math.prod(dims[base.axis + 1 :])
    if stat.block is not None:  # runs of block/chunk chunk-sums along the same axis
        blocks = dims[base.axis] * base.chunk // stat.block
        view = _const(out + "_shape", [*lead, pre, blocks, stat.block // base.chunk, post])
        summed, keep_shape = [k + 2], [view]
    else:
        view = _const(out + "_shape", [*lead, *dims])
        summed = [k + j for j in range(len(dims)) if j != stat.axis % len(dims)]
        keep_shape = [view]
    nodes = [helper.make_node("Reshape", [base.name, view.name], [out + "_view"])]
    red, inits = _reduce("ReduceSum", out + "_view", summed, out + "_g", opset)
    flat = _const(out + "_flat", [*lead, -1])
    nodes += [*red, helper.make_node("Reshape", [out + "_g", flat.name], [out])]
    return nodes, [*keep_shape, *inits, flat]


DIAG = "|fisher-diag"


def diag_key(tensor: str) -> str:
    """The key of ``tensor``'s summed g² in the engine's sums, until ``finish_weighted`` replaces it."""
    return tensor + DIAG


BATCH_MASK = "fitonnx_batch_mask"  # [batch] float32 input of a batched model: 1 per real sample, 0 per pad


def diag_nodes(grad: str, out: str, opset: int, batch: int | None = None, rank: int = 0) -> Nodes:
    """Nodes computing ``out`` = g² elementwise (float32; the engine sums it over samples in float64).
    With ``batch``: per-sample gradients [batch, ...] of a tensor of ``rank`` dims summed over the
    batch in float32, one batch total (the engine sums the totals); ``masked(out)``, the same over
    the real samples of a padded batch only (``BATCH_MASK``)."""
    if batch is None:
        return [helper.make_node("Mul", [grad, grad], [out])], []
    shape = _const(out + "_mask_shape", [batch] + [1] * rank)
    full, inits = _reduce("ReduceSumSquare", grad, [0], out, opset)
    part, more = _reduce("ReduceSumSquare", out + "_masked_g", [0], masked(out), opset)
    nodes = [
        *full,
        helper.make_node("Reshape", [BATCH_MASK, shape.name], [out + "_mask"]),
        helper.make_node("Mul", [grad, out + "_mask"], [out + "_masked_g"]),
        *part,
    ]
    return nodes, [shape, *inits, *more]


def masked(out: str) -> str:
    """The output of a batch total (``diag_nodes``) over the real samples of a padded batch."""
    return out + "_masked"


BLOCK = 1 << 18  # elements per step of finish_weighted's float64 products (kept in cache)


def finish_weighted(
    sums: Mapping[str, np.ndarray], weighted: Sequence[WeightedStat], samples: int
) -> dict[str, np.ndarray]:
    """``sums`` with every weighted statistic: Σ_j c_j · Σ_i g_ij² / ``samples`` in float64 from its
    weight's g² summed over the samples (``diag_key``, a total, not a mean; a weight the loss does
    not reach has none: left out), the g² totals dropped. The products run in blocks of ``BLOCK``
    elements, so no float64 copy of a weight-sized array is made."""
    out = {k: v for k, v in sums.items() if not k.endswith(DIAG)}
    by_tensor: dict[str, list[WeightedStat]] = {}
    for stat in weighted:
        if diag_key(stat.tensor) in sums:
            by_tensor.setdefault(stat.tensor, []).append(stat)
    for tensor, stats in by_tensor.items():
        diag = np.ravel(sums[diag_key(tensor)])
        roots = [np.ravel(x.root) for x in stats]
        totals = [0.0] * len(stats)
        for a in range(0, diag.size, BLOCK):
            d = diag[a : a + BLOCK].astype(np.float64)
            for k, root in enumerate(roots):  # not np.dot: BLAS threads cost more than the product here
                c = np.square(root[a : a + BLOCK], dtype=np.float64)
                totals[k] += float(np.multiply(c, d, out=c).sum())
        out |= {x.key: np.asarray(t / samples) for x, t in zip(stats, totals, strict=True)}
    return out


SPLIT = float(2**23 + 1)  # Veltkamp's splitting factor for float32: rounds to 1 significant bit
FLOAT32_MAX = float(np.finfo(np.float32).max)


def split_nodes(x: str, p: str) -> list[onnx.NodeProto]:
    """Nodes computing ``p + "pow"`` = 2^⌊log2 x⌋ for finite normal x ≥ 0 whose x·SPLIT is finite
    (at most 2^-126 for a subnormal x, 0 for 0).

    Veltkamp's split h = (y − y·σ) + y·σ, σ = 2^23 + 1, rounds y to one significant bit (to nearest)
    in float32 arithmetic. For x in [2^e, 2^(e+1)), y = fl(¾·x) lies in [¾·2^e, 1.5·2^e − ulp], whose
    nearest one-bit value is 2^e (the tie ¾·2^e rounds up). Four elementwise ops instead of Log,
    Floor and Pow (which cost 30 times more in onnxruntime)."""
    mk = helper.make_node
    return [
        mk("Mul", [x, "fitonnx_three_quarters"], [p + "y"]),
        mk("Mul", [p + "y", "fitonnx_split"], [p + "ys"]),
        mk("Sub", [p + "y", p + "ys"], [p + "d"]),
        mk("Add", [p + "d", p + "ys"], [p + "pow"]),
    ]


def binade_nodes(x: str, p: str, top: float, floor: bool = False) -> list[onnx.NodeProto]:
    """Nodes computing ``p + "pow"`` = 2^⌊log2 x⌋ for 0 ≤ x (x clipped to ``top`` first, so x·SPLIT
    stays finite; where ``top``·SPLIT overflows, as for bf16, the large values are split after a
    scaling by 2^−64 and the small ones, whose scaled value would be subnormal, directly).
    ``floor``: x is first raised to the power of two ``p + "tiny"`` too (one Clip for both bounds),
    so the result is at least that (the binade of a value below it is the floor's)."""
    mk = helper.make_node
    bounds = [p + "tiny", p + "top"] if floor else [p + "top"]
    nodes = [mk("Clip" if floor else "Min", [x, *bounds], [p + "xc"])]
    if top * SPLIT <= FLOAT32_MAX:
        return nodes + split_nodes(p + "xc", p)
    nodes += [mk("Mul", [p + "xc", p + "down"], [p + "xd"])]
    nodes += split_nodes(p + "xd", p + "big_") + split_nodes(p + "xc", p + "small_")
    return [
        *nodes,
        mk("Mul", [p + "big_pow", p + "up"], [p + "big"]),
        mk("Less", [p + "xc", p + "cut"], [p + "is_small"]),
        mk("Where", [p + "is_small", p + "small_pow", p + "big"], [p + "pow"]),
    ]


def noise_nodes(
    stat: NoiseStat, grad: str, value: str, numel: int, out: str, opset: int, batch: int | None = None
) -> Nodes:
    """Nodes computing ``out`` = Σ g² · E[δ²](value) under ``stat.fmt`` with scale ``stat.scale``.

    v = value / s in float32 (as QuantizeLinear divides); p = 2^e with e = ⌊log2|v|⌋ the binade
    (``binade_nodes``), floored at the smallest normal binade; E[δ²] = s² · (p · 2^(−m))² / 12, and
    (|v| − max)² · s² beyond the largest element (fp16/bf16: infinite noise there, which the caller
    reports without asking the graph). The graph sums (g · r)², r = p in range and
    (|v| − max)·√(12 · 4^m) beyond, and scales the sum by s² · 4^(−m) / 12 in float64. With
    ``batch``: value and gradient [batch, ...] of ``numel`` elements per sample, one sum per sample."""
    info = ml_dtypes.finfo(stat.fmt.dtype)
    top, mant, emin = float(info.max), int(info.nmant), int(info.minexp)
    p = out + "_"
    consts = {"s": stat.scale, "tiny": 2.0**emin, "top": top, "sat": math.sqrt(12.0 * 4.0**mant)}
    if top * SPLIT > FLOAT32_MAX:  # the scaled split of binade_nodes
        consts |= {"down": 2.0**-64, "up": 2.0**64, "cut": 2.0**-62}
    inits = [helper.make_tensor(p + k, TensorProto.FLOAT, [], [v]) for k, v in consts.items()]
    mk = helper.make_node
    clip = opset >= 11
    nodes = [
        mk("Div", [value, p + "s"], [p + "v"]),
        mk("Abs", [p + "v"], [p + "x"]),
        # subnormals (and 0) share the lowest binade's spacing: x is floored at it (Clip from opset 11)
        *(binade_nodes(p + "x", p, top, floor=True) if clip else binade_nodes(p + "x", p, top)),
        *([] if clip else [mk("Max", [p + "pow", p + "tiny"], [p + "pw"])]),
        mk("Sub", [p + "x", p + "top"], [p + "over"]),
        mk("Mul", [p + "over", p + "sat"], [p + "r_sat"]),
        mk("Greater", [p + "x", p + "top"], [p + "beyond"]),
        mk("Where", [p + "beyond", p + "r_sat", p + ("pow" if clip else "pw")], [p + "root"]),
        mk("Mul", [grad, p + "root"], [p + "gw"]),
    ]
    lead = _lead(batch)
    more, more_inits = _chunked_square_sum(p + "gw", [*lead, max(numel, 1)], list(range(len(lead))), p + "units", opset)
    factor = helper.make_tensor(p + "factor", TensorProto.DOUBLE, [], [stat.scale**2 * 4.0 ** (-mant) / 12.0])
    nodes += [*more, mk("Mul", [p + "units", factor.name], [out])]
    return nodes, [*inits, *more_inits, factor]


def shared_initializers() -> list[onnx.TensorProto]:
    """The constants every noise statistic reads (added once per graph)."""
    return [
        helper.make_tensor("fitonnx_split", TensorProto.FLOAT, [], [SPLIT]),
        helper.make_tensor("fitonnx_three_quarters", TensorProto.FLOAT, [], [0.75]),
    ]


def add_statistics(
    g: onnx.GraphProto,
    stats: Statistics,
    grads: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    opset: int,
    batch: int | None = None,
) -> list[tuple[str, str]]:
    """Append every statistic's nodes to ``g``; return (key, output name) pairs: the group statistics,
    one ``diag_key`` per weight with weighted statistics (``finish_weighted``), the noise statistics.

    ``grads``: the gradient output of each tensor; ``shapes``: each tensor's (per-sample) shape.
    ``batch``: a batched model's, whose ``grads`` are per-sample [batch, ...] (a weight's with the
    batch axis in front of its shape, an activation's as it is): every statistic is one row per
    sample, except a weight's g², one total over the batch's real samples (``BATCH_MASK``, an input
    of ``g`` then)."""
    pairs: list[tuple[str, str]] = []
    everything: list[GroupStat | WeightedStat | NoiseStat] = [*stats.groups, *stats.weighted, *stats.noise]
    if any(x.tensor not in grads or x.tensor not in shapes for x in (*everything, *stats.blocks)):
        raise InternalError("a statistic names a tensor that is not scored")
    bases = _add_bases(g, stats.groups, grads, shapes, opset, batch)
    diags = list(dict.fromkeys(x.tensor for x in stats.weighted))  # one g² per weight, for all its constants
    todo: list[GroupStat | NoiseStat | str] = [*stats.groups, *diags, *stats.noise]
    for i, stat in enumerate(todo):
        out = f"fitonnx_stat{i}"
        if isinstance(stat, str):
            (nodes, inits), key = diag_nodes(grads[stat], out, opset, batch, len(shapes[stat])), diag_key(stat)
        elif isinstance(stat, GroupStat) and stat.tensor in bases:
            (nodes, inits), key = derived_group_nodes(stat, bases[stat.tensor], out, opset), stat.key
        elif isinstance(stat, GroupStat):
            nodes, inits = group_nodes(stat, grads[stat.tensor], shapes[stat.tensor], out, opset, batch)
            key = stat.key
        else:
            numel = math.prod(shapes[stat.tensor])
            nodes, inits = noise_nodes(stat, grads[stat.tensor], stat.tensor, numel, out, opset, batch)
            key = stat.key
        g.node.extend(nodes)
        g.initializer.extend(inits)
        pairs.append((key, out))
    if stats.noise:
        g.initializer.extend(shared_initializers())
    for j, stat in enumerate(stats.blocks):
        nodes, inits, outs = block_stat_nodes(
            stat, grads[stat.tensor], shapes[stat.tensor], f"fitonnx_bstat{j}_", opset, batch
        )
        g.node.extend(nodes)
        g.initializer.extend(inits)
        pairs += [(stat.key, outs[0]), (stat.measured_key, outs[1])]
    if batch is not None and stats.weighted:
        g.input.append(helper.make_tensor_value_info(BATCH_MASK, TensorProto.FLOAT, [batch]))
    return pairs


def _add_bases(
    g: onnx.GraphProto,
    groups: Sequence[GroupStat],
    grads: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    opset: int,
    batch: int | None = None,
) -> dict[str, ChunkBase]:
    """One ``ChunkBase`` per weight with several groupings that can share it (``shared_base``)."""
    by_tensor: dict[str, list[GroupStat]] = {}
    for x in groups:
        by_tensor.setdefault(x.tensor, []).append(x)
    bases = {}
    for j, (tensor, stats) in enumerate(by_tensor.items()):
        shared = shared_base(stats, shapes[tensor])
        if shared is None:
            continue
        base, (nodes, inits) = base_nodes(grads[tensor], shapes[tensor], *shared, f"fitonnx_base{j}", opset, batch)
        g.node.extend(nodes)
        g.initializer.extend(inits)
        bases[tensor] = base
    return bases


def noise_needs_scale(fmt: Format) -> bool:
    """Whether an activation's floating ``fmt`` scales by a calibrated max|a| (fp16/bf16 do not)."""
    return fmt.scale is not ScaleType.NONE


def activation_absmax(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    threads: int = 0,
) -> dict[str, float]:
    """max |a| of each activation over ``feeds``: one forward pass per sample through a copy of
    ``model`` whose outputs are ReduceMax(Abs(a)) (the calibration a toolchain runs before scaling)."""
    probe, weights = external.detached(model)  # the weights reach onnxruntime unserialized
    del probe.graph.output[:]
    outs = []
    for i, name in enumerate(names):
        out = f"fitonnx_absmax{i}"
        probe.graph.node.append(helper.make_node("Abs", [name], [out + "_abs"]))
        probe.graph.node.append(helper.make_node("ReduceMax", [out + "_abs"], [out], keepdims=0))
        probe.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
        outs.append(out)
    session = make_session(probe.SerializeToString(), threads, initializers=weights)
    best = np.zeros(len(names), np.float64)
    for feed in feeds:
        np.maximum(best, np.array(session.run(outs, dict(feed)), np.float64), out=best)
    return dict(zip(names, best.tolist(), strict=True))


def block_stat_nodes(
    stat: BlockStat, grad: str, shape: Sequence[int], p: str, opset: int, batch: int | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], tuple[str, str]]:
    """Nodes computing (noise, measured) float64 scalars of ``stat`` for one sample of ``shape``.

    The activation and its gradient are cut into the same zero-padded blocks (``formats.block_nodes``);
    with s_b each block's dynamic scale, v = a/s_b, p_j the binade power of |v_j| (floored at the
    subnormal one) and m the element's mantissa bits: noise = Σ (g · r · s_b)² · 4^(−m)/12 with r = p_j
    in range and (|v_j| − max)·√(12·4^m) beyond (``noise_nodes``' rule per block); measured =
    Σ (g · (Q(a) − a))², Q(a) the block quantize-dequantize itself. With ``batch``: activation and
    gradient [batch, ...] (``shape`` one sample's, batch axis first: blocks never cross samples), one
    pair of sums per sample."""
    layout = block_nodes.block_layout(shape, stat.axis, stat.fmt.block_size or 1)
    mant, _, top = block_nodes.element_constants(stat.fmt)
    mk = helper.make_node
    nodes, inits = block_nodes.blocked_nodes(stat.tensor, p + "a_", layout, opset)
    more, more_inits = block_nodes.blocked_nodes(grad, p + "g_", layout, opset)
    nodes, inits = nodes + more, inits + more_inits
    scale = None
    if stat.fmt.scale is ScaleType.E4M3:
        scale = p + "ts"
        inits.append(helper.make_tensor(scale, TensorProto.FLOAT, [], [stat.tensor_scale]))
    more, more_inits = block_nodes.scale_nodes(p + "a_b", p, stat.fmt, opset, scale)
    rnd, rnd_inits = block_nodes.round_nodes(p + "v", p + "el_", *block_nodes.element_constants(stat.fmt))
    nodes += [*more, mk("Div", [p + "a_b", p + "scale"], [p + "v"]), *rnd]
    x, pw = p + "el_x", p + "el_pw"
    nodes += [
        mk("Sub", [x, p + "top"], [p + "over"]),
        mk("Mul", [p + "over", p + "sat"], [p + "r_sat"]),
        mk("Greater", [x, p + "top"], [p + "beyond"]),
        mk("Where", [p + "beyond", p + "r_sat", pw], [p + "root"]),
        mk("Mul", [p + "root", p + "scale"], [p + "rs"]),
        mk("Mul", [p + "g_b", p + "rs"], [p + "gw"]),
        mk("Mul", [p + "el_q", p + "scale"], [p + "dq"]),
        mk("Sub", [p + "dq", p + "a_b"], [p + "err"]),
        mk("Mul", [p + "g_b", p + "err"], [p + "ge"]),
    ]
    consts = [
        helper.make_tensor(p + k, TensorProto.FLOAT, [], [v])
        for k, v in (("top", top), ("sat", math.sqrt(12.0 * 4.0**mant)))
    ]
    numel = max(math.prod(int(d) for d in shape) // layout.length * layout.blocks * layout.block, 1)
    lead = _lead(batch)
    if batch is not None and (len(shape) < 2 or int(shape[0]) != 1 or stat.axis % len(shape) == 0):
        raise InternalError(f"blocks of {stat.tensor!r} must run along a per-sample axis of a batch-first tensor")
    keep = list(range(len(lead)))
    noise, noise_inits = _chunked_square_sum(p + "gw", [*lead, numel], keep, p + "units", opset)
    measured, measured_inits = _chunked_square_sum(p + "ge", [*lead, numel], keep, p + "measured", opset)
    factor = helper.make_tensor(p + "factor", TensorProto.DOUBLE, [], [4.0 ** (-mant) / 12.0])
    nodes += [*noise, *measured, mk("Mul", [p + "units", factor.name], [p + "noise"])]
    inits += [*more_inits, *rnd_inits, *consts, *noise_inits, *measured_inits, factor]
    return nodes, inits, (p + "noise", p + "measured")
