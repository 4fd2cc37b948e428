"""StateTransition: the seed document's validator, its messages, and its agreement with
the batched op on random single requests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kasmina import CONTEXT_FIELDS, ExtendedStateTensor, LifecyclePolicy, Reason, StateTransition, TransitionContext
from kasmina import ExtendedLifecycle as L
from kasmina._generated import lifecycle_tables as T
from kasmina._generated.lifecycle_tables import StateColumn


def ctx(current: L, target: L, epochs: int = 1000, errors: int = 0, **metrics: float) -> TransitionContext:
    return TransitionContext(7, current, target, epochs_in_state=epochs, performance_metrics=metrics, error_count=errors)


def test_valid_transition() -> None:
    assert StateTransition().validate_transition(L.DORMANT, L.GERMINATED, ctx(L.DORMANT, L.GERMINATED)) == (True, None)
    context = ctx(L.TRAINING, L.GRAFTING, reconstruction_loss=0.0)
    ok, error = StateTransition().validate_transition("training", "grafting", context)
    assert ok and error is None


def test_messages_name_states_numbers_and_thresholds() -> None:
    v = StateTransition()
    ok, error = v.validate_transition(L.GERMINATED, L.FOSSILIZED, ctx(L.GERMINATED, L.FOSSILIZED))
    assert not ok and error == "no transition GERMINATED -> FOSSILIZED in the lifecycle"
    ok, error = v.validate_transition(L.TRAINING, L.CULLED, ctx(L.TRAINING, L.CULLED, epochs=12))
    minimum = T.STATE_MIN_EPOCHS[L.TRAINING]
    assert error == f"seed 7 has spent 12 of the {minimum} epochs TRAINING requires before -> CULLED"
    ok, error = v.validate_transition(L.TRAINING, L.GRAFTING, ctx(L.GRAFTING, L.GRAFTING))
    assert error == "seed 7 is in GRAFTING, not TRAINING"
    ok, error = v.validate_transition(L.TRAINING, L.GRAFTING, ctx(L.TRAINING, L.GRAFTING, reconstruction_loss=0.05))
    assert error == (
        "seed 7: guard 'reconstruction_converged' of TRAINING -> GRAFTING failed: "
        "reconstruction_loss=0.05 > reconstruction_threshold=0.01"
    )
    ok, error = v.validate_transition(L.EVALUATING, L.FINE_TUNING, ctx(L.EVALUATING, L.FINE_TUNING, stability_score=0.5))
    assert error.endswith("performance_delta missing and stability_score=0.5 < min_stability=0.8")
    ok, error = v.validate_transition(
        L.EVALUATING, L.CULLED, ctx(L.EVALUATING, L.CULLED, errors=2, performance_delta=0.1, error_rate=0.0)
    )
    assert error.endswith(
        "performance_delta=0.1 >= cull_performance_delta=-0.05 and error_rate=0 <= cull_error_rate=0.1 "
        "and error_count=2 <= cull_error_count=5"
    )


def test_any_guard_passes_on_one_clause() -> None:
    v = StateTransition()
    assert v.judge(L.EVALUATING, L.CULLED, ctx(L.EVALUATING, L.CULLED, errors=6)) == Reason.OK
    assert v.judge(L.EVALUATING, L.CULLED, ctx(L.EVALUATING, L.CULLED, error_rate=0.5)) == Reason.OK
    assert v.judge(L.EVALUATING, L.CULLED, ctx(L.EVALUATING, L.CULLED, performance_delta=-0.1)) == Reason.OK


def test_bypass_and_policy() -> None:
    v = StateTransition(LifecyclePolicy.default().with_overrides(min_epochs={"FINE_TUNING": 5}))
    assert v.judge(L.FINE_TUNING, L.ROLLED_BACK, ctx(L.FINE_TUNING, L.ROLLED_BACK, epochs=0)) == Reason.OK
    assert v.judge(L.FINE_TUNING, L.CULLED, ctx(L.FINE_TUNING, L.CULLED, epochs=4)) == Reason.MIN_EPOCHS
    assert v.judge(L.FINE_TUNING, L.CULLED, ctx(L.FINE_TUNING, L.CULLED, epochs=5)) == Reason.OK


def test_context_validation() -> None:
    with pytest.raises(ValueError, match="unknown lifecycle state 'NOWHERE'"):
        TransitionContext(0, "NOWHERE", L.DORMANT)
    with pytest.raises(ValueError, match="epochs_in_state must be a non-negative int, got -1"):
        TransitionContext(0, L.DORMANT, L.GERMINATED, epochs_in_state=-1)
    with pytest.raises(TypeError, match="seed_id must be an int"):
        TransitionContext("0", L.DORMANT, L.GERMINATED)
    row = ctx(L.DORMANT, L.GERMINATED, performance_delta=0.25, unrelated=3.0).context_row()
    assert row.dtype == np.float32 and row[CONTEXT_FIELDS.index("performance_delta")] == 0.25
    assert np.isnan(row[CONTEXT_FIELDS.index("reconstruction_loss")])


metric_values = st.one_of(st.none(), st.sampled_from([math.nan, 0.0, 0.01, 0.8, 0.95, -0.05, 0.1]), st.floats(-1, 1, width=32))


@settings(max_examples=200, deadline=None)
@given(
    current=st.sampled_from(list(L)),
    src=st.sampled_from(list(L)),
    dst=st.sampled_from(list(L)),
    epochs=st.integers(0, 120),
    errors=st.integers(0, 8),
    values=st.lists(metric_values, min_size=len(CONTEXT_FIELDS), max_size=len(CONTEXT_FIELDS)),
)
def test_validator_agrees_with_the_batched_op(current, src, dst, epochs, errors, values) -> None:
    metrics = {name: v for name, v in zip(CONTEXT_FIELDS, values, strict=True) if v is not None}
    state = ExtendedStateTensor(1)
    state.state[0, StateColumn.LIFECYCLE_STATE] = int(current)
    state.state[0, StateColumn.EPOCHS_IN_STATE] = epochs
    state.state[0, StateColumn.ERROR_COUNT] = errors
    code = state.apply_transitions([0], [src], [dst], {k: torch.tensor([v]) for k, v in metrics.items()})
    context = TransitionContext(0, current, dst, epochs_in_state=epochs, performance_metrics=metrics, error_count=errors)
    assert StateTransition().judge(src, dst, context) == code.item()
    ok, error = StateTransition().validate_transition(src, dst, context)
    assert ok == (code.item() == Reason.OK) and (error is None) == ok
