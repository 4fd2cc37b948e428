"""ExtendedStateTensor: every edge, guard, minimum and bypass, the recycle embargo,
stale and duplicate requests, history wrap-around, device and state_dict round trips,
and bad input leaving everything untouched. Each test runs on the compiled kernels (when
built) and on the pure-torch reference."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import kasmina
from kasmina import ExtendedLifecycle as L
from kasmina import ExtendedStateTensor, LifecyclePolicy, Reason
from kasmina import ops as kops
from kasmina._generated import lifecycle_tables as T
from kasmina._generated.lifecycle_tables import MetricColumn, StateColumn

BACKENDS = ["reference"] + (["kernel"] if kops.HAS_EXTENSION else [])
FAST = LifecyclePolicy.default().with_overrides(min_epochs={s.name: 0 for s in L})


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    if request.param == "reference":
        monkeypatch.setattr(kops, "HAS_EXTENSION", False)
    return request.param


def passing_metrics(edge: int, policy: LifecyclePolicy = FAST) -> dict[str, float]:
    """Context values that satisfy the edge's guard under ``policy`` (built from the
    guard clauses: every clause of an `all` guard, the first field clause of an `any`)."""
    guard = T.EDGE_GUARD[edge]
    if guard < 0:
        return {}
    clauses = [c for c in T.GUARD_CLAUSES[guard] if not c[0]]
    if T.GUARD_IS_ANY[guard]:
        clauses = clauses[:1]
    metrics = {}
    for _, field, op, rhs_is_value, param, value in clauses:
        rhs = value if rhs_is_value else policy.params[param]
        offset = {"lt": -1.0, "le": 0.0, "gt": 1.0, "ge": 0.0, "eq": 0.0, "ne": 1.0}[T.OPS[op]]
        metrics[T.CONTEXT_FIELDS[field]] = rhs + offset
    return metrics


def path_to(target: int) -> list[int]:
    """Edge ids of a shortest path DORMANT -> target."""
    frontier, seen = [(int(L.DORMANT), [])], {int(L.DORMANT)}
    while frontier:
        state, path = frontier.pop(0)
        if state == target:
            return path
        for edge, (src, dst) in enumerate(T.EDGES):
            if src == state and dst not in seen:
                seen.add(dst)
                frontier.append((dst, [*path, edge]))
    raise AssertionError(f"{target} unreachable")


def move(st: ExtendedStateTensor, seed: int, edge: int, policy: LifecyclePolicy = FAST) -> None:
    src, dst = T.EDGES[edge]
    codes = st.apply_transitions([seed], [src], [dst], passing_metrics(edge, policy) or None, policy=policy)
    assert codes.tolist() == [Reason.OK], (T.STATE_NAMES[src], T.STATE_NAMES[dst], codes)


def bring(st: ExtendedStateTensor, seed: int, target: int) -> None:
    for edge in path_to(target):
        move(st, seed, edge)


def snapshot(st: ExtendedStateTensor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in st.state_dict().items()}


def assert_unchanged(st: ExtendedStateTensor, before: dict[str, torch.Tensor]) -> None:
    for key, value in st.state_dict().items():
        assert torch.equal(value, before[key]) or (
            value.is_floating_point()
            and torch.equal(value.isnan(), before[key].isnan())
            and torch.equal(value.nan_to_num(), before[key].nan_to_num())
        ), key


# ---- construction -------------------------------------------------------------------


def test_initial_rows_and_layout() -> None:
    st = ExtendedStateTensor(3)
    assert st.state.shape == (3, len(T.STATE_COLUMNS)) and st.state.dtype == torch.int32
    assert st.history.shape == (3, T.HISTORY_LENGTH, 2) and st.history.dtype == torch.int32
    assert st.history_count.shape == (3,) and st.history_count.dtype == torch.int32
    assert st.metrics.shape == (3, len(T.METRIC_COLUMNS)) and st.metrics.dtype == torch.float32
    row = st.get_state(1).tolist()
    assert row[StateColumn.LIFECYCLE_STATE] == L.DORMANT and row[StateColumn.PARENT_STATE] == L.DORMANT
    assert row[StateColumn.BLUEPRINT_ID] == -1 and row[StateColumn.CHECKPOINT_ID] == -1
    assert row[StateColumn.EPOCHS_IN_STATE] == row[StateColumn.ERROR_COUNT] == row[StateColumn.EVALUATION_SCORE] == 0
    assert torch.isnan(st.metrics).all()
    assert st.bytes_per_seed <= 136
    assert st.get_transition_history(0) == []
    assert st.get_state_summary() == {name: (3 if name == "DORMANT" else 0) for name in T.STATE_NAMES}
    assert set(dict(st.named_buffers())) == {"state", "history", "history_count", "metrics"}


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_num_seeds(bad) -> None:
    with pytest.raises(ValueError, match="num_seeds"):
        ExtendedStateTensor(bad)


# ---- edges ----------------------------------------------------------------------------


@pytest.mark.parametrize("edge", range(T.NUM_EDGES), ids=[f"{T.STATE_NAMES[a]}->{T.STATE_NAMES[b]}" for a, b in T.EDGES])
def test_every_edge_commits(backend, edge: int) -> None:
    src, dst = T.EDGES[edge]
    st = ExtendedStateTensor(4)
    bring(st, 2, src)
    st.step_epoch()
    before_history = st.get_transition_history(2)
    move(st, 2, edge)
    row = st.get_state(2).tolist()
    assert row[StateColumn.LIFECYCLE_STATE] == dst
    assert row[StateColumn.PARENT_STATE] == src
    assert row[StateColumn.EPOCHS_IN_STATE] == 0
    assert st.get_transition_history(2) == [*before_history, (src, dst)]
    assert st.lifecycle_state(2) == dst
    # Other seeds are untouched.
    assert st.get_state([0, 1, 3])[:, StateColumn.LIFECYCLE_STATE].tolist() == [L.DORMANT] * 3


@pytest.mark.parametrize("src", list(L), ids=lambda s: s.name)
def test_non_edges_are_invalid(backend, src: L) -> None:
    st = ExtendedStateTensor(1)
    bring(st, 0, src)
    targets = [dst for dst in L if T.EDGE_MATRIX[src][dst] < 0]
    before = snapshot(st)
    for dst in targets:
        assert st.apply_transitions([0], [src], [dst], policy=FAST).tolist() == [Reason.INVALID_EDGE]
    for bad in (-1, T.NUM_STATES, 1000):
        assert st.apply_transitions([0], [src], [bad], policy=FAST).tolist() == [Reason.INVALID_EDGE]
    assert_unchanged(st, before)


def test_fossilized_is_permanent_and_retired_states_recycle() -> None:
    assert kasmina.StateTransition.allowed_targets(L.FOSSILIZED) == ()
    for retired in (L.CULLED, L.CANCELLED, L.ROLLED_BACK):
        assert kasmina.StateTransition.allowed_targets(retired) == (L.DORMANT,)


# ---- guards ---------------------------------------------------------------------------

GUARDED = [e for e in range(T.NUM_EDGES) if T.EDGE_GUARD[e] >= 0]


@pytest.mark.parametrize("edge", GUARDED, ids=lambda e: T.GUARD_NAMES[T.EDGE_GUARD[e]])
def test_guard_pass_fail_missing(backend, edge: int) -> None:
    src, dst = T.EDGES[edge]
    guard = T.EDGE_GUARD[edge]
    st = ExtendedStateTensor(3)
    for seed in range(3):
        bring(st, seed, src)
    good = passing_metrics(edge)
    assert good, "a guarded edge needs metrics"
    # Missing metrics: every comparison with NaN fails.
    before = snapshot(st)
    assert st.apply_transitions([0], [src], [dst], policy=FAST).tolist() == [Reason.GUARD_FAILED]
    assert st.apply_transitions([0], [src], [dst], {name: math.nan for name in good}, policy=FAST).tolist() == [
        Reason.GUARD_FAILED
    ]
    # Failing values: push each passing value across its threshold.
    failing = {}
    for _, field, op, rhs_is_value, param, value in T.GUARD_CLAUSES[guard]:
        name = T.CONTEXT_FIELDS[field] if not _ else None
        if name is None:
            continue
        rhs = np.float32(value if rhs_is_value else FAST.params[param])
        direction = {"lt": np.inf, "le": np.inf, "gt": -np.inf, "ge": -np.inf}[T.OPS[op]]
        boundary = rhs if T.OPS[op] in ("lt", "gt") else np.nextafter(rhs, np.float32(direction))
        failing[name] = float(boundary)
    assert st.apply_transitions([1], [src], [dst], failing, policy=FAST).tolist() == [Reason.GUARD_FAILED]
    assert_unchanged(st, before)
    assert st.apply_transitions([2], [src], [dst], good, policy=FAST).tolist() == [Reason.OK]


def test_threshold_exact_value_compares_in_float32(backend) -> None:
    """reconstruction_loss == threshold passes `le` even when given as float64."""
    edge = T.EDGE_MATRIX[L.TRAINING][L.GRAFTING]
    threshold = FAST.param(T.PARAM_NAMES[T.GUARD_CLAUSES[T.EDGE_GUARD[edge]][0][4]])
    st = ExtendedStateTensor(2)
    bring(st, 0, L.TRAINING)
    bring(st, 1, L.TRAINING)
    ctx = torch.full((2, len(T.CONTEXT_FIELDS)), math.nan, dtype=torch.float64)
    ctx[:, T.CONTEXT_FIELDS.index("reconstruction_loss")] = torch.tensor(
        [threshold, float(np.nextafter(np.float32(threshold), np.float32(1)))], dtype=torch.float64
    )
    codes = st.apply_transitions([0, 1], [L.TRAINING] * 2, [L.GRAFTING] * 2, ctx, policy=FAST)
    assert codes.tolist() == [Reason.OK, Reason.GUARD_FAILED]


def test_error_count_builtin_culls(backend) -> None:
    st = ExtendedStateTensor(2)
    bring(st, 0, L.EVALUATING)
    bring(st, 1, L.EVALUATING)
    limit = int(FAST.param("cull_error_count"))
    st.increment_error_count([0] * (limit + 1) + [1] * limit)
    assert st.get_state([0, 1])[:, StateColumn.ERROR_COUNT].tolist() == [limit + 1, limit]
    codes = st.apply_transitions([0, 1], [L.EVALUATING] * 2, [L.CULLED] * 2, policy=FAST)
    assert codes.tolist() == [Reason.OK, Reason.GUARD_FAILED]


def test_policy_params_change_guards(backend) -> None:
    st = ExtendedStateTensor(2)
    bring(st, 0, L.TRAINING)
    bring(st, 1, L.TRAINING)
    strict = FAST.with_overrides(params={"reconstruction_threshold": 0.001})
    ctx = {"reconstruction_loss": 0.005}
    assert st.apply_transitions([0], [L.TRAINING], [L.GRAFTING], ctx, policy=strict).tolist() == [Reason.GUARD_FAILED]
    assert st.apply_transitions([1], [L.TRAINING], [L.GRAFTING], ctx, policy=FAST).tolist() == [Reason.OK]


# ---- minimum epochs, bypass, embargo ------------------------------------------------------


def test_min_epochs_and_bypass(backend) -> None:
    policy = FAST.with_overrides(min_epochs={"TRAINING": 3})
    st = ExtendedStateTensor(3)
    for seed in range(3):
        bring(st, seed, L.TRAINING)
    st.step_epoch()
    st.step_epoch()
    # Culling does not bypass the minimum; cancellation does.
    assert st.apply_transitions([0], [L.TRAINING], [L.CULLED], policy=policy).tolist() == [Reason.MIN_EPOCHS]
    assert T.EDGE_BYPASS_MIN_EPOCHS[T.EDGE_MATRIX[L.TRAINING][L.CANCELLED]]
    assert st.apply_transitions([1], [L.TRAINING], [L.CANCELLED], policy=policy).tolist() == [Reason.OK]
    st.step_epoch()
    assert st.apply_transitions([0], [L.TRAINING], [L.CULLED], policy=policy).tolist() == [Reason.OK]
    # Minimum checked before the guard: a too-early guarded move reports MIN_EPOCHS.
    assert st.apply_transitions(
        [2], [L.TRAINING], [L.GRAFTING], {"reconstruction_loss": 0.0}, policy=policy.with_overrides(min_epochs={"TRAINING": 10})
    ).tolist() == [Reason.MIN_EPOCHS]


def test_default_policy_minimums_come_from_the_spec(backend) -> None:
    st = ExtendedStateTensor(1)
    bring(st, 0, L.TRAINING)
    minimum = T.STATE_MIN_EPOCHS[L.TRAINING]
    for _ in range(minimum - 1):
        st.step_epoch()
    assert st.apply_transitions([0], [L.TRAINING], [L.CULLED]).tolist() == [Reason.MIN_EPOCHS]
    st.step_epoch()
    assert st.apply_transitions([0], [L.TRAINING], [L.CULLED]).tolist() == [Reason.OK]


@pytest.mark.parametrize("retired", [L.CULLED, L.CANCELLED, L.ROLLED_BACK], ids=lambda s: s.name)
def test_recycle_embargo(backend, retired: L) -> None:
    embargo = T.STATE_MIN_EPOCHS[retired]
    st = ExtendedStateTensor(1)
    bring(st, 0, retired)
    for _ in range(embargo):
        assert st.apply_transitions([0], [retired], [L.DORMANT]).tolist() == [Reason.MIN_EPOCHS]
        st.step_epoch()
    assert st.apply_transitions([0], [retired], [L.DORMANT]).tolist() == [Reason.OK]
    assert st.lifecycle_state(0) == L.DORMANT
    assert st.get_state(0)[StateColumn.PARENT_STATE] == retired


def test_step_epoch_saturates(backend) -> None:
    st = ExtendedStateTensor(2)
    st.state[0, StateColumn.EPOCHS_IN_STATE] = torch.iinfo(torch.int32).max - 1
    for _ in range(3):
        st.step_epoch()
    assert st.get_state([0, 1])[:, StateColumn.EPOCHS_IN_STATE].tolist() == [torch.iinfo(torch.int32).max, 3]


# ---- stale, unknown, duplicates -----------------------------------------------------------


def test_stale_from_state_and_unknown_seed(backend) -> None:
    st = ExtendedStateTensor(2)
    before = snapshot(st)
    codes = st.apply_transitions([0, 1, 2, -1], [L.GERMINATED, -3, L.DORMANT, L.DORMANT], [L.TRAINING] * 4, policy=FAST)
    assert codes.tolist() == [Reason.STALE_FROM_STATE, Reason.STALE_FROM_STATE, Reason.UNKNOWN_SEED, Reason.UNKNOWN_SEED]
    assert_unchanged(st, before)


def test_duplicates_in_batch_are_all_rejected(backend) -> None:
    st = ExtendedStateTensor(4)
    codes = st.apply_transitions(
        [1, 0, 1, 9, 9, 2, 1],
        [L.DORMANT] * 7,
        [L.GERMINATED, L.GERMINATED, L.GERMINATED, L.GERMINATED, L.GERMINATED, L.FOSSILIZED, L.GERMINATED],
    )
    dup, ok = Reason.DUPLICATE_IN_BATCH, Reason.OK
    # Out-of-range duplicates are UNKNOWN_SEED (range first); a duplicate wins over every other check.
    assert codes.tolist() == [dup, ok, dup, Reason.UNKNOWN_SEED, Reason.UNKNOWN_SEED, Reason.INVALID_EDGE, dup]
    assert st.get_state()[:, StateColumn.LIFECYCLE_STATE].tolist() == [L.GERMINATED, L.DORMANT, L.DORMANT, L.DORMANT]
    # An exact pair, and a pair where one request would fail anyway: both refused as duplicates.
    pair = st.apply_transitions([3, 3, 2, 2], [L.DORMANT, L.DORMANT, L.DORMANT, L.TRAINING], [L.GERMINATED] * 4)
    assert pair.tolist() == [dup] * 4
    assert st.get_state()[:, StateColumn.LIFECYCLE_STATE].tolist() == [L.GERMINATED, L.DORMANT, L.DORMANT, L.DORMANT]
    assert st.get_transition_history(1) == []


def test_batch_is_judged_against_the_state_before_it(backend) -> None:
    """Each seed appears once; chained moves in one batch are impossible by construction."""
    st = ExtendedStateTensor(3)
    codes = st.apply_transitions([2, 0, 1], [L.DORMANT, L.DORMANT, L.GERMINATED], [L.GERMINATED] * 2 + [L.TRAINING])
    assert codes.tolist() == [Reason.OK, Reason.OK, Reason.STALE_FROM_STATE]


def test_mixed_index_dtypes(backend) -> None:
    st = ExtendedStateTensor(3)
    codes = st.apply_transitions(
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([L.DORMANT] * 2, dtype=torch.int32),
        torch.tensor([L.GERMINATED, L.TRAINING], dtype=torch.int64),
    )
    assert codes.tolist() == [Reason.OK, Reason.INVALID_EDGE]


def test_empty_batch(backend) -> None:
    st = ExtendedStateTensor(2)
    codes = st.apply_transitions(torch.empty(0, dtype=torch.int64), [], [])
    assert codes.shape == (0,) and codes.dtype == torch.int32


# ---- history ------------------------------------------------------------------------------


def test_history_wraps_oldest_first(backend) -> None:
    st = ExtendedStateTensor(2)
    cycle = [(L.DORMANT, L.GERMINATED), (L.GERMINATED, L.CANCELLED), (L.CANCELLED, L.DORMANT)]
    expected = []
    for i in range(3 * T.HISTORY_LENGTH + 2):
        src, dst = cycle[i % 3]
        assert st.apply_transitions([1], [src], [dst], policy=FAST).tolist() == [Reason.OK]
        expected.append((int(src), int(dst)))
        assert st.get_transition_history(1) == expected[-T.HISTORY_LENGTH :]
    assert int(st.history_count[1]) == 3 * T.HISTORY_LENGTH + 2
    assert st.get_transition_history(0) == []


def test_history_count_never_overflows(backend) -> None:
    st = ExtendedStateTensor(1)
    top = torch.iinfo(torch.int32).max
    st.history_count[0] = top
    assert st.apply_transitions([0], [L.DORMANT], [L.GERMINATED]).tolist() == [Reason.OK]
    after = int(st.history_count[0])
    assert after == top - (T.HISTORY_LENGTH - 1) and after % T.HISTORY_LENGTH == (top + 1) % T.HISTORY_LENGTH
    assert st.get_transition_history(0)[-1] == (L.DORMANT, L.GERMINATED)


# ---- device and persistence -----------------------------------------------------------------


def _busy(st: ExtendedStateTensor) -> None:
    bring(st, 0, L.FINE_TUNING)
    bring(st, 1, L.ROLLED_BACK)
    st.step_epoch()
    st.update_performance([0, 2], loss=[0.5, 0.25], accuracy=0.9, evaluation_score=0.731)
    st.update_blueprint([0, 1], [3, 4], strategies=["momentum", "stability"])
    st.increment_error_count([1, 1])
    st.set_checkpoint([0], [12345])


def test_to_and_dtype_casts_keep_every_value() -> None:
    st = ExtendedStateTensor(4)
    _busy(st)
    before = snapshot(st)
    assert st.to(torch.device("cpu")) is st
    assert_unchanged(st, before)
    owner = torch.nn.Sequential(torch.nn.Linear(2, 2))
    owner.lifecycle = st
    owner.half()  # a host cast must not round the lifecycle metrics
    assert owner[0].weight.dtype == torch.float16
    assert st.metrics.dtype == torch.float32 and st.state.dtype == torch.int32
    assert_unchanged(st, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_to_cuda_and_back_keeps_every_value() -> None:
    st = ExtendedStateTensor(4)
    _busy(st)
    before = snapshot(st)
    st.to("cuda")
    assert st.device.type == "cuda" and st.lifecycle_state(0) == L.FINE_TUNING
    st.to("cpu")
    assert_unchanged(st, before)


def test_state_dict_round_trip_and_owner_module() -> None:
    st = ExtendedStateTensor(4)
    _busy(st)
    owner = torch.nn.Module()
    owner.lifecycle = st
    saved = owner.state_dict()
    assert {"lifecycle.state", "lifecycle.history", "lifecycle.history_count", "lifecycle.metrics"} <= set(saved)
    fresh_owner = torch.nn.Module()
    fresh_owner.lifecycle = ExtendedStateTensor(4)
    fresh_owner.load_state_dict(saved)
    assert_unchanged(fresh_owner.lifecycle, {k.split(".", 1)[1]: v for k, v in saved.items()})
    assert fresh_owner.lifecycle.get_transition_history(0) == st.get_transition_history(0)
    assert fresh_owner.lifecycle.lifecycle_state(1) == L.ROLLED_BACK


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda sd: sd["state"].__setitem__((0, StateColumn.LIFECYCLE_STATE), T.NUM_STATES),
            f"seed 0's LIFECYCLE_STATE {T.NUM_STATES} ",
        ),
        (lambda sd: sd["state"].__setitem__((1, StateColumn.PARENT_STATE), -1), "seed 1's PARENT_STATE -1 "),
        (lambda sd: sd["state"].__setitem__((1, StateColumn.EPOCHS_IN_STATE), -5), "seed 1's EPOCHS_IN_STATE is -5"),
        (lambda sd: sd["state"].__setitem__((3, StateColumn.ERROR_COUNT), -1), "seed 3's ERROR_COUNT is -1"),
        (lambda sd: sd["history_count"].__setitem__(2, -1), "history_count of seed 2 is -1; it must be >= 0"),
        (lambda sd: sd["history"].__setitem__((0, 0, 1), 99), "history of seed 0 holds 99"),
        (lambda sd: sd["history"].__setitem__((3, 1, 0), -1), "history of seed 3 holds -1"),
        (lambda sd: sd.__setitem__("state", sd["state"].float()), "state: expected torch.int32"),
        (lambda sd: sd.__setitem__("history", sd["history"][:2]), f"history: expected torch.int32 (4, {T.HISTORY_LENGTH}, 2)"),
    ],
)
def test_load_state_dict_rejects_bad_content_and_changes_nothing(corrupt, message: str) -> None:
    source = ExtendedStateTensor(4)
    _busy(source)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    corrupt(sd)
    target = ExtendedStateTensor(4)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        target.load_state_dict(sd)
    assert_unchanged(target, before)


# ---- other updates ----------------------------------------------------------------------------


def test_updates() -> None:
    st = ExtendedStateTensor(3)
    _busy(st)
    assert st.metrics[0, MetricColumn.LOSS].item() == 0.5 and st.metrics[2, MetricColumn.LOSS].item() == 0.25
    assert st.metrics[0, MetricColumn.ACCURACY].item() == pytest.approx(0.9)
    assert math.isnan(st.metrics[1, MetricColumn.LOSS].item())
    assert st.get_state(0)[StateColumn.EVALUATION_SCORE] == 731
    assert st.get_state(1)[StateColumn.ERROR_COUNT] == 2
    assert st.get_state(0)[StateColumn.BLUEPRINT_ID] == 3
    assert st.get_state(1)[StateColumn.GRAFTING_STRATEGY] == T.GRAFTING_STRATEGY_NAMES.index("stability")
    assert st.get_state(0)[StateColumn.CHECKPOINT_ID] == 12345
    assert st.get_seeds_in_state("FINE_TUNING").tolist() == [0]
    assert st.get_seeds_in_state(L.DORMANT).tolist() == [2]


def test_error_count_saturates() -> None:
    st = ExtendedStateTensor(1)
    st.state[0, StateColumn.ERROR_COUNT] = torch.iinfo(torch.int32).max
    st.increment_error_count([0, 0])
    assert st.get_state(0)[StateColumn.ERROR_COUNT] == torch.iinfo(torch.int32).max


# ---- bad input ----------------------------------------------------------------------------------

BAD_BATCHES = [
    (dict(seed_ids=[0.5], from_states=[0], to_states=[1]), TypeError, "seed_ids must hold integers"),
    (dict(seed_ids=[[0]], from_states=[0], to_states=[1]), ValueError, "seed_ids must be 1-D"),
    (dict(seed_ids=[0, 1], from_states=[0, 0, 0], to_states=[1, 1]), ValueError, "from_states has 3 entries"),
    (dict(seed_ids=[0], from_states=[0], to_states=["NOPE"]), ValueError, "unknown lifecycle state 'NOPE'"),
    (dict(seed_ids=[0], from_states=[0.0], to_states=[1]), TypeError, "from_states must hold state ids"),
    (dict(seed_ids=[0], from_states=[0], to_states=[1], context={"bogus": [1.0]}), ValueError, "unknown context field"),
    (
        dict(seed_ids=[0], from_states=[0], to_states=[1], context={"reconstruction_loss": [1.0, 2.0]}),
        ValueError,
        "2 values for 1 seeds",
    ),
    (dict(seed_ids=[0], from_states=[0], to_states=[1], context=torch.zeros(1, 2)), ValueError, "shape"),
    (
        dict(seed_ids=[0], from_states=[0], to_states=[1], context=torch.zeros(1, len(T.CONTEXT_FIELDS), dtype=torch.int32)),
        TypeError,
        "floating point",
    ),
    (dict(seed_ids=torch.tensor([0], device="meta"), from_states=[0], to_states=[1]), ValueError, "is on meta"),
    (dict(seed_ids=[0], from_states=[0], to_states=[1], context="loss"), TypeError, "context must be"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_BATCHES)
def test_bad_batches_raise_and_change_nothing(backend, kwargs, error, match) -> None:
    st = ExtendedStateTensor(2)
    before = snapshot(st)
    with pytest.raises(error, match=match):
        st.apply_transitions(**kwargs)
    assert_unchanged(st, before)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda st: st.update_performance([0], loss=[1.0, 2.0]), ValueError, "2 values for 1 seeds"),
        (lambda st: st.update_performance([0], bogus=1.0), ValueError, "unknown metric"),
        (lambda st: st.update_performance([0], evaluation_score=math.inf), ValueError, "finite"),
        (lambda st: st.update_performance([0, 0], loss=1.0), ValueError, "repeat"),
        (lambda st: st.update_performance([5], loss=1.0), IndexError, "seed 5 does not exist"),
        (lambda st: st.update_blueprint([0], [-2]), ValueError, "blueprint_ids must be in -1"),
        (lambda st: st.update_blueprint([0], [1], strategies=["nope"]), ValueError, "unknown grafting strategy"),
        (lambda st: st.update_blueprint([0], [1], strategies=[99]), ValueError, "strategies must be in 0"),
        (lambda st: st.set_checkpoint([0], [2**31]), ValueError, "checkpoint_ids must be in -1"),
        (lambda st: st.increment_error_count([-1]), IndexError, "seed -1 does not exist"),
        (lambda st: st.get_state(7), IndexError, "seed 7 does not exist"),
        (lambda st: st.lifecycle_state(2), IndexError, "seed 2 does not exist"),
        (lambda st: st.get_transition_history(-1), IndexError, "seed -1 does not exist"),
        (lambda st: st.get_seeds_in_state("ALIVE"), ValueError, "unknown lifecycle state 'ALIVE'"),
    ],
)
def test_bad_updates_raise_and_change_nothing(call, error, match) -> None:
    st = ExtendedStateTensor(2)
    before = snapshot(st)
    with pytest.raises(error, match=match):
        call(st)
    assert_unchanged(st, before)
