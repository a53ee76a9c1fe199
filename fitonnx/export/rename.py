"""A recommendation in the original model's tensor names, for the files a toolchain reads.

fitonnx scores the prepared twin: BatchNormalization folded into its convolution (``w+bn``),
constant expressions folded (a tied embedding's ``Transpose`` becomes an initializer), If branches
inlined and some ops rewritten. The exports quantize the ORIGINAL model, so each recommended
tensor is mapped back through the prepare stage's origins (``PreparedModel.origin_of``, the
replaced tensor first):

- a weight goes to the first origin that is a weight of the original (a folded ``w+bn`` to ``w``:
  toolchains fold BatchNormalization before they quantize, so the folded range is the right one);
  two scored weights from one original (a tied table read by Gather and by MatMul) keep the wider
  width;
- an activation keeps its name when the original's main graph has it;
- a tensor with no counterpart (made by a rewrite, or inside an If branch) is left out, and a
  note says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import onnx

from fitonnx.allocate.recommendation import ParetoPoint, Recommendation
from fitonnx.export.common import working_copy

OriginFn = Callable[[str], tuple[str, ...]]
SHOWN = 3


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(repr(n) for n in names[:SHOWN]) + more


def for_original(
    rec: Recommendation, original: onnx.ModelProto, origin_of: OriginFn
) -> tuple[Recommendation, tuple[str, ...]]:
    """``rec`` with every tensor named as in ``original`` (see the module docstring), and notes."""
    work = working_copy(original)  # Constant-node weights count as initializers, as exporters see them
    inits = {t.name for t in work.graph.initializer}
    acts = ({v.name for v in work.graph.input} | {o for n in work.graph.node for o in n.output if o}) - inits

    def find(name: str, pool: set[str]) -> str | None:
        return name if name in pool else next((o for o in origin_of(name) if o in pool), None)

    renamed: dict[str, str] = {}
    dropped: list[str] = []
    tied: list[str] = []
    weight_bits: dict[str, int] = {}
    for name, bits in rec.weight_bits.items():
        target = find(name, inits)
        if target is None:
            dropped.append(name)
            continue
        if target in weight_bits:
            tied.append(f"{name!r} and another scored weight both come from {target!r}")
        weight_bits[target] = max(bits, weight_bits.get(target, bits))
        if target != name:
            renamed[name] = target
    activation_bits: dict[str, int] = {}
    for name, bits in rec.activation_bits.items():
        target = find(name, acts)
        if target is None:
            dropped.append(name)
            continue
        activation_bits[target] = max(bits, activation_bits.get(target, bits))
        if target != name:
            renamed[name] = target

    def keyed(d: Mapping[str, object]) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, value in d.items():
            target = renamed.get(name, name)
            if target in weight_bits or target in activation_bits:
                out.setdefault(target, value)
        return out

    translated = dataclasses.replace(
        rec,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        ranges=keyed(rec.ranges),  # type: ignore[arg-type]
        fit_per_tensor=keyed(rec.fit_per_tensor),  # type: ignore[arg-type]
        # tied weights: the first scored weight's format (formats have no order to take the wider of)
        weight_formats=keyed(rec.weight_formats),  # type: ignore[arg-type]
        activation_formats=keyed(rec.activation_formats),  # type: ignore[arg-type]
        fit_per_format=keyed(rec.fit_per_format),  # type: ignore[arg-type]
        activation_fit_models=keyed(rec.activation_fit_models),  # type: ignore[arg-type]
        pareto=tuple(
            ParetoPoint(
                p.weight_bytes,
                p.avg_weight_bits,
                p.fit,
                {renamed.get(n, n): b for n, b in p.weight_bits.items() if renamed.get(n, n) in weight_bits},
                {renamed.get(n, n): f for n, f in p.weight_formats.items() if renamed.get(n, n) in weight_bits},
            )
            for p in rec.pareto
        ),
        scored_as={target: name for name, target in renamed.items()},
    )
    return translated, _notes(renamed, tied, dropped)


def _notes(renamed: Mapping[str, str], tied: list[str], dropped: list[str]) -> tuple[str, ...]:
    notes: list[str] = []
    if renamed:
        folded = [n for n in renamed if "+" in n]
        notes.append(
            f"{len(renamed)} tensors are named as in the original model"
            + (
                f" ({len(folded)} folded weights under their own weight's name, e.g. {_shown(folded)})"
                if folded
                else ""
            )
            + "; recommendation.json maps them back under 'scored_as'"
        )
    if tied:
        notes.append("tied weights keep the wider width: " + "; ".join(tied[:SHOWN]))
    if dropped:
        notes.append(
            f"{len(dropped)} scored tensors have no counterpart in the original model's main graph (made by "
            f"fitonnx's prepare stage, or inside an If branch) and are left out of the exports: {_shown(dropped)}"
        )
    return tuple(notes)
