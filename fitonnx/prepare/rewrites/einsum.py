"""Einsum as Transpose/Unsqueeze/ReduceSum/MatMul/Mul/Squeeze (onnxruntime-training has no Einsum gradient).

Written here because no library pass lowers Einsum. Operands are contracted left to right, two at
a time: letters no later operand or the output needs are summed out first; a pair sharing exactly
one summed letter becomes a (broadcast, batched) MatMul, any other pair a broadcast Mul followed by
ReduceSum. Ellipses are expanded from the operands' ranks. Repeated letters within one operand
(diagonals, traces) are not covered.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from fitonnx.prepare.rewrites.base import Builder, NoRewrite, rewrite


def parse(equation: str, ranks: Sequence[int | None]) -> tuple[list[str], str]:
    """Operand letter strings and output letters, ellipses replaced by fresh capital-free letters."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    operands = lhs.split(",")
    if len(operands) != len(ranks):
        raise NoRewrite(f"expected {len(ranks)} operands in equation {equation!r}; found {len(operands)}")
    used = set(eq) - set(".,->")
    spare = [c for c in string.ascii_letters if c not in used]
    widest = 0
    for term, rank in zip(operands, ranks, strict=True):
        if "..." in term:
            if rank is None:
                raise NoRewrite(f"expected known operand ranks for the ellipsis in {equation!r}")
            widest = max(widest, rank - (len(term) - 3))
    ell = spare[:widest]
    expanded: list[str] = []
    for term, rank in zip(operands, ranks, strict=True):
        if "..." in term:
            k = rank - (len(term) - 3)  # type: ignore[operator]
            term = term.replace("...", "".join(ell[widest - k :]))
        if rank is not None and len(term) != rank:
            raise NoRewrite(f"expected {len(term)} axes for operand {term!r} of {equation!r}; the input has {rank}")
        if len(set(term)) != len(term):
            raise NoRewrite(f"expected no repeated letter within an operand (diagonal) in {equation!r}")
        expanded.append(term)
    if arrow:
        out = rhs.replace("...", "".join(ell))
    else:  # implicit output: the ellipsis, then letters used once, in alphabetical order
        counts = {c: sum(t.count(c) for t in expanded) for c in set("".join(expanded))}
        out = "".join(ell) + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return expanded, out


def _sum_out(b: Builder, x: str, letters: str, keep: set[str]) -> tuple[str, str]:
    axes = [k for k, c in enumerate(letters) if c not in keep]
    if not axes:
        return x, letters
    return b.reduce("ReduceSum", x, axes, 0, "sum"), "".join(c for c in letters if c in keep)


def _align(b: Builder, x: str, letters: str, order: str) -> str:
    """Transpose ``x`` to the order of its letters in ``order`` and unsqueeze the letters it lacks."""
    present = [c for c in order if c in letters]
    x = b.transpose(x, [letters.index(c) for c in present])
    return b.unsqueeze(x, [k for k, c in enumerate(order) if c not in letters])


def _pair(b: Builder, a: str, la: str, c: str, lc: str, keep: set[str]) -> tuple[str, str]:
    contract = [ch for ch in la if ch in lc and ch not in keep]
    batch = [ch for ch in la if ch in lc and ch in keep]
    a_only = [ch for ch in la if ch not in lc]
    c_only = [ch for ch in lc if ch not in la]
    if len(contract) == 1:
        k = contract[0]
        m = a_only[-1] if a_only else None
        n = c_only[-1] if c_only else None
        a_extra, c_extra = a_only[:-1], c_only[:-1]
        lead = "".join(batch + a_extra + c_extra)
        m_letter, n_letter = m or "#", n or "$"
        left = _align(b, a, la, lead + m_letter + k) if m else b.unsqueeze(_align(b, a, la, lead + k), [len(lead)])
        right = _align(b, c, lc, lead + k + n_letter) if n else b.unsqueeze(_align(b, c, lc, lead + k), [len(lead) + 1])
        y = b.internal(b.op("MatMul", [left, right]))
        dropped = [len(lead) + j for j, letter in enumerate((m, n)) if letter is None]
        y = b.squeeze(y, dropped)
        return y, lead + (m or "") + (n or "")
    order = "".join(batch + a_only + c_only + contract)
    y = b.op("Mul", [_align(b, a, la, order), _align(b, c, lc, order)])
    kept = "".join(batch + a_only + c_only)
    if contract:
        y = b.reduce("ReduceSum", y, list(range(len(kept), len(order))), 0, "sum")
    return y, kept


@rewrite("Einsum")
def rewrite_einsum(b: Builder) -> str:
    inputs = [i for i in b.node.input]
    if not all(b.is_float(i) for i in inputs):
        raise NoRewrite("expected float operands")
    ranks = []
    for name in inputs:
        t = b.ctx.types.get(name)
        ranks.append(None if t is None or t.shape is None else len(t.shape))
    equation = str(b.attr("equation"))
    terms, out = parse(equation, ranks)
    if len(set(out)) != len(out) or any(c not in "".join(terms) for c in out):
        raise NoRewrite(f"expected each output letter once and present in an operand in {equation!r}")
    x, lx = inputs[0], terms[0]
    for k in range(len(terms)):
        later = set(out).union(*[set(t) for t in terms[k + 1 :]])
        if k == 0:
            x, lx = _sum_out(b, x, lx, later | set(terms[1] if len(terms) > 1 else ""))
            continue
        c, lc = _sum_out(b, inputs[k], terms[k], later | set(lx))
        x, lx = _pair(b, x, lx, c, lc, later)
    x, lx = _sum_out(b, x, lx, set(out))
    b.finish(b.transpose(x, [lx.index(ch) for ch in out]))
    return f"{equation!r} as Transpose/MatMul/Mul/ReduceSum"
