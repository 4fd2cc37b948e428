"""Emit `csrc/generated/lifecycle_tables.h`: the spec as constexpr data and switch-based
`KASMINA_HD` functions, usable from host C++ and CUDA device code alike (switches
rather than arrays, because namespace-scope constexpr arrays are not addressable from
device code)."""

from __future__ import annotations

import struct

from .spec_loader import ALPHA_SOURCES, KINDS, LEARNS_FROM, Spec
from .tables import SpecTables


def _f32(value: float) -> str:
    """An exact C++ float literal of the float32 nearest to ``value``."""
    f32 = struct.unpack("<f", struct.pack("<f", value))[0]
    return f"{f32.hex()}f"


def _switch(name: str, ret: str, arg: str, cases: list[tuple[int, str]], default: str, doc: str) -> list[str]:
    lines = [f"// {doc}", f"KASMINA_HD {ret} {name}(int32_t {arg}) {{", f"  switch ({arg}) {{"]
    lines += [f"    case {k}: return {v};" for k, v in cases]
    lines += [f"    default: return {default};", "  }", "}", ""]
    return lines


def _enum(name: str, base: str, members: list[tuple[str, int]]) -> list[str]:
    body = ",\n".join(f"  {n} = {v}" for n, v in members)
    return [f"enum {name} : {base} {{", body, "};", ""]


def emit_cpp(spec: Spec, header: str) -> str:
    t = SpecTables(spec)
    n = len(spec.states)
    fields = [f for f, _ in spec.context_fields]
    params = [p.name for p in spec.params]
    out = [
        f"// {header}",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "#ifndef KASMINA_HD",
        "#if defined(__CUDACC__) || defined(__HIPCC__)",
        "#define KASMINA_HD __host__ __device__ __forceinline__",
        "#else",
        "#define KASMINA_HD inline",
        "#endif",
        "#endif",
        "",
        f'#define KASMINA_SPEC_SHA256 "{spec.sha256}"',
        "",
        "namespace kasmina {",
        "namespace spec {",
        "",
        f"constexpr int32_t kNumStates = {n};",
        f"constexpr int32_t kNumEdges = {len(t.edges)};",
        f"constexpr int32_t kNumContextFields = {len(fields)};",
        f"constexpr int32_t kNumParams = {len(params)};",
        f"constexpr int32_t kNumStateColumns = {len(spec.state_columns)};",
        f"constexpr int32_t kNumMetricColumns = {len(spec.metric_columns)};",
        f"constexpr int32_t kHistoryLength = {spec.history_length};",
        f"constexpr int32_t kNumGraftingStrategies = {len(spec.grafting_strategies)};",
        f"constexpr int32_t kNumReasons = {len(spec.reasons)};",
        "",
    ]
    out += _enum("State", "int32_t", [(s.name, s.id) for s in spec.states])
    out += _enum("StateColumn", "int32_t", [(f"COL_{c.upper()}", i) for i, c in enumerate(spec.state_columns)])
    out += _enum("MetricColumn", "int32_t", [(f"METRIC_{c.upper()}", i) for i, c in enumerate(spec.metric_columns)])
    out += _enum("ContextField", "int32_t", [(f"FIELD_{f.upper()}", i) for i, f in enumerate(fields)])
    out += _enum("Param", "int32_t", [(f"PARAM_{p.upper()}", i) for i, p in enumerate(params)])
    out += _enum("Reason", "int32_t", [(f"REASON_{r.name}", r.code) for r in spec.reasons])
    out += _enum("StateKind", "int32_t", [(f"KIND_{k.upper()}", i) for i, k in enumerate(KINDS)])
    out += _enum("AlphaSource", "int32_t", [(f"ALPHA_{a.upper()}", i) for i, a in enumerate(ALPHA_SOURCES)])
    out += _enum("LearnsFrom", "int32_t", [(f"LEARNS_{a.upper()}", i) for i, a in enumerate(LEARNS_FROM)])

    out += _switch(
        "default_min_epochs",
        "int32_t",
        "state",
        [(s.id, str(s.min_epochs)) for s in spec.states],
        "0",
        "Default minimum lifecycle epochs per state (a LifecyclePolicy overrides them at run time).",
    )
    out += _switch(
        "default_param",
        "float",
        "param",
        [(i, _f32(p.default)) for i, p in enumerate(spec.params)],
        "0.0f",
        "Default value of each param (a LifecyclePolicy overrides them at run time).",
    )
    out += _switch(
        "state_kind",
        "int32_t",
        "state",
        [(s.id, f"KIND_{s.kind.upper()}") for s in spec.states],
        "-1",
        "StateKind of each state.",
    )
    out += _switch(
        "state_blueprint_runs",
        "bool",
        "state",
        [(s.id, "true") for s in spec.states if s.blueprint_runs],
        "false",
        "Whether the layer evaluates the blueprint of a seed in this state.",
    )
    out += _switch(
        "state_alpha_source",
        "int32_t",
        "state",
        [(s.id, f"ALPHA_{s.alpha.upper()}") for s in spec.states],
        "ALPHA_ZERO",
        "Where a seed's blend factor comes from in this state.",
    )
    out += _switch(
        "state_learns_from",
        "int32_t",
        "state",
        [(s.id, f"LEARNS_{s.learns_from.upper()}") for s in spec.states],
        "LEARNS_NONE",
        "What a seed's blueprint is trained on in this state.",
    )

    out += [
        "// Edge id of from -> to, or -1 where the lifecycle has no such edge.",
        "KASMINA_HD int32_t edge_id(int32_t from, int32_t to) {",
        "  if (from < 0 || from >= kNumStates || to < 0 || to >= kNumStates) return -1;",
        "  switch (from * kNumStates + to) {",
    ]
    out += [
        f"    case {a * n + b}: return {e};  // {spec.states[a].name} -> {spec.states[b].name}"
        for e, (a, b) in enumerate(t.edges)
    ]
    out += ["    default: return -1;", "  }", "}", ""]
    out += _switch(
        "edge_from", "int32_t", "edge", [(e, str(a)) for e, (a, _) in enumerate(t.edges)], "-1", "Source state of an edge."
    )
    out += _switch(
        "edge_to", "int32_t", "edge", [(e, str(b)) for e, (_, b) in enumerate(t.edges)], "-1", "Target state of an edge."
    )
    out += _switch(
        "edge_bypasses_min_epochs",
        "bool",
        "edge",
        [(e, "true") for e, b in enumerate(t.edge_bypass) if b],
        "false",
        "Whether an edge may be taken before the source state's minimum epochs.",
    )
    out += _switch(
        "edge_guard",
        "int32_t",
        "edge",
        [(e, str(g)) for e, g in enumerate(t.edge_guard) if g >= 0],
        "-1",
        "Guard id of an edge, or -1 for an unguarded edge.",
    )

    out += [
        "namespace detail {",
        "// Every comparison with NaN is false, `ne` included, so a missing metric never",
        "// lets a guarded move through.",
        "KASMINA_HD bool cmp_lt(float a, float b) { return a < b; }",
        "KASMINA_HD bool cmp_le(float a, float b) { return a <= b; }",
        "KASMINA_HD bool cmp_gt(float a, float b) { return a > b; }",
        "KASMINA_HD bool cmp_ge(float a, float b) { return a >= b; }",
        "KASMINA_HD bool cmp_eq(float a, float b) { return a == b; }",
        "KASMINA_HD bool cmp_ne(float a, float b) { return a < b || a > b; }",
        "}  // namespace detail",
        "",
        "// Whether the guard of `edge` holds. `ctx` holds kNumContextFields float32 metrics",
        "// (NaN where not supplied), `params` kNumParams float32 thresholds. Unguarded",
        "// edges pass.",
        "KASMINA_HD bool guard_passes(int32_t edge, const float* ctx, float epochs_in_state,",
        "                             float error_count, const float* params) {",
        "  (void)ctx;",
        "  (void)epochs_in_state;",
        "  (void)error_count;",
        "  (void)params;",
        "  switch (edge) {",
    ]
    for e, g in enumerate(t.edge_guard):
        if g < 0:
            continue
        guard = t.guards[g]
        terms = []
        for c in guard.comparisons:
            lhs = c.lhs if c.lhs_kind == "builtin" else f"ctx[FIELD_{c.lhs.upper()}]"
            rhs = _f32(float(c.rhs)) if c.rhs_kind == "value" else f"params[PARAM_{str(c.rhs).upper()}]"
            terms.append(f"detail::cmp_{c.op}({lhs}, {rhs})")
        joiner = " &&\n             " if guard.mode == "all" else " ||\n             "
        a, b = t.edges[e]
        out += [
            f"    case {e}:  // {spec.states[a].name} -> {spec.states[b].name}: {guard.name} ({guard.mode})",
            f"      return {joiner.join(terms)};",
        ]
    out += ["    default: return true;", "  }", "}", "", "}  // namespace spec", "}  // namespace kasmina", ""]
    return "\n".join(out)
