"""Lifecycle states and the validator of single transition requests.

:class:`StateTransition` judges one request with the same rules, in the same order and
with the same float32 comparisons as the batched kernels (DESIGN §4), and turns the
answer into the spec's message, naming the states, the numbers and the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._generated.lifecycle_tables import (
    BUILTINS,
    CONTEXT_FIELDS,
    EDGE_BYPASS_MIN_EPOCHS,
    EDGE_GUARD,
    EDGE_MATRIX,
    GUARD_CLAUSES,
    GUARD_IS_ANY,
    GUARD_NAMES,
    NUM_STATES,
    OPS,
    PARAM_NAMES,
    REASON_MESSAGES,
    STATE_NAMES,
    ExtendedLifecycle,
    Reason,
    StateColumn,
)
from .policy import LifecyclePolicy, resolve_state

__all__ = [
    "CONTEXT_FIELDS",
    "ExtendedLifecycle",
    "Reason",
    "StateTransition",
    "TransitionContext",
    "context_row",
    "format_reason",
    "state_name",
]

_COMPARE = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a < b or a > b,  # false with NaN, like every other comparison
}
# The relation that holds when a comparison fails (for messages).
_NEGATED = {"lt": ">=", "le": ">", "gt": "<=", "ge": "<", "eq": "!=", "ne": "=="}


def state_name(state: int) -> str:
    """Name of a state id, or ``<unknown state N>`` for an id outside the spec."""
    return STATE_NAMES[state] if 0 <= state < NUM_STATES else f"<unknown state {state}>"


def context_row(metrics: Mapping[str, Any] | None) -> np.ndarray:
    """Float32 (F,) row in ``CONTEXT_FIELDS`` order; fields not in ``metrics`` (or None)
    are NaN. Keys that are not context fields are ignored (a metrics dict may carry more)."""
    row = np.full(len(CONTEXT_FIELDS), np.nan, dtype=np.float32)
    if metrics:
        for index, name in enumerate(CONTEXT_FIELDS):
            value = metrics.get(name)
            if value is not None:
                try:
                    row[index] = float(value)
                except (TypeError, ValueError):
                    raise TypeError(f"metric {name!r} must be a number, got {value!r}") from None
    return row


def format_reason(code: int, **fields: Any) -> str:
    """The spec's message for reason ``code`` filled with ``fields`` (seed_id, num_seeds,
    from_state, to_state, actual_state, epochs_in_state, min_epochs, guard, detail)."""
    return REASON_MESSAGES[int(code)].format_map(_Fields(fields))


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        return "?"


@dataclass
class TransitionContext:
    """What a single request is judged on: the seed, the state it is in and the one
    requested, its lifecycle epochs in the current state, its error count and the
    performance metrics the guards read (``CONTEXT_FIELDS``; missing ones count as NaN)."""

    seed_id: int
    current_state: ExtendedLifecycle
    target_state: ExtendedLifecycle
    epochs_in_state: int = 0
    performance_metrics: dict[str, float] = field(default_factory=dict)
    error_count: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.seed_id, bool) or not isinstance(self.seed_id, (int, np.integer)):
            raise TypeError(f"seed_id must be an int, got {self.seed_id!r}")
        self.seed_id = int(self.seed_id)
        self.current_state = ExtendedLifecycle(resolve_state(self.current_state))
        self.target_state = ExtendedLifecycle(resolve_state(self.target_state))
        for name in ("epochs_in_state", "error_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
            setattr(self, name, int(value))
        self.performance_metrics = dict(self.performance_metrics)
        self.metadata = dict(self.metadata)

    @classmethod
    def from_row(cls, seed_id: int, target_state: Any, row: list[int], metrics: dict[str, Any]) -> TransitionContext:
        """The context of a request judged on a seed's state row (a list of its int32
        columns, as ``ExtendedStateTensor.state[seed].tolist()`` gives it)."""
        return cls(
            seed_id,
            row[StateColumn.LIFECYCLE_STATE],
            target_state,
            epochs_in_state=row[StateColumn.EPOCHS_IN_STATE],
            performance_metrics=metrics,
            error_count=row[StateColumn.ERROR_COUNT],
        )

    def context_row(self) -> np.ndarray:
        """The guard metrics as a float32 row in ``CONTEXT_FIELDS`` order (NaN = missing)."""
        return context_row(self.performance_metrics)


class StateTransition:
    """Validator of single transition requests under a :class:`LifecyclePolicy`."""

    def __init__(self, policy: LifecyclePolicy | None = None) -> None:
        self.policy = policy if policy is not None else LifecyclePolicy.default()

    @staticmethod
    def edge(from_state: Any, to_state: Any) -> int:
        """Edge id of ``from_state -> to_state``, or -1 where the lifecycle has none."""
        return EDGE_MATRIX[resolve_state(from_state)][resolve_state(to_state)]

    @staticmethod
    def allowed_targets(state: Any) -> tuple[ExtendedLifecycle, ...]:
        """States reachable from ``state`` in one step."""
        row = EDGE_MATRIX[resolve_state(state)]
        return tuple(ExtendedLifecycle(to) for to in range(NUM_STATES) if row[to] >= 0)

    def judge(self, from_state: Any, to_state: Any, context: TransitionContext) -> Reason:
        """The reason code of the request (checks 2..5 of DESIGN §4; the seed id is the
        caller's business)."""
        return self._judge(resolve_state(from_state), resolve_state(to_state), context)[0]

    def validate_transition(self, from_state: Any, to_state: Any, context: TransitionContext) -> tuple[bool, str | None]:
        """``(True, None)`` when ``from_state -> to_state`` may be taken by the seed of
        ``context``, else ``(False, message)``."""
        src, dst = resolve_state(from_state), resolve_state(to_state)
        code, detail = self._judge(src, dst, context)
        if code == Reason.OK:
            return True, None
        return False, self.message(code, context.seed_id, src, dst, context, detail=detail)

    def message(
        self,
        code: int,
        seed_id: int,
        from_state: int,
        to_state: int,
        context: TransitionContext | None = None,
        *,
        detail: str | None = None,
        num_seeds: int | None = None,
    ) -> str:
        """The spec's message for ``code``; for GUARD_FAILED the guard and the failed
        comparisons are named (computed from ``context`` unless ``detail`` is given)."""
        edge = EDGE_MATRIX[from_state][to_state] if 0 <= from_state < NUM_STATES and 0 <= to_state < NUM_STATES else -1
        guard = EDGE_GUARD[edge] if edge >= 0 else -1
        if code == Reason.GUARD_FAILED and detail is None and context is not None and guard >= 0:
            detail = self.guard_failure(guard, context)
        return format_reason(
            code,
            seed_id=seed_id,
            num_seeds=num_seeds if num_seeds is not None else "?",
            from_state=state_name(from_state),
            to_state=state_name(to_state),
            actual_state=state_name(int(context.current_state)) if context is not None else "?",
            epochs_in_state=context.epochs_in_state if context is not None else "?",
            min_epochs=self.policy.min_epochs[from_state] if 0 <= from_state < NUM_STATES else "?",
            guard=GUARD_NAMES[guard] if guard >= 0 else "?",
            detail=detail if detail is not None else "?",
        )

    def guard_failure(self, guard: int, context: TransitionContext) -> str | None:
        """Which comparisons of guard ``guard`` failed, with their numbers, or None when
        the guard holds."""
        outcomes = list(self._clauses(guard, context))
        passed = any(ok for ok, _ in outcomes) if GUARD_IS_ANY[guard] else all(ok for ok, _ in outcomes)
        if passed:
            return None
        return " and ".join(text for ok, text in outcomes if not ok)

    def _judge(self, src: int, dst: int, context: TransitionContext) -> tuple[Reason, str | None]:
        if int(context.current_state) != src:
            return Reason.STALE_FROM_STATE, None
        edge = EDGE_MATRIX[src][dst]
        if edge < 0:
            return Reason.INVALID_EDGE, None
        if not EDGE_BYPASS_MIN_EPOCHS[edge] and context.epochs_in_state < self.policy.min_epochs[src]:
            return Reason.MIN_EPOCHS, None
        guard = EDGE_GUARD[edge]
        if guard >= 0:
            detail = self.guard_failure(guard, context)
            if detail is not None:
                return Reason.GUARD_FAILED, detail
        return Reason.OK, None

    def _clauses(self, guard: int, context: TransitionContext):
        """(passed, description of the failure) per clause, compared in float32."""
        row = context.context_row()
        builtins = {"epochs_in_state": context.epochs_in_state, "error_count": context.error_count}
        for lhs_is_builtin, lhs_index, op_index, rhs_is_value, rhs_param, rhs_value in GUARD_CLAUSES[guard]:
            op = OPS[op_index]
            if lhs_is_builtin:
                lhs_name = BUILTINS[lhs_index]
                lhs = np.float32(builtins[lhs_name])
            else:
                lhs_name = CONTEXT_FIELDS[lhs_index]
                lhs = row[lhs_index]
            if rhs_is_value:
                rhs, rhs_text = np.float32(rhs_value), f"{float(np.float32(rhs_value)):.6g}"
            else:
                rhs = np.float32(self.policy.params[rhs_param])
                rhs_text = f"{PARAM_NAMES[rhs_param]}={float(rhs):.6g}"
            ok = bool(_COMPARE[op](lhs, rhs))
            if math.isnan(float(lhs)):
                yield ok, f"{lhs_name} missing"
            else:
                yield ok, f"{lhs_name}={float(lhs):.6g} {_NEGATED[op]} {rhs_text}"
