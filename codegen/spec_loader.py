"""Load and validate `spec/lifecycle.yaml`.

Shape is checked against `spec/lifecycle.schema.json` (jsonschema); meaning is checked
here. Every problem becomes one line naming the file, the entry and the fix, and all
of them are reported at once in a :class:`SpecError`.

This module imports neither torch nor ``kasmina`` so that code generation works before
the package (or its extension) can be imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_DIR = Path(__file__).resolve().parent.parent / "spec"
DEFAULT_SPEC_PATH = SPEC_DIR / "lifecycle.yaml"
SCHEMA_PATH = SPEC_DIR / "lifecycle.schema.json"

OPS = ("lt", "le", "gt", "ge", "eq", "ne")
BUILTINS = ("epochs_in_state", "error_count")
KINDS = ("idle", "active", "permanent", "retired")
ALPHA_SOURCES = ("zero", "strategy", "one")
LEARNS_FROM = ("none", "reconstruction", "task")
# Names the runtime refers to by meaning; the spec decides their numbers.
REQUIRED_REASONS = (
    "OK",
    "UNKNOWN_SEED",
    "STALE_FROM_STATE",
    "INVALID_EDGE",
    "MIN_EPOCHS",
    "GUARD_FAILED",
    "DUPLICATE_IN_BATCH",
)
REQUIRED_STATE_COLUMNS = (
    "LIFECYCLE_STATE",
    "BLUEPRINT_ID",
    "EPOCHS_IN_STATE",
    "GRAFTING_STRATEGY",
    "PARENT_STATE",
    "CHECKPOINT_ID",
    "EVALUATION_SCORE",
    "ERROR_COUNT",
)
MESSAGE_PLACEHOLDERS = frozenset(
    {
        "seed_id",
        "num_seeds",
        "from_state",
        "to_state",
        "actual_state",
        "epochs_in_state",
        "min_epochs",
        "guard",
        "detail",
    }
)


class SpecError(ValueError):
    """The spec is malformed. ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass(frozen=True)
class State:
    name: str
    id: int
    min_epochs: int
    kind: str
    blueprint_runs: bool
    alpha: str
    learns_from: str
    requires_blueprint: bool
    description: str


@dataclass(frozen=True)
class Comparison:
    lhs_kind: str  # "field" | "builtin"
    lhs: str
    op: str
    rhs_kind: str  # "param" | "value"
    rhs: str | float


@dataclass(frozen=True)
class Guard:
    name: str
    mode: str  # "all" | "any"
    comparisons: tuple[Comparison, ...]


@dataclass(frozen=True)
class Transition:
    source: str
    target: str
    bypass_min_epochs: bool
    guard: Guard | None


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    description: str


@dataclass(frozen=True)
class Reason:
    name: str
    code: int
    message: str


@dataclass(frozen=True)
class Spec:
    """A validated lifecycle spec; states are sorted by id."""

    path: Path
    sha256: str
    state_columns: tuple[str, ...]
    metric_columns: tuple[str, ...]
    history_length: int
    states: tuple[State, ...]
    context_fields: tuple[tuple[str, str], ...]
    params: tuple[Param, ...]
    transitions: tuple[Transition, ...]
    grafting_strategies: tuple[tuple[str, int], ...]
    reasons: tuple[Reason, ...]

    def state_id(self, name: str) -> int:
        return next(s.id for s in self.states if s.name == name)

    @property
    def guards(self) -> tuple[Guard, ...]:
        return tuple(t.guard for t in self.transitions if t.guard is not None)


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _schema_location(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def load_spec(path: str | Path | None = None) -> Spec:
    """Read, validate and normalise a lifecycle spec (default: the package's own)."""
    path = Path(path) if path is not None else DEFAULT_SPEC_PATH
    shown = _display_path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise SpecError([f"{shown}: cannot read the spec ({exc.strerror}); check the path"]) from exc
    try:
        data = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise SpecError([f"{shown}: {where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"]) from exc

    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    shape_errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if shape_errors:
        raise SpecError([f"{shown}: {_schema_location(e)}: {e.message}; see spec/lifecycle.schema.json" for e in shape_errors])
    errors: list[str] = []
    spec = _build(path, hashlib.sha256(raw_bytes).hexdigest(), data, errors, shown)
    if errors:
        raise SpecError(errors)
    assert spec is not None
    return spec


def _duplicates(values: list[Any]) -> list[Any]:
    """Values met before; names compare without case (the emitters upper-case them)."""
    seen: set[Any] = set()
    return [v for v in values if (key := v.upper() if isinstance(v, str) else v) in seen or seen.add(key)]


def _build(path: Path, sha: str, data: dict, errors: list[str], shown: str) -> Spec | None:
    def err(where: str, what: str, fix: str) -> None:
        errors.append(f"{shown}: {where}: {what}; {fix}")

    layout = data["layout"]
    for column in REQUIRED_STATE_COLUMNS:
        if column not in layout["state_columns"]:
            err("layout.state_columns", f"missing column {column}", "the runtime needs it; add it")
    for key in ("state_columns", "metric_columns"):
        for dup in _duplicates(list(layout[key])):
            err(f"layout.{key}", f"column {dup} is listed twice", "list each column once")

    raw_states = data["states"]
    names = [s["name"] for s in raw_states]
    ids = [s["id"] for s in raw_states]
    for i, s in enumerate(raw_states):
        if s["name"] in names[:i]:
            err(f"states[{i}].name", f"state name {s['name']} is used twice", "give every state its own name")
        if s["id"] in ids[:i]:
            err(f"states[{i}].id", f"state id {s['id']} is used twice", "give every state its own id")
    if sorted(set(ids)) != list(range(len(set(ids)))):
        err("states", f"state ids {sorted(set(ids))} are not contiguous from 0", f"use ids 0..{len(raw_states) - 1}")
    states = tuple(
        sorted(
            (
                State(
                    name=s["name"],
                    id=s["id"],
                    min_epochs=s["min_epochs"],
                    kind=s["kind"],
                    blueprint_runs=s["blueprint_runs"],
                    alpha=s["alpha"],
                    learns_from=s["learns_from"],
                    requires_blueprint=s["requires_blueprint"],
                    description=s.get("description", ""),
                )
                for s in raw_states
            ),
            key=lambda s: s.id,
        )
    )
    known_states = set(names)

    fields = [f["name"] for f in data["context_fields"]]
    for dup in _duplicates(fields):
        err("context_fields", f"field {dup} is declared twice", "declare each field once")
    for clash in set(fields) & set(BUILTINS):
        err("context_fields", f"field {clash} shadows a builtin", f"rename it; builtins are {', '.join(BUILTINS)}")

    params: list[Param] = []
    for i, p in enumerate(data["params"]):
        if not _is_float32(float(p["default"])):
            err(f"params[{i}].default", f"default {p['default']} is not a finite float32", _FLOAT32_HINT)
        params.append(Param(p["name"], float(p["default"]), p.get("description", "")))
    param_names = [p.name for p in params]
    for dup in _duplicates(param_names):
        err("params", f"param {dup} is declared twice", "declare each param once")

    transitions: list[Transition] = []
    seen_edges: set[tuple[str, str]] = set()
    guard_names: list[str] = []
    for i, t in enumerate(data["transitions"]):
        where = f"transitions[{i}]"
        for end in ("from", "to"):
            if t[end] not in known_states:
                err(f"{where}.{end}", f"unknown state {t[end]}", f"use one of {', '.join(names)}")
        edge = (t["from"], t["to"])
        if edge in seen_edges:
            err(where, f"edge {t['from']} -> {t['to']} is listed twice", "list each edge once")
        seen_edges.add(edge)
        guard = None
        if "guard" in t:
            guard = _build_guard(t["guard"], f"{where}.guard", set(fields), set(param_names), err)
            if guard.name in guard_names:
                err(f"{where}.guard.name", f"guard name {guard.name} is used twice", "name every guard uniquely")
            guard_names.append(guard.name)
        transitions.append(Transition(t["from"], t["to"], bool(t.get("bypass_min_epochs", False)), guard))

    if not errors:
        _check_graph(states, names, transitions, err)

    strategies = [(g["name"], g["id"]) for g in data["grafting_strategies"]]
    for dup in _duplicates([n for n, _ in strategies]):
        err("grafting_strategies", f"strategy {dup} is listed twice", "list each strategy once")
    if sorted(i for _, i in strategies) != list(range(len(strategies))):
        err("grafting_strategies", "strategy ids are not contiguous from 0", f"use ids 0..{len(strategies) - 1}")

    reasons = [Reason(r["name"], r["code"], r["message"]) for r in data["reasons"]]
    for dup in _duplicates([r.name for r in reasons]):
        err("reasons", f"reason {dup} is listed twice", "list each reason once")
    for dup in _duplicates([r.code for r in reasons]):
        err("reasons", f"reason code {dup} is used twice", "give every reason its own code")
    if sorted(r.code for r in reasons) != list(range(len(reasons))):
        err("reasons", "reason codes are not contiguous from 0", f"use codes 0..{len(reasons) - 1}")
    for name in REQUIRED_REASONS:
        if name not in {r.name for r in reasons}:
            err("reasons", f"missing reason {name}", "the runtime reports it; add it with a message")
    for i, r in enumerate(reasons):
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(r.message) if f}
        except ValueError as exc:
            err(f"reasons[{i}].message", f"bad template ({exc})", "use str.format placeholders like {seed_id}")
            continue
        for unknown in sorted(used - MESSAGE_PLACEHOLDERS):
            err(
                f"reasons[{i}].message",
                f"unknown placeholder {{{unknown}}}",
                f"use only {', '.join(sorted(MESSAGE_PLACEHOLDERS))}",
            )

    if errors:
        return None
    return Spec(
        path=path,
        sha256=sha,
        state_columns=tuple(layout["state_columns"]),
        metric_columns=tuple(layout["metric_columns"]),
        history_length=layout["history_length"],
        states=states,
        context_fields=tuple((f["name"], f.get("description", "")) for f in data["context_fields"]),
        params=tuple(params),
        transitions=tuple(transitions),
        grafting_strategies=tuple(sorted(strategies, key=lambda s: s[1])),
        reasons=tuple(sorted(reasons, key=lambda r: r.code)),
    )


_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_HINT = f"use a finite number of magnitude at most {_FLOAT32_MAX:.6g} (guards compare in float32)"


def _is_float32(value: float) -> bool:
    """Whether ``value`` is finite and rounds to a finite float32, the type the kernels
    compare in (numpy prints float32's largest value as 3.4028235e+38, a little above it)."""
    try:
        struct.pack("<f", value)
    except OverflowError:
        return False
    return math.isfinite(value)


def _build_guard(raw: dict, where: str, fields: set[str], params: set[str], err) -> Guard:
    mode = "all" if "all" in raw else "any"
    comparisons: list[Comparison] = []
    for j, c in enumerate(raw[mode]):
        at = f"{where}.{mode}[{j}]"
        if "field" in c:
            lhs_kind, lhs = "field", c["field"]
            if lhs not in fields:
                err(
                    f"{at}.field",
                    f"unknown context field {lhs}",
                    f"declare it under context_fields or use one of {', '.join(sorted(fields))}",
                )
        else:
            lhs_kind, lhs = "builtin", c["builtin"]
            if lhs not in BUILTINS:
                err(f"{at}.builtin", f"unknown builtin {lhs}", f"use one of {', '.join(BUILTINS)}")
        if c["op"] not in OPS:
            err(f"{at}.op", f"unknown operator {c['op']}", f"use one of {', '.join(OPS)}")
        if "param" in c:
            rhs_kind, rhs = "param", c["param"]
            if rhs not in params:
                err(f"{at}.param", f"unknown param {rhs}", "declare it under params or use a declared one")
        else:
            rhs_kind, rhs = "value", float(c["value"])
            if not _is_float32(rhs):
                err(f"{at}.value", f"value {c['value']} is not a finite float32", _FLOAT32_HINT)
        comparisons.append(Comparison(lhs_kind, lhs, c["op"], rhs_kind, rhs))
    return Guard(raw["name"], mode, tuple(comparisons))


def _check_graph(states: tuple[State, ...], file_order: list[str], transitions: list[Transition], err) -> None:
    outgoing: dict[str, list[str]] = {s.name: [] for s in states}
    for t in transitions:
        outgoing[t.source].append(t.target)
    initial = next(s.name for s in states if s.id == 0)
    reached = {initial}
    queue = deque([initial])
    while queue:
        for nxt in outgoing[queue.popleft()]:
            if nxt not in reached:
                reached.add(nxt)
                queue.append(nxt)
    for s in states:
        i = file_order.index(s.name)
        if s.name not in reached:
            err(f"states[{i}]", f"state {s.name} is unreachable from {initial}", "add a transition into it or remove it")
        if s.kind == "permanent" and outgoing[s.name]:
            err(f"states[{i}].kind", f"permanent state {s.name} has outgoing transitions", "remove them or change its kind")
        if s.kind != "permanent" and not outgoing[s.name]:
            err(
                f"states[{i}]",
                f"state {s.name} is a trap (kind {s.kind}, no way out)",
                "add a transition out of it or make it kind: permanent",
            )
        if s.kind == "retired" and initial not in outgoing[s.name]:
            err(f"states[{i}]", f"retired state {s.name} cannot be recycled", f"add a transition {s.name} -> {initial}")
