"""Emit `docs/lifecycle.md`: a Mermaid diagram and tables of states and edges, and
the diagram alone (Mermaid or Graphviz dot) for `kasmina spec diagram`."""

from __future__ import annotations

from .spec_loader import Comparison, Guard, Spec

_OP_SYMBOLS = {"lt": "<", "le": "≤", "gt": ">", "ge": "≥", "eq": "=", "ne": "≠"}


def _comparison_text(c: Comparison, spec: Spec) -> str:
    if c.rhs_kind == "param":
        default = next(p.default for p in spec.params if p.name == c.rhs)
        rhs = f"{c.rhs} ({default:g})"
    else:
        rhs = f"{float(c.rhs):g}"
    return f"{c.lhs} {_OP_SYMBOLS[c.op]} {rhs}"


def guard_text(guard: Guard, spec: Spec) -> str:
    joiner = " and " if guard.mode == "all" else " or "
    return joiner.join(_comparison_text(c, spec) for c in guard.comparisons)


def mermaid(spec: Spec) -> str:
    initial = spec.states[0].name
    lines = ["stateDiagram-v2", f"    [*] --> {initial}"]
    for t in spec.transitions:
        label = t.guard.name if t.guard else ""
        if t.bypass_min_epochs:
            label = f"{label} (any time)".strip()
        lines.append(f"    {t.source} --> {t.target}" + (f": {label}" if label else ""))
    for s in spec.states:
        if s.kind == "permanent":
            lines.append(f"    {s.name} --> [*]")
    return "\n".join(lines) + "\n"


def dot(spec: Spec) -> str:
    shapes = {"idle": "ellipse", "active": "box", "permanent": "doublecircle", "retired": "octagon"}
    lines = ["digraph lifecycle {", "  rankdir=LR;"]
    lines += [f'  {s.name} [shape={shapes[s.kind]}, label="{s.name}\\n({s.id})"];' for s in spec.states]
    for t in spec.transitions:
        attrs = []
        if t.guard:
            attrs.append(f'label="{t.guard.name}"')
        if t.bypass_min_epochs:
            attrs.append("style=dashed")
        lines.append(f"  {t.source} -> {t.target}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    return "\n".join([*lines, "}"]) + "\n"


def emit_docs(spec: Spec, header: str) -> str:
    out = [
        f"<!-- {header} -->",
        "",
        "# The seed lifecycle",
        "",
        "```mermaid",
        mermaid(spec).rstrip(),
        "```",
        "",
        "## States",
        "",
        "| id | state | kind | min epochs | blueprint runs | alpha | learns from | meaning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in spec.states:
        out.append(
            f"| {s.id} | {s.name} | {s.kind} | {s.min_epochs} | {'yes' if s.blueprint_runs else 'no'} "
            f"| {s.alpha} | {s.learns_from} | {s.description} |"
        )
    out += [
        "",
        "For a retired state, min epochs is the embargo before the slot can be recycled.",
        "",
        "## Transitions",
        "",
        "| # | from | to | min epochs | guard |",
        "|---|---|---|---|---|",
    ]
    for i, t in enumerate(spec.transitions):
        src = next(s for s in spec.states if s.name == t.source)
        minimum = "bypassed" if t.bypass_min_epochs else str(src.min_epochs)
        guard = f"`{t.guard.name}`: {guard_text(t.guard, spec)}" if t.guard else "—"
        out.append(f"| {i} | {t.source} | {t.target} | {minimum} | {guard} |")
    out += [
        "",
        "A missing metric is NaN and fails every comparison. Params (in parentheses, their",
        "defaults) and min epochs can be overridden at run time with a `LifecyclePolicy`.",
        "",
        "## Reasons",
        "",
        "| code | reason | message |",
        "|---|---|---|",
    ]
    out += [f"| {r.code} | {r.name} | `{r.message}` |" for r in spec.reasons]
    return "\n".join(out) + "\n"
