"""Flat integer tables derived from a spec, shared by every emitter."""

from __future__ import annotations

from dataclasses import dataclass, field

from .spec_loader import BUILTINS, OPS, Guard, Spec


@dataclass
class SpecTables:
    spec: Spec
    edges: list[tuple[int, int]] = field(init=False)
    edge_bypass: list[bool] = field(init=False)
    edge_guard: list[int] = field(init=False)
    edge_matrix: list[list[int]] = field(init=False)
    guards: list[Guard] = field(init=False)
    guard_clauses: list[list[tuple[bool, int, int, bool, int, float]]] = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        n = len(spec.states)
        fields = [f for f, _ in spec.context_fields]
        params = [p.name for p in spec.params]
        self.edges, self.edge_bypass, self.edge_guard = [], [], []
        self.edge_matrix = [[-1] * n for _ in range(n)]
        self.guards, self.guard_clauses = [], []
        for edge_id, t in enumerate(spec.transitions):
            a, b = spec.state_id(t.source), spec.state_id(t.target)
            self.edges.append((a, b))
            self.edge_bypass.append(t.bypass_min_epochs)
            self.edge_matrix[a][b] = edge_id
            if t.guard is None:
                self.edge_guard.append(-1)
                continue
            self.edge_guard.append(len(self.guards))
            self.guards.append(t.guard)
            clauses = []
            for c in t.guard.comparisons:
                lhs_builtin = c.lhs_kind == "builtin"
                lhs_index = BUILTINS.index(c.lhs) if lhs_builtin else fields.index(c.lhs)
                rhs_value = c.rhs_kind == "value"
                clauses.append(
                    (
                        lhs_builtin,
                        lhs_index,
                        OPS.index(c.op),
                        rhs_value,
                        -1 if rhs_value else params.index(c.rhs),
                        float(c.rhs) if rhs_value else 0.0,
                    )
                )
            self.guard_clauses.append(clauses)
