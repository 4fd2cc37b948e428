"""Emit `kasmina/_generated/lifecycle_tables.py` from a validated spec."""

from __future__ import annotations

from .spec_loader import BUILTINS, OPS, Spec
from .tables import SpecTables


def _tuple(values) -> str:
    items = [repr(v) for v in values]
    flat = "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if len(flat) <= 90:
        return flat
    return "(\n" + "".join(f"    {item},\n" for item in items) + ")"


def _enum(name: str, doc: str, members: list[tuple[str, int]]) -> list[str]:
    lines = [f"class {name}(IntEnum):", f'    """{doc}"""', ""]
    lines += [f"    {n} = {v}" for n, v in members]
    return lines


def emit_python(spec: Spec, header: str) -> str:
    t = SpecTables(spec)
    out: list[str] = [
        f'"""{header}"""',
        "",
        "from __future__ import annotations",
        "",
        "from enum import IntEnum",
        "",
        f"SPEC_SHA256 = {spec.sha256!r}",
        "",
        "# Layout of the per-seed buffers.",
        f"STATE_COLUMNS = {_tuple(spec.state_columns)}",
        f"METRIC_COLUMNS = {_tuple(spec.metric_columns)}",
        f"HISTORY_LENGTH = {spec.history_length}",
        "",
        "# States, indexed by id.",
        f"NUM_STATES = {len(spec.states)}",
        f"STATE_NAMES = {_tuple(s.name for s in spec.states)}",
        f"STATE_KINDS = {_tuple(s.kind for s in spec.states)}",
        f"STATE_MIN_EPOCHS = {_tuple(s.min_epochs for s in spec.states)}",
        f"STATE_BLUEPRINT_RUNS = {_tuple(s.blueprint_runs for s in spec.states)}",
        f"STATE_ALPHA_SOURCE = {_tuple(s.alpha for s in spec.states)}",
        f"STATE_LEARNS_FROM = {_tuple(s.learns_from for s in spec.states)}",
        f"STATE_REQUIRES_BLUEPRINT = {_tuple(s.requires_blueprint for s in spec.states)}",
        f"STATE_DESCRIPTIONS = {_tuple(s.description for s in spec.states)}",
        "",
        "# Guard inputs and thresholds.",
        f"CONTEXT_FIELDS = {_tuple(n for n, _ in spec.context_fields)}",
        f"BUILTINS = {_tuple(BUILTINS)}",
        f"PARAM_NAMES = {_tuple(p.name for p in spec.params)}",
        f"PARAM_DEFAULTS = {_tuple(p.default for p in spec.params)}",
        f"OPS = {_tuple(OPS)}",
        "",
        "# Edges, indexed by edge id: (from state id, to state id).",
        f"NUM_EDGES = {len(t.edges)}",
        f"EDGES = {_tuple(t.edges)}",
        f"EDGE_BYPASS_MIN_EPOCHS = {_tuple(t.edge_bypass)}",
        "# Guard id per edge, -1 for an unguarded edge.",
        f"EDGE_GUARD = {_tuple(t.edge_guard)}",
        "# EDGE_MATRIX[from][to] is the edge id, or -1 where there is no edge.",
        f"EDGE_MATRIX = {_tuple(tuple(row) for row in t.edge_matrix)}",
        "",
        "# Guards, indexed by guard id. A clause is",
        "# (lhs_is_builtin, lhs_index, op_index, rhs_is_value, rhs_param_index, rhs_value):",
        "# lhs_index indexes CONTEXT_FIELDS or BUILTINS, op_index indexes OPS, and the right",
        "# side is PARAM_NAMES[rhs_param_index] or the literal rhs_value.",
        f"GUARD_NAMES = {_tuple(g.name for g in t.guards)}",
        f"GUARD_IS_ANY = {_tuple(g.mode == 'any' for g in t.guards)}",
        f"GUARD_CLAUSES = {_tuple(tuple(c) for c in t.guard_clauses)}",
        "",
        f"GRAFTING_STRATEGY_NAMES = {_tuple(n for n, _ in spec.grafting_strategies)}",
        "",
        "# Reasons, indexed by code.",
        f"REASON_NAMES = {_tuple(r.name for r in spec.reasons)}",
        f"REASON_MESSAGES = {_tuple(r.message for r in spec.reasons)}",
        "",
        "",
    ]
    out += _enum("StateColumn", "Columns of the int32 per-seed state tensor.", [(n, i) for i, n in enumerate(spec.state_columns)])
    out += ["", ""]
    out += _enum(
        "MetricColumn",
        "Columns of the float32 per-seed metrics tensor.",
        [(n.upper(), i) for i, n in enumerate(spec.metric_columns)],
    )
    out += ["", ""]
    out += _enum("Reason", "Every answer to a transition request.", [(r.name, r.code) for r in spec.reasons])
    out += ["", ""]
    out += _enum("ExtendedLifecycle", "The lifecycle states of a seed.", [(s.name, s.id) for s in spec.states])
    out += [
        "",
        "    @property",
        "    def kind(self) -> str:",
        '        """idle, active, permanent or retired."""',
        "        return STATE_KINDS[self]",
        "",
        "    @property",
        "    def is_terminal(self) -> bool:",
        '        """The seed\'s journey has ended here (permanent or retired)."""',
        '        return STATE_KINDS[self] in ("permanent", "retired")',
        "",
        "    @property",
        "    def is_active(self) -> bool:",
        '        """A blueprint is being developed in this state."""',
        '        return STATE_KINDS[self] == "active"',
        "",
        "    @property",
        "    def requires_blueprint(self) -> bool:",
        '        """A blueprint is allocated to a seed in this state."""',
        "        return STATE_REQUIRES_BLUEPRINT[self]",
        "",
        "    @property",
        "    def blueprint_runs(self) -> bool:",
        '        """The layer evaluates the blueprint in this state."""',
        "        return STATE_BLUEPRINT_RUNS[self]",
        "",
        "    @property",
        "    def alpha_source(self) -> str:",
        '        """zero, strategy or one."""',
        "        return STATE_ALPHA_SOURCE[self]",
        "",
        "    @property",
        "    def learns_from(self) -> str:",
        '        """none, reconstruction or task."""',
        "        return STATE_LEARNS_FROM[self]",
        "",
        "    @property",
        "    def min_epochs(self) -> int:",
        '        """Default minimum lifecycle epochs in this state (the spec\'s)."""',
        "        return STATE_MIN_EPOCHS[self]",
        "",
    ]
    return "\n".join(out)
